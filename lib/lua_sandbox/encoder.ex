defprotocol LuaSandbox.Encoder do
  @moduledoc """
  Turns Elixir data the sandbox cannot carry (structs) into data it can, before it crosses into
  Lua: globals, `call:` arguments and tool results all go through it.

  Built in: `Date`, `Time`, `NaiveDateTime` and `DateTime` become ISO 8601 strings, `URI` its
  string. Plain maps, lists, binaries, numbers and atoms pass unchanged; tuples become lists
  (`{:ok, 1}` is `{"ok", 1}` in Lua). Pids, references, ports, functions and structs without
  an implementation are `:invalid_input`, with the path in the message.

      iex> LuaSandbox.run!("return d", globals: %{d: ~D[2026-12-01]}).value
      "2026-12-01"

  For your own structs, derive it (like `Jason.Encoder`), optionally naming the fields:

      defmodule User do
        @derive {LuaSandbox.Encoder, only: [:name, :email]}
        defstruct [:name, :email, :password_hash]
      end

  or implement `encode/1`, returning any term (itself encoded in turn):

      defimpl LuaSandbox.Encoder, for: Money do
        def encode(%Money{amount: a, currency: c}), do: %{amount: a, currency: c}
      end
  """

  @fallback_to_any true

  @doc "Returns a term made of maps, lists, binaries, numbers, atoms (and encodable structs)."
  @spec encode(t) :: term
  def encode(value)
end

defimpl LuaSandbox.Encoder, for: Any do
  defmacro __deriving__(module, struct, opts) do
    fields = Map.keys(struct) -- [:__struct__]
    only = Keyword.get(opts, :only, fields)
    except = Keyword.get(opts, :except, [])

    unknown = Enum.uniq(only ++ except) -- fields

    if unknown != [] do
      raise ArgumentError,
            "@derive LuaSandbox.Encoder for #{inspect(module)}: unknown fields #{inspect(unknown)}"
    end

    keep = only -- except

    quote do
      defimpl LuaSandbox.Encoder, for: unquote(module) do
        def encode(struct), do: Map.take(struct, unquote(keep))
      end
    end
  end

  # No implementation: left as it is, so the NIF names the path in its :invalid_input error.
  def encode(value), do: value
end

defimpl LuaSandbox.Encoder, for: Date do
  def encode(value), do: Date.to_iso8601(value)
end

defimpl LuaSandbox.Encoder, for: Time do
  def encode(value), do: Time.to_iso8601(value)
end

defimpl LuaSandbox.Encoder, for: NaiveDateTime do
  def encode(value), do: NaiveDateTime.to_iso8601(value)
end

defimpl LuaSandbox.Encoder, for: DateTime do
  def encode(value), do: DateTime.to_iso8601(value)
end

defimpl LuaSandbox.Encoder, for: URI do
  def encode(value), do: URI.to_string(value)
end

defmodule LuaSandbox.Encoding do
  @moduledoc false
  # Applies LuaSandbox.Encoder to a term before the NIF sees it. A first pass that allocates
  # nothing checks whether anything needs encoding, so plain data (the common case) crosses
  # as it is, without being copied.

  @doc "The term with every struct encoded and every tuple turned into a list."
  def encode(term) do
    if plain?(term), do: term, else: walk(term)
  end

  @doc "Every value of a `{name, value}` list."
  def encode_pairs(pairs), do: Enum.map(pairs, fn {k, v} -> {k, encode(v)} end)

  defp plain?(t) when is_binary(t) or is_number(t) or is_atom(t), do: true
  defp plain?([]), do: true
  defp plain?([h | t]), do: plain?(h) and plain?(t)
  defp plain?(%{__struct__: _}), do: false
  defp plain?(m) when is_map(m), do: plain_map?(:maps.iterator(m))
  # pids, refs, funs, improper lists: the NIF reports them with their path
  defp plain?(t) when is_tuple(t), do: false
  defp plain?(_), do: true

  defp plain_map?(it) do
    case :maps.next(it) do
      :none -> true
      {k, v, next} -> plain?(k) and plain?(v) and plain_map?(next)
    end
  end

  # Depth is bounded by the NIF's max_depth later; an encoder that returns its own input
  # stops here instead of looping.
  defp walk(%{__struct__: _} = s) do
    case LuaSandbox.Encoder.encode(s) do
      ^s -> s
      other -> walk(other)
    end
  end

  defp walk(m) when is_map(m), do: Map.new(m, fn {k, v} -> {walk(k), walk(v)} end)
  defp walk(t) when is_tuple(t), do: t |> Tuple.to_list() |> walk()
  defp walk([h | t]), do: [walk(h) | walk_tail(t)]
  defp walk(other), do: other

  defp walk_tail([h | t]), do: [walk(h) | walk_tail(t)]
  defp walk_tail(other), do: other
end
