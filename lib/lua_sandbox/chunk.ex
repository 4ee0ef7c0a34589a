defmodule LuaSandbox.Chunk do
  @moduledoc """
  Lua source parsed once by `LuaSandbox.compile/2`.

  The bytecode lives inside an opaque NIF resource: it never travels as a binary a caller
  could forge, and each `LuaSandbox.run/2` of a chunk still gets a fresh state.
  """

  @enforce_keys [:ref, :name]
  defstruct [:ref, :name]

  @type t :: %__MODULE__{ref: reference, name: String.t()}

  @doc """
  True for a chunk whose fields have the types `LuaSandbox.compile/2` gives them (a reference and
  a name). A struct built by hand with other fields is refused before it reaches the NIF; a
  reference that is not a compiled chunk is refused by the NIF (`ArgumentError`).
  """
  @spec valid?(term) :: boolean
  def valid?(%__MODULE__{ref: ref, name: name}), do: is_reference(ref) and is_binary(name)
  def valid?(_), do: false

  @doc "Raises `ArgumentError` unless `chunk` is `valid?/1`."
  @spec check!(term) :: :ok
  def check!(chunk) do
    if valid?(chunk),
      do: :ok,
      else:
        raise(
          ArgumentError,
          "not a chunk from LuaSandbox.compile/2: #{inspect(chunk, structs: false)}"
        )
  end

  defimpl Inspect do
    def inspect(%{name: name}, _opts), do: "#LuaSandbox.Chunk<#{name}>"
  end
end
