defmodule LuaSandbox.Generators do
  @moduledoc false
  # PropEr generators (PropEr comes from Debian's erlang-proper; no Hex).

  import :proper_types,
    only: [
      oneof: 1,
      integer: 2,
      float: 2,
      binary: 0,
      bool: 0,
      list: 1,
      tuple: 1,
      sized: 1,
      resize: 2,
      exactly: 1,
      elements: 1
    ]

  @int64 {-0x8000000000000000, 0x7FFFFFFFFFFFFFFF}

  def leaf do
    {lo, hi} = @int64

    oneof([
      exactly(nil),
      bool(),
      integer(lo, hi),
      integer(-1000, 1000),
      float(-1.0e12, 1.0e12),
      binary(),
      elements([:a, :b, :hello, :ok])
    ])
  end

  def key do
    oneof([binary(), integer(-3, 8), elements([:a, :b, :c]), bool(), float(-10.0, 10.0)])
  end

  @doc "Terms of the subset that can cross into Lua."
  def term do
    sized(fn size -> term(min(size, 40)) end)
  end

  defp term(size) when size < 4, do: leaf()

  defp term(size) do
    # Each level gets a quarter of the size, for lists' lengths and for what they hold.
    inner = :proper_types.lazy(fn -> term(div(size, 4)) end)

    oneof([
      leaf(),
      resize(div(size, 4), list(inner)),
      :proper_types.bind(
        resize(div(size, 4), list(tuple([key(), inner]))),
        fn kvs -> exactly(Map.new(kvs)) end,
        false
      )
    ])
  end

  @doc "What a supported term looks like after Elixir -> Lua -> Elixir."
  def normalize(nil), do: nil
  def normalize(b) when is_boolean(b), do: b
  def normalize(a) when is_atom(a), do: Atom.to_string(a)
  def normalize(x) when is_number(x) or is_binary(x), do: x

  def normalize(list) when is_list(list) do
    list |> Enum.with_index(1) |> Enum.map(fn {v, i} -> {i, v} end) |> table()
  end

  def normalize(map) when is_map(map), do: map |> Enum.to_list() |> table()

  defp table(pairs) do
    entries =
      for {k, v} <- pairs, v != nil, into: %{} do
        {normalize_key(k), normalize(v)}
      end

    n = map_size(entries)

    if n > 0 and Enum.all?(Map.keys(entries), &(is_integer(&1) and &1 >= 1 and &1 <= n)) do
      for i <- 1..n, do: entries[i]
    else
      entries
    end
  end

  @doc "A Lua table constructor's fields in order: later ones win, keys normalised."
  def constructor(pairs) do
    pairs
    |> Enum.reduce(%{}, fn {k, v}, acc -> Map.put(acc, normalize_key(k), v) end)
    |> normalize()
  end

  defp normalize_key(k) when is_boolean(k), do: k
  defp normalize_key(k) when is_atom(k), do: Atom.to_string(k)

  defp normalize_key(k) when is_float(k) do
    if k == Float.round(k) and abs(k) < 9.0e18, do: trunc(k), else: k
  end

  defp normalize_key(k), do: k

  @doc "Whether two keys of a map collide once they are Lua keys."
  def collides?(map) when is_map(map) do
    keys = Map.keys(map) |> Enum.map(&normalize_key/1)
    length(keys) != length(Enum.uniq(keys)) or Enum.any?(Map.values(map), &collides?/1)
  end

  def collides?(list) when is_list(list), do: Enum.any?(list, &collides?/1)
  def collides?(_), do: false

  @doc """
  Runs a PropEr property `n` times quietly; returns `true` or `{:counterexample, term}` so
  a failing ExUnit assertion shows the shrunk input.
  """
  def check(prop, n) do
    case :proper.quickcheck(prop, [{:numtests, n}, :quiet, {:max_shrinks, 200}]) do
      true -> true
      _ -> {:counterexample, :proper.counterexample()}
    end
  end

  @doc "Number of property cases: LUA_PROPERTY_CASES, or `default`."
  def cases(default) do
    case System.get_env("LUA_PROPERTY_CASES") do
      nil -> default
      n -> String.to_integer(n)
    end
  end
end
