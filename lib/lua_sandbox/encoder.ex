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
  # Applies LuaSandbox.Encoder to host data before the NIF sees it (globals, `call:` arguments,
  # session values, tool results). A first pass that allocates nothing checks whether anything
  # needs encoding, so plain data (the common case) crosses as it is, without being copied.
  #
  # Cost: Elixir cannot see sharing, so a walk visits a term as the tree it stands for, and a
  # term of n cells can stand for 2^n values (`[a, a]` nested n times). Every walk is metered
  # against the run's own limits instead (`bound/3`): each list element and map entry becomes
  # at least 16 bytes of Lua heap (a table slot: marshal.rs `Builder::reserve`) and costs at
  # least one instruction when the NIF builds it (its `Meter`), so a term with more of them
  # than max_memory / 16 or max_instructions can never go in. The walk stops there with the
  # error the NIF would give, after work bounded by the limits rather than by the term's
  # expansion; it also checks the deadline every 4096 values.

  import Bitwise

  alias LuaSandbox.Error

  @slot_bytes 16
  @deadline_every 4096

  @typedoc "Values a walk may visit, the limit that bounds them, and the deadline (or nil)."
  @type bound :: {non_neg_integer, :memory_limit | :instruction_limit, integer | nil}

  @doc "The bound for data entering a heap of `max_memory` bytes (`max_instructions`: nil for none)."
  def bound(max_memory, max_instructions, deadline) do
    by_memory = div(max_memory, @slot_bytes)

    if is_integer(max_instructions) and max_instructions < by_memory,
      do: {max_instructions, :instruction_limit, deadline},
      else: {by_memory, :memory_limit, deadline}
  end

  @doc "The bound of a run from its normalized options (`LuaSandbox.Options`)."
  def bound(opts), do: bound(opts[:max_memory], opts[:max_instructions], opts[:deadline])

  @doc """
  Every term of `terms` with every struct encoded and every tuple turned into a list, or the
  kind of the limit the terms together cannot fit (`:memory_limit`, `:instruction_limit`,
  `:timeout`).
  """
  @spec encode_all([term], bound) :: {:ok, [term]} | {:error, atom}
  def encode_all(terms, {left, _kind, _deadline} = bound) do
    _ = Enum.reduce(terms, left, &plain(&1, &2, bound))
    {:ok, terms}
  catch
    :walk -> walk_all(terms, bound)
    {__MODULE__, kind} -> {:error, kind}
  end

  defp walk_all(terms, {left, _kind, _deadline} = bound) do
    {terms, _left} = walk_list(terms, [], left + length(terms), bound)
    {:ok, terms}
  catch
    {__MODULE__, kind} -> {:error, kind}
  end

  @doc "`encode_all/2` of one term."
  def encode(term, bound) do
    with {:ok, [term]} <- encode_all([term], bound), do: {:ok, term}
  end

  @doc "`encode_all/2` of the values of a `{name, value}` list."
  def encode_pairs(pairs, bound) do
    with {:ok, values} <- encode_all(Enum.map(pairs, &elem(&1, 1)), bound),
         do: {:ok, Enum.zip_with(pairs, values, fn {k, _}, v -> {k, v} end)}
  end

  @doc "The run's error for `what` (\"globals\", ...) refused by `encode_all/2` with `kind`."
  def error(:timeout, _what, _bound, timeout), do: Error.timeout("run", timeout)

  def error(kind, what, {left, kind, _deadline}, _timeout) do
    limit =
      case kind do
        :memory_limit ->
          "max_memory (#{left * @slot_bytes} bytes; at least #{@slot_bytes} per value)"

        :instruction_limit ->
          "max_instructions (#{left}; at least one per value)"
      end

    Error.new(kind, "#{what} hold more values than #{limit} allows", stats: Error.empty_stats())
  end

  @doc """
  True when `term` has at most `max` values (list elements, tuple elements, map entries),
  counted as a tree, as the external term format stores it; the work is bounded by `max`.
  """
  def values_within?(term, max) do
    _ = count(term, max)
    true
  catch
    {__MODULE__, :over} -> false
  end

  # Each counted value takes at least one byte of the external format.
  defp count([h | t], n), do: count(t, count(h, less(n)))
  defp count(t, n) when is_tuple(t), do: t |> Tuple.to_list() |> count(n)

  defp count(m, n) when is_map(m),
    do: :maps.fold(fn k, v, n -> count(v, count(k, less(less(n)))) end, n, m)

  defp count(_, n), do: n

  defp less(0), do: throw({__MODULE__, :over})
  defp less(n), do: n - 1

  # One more value: the budget left, or a throw when it ran out or the deadline passed.
  defp tick(0, {_left, kind, _deadline}), do: throw({__MODULE__, kind})

  defp tick(n, {_left, _kind, deadline})
       when band(n, @deadline_every - 1) == 0 and deadline != nil do
    if System.monotonic_time(:millisecond) > deadline, do: throw({__MODULE__, :timeout})
    n - 1
  end

  defp tick(n, _bound), do: n - 1

  # The budget left after checking `t`, or a throw of :walk when something needs encoding.
  defp plain(t, n, _b) when is_binary(t) or is_number(t) or is_atom(t), do: n
  defp plain([], n, _b), do: n
  defp plain([h | t], n, b), do: plain(t, plain(h, tick(n, b), b), b)
  defp plain(%{__struct__: _}, _n, _b), do: throw(:walk)
  defp plain(m, n, b) when is_map(m), do: plain_map(:maps.next(:maps.iterator(m)), n, b)
  defp plain(t, _n, _b) when is_tuple(t), do: throw(:walk)
  # pids, refs, funs: the NIF reports them with their path
  defp plain(_, n, _b), do: n

  defp plain_map(:none, n, _b), do: n

  defp plain_map({k, v, it}, n, b),
    do: plain_map(:maps.next(it), plain(v, plain(k, tick(n, b), b), b), b)

  # `{encoded, budget left}`. An encoder that returns its own input stops here instead of
  # looping; one that nests its input in what it returns stops at the budget.
  defp walk(%{__struct__: _} = s, n, b) do
    case LuaSandbox.Encoder.encode(s) do
      ^s -> {s, n}
      other -> walk(other, n, b)
    end
  end

  defp walk(m, n, b) when is_map(m) do
    {pairs, n} = walk_map(:maps.next(:maps.iterator(m)), [], n, b)
    {:maps.from_list(pairs), n}
  end

  defp walk(t, n, b) when is_tuple(t), do: t |> Tuple.to_list() |> walk(n, b)
  defp walk([_ | _] = l, n, b), do: walk_list(l, [], n, b)
  defp walk(other, n, _b), do: {other, n}

  # An improper tail is kept as it is: the NIF reports it with its path.
  defp walk_list([h | t], acc, n, b) do
    {h, n} = walk(h, tick(n, b), b)
    walk_list(t, [h | acc], n, b)
  end

  defp walk_list(tail, acc, n, _b), do: {:lists.reverse(acc, tail), n}

  defp walk_map(:none, acc, n, _b), do: {acc, n}

  defp walk_map({k, v, it}, acc, n, b) do
    {k, n} = walk(k, tick(n, b), b)
    {v, n} = walk(v, n, b)
    walk_map(:maps.next(it), [{k, v} | acc], n, b)
  end
end
