defmodule LuaSandbox.Chunk do
  @moduledoc """
  Lua source parsed once by `LuaSandbox.compile/2`.

  The bytecode lives inside an opaque NIF resource: it never travels as a binary a caller
  could forge, and each `LuaSandbox.run/2` of a chunk still gets a fresh state.
  """

  @enforce_keys [:ref, :name]
  defstruct [:ref, :name]

  @type t :: %__MODULE__{ref: reference, name: String.t()}

  defimpl Inspect do
    def inspect(%{name: name}, _opts), do: "#LuaSandbox.Chunk<#{name}>"
  end
end
