defmodule LuaSandbox.Adversarial.Case do
  @moduledoc false
  # Shared helpers for test/adversarial: every hostile script runs with small limits and
  # under a kill (`timeout:`), so a regression that hangs shows up as `:timeout` (a wrong
  # kind) instead of hanging CI; every assertion also checks a wall-clock bound and that a
  # normal script still runs afterwards.
  #
  # Under both isolations (issue 18): a file wraps its module in
  # `for isolation <- LuaSandbox.Isolation.all()` and passes `isolation: isolation` to
  # `use LuaSandbox.Adversarial.Case`; every helper here, and `lua_run/2`, then runs on that
  # isolation's supervisor (LuaSandbox.Isolation), the test process remembering which
  # (`isolated/1`; a task started by the test asks `isolation/0` of its caller).

  use ExUnit.CaseTemplate

  import ExUnit.Assertions

  alias LuaSandbox.Error

  using opts do
    isolation = Keyword.get(opts, :isolation, :nif)

    quote do
      import LuaSandbox.Adversarial.Case
      alias LuaSandbox.Error

      @moduletag :adversarial
      @moduletag timeout: 120_000
      # evaluated in the module's body, where the file's `isolation` is bound
      @lua_isolation unquote(isolation)
      @moduletag isolation: @lua_isolation

      setup do
        Process.put(LuaSandbox.Adversarial.Case, @lua_isolation)
        :ok
      end
    end
  end

  @doc "The isolation the calling test (or the test that started this task) runs under."
  def isolation do
    Enum.find_value([self() | Process.get(:"$callers", [])], :nif, fn pid ->
      if pid == self(),
        do: Process.get(__MODULE__),
        else: with({:dictionary, d} <- Process.info(pid, :dictionary), do: d[__MODULE__])
    end)
  end

  @doc "`opts` with the supervisor of the test's isolation (unless they name one)."
  def isolated(opts), do: LuaSandbox.Isolation.opts(isolation(), opts)

  @doc "`LuaSandbox.run/2` on the test's isolation."
  def lua_run(src, opts \\ []), do: LuaSandbox.run(src, isolated(opts))

  @mib 1024 * 1024

  @limits [max_instructions: 2_000_000, max_memory: 8 * @mib, max_output: 64 * 1024]

  # Wall-clock bound for one hostile run (the kill comes at `@kill_ms`).
  @bound_us 5_000_000
  @kill_ms 10_000

  @doc "The small default limits hostile scripts run with."
  def limits, do: @limits

  @doc "Runs `src` with the small limits (overridable) under a kill; `{microseconds, result}`."
  def hostile(src, opts \\ []) do
    opts = Keyword.merge(@limits ++ [timeout: @kill_ms], opts)
    :timer.tc(fn -> lua_run(src, opts) end)
  end

  @doc """
  Asserts `src` fails with one of `kinds` within the bound, then that the sandbox still works.
  Options: the run's options, plus `bound_us:` and `message:` (a regex the message must match).
  Returns the `%LuaSandbox.Error{}`.
  """
  def assert_error(src, kinds, opts \\ []) do
    {bound, opts} = Keyword.pop(opts, :bound_us, @bound_us)
    {pattern, opts} = Keyword.pop(opts, :message)
    kinds = List.wrap(kinds)
    {us, result} = hostile(src, opts)

    error =
      case result do
        {:error, %Error{kind: kind} = e} ->
          assert kind in kinds,
                 "expected kind in #{inspect(kinds)}, got #{inspect(kind)}: " <>
                   String.slice(e.message, 0, 300) <> "\n  after #{div(us, 1000)} ms"

          e

        {:ok, r} ->
          flunk(
            "expected an error of kind #{inspect(kinds)}, got {:ok, #{inspect(r.values, limit: 8, printable_limit: 80)}}" <>
              " after #{div(us, 1000)} ms"
          )
      end

    if pattern && error.kind in [:runtime, :syntax] do
      assert error.message =~ pattern, "message: #{error.message}"
    end

    assert_bound(us, bound)
    assert_alive()
    error
  end

  @doc "Asserts `src` succeeds within the bound and returns `values` (a list) or satisfies a fun."
  def assert_values(src, expected, opts \\ []) do
    {bound, opts} = Keyword.pop(opts, :bound_us, @bound_us)
    {us, result} = hostile(src, opts)

    values =
      case result do
        {:ok, r} ->
          r.values

        {:error, e} ->
          flunk(
            "expected {:ok, _}, got #{inspect(e.kind)}: #{String.slice(e.message, 0, 300)}" <>
              " after #{div(us, 1000)} ms"
          )
      end

    if is_function(expected, 1) do
      assert expected.(values), "unexpected values: #{inspect(values, limit: 8)}"
    else
      assert values == expected
    end

    assert_bound(us, bound)
    assert_alive()
    values
  end

  @doc """
  For inputs where a value and a clean error are both fine (a crash or a hang is not):
  asserts `{:ok, _}` or an error whose kind is in `kinds`, within the bound.
  """
  def assert_clean(src, kinds \\ [:runtime], opts \\ []) do
    {bound, opts} = Keyword.pop(opts, :bound_us, @bound_us)
    {us, result} = hostile(src, opts)

    case result do
      {:ok, _} ->
        :ok

      {:error, %Error{kind: kind} = e} ->
        assert kind in kinds,
               "expected ok or kind in #{inspect(kinds)}, got #{inspect(kind)}: " <>
                 String.slice(e.message, 0, 300) <> "\n  after #{div(us, 1000)} ms"
    end

    assert_bound(us, bound)
    assert_alive()
    result
  end

  def assert_bound(us, bound \\ @bound_us) do
    assert us < bound, "took #{div(us, 1000)} ms, bound #{div(bound, 1000)} ms"
  end

  @doc """
  Under `make stretch` (the hole finder's build: LUA_SANDBOX_STRETCH_LOG names its log, the
  formatter puts the running test's name in each line): fails naming every stretch of
  `max_us` µs or more between two budget checks that the running test logged, so a hole
  shows up as this test's failure. A no-op in any other build. `context` is the test's.
  """
  def assert_checked(%{module: module, test: test}, max_us \\ 1000) do
    with path when is_binary(path) <- System.get_env("LUA_SANDBOX_STRETCH_LOG"),
         {:ok, log} <- File.read(path) do
      name = "#{inspect(module)} #{test}"

      long =
        for line <- String.split(log, "\n", trim: true),
            [us, _where, ^name | _] <- [String.split(line, "\t")],
            String.to_integer(us) >= max_us,
            do: line

      assert long == [],
             "stretches of #{max_us} µs or more between two checks:\n" <> Enum.join(long, "\n")
    end

    :ok
  end

  @doc "A normal script still runs (and promptly)."
  def assert_alive do
    {us, result} = :timer.tc(fn -> lua_run("return 1 + 1", timeout: @kill_ms) end)
    assert {:ok, %{value: 2}} = result
    assert_bound(us)
  end

  # One probe per builtin that can run unbounded C loops: {setup, work}. The setup runs alone
  # first to learn its cost; then setup + work must run out of that cost + 1000 instructions
  # once the builtin charges its work (without that it returns after a few milliseconds).
  @probes %{
    patterns: {"local s = string.rep('a', 100)", "return string.find(s, '.-.-.-b')"},
    plain_find:
      {"local h, n = string.rep('a', 1e5), string.rep('a', 100) .. 'b'",
       "return string.find(h, n, 1, true)"},
    sort: {"local t = {string.byte(string.rep('a', 2e4), 1, -1)}", "table.sort(t) return 1"},
    rep: {"", "return #string.rep('', 1e6)"},
    table_move: {"", "return table.move({}, 1, 1e5, 2) ~= nil"},
    table_insert:
      {"local t = setmetatable({}, {__len = function() return 1e5 end})",
       "table.insert(t, 1, 'x') return 1"},
    load: {"local s = string.rep('x = 1 ', 2e4)", "for i = 1, 5 do load(s) end return 1"},
    call_chain: {"", "local t = setmetatable({}, {}) getmetatable(t).__call = t return t()"}
  }

  @doc """
  Whether the builtin(s) behind `what` (a key of the probes above) charge their work to the
  instruction budget. Cached for the test run.
  """
  def hardened?(what) do
    key = {__MODULE__, :hardened, what}

    case :persistent_term.get(key, :unknown) do
      :unknown ->
        hardened = probe(what)
        :persistent_term.put(key, hardened)
        hardened

      known ->
        known
    end
  end

  # The __call chain is not a builtin: it is fixed when a 1 MB heap no longer takes ~1 s.
  defp probe(:call_chain) do
    {_, work} = @probes.call_chain

    {us, _} = :timer.tc(fn -> LuaSandbox.run(work, max_memory: 1024 * 1024, timeout: 30_000) end)

    us < 200_000
  end

  defp probe(what) do
    {setup, work} = Map.fetch!(@probes, what)
    opts = [max_memory: 64 * 1024 * 1024, timeout: 30_000]

    case LuaSandbox.run(setup <> "\nreturn 0", opts) do
      {:ok, %{stats: %{instructions: cost}}} ->
        result = LuaSandbox.run(setup <> "\n" <> work, [max_instructions: cost + 1000] ++ opts)

        match?({:error, %Error{kind: :instruction_limit}}, result)

      _ ->
        false
    end
  end

  def hardened_builtins?, do: hardened?(:patterns)

  @doc """
  The `skip` tag for inputs that, while `what` is not budgeted, keep a dirty scheduler busy
  for minutes to forever (a kill does not interrupt a C builtin), which would starve the rest
  of the suite and can keep the VM from exiting: nil (run it) once `what` is hardened.
  """
  def skip_unless_hardened(what \\ :patterns) do
    if hardened?(what) do
      nil
    else
      "#{what} not budgeted yet: this input pins a dirty scheduler for minutes to forever"
    end
  end
end

defmodule LuaSandbox.LuaPrograms do
  @moduledoc false
  # PropEr generator of random Lua programs for the "any program ends cleanly" property:
  # expressions, arithmetic edge cases, string library calls with random patterns, loops
  # (bounded and not), tables, closures, pcall/error, coroutines and recursion.

  import :proper_types,
    only: [
      oneof: 1,
      frequency: 1,
      integer: 2,
      elements: 1,
      list: 1,
      sized: 1,
      resize: 2,
      bind: 3,
      lazy: 1,
      exactly: 1,
      non_empty: 1
    ]

  @doc "A whole program: some statements, then a `return` of an expression."
  def program do
    sized(fn size ->
      size = min(size, 24)

      bind(
        {resize(div(size, 2) + 1, list(stat(size))), expr(size)},
        fn {stats, ret} ->
          exactly(Enum.join(prelude() ++ stats ++ ["return " <> ret], "\n"))
        end,
        false
      )
    end)
  end

  # Variables every program has, so generated statements can refer to them.
  defp prelude do
    [
      "local a, b, c = 1, 2.5, 'x'",
      "local s = 'hello world'",
      "local t = {1, 2, 3, k = 'v'}",
      "local f = function(x, ...) return x end"
    ]
  end

  @vars ~w(a b c s t f)

  @doc """
  Longest generated pattern subject. Without the budget-charging pattern functions a
  6-token pattern like `.-.-.-.-.-b` is O(n^6) in C, out of reach of the budget and of a kill,
  so subjects stay short until the hardened builtins are in.
  """
  def subject_max do
    if LuaSandbox.Adversarial.Case.hardened_builtins?(), do: 2000, else: 40
  end

  defp var, do: elements(@vars)

  # ---- expressions -----------------------------------------------------------------------

  def expr(size) when size <= 1, do: atom()

  def expr(size) do
    sub = lazy(fn -> expr(div(size, 2)) end)

    # `lazy` everywhere: building every alternative's type at every node is what makes
    # PropEr generators slow, and only one of them is used.
    frequency([
      {4, lazy(fn -> atom() end)},
      {3, lazy(fn -> binop(sub) end)},
      {1, lazy(fn -> unop(sub) end)},
      {2, lazy(fn -> string_call(sub) end)},
      {1, lazy(fn -> table_ctor(sub) end)},
      {1, lazy(fn -> call_expr(sub) end)},
      {1, lazy(fn -> closure_expr(size) end)},
      {1, lazy(fn -> pcall_expr(size) end)},
      {1, lazy(fn -> coroutine_expr(size) end)},
      {1, lazy(fn -> index_expr(sub) end)},
      {1, lazy(fn -> math_call(sub) end)}
    ])
  end

  defp atom do
    oneof([
      var(),
      int_lit(),
      float_lit(),
      str_lit(),
      elements(["nil", "true", "false", "{}", "#t", "#s"]),
      elements([
        "math.maxinteger",
        "math.mininteger",
        "math.huge",
        "-math.huge",
        "(0/0)",
        "math.pi"
      ])
    ])
  end

  defp int_lit do
    oneof([
      bind(integer(-5, 100), &exactly(Integer.to_string(&1)), false),
      elements([
        "0",
        "-1",
        "2^53",
        "2^63",
        "0x7fffffffffffffff",
        "0xffffffffffffffff",
        "1e308",
        "1e9",
        "-0.0"
      ])
    ])
  end

  defp float_lit, do: elements(["0.5", "1.5e3", "-2.25", "3.0", "1e-300"])

  defp str_lit do
    elements([
      "''",
      "'a'",
      "'abc'",
      "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab'",
      "'10'",
      "'0x10'",
      "' 3 '",
      "'\\0z'",
      "'%d'",
      "'%s'",
      "'(%w+)'"
    ])
  end

  @binops ~w(+ - * / // % ^ .. == ~= < <= > >= and or & | ~ << >>)

  defp binop(sub) do
    bind(
      {sub, elements(@binops), sub},
      fn {l, op, r} -> exactly("(#{l} #{op} #{r})") end,
      false
    )
  end

  defp unop(sub) do
    bind(
      {elements(["-", "not ", "#", "~"]), sub},
      fn {op, e} -> exactly("(#{op}#{e})") end,
      false
    )
  end

  defp index_expr(sub) do
    bind(
      {elements(["t", "s", "_G", "string"]), sub},
      fn {v, k} -> exactly("#{v}[#{k}]") end,
      false
    )
  end

  defp table_ctor(sub) do
    bind(
      resize(
        4,
        list(oneof([sub, bind({sub, sub}, fn {k, v} -> exactly("[#{k}] = #{v}") end, false)]))
      ),
      fn fields -> exactly("{" <> Enum.join(fields, ", ") <> "}") end,
      false
    )
  end

  defp call_expr(sub) do
    bind(
      {elements(["f", "tostring", "tonumber", "type", "select('#', ", "rawlen", "print"]),
       resize(3, list(sub))},
      fn
        {"select('#', ", args} -> exactly("select('#', " <> Enum.join(args, ", ") <> ")")
        {fun, args} -> exactly("#{fun}(" <> Enum.join(args, ", ") <> ")")
      end,
      false
    )
  end

  defp math_call(sub) do
    bind(
      {elements([
         "math.floor",
         "math.tointeger",
         "math.abs",
         "math.fmod",
         "math.max",
         "math.min",
         "math.ult",
         "math.type",
         "math.sqrt",
         "string.char",
         "utf8.char",
         "utf8.len",
         "table.unpack",
         "table.concat",
         "string.format"
       ]), resize(3, list(sub))},
      fn {fun, args} -> exactly("#{fun}(" <> Enum.join(args, ", ") <> ")") end,
      false
    )
  end

  # Lua patterns from an alphabet that includes the catastrophic ones.
  def pattern do
    bind(
      resize(
        6,
        non_empty(
          list(
            elements([
              "a",
              "b",
              ".",
              "%a",
              "%d",
              "%s",
              "%w",
              "%%",
              ".-",
              ".*",
              "a-",
              "a*",
              "a+",
              "a?",
              "[ab]",
              "[^a]",
              "[%a_]",
              "(",
              ")",
              "()",
              "%1",
              "^",
              "$",
              "%b()",
              "%f[%w]",
              "[",
              "%"
            ])
          )
        )
      ),
      fn parts -> exactly(Enum.join(parts)) end,
      false
    )
  end

  defp subject do
    oneof([
      str_lit(),
      bind(
        {elements(["'a'", "'ab'", "' '", "'(a)'"]), integer(0, subject_max())},
        fn {s, n} -> exactly("string.rep(#{s}, #{n})") end,
        false
      ),
      elements(["s", "c"])
    ])
  end

  # string.rep('', n) loops n times in C without touching the budget: 2^62 would pin a dirty
  # scheduler for centuries, so huge counts only once string.rep charges its work.
  defp rep_counts do
    if LuaSandbox.Adversarial.Case.hardened?(:rep),
      do: ["1e6", "1e9", "2^31", "2^62", "-1"],
      else: ["1e5", "1e6", "-1"]
  end

  defp string_call(sub), do: bind(integer(1, 8), &string_call(&1, sub), false)

  defp string_call(1, _sub) do
    bind(
      {elements(["string.find", "string.match"]), subject(), pattern(), integer(-3, 5)},
      fn {fun, subj, pat, init} -> exactly("#{fun}(#{subj}, #{inspect(pat)}, #{init})") end,
      false
    )
  end

  defp string_call(2, _sub) do
    repl =
      oneof([
        str_lit(),
        elements(["'%0%0'", "'%1'", "{a = 'A'}", "function(x) return x end", "function() end"])
      ])

    bind(
      {subject(), pattern(), repl},
      fn {subj, pat, r} -> exactly("string.gsub(#{subj}, #{inspect(pat)}, #{r})") end,
      false
    )
  end

  defp string_call(3, _sub) do
    bind(
      {subject(), pattern()},
      fn {subj, pat} ->
        exactly(
          "(function() local n = 0 for x in string.gmatch(#{subj}, #{inspect(pat)}) do " <>
            "n = n + 1 end return n end)()"
        )
      end,
      false
    )
  end

  defp string_call(4, sub) do
    bind(
      {sub, oneof([integer(-2, 50), elements(rep_counts())]), elements(["", ", ','", ", ''"])},
      fn {e, n, sep} -> exactly("string.rep(#{e}, #{n}#{sep})") end,
      false
    )
  end

  defp string_call(5, sub),
    do: bind({sub, sub}, fn {l, r} -> exactly("(#{l} .. #{r})") end, false)

  defp string_call(6, sub) do
    bind(
      {elements(["upper", "lower", "len", "reverse", "byte"]), sub},
      fn {m, e} -> exactly("string.#{m}(#{e})") end,
      false
    )
  end

  defp string_call(7, sub) do
    bind(
      {elements(["'%d'", "'%5.2f'", "'%q'", "'%s'", "'%x'", "'%c'", "'%a'", "'%i'", "'%99d'"]),
       sub},
      fn {fmt, e} -> exactly("string.format(#{fmt}, #{e})") end,
      false
    )
  end

  defp string_call(8, sub) do
    bind(
      {sub, integer(-3, 5), integer(-3, 5)},
      fn {e, i, j} -> exactly("string.sub(#{e}, #{i}, #{j})") end,
      false
    )
  end

  defp closure_expr(size) do
    body = lazy(fn -> block(div(size, 2)) end)

    bind(
      {body, expr(div(size, 2))},
      fn {stats, ret} ->
        exactly("(function(x) " <> Enum.join(stats, " ") <> " return #{ret} end)(2)")
      end,
      false
    )
  end

  defp pcall_expr(size) do
    body = lazy(fn -> block(div(size, 2)) end)

    bind(
      {elements(["pcall", "xpcall"]), body, expr(div(size, 2))},
      fn
        {"pcall", stats, ret} ->
          exactly(
            "select(2, pcall(function() " <> Enum.join(stats, " ") <> " return #{ret} end))"
          )

        {"xpcall", stats, ret} ->
          exactly(
            "select(2, xpcall(function() " <>
              Enum.join(stats, " ") <> " return #{ret} end, function(e) return e end))"
          )
      end,
      false
    )
  end

  defp coroutine_expr(size) do
    body = lazy(fn -> block(div(size, 2)) end)

    bind(
      {elements([:wrap, :resume, :close]), body, expr(div(size, 2))},
      fn
        {:wrap, stats, ret} ->
          exactly(
            "coroutine.wrap(function(x) coroutine.yield(x) " <>
              Enum.join(stats, " ") <> " return #{ret} end)(1)"
          )

        {:resume, stats, ret} ->
          exactly(
            "select(2, coroutine.resume(coroutine.create(function() " <>
              Enum.join(stats, " ") <> " coroutine.yield(#{ret}) end)))"
          )

        {:close, stats, _ret} ->
          exactly(
            "(function() local co = coroutine.create(function() " <>
              Enum.join(stats, " ") <>
              " coroutine.yield() end) coroutine.resume(co) return coroutine.close(co) end)()"
          )
      end,
      false
    )
  end

  # ---- statements ------------------------------------------------------------------------

  defp block(size), do: resize(3, list(stat(size)))

  def stat(size) when size <= 2, do: simple_stat(expr(1))

  def stat(size) do
    sub_expr = lazy(fn -> expr(div(size, 2)) end)
    body = lazy(fn -> block(div(size, 3)) end)

    frequency([
      {6, lazy(fn -> simple_stat(sub_expr) end)},
      {2, lazy(fn -> for_loop(body) end)},
      {2, lazy(fn -> while_loop(body) end)},
      {1, exactly("while true do end")},
      {1, exactly("while true do a = a + 1 end")},
      {1, lazy(fn -> if_stat(sub_expr, body) end)},
      {1, lazy(fn -> recursion() end)},
      {1, lazy(fn -> error_stat(sub_expr) end)},
      {1, exactly("local big = {} for i = 1, 1e7 do big[i] = i end")},
      {1, exactly("local str = 'x' for i = 1, 40 do str = str .. str end")},
      {1, exactly("for i = 1, 1e5 do print(i, s, t) end")},
      {1, exactly("do local q <close> = setmetatable({}, {__close = function() a = 0 end}) end")}
    ])
  end

  defp simple_stat(e) do
    oneof([
      bind({var(), e}, fn {v, x} -> exactly("#{v} = #{x}") end, false),
      bind(e, fn x -> exactly("local _ = #{x}") end, false),
      bind(e, fn x -> exactly("t[#t + 1] = #{x}") end, false),
      bind({e, e}, fn {k, v} -> exactly("t[#{k}] = #{v}") end, false),
      bind(e, fn x -> exactly("print(#{x})") end, false)
    ])
  end

  defp for_loop(body) do
    bind(
      {integer(-5, 50), oneof([integer(-5, 2000), elements(["1e8", "math.maxinteger"])]),
       elements(["", ", 1", ", 2", ", -1", ", 0.5", ", 0"]), body},
      fn {lo, hi, step, stats} ->
        exactly("for i = #{lo}, #{hi}#{step} do " <> Enum.join(stats, " ") <> " end")
      end,
      false
    )
  end

  defp while_loop(body) do
    bind(
      {integer(0, 500), body},
      fn {n, stats} ->
        exactly(
          "do local n = 0 while n < #{n} do n = n + 1 " <> Enum.join(stats, " ") <> " end end"
        )
      end,
      false
    )
  end

  defp if_stat(cond, body) do
    bind(
      {cond, body, body},
      fn {c, th, el} ->
        exactly("if #{c} then " <> Enum.join(th, " ") <> " else " <> Enum.join(el, " ") <> " end")
      end,
      false
    )
  end

  defp recursion do
    bind(
      integer(0, 100_000),
      fn n ->
        oneof([
          exactly(
            "do local function r(k) if k <= 0 then return 0 end return 1 + r(k - 1) end a = r(#{n}) end"
          ),
          exactly(
            "do local function r(k) if k <= 0 then return 0 end return r(k - 1) end a = r(#{n}) end"
          ),
          exactly(
            "do local function r(k) if k <= 0 then return 0 end " <>
              "return coroutine.wrap(r)(k - 1) end a = r(#{rem(n, 400)}) end"
          ),
          exactly(
            "do local function r(k) if k <= 0 then return 0 end " <>
              "return select(2, pcall(r, k - 1)) end a = r(#{rem(n, 400)}) end"
          )
        ])
      end,
      false
    )
  end

  defp error_stat(e) do
    bind(
      {elements(["error", "assert(false, ", "pcall(error, "]), e},
      fn
        {"error", x} -> exactly("if a == a then error(#{x}) end")
        {"assert(false, ", x} -> exactly("if a == a then assert(false, #{x}) end")
        {"pcall(error, ", x} -> exactly("pcall(error, #{x})")
      end,
      false
    )
  end
end
