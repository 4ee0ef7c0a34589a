defmodule LuaSandbox.StockLua do
  @moduledoc false
  # The differential oracle: an unpatched Lua 5.4.9 built from the vendored sources with
  # vendor/lua-src/lua_sandbox.patch reversed, driven as a port (test/stock/stock_driver.c)
  # so thousands of programs run in one OS process, each in a fresh lua_State.
  #
  # `compare/2` runs one program in both and returns the two outcomes in one normal form:
  #   %{output: binary, result: {:ok, [value]} | {:error, message_or_value} | {:syntax, message}}
  # where a value is nil, a boolean, {:int, i}, {:float, f | :nan | :inf | :"-inf"}, a binary,
  # or {:other, type_name}.

  @root Path.expand("../..", __DIR__)
  @vendor Path.join(@root, "vendor/lua-src")
  @driver Path.join(@root, "test/stock/stock_driver.c")

  # Stubs the deliberate restrictions of the sandbox the same way in stock Lua, so a program
  # that looks at them sees the same thing on both sides.
  @prologue """
  getmetatable("").__metatable = false
  string.dump = nil
  """

  @doc "Path of the stock driver binary, built (once, cached under _build/) if needed."
  def binary! do
    sources =
      [@driver, Path.join(@vendor, "lua_sandbox.patch")] ++
        Path.wildcard(Path.join(@vendor, "lua-5.4.9/*.[ch]"))

    hash =
      sources
      |> Enum.map(&File.read!/1)
      |> :erlang.md5()
      |> Base.encode16(case: :lower)

    dir = Path.join([@root, "_build", "stock_lua", hash])
    bin = Path.join(dir, "stock_driver")
    if not File.exists?(bin), do: build!(dir, bin)
    bin
  end

  defp build!(dir, bin) do
    tmp = dir <> ".tmp#{System.unique_integer([:positive])}"
    src = Path.join(tmp, "lua-5.4.9")
    File.rm_rf!(tmp)
    File.mkdir_p!(tmp)
    File.cp_r!(Path.join(@vendor, "lua-5.4.9"), src)

    # The patch's paths are a/lua-5.4.9/..., b/lua-5.4.9/...
    run!("patch", ["-R", "-p1", "-s", "-i", Path.join(@vendor, "lua_sandbox.patch")], tmp)

    case System.cmd("grep", ["-rl", "LUA_SANDBOX", src]) do
      {"", 1} ->
        :ok

      {files, _} ->
        raise "stock Lua: #{String.trim(files)} still patched after reversing " <>
                "vendor/lua-src/lua_sandbox.patch: regenerate the patch (see PATCHES.md)"
    end

    c_files = Path.wildcard(Path.join(src, "*.c"))

    run!(
      "gcc",
      [
        "-O2",
        "-std=gnu99",
        "-DLUA_USE_LINUX",
        "-DLUA_COMPAT_5_3",
        "-I",
        src,
        "-o",
        Path.join(tmp, "stock_driver")
      ] ++
        [@driver | c_files] ++ ["-lm", "-ldl"],
      tmp
    )

    File.mkdir_p!(dir)
    File.rename!(Path.join(tmp, "stock_driver"), bin)
    File.rm_rf!(tmp)
  end

  defp run!(cmd, args, cd) do
    case System.cmd(cmd, args, cd: cd, stderr_to_stdout: true) do
      {_, 0} -> :ok
      {out, st} -> raise "stock Lua build: #{cmd} exited with #{st}:\n#{out}"
    end
  end

  @doc "Starts a driver; the port is linked to the calling process."
  def open do
    Port.open({:spawn_executable, binary!()}, [:binary, {:packet, 4}, :exit_status])
  end

  @doc """
  Runs `src` in stock Lua; the normal form described in the moduledoc. A program the driver
  cannot finish (it stops itself after 20 s) gives `{:stock_failed, reason}` and a new port.
  """
  def run_stock(given, src, prologue \\ @prologue) do
    port = Process.get({__MODULE__, given}, given)
    Port.command(port, [<<byte_size(prologue)::32>>, prologue, src])

    receive do
      {^port, {:data, reply}} ->
        decode(reply)

      {^port, {:exit_status, st}} ->
        Process.put({__MODULE__, given}, open())
        %{output: "", result: {:stock_failed, "driver exited with #{st}"}}
    after
      30_000 ->
        Port.close(port)
        Process.put({__MODULE__, given}, open())
        %{output: "", result: {:stock_failed, "no answer"}}
    end
  end

  @doc "Runs `src` in the sandbox; the same normal form as `run_stock/2`."
  def run_sandbox(src, opts \\ []) do
    case LuaSandbox.run(src, opts) do
      {:ok, %{values: values, output: out}} ->
        %{output: out, result: {:ok, Enum.map(values, &term_value/1)}}

      {:error, %{kind: :syntax, message: m, output: out}} ->
        %{output: out, result: {:syntax, m}}

      {:error, %{kind: :runtime, message: m, value: v, output: out}} ->
        %{output: out, result: {:error, error_value(m, v)}}

      {:error, e} ->
        %{output: e.output, result: {e.kind, e.message}}
    end
  end

  @doc "Both outcomes of `src`: `{stock, sandbox}`, with addresses (`0x...`) blanked out."
  def compare(port, src, opts \\ []) do
    {blank(run_stock(port, src)), blank(run_sandbox(src, opts))}
  end

  defp blank(%{output: out, result: {tag, v}}),
    do: %{output: blank(out), result: {tag, blank(v)}}

  defp blank(s) when is_binary(s), do: String.replace(s, ~r/0x[0-9a-f]{6,}/, "0xADDR")
  defp blank(l) when is_list(l), do: Enum.map(l, &blank/1)
  defp blank(v), do: v

  @doc "The traceback stock Lua reported for the last error of `src` (nil if none)."
  def stock_traceback(port, src) do
    Port.command(port, [<<byte_size(@prologue)::32>>, @prologue, src])

    receive do
      {^port, {:data, reply}} ->
        reply |> fields() |> Enum.find_value(fn {tag, v} -> if tag == ?T, do: v end)
    after
      60_000 -> raise "stock Lua driver did not answer"
    end
  end

  defp term_value(nil), do: nil
  defp term_value(b) when is_boolean(b), do: b
  defp term_value(i) when is_integer(i), do: {:int, i}
  defp term_value(f) when is_float(f), do: {:float, f}
  defp term_value(:nan), do: {:float, :nan}
  defp term_value(:infinity), do: {:float, :inf}
  defp term_value(:neg_infinity), do: {:float, :"-inf"}
  defp term_value(b) when is_binary(b), do: b
  defp term_value(m) when is_map(m) or is_list(m), do: {:other, "table"}
  defp term_value(a) when is_atom(a), do: Atom.to_string(a)

  # The sandbox reports a string error object as the message, any other as `value`.
  defp error_value(m, nil), do: nil_or_message(m)
  defp error_value(_m, v), do: term_value(v)

  defp nil_or_message("(error object is a nil value)"), do: nil
  defp nil_or_message(m), do: m

  defp decode(reply) do
    fs = fields(reply)
    {[{?O, out}], rest} = Enum.split(fs, 1)

    result =
      case rest do
        [{?K, _} | vals] -> {:ok, Enum.map(vals, &stock_value/1)}
        [{?E, _}, v | _] -> {:error, stock_error(v)}
        [{?S, m}] -> {:syntax, m}
      end

    %{output: out, result: result}
  end

  defp stock_error({?x, "table"}), do: {:other, "table"}
  defp stock_error({?i, i}), do: {:int, String.to_integer(i)}
  defp stock_error(v), do: stock_value(v)

  defp fields(<<>>), do: []

  defp fields(<<tag, n::32, v::binary-size(n), rest::binary>>),
    do: [{tag, v} | fields(rest)]

  defp stock_value({?n, _}), do: nil
  defp stock_value({?b, b}), do: b == "1"
  defp stock_value({?i, i}), do: {:int, String.to_integer(i)}
  defp stock_value({?s, s}), do: s
  defp stock_value({?x, t}), do: {:other, t}
  defp stock_value({?f, "inf"}), do: {:float, :inf}
  defp stock_value({?f, "-inf"}), do: {:float, :"-inf"}
  defp stock_value({?f, "nan"}), do: {:float, :nan}
  defp stock_value({?f, "-nan"}), do: {:float, :nan}

  defp stock_value({?f, f}) do
    {x, ""} = Float.parse(f)
    {:float, x}
  end
end

defmodule LuaSandbox.StockLua.Programs do
  @moduledoc false
  # Generated Lua programs for the differential property: a few statements, each from a
  # family (errors and levels, pcall/xpcall, coroutines, <close>, metamethods, string
  # methods, number formatting, load, varargs), then a final return or error. A program is
  # generated as a term ({family, params...}) and rendered by `render/1`, so PropEr shrinks
  # it statement by statement. Nothing printed or returned depends on an address.

  import :proper_types, only: [oneof: 1, elements: 1, integer: 2, list: 1, resize: 2]

  @scalars [
    "0",
    "1",
    "-1",
    "7",
    "2^53",
    "1e15",
    "1e16",
    "0.1",
    "-0.0",
    "1/0",
    "-1/0",
    "3.0",
    "10//3",
    "7//2.0",
    "math.maxinteger",
    "math.mininteger",
    "math.pi",
    "'10'",
    "'0x10'",
    "' 5 '",
    "'abc'",
    "''",
    "true",
    "false",
    "nil",
    "2^63",
    "-2^63",
    "255",
    "1e100",
    "0.5",
    "-7",
    "3%-2",
    "-3%2",
    "5.5%2",
    "math.huge",
    "100000000000000",
    "'3.0'",
    "'1e2'",
    "0x7fffffffffffffff",
    "2^-1074"
  ]
  @binops ~w(+ - * / // % ^ .. == ~= < <= & | ~ << >> and or)
  @unops ["-", "not ", "#", "~"]
  @funcs ~w(tostring tonumber math.type math.floor math.ceil math.tointeger math.abs type
    math.ult string.len string.upper math.fmod math.max math.min)
  @messages [
    "'m'",
    "nil",
    "42",
    "4.5",
    "setmetatable({}, {__tostring = function() return 'E!' end})",
    "'with\\nnewline'",
    "{}"
  ]
  @handlers [
    "function(m) return 'h:' .. tostring(m) end",
    "debug.traceback",
    "function(m) error('in handler') end",
    "print",
    "function(m) return m, 2 end",
    "function(m) return debug.traceback(m, 2) end"
  ]
  @callees [
    "error",
    "function(...) return ... end",
    "function(a) return a + 1 end",
    "function() local x <close> = setmetatable({}, {__close = function() print('closed') end}) error('c') end",
    "coroutine.wrap(function(...) error(...) end)",
    "string.byte",
    "tostring",
    "nil",
    "select",
    "function(a, b) return a .. b end",
    "coroutine.yield",
    "load"
  ]
  @formats [
    "'%d'",
    "'%5.2f'",
    "'%g'",
    "'%q'",
    "'%s'",
    "'%x'",
    "'%10s|'",
    "'%-5d|'",
    "'%i'",
    "'%c'",
    "'%.3s'",
    "'%5%'",
    "'%'",
    "'%d %d'",
    "'%.14g'",
    "'%a'",
    "'%X'",
    "'%o'",
    "'%e'",
    "'%+.3e'",
    "'%#x'",
    "'%05d'",
    "'%.0f'",
    "'%u'"
  ]
  @strings ["'hello'", "'a,b,,c'", "''", "'x'", "'ÄÖ'", "'\\0z'", "'%d'", "'aaa'", "'  trim '"]
  @patterns [
    "'l+'",
    "'(%a)(%d?)'",
    "'%s*'",
    "'[a'",
    "'%'",
    "'(()'",
    "'^h'",
    "'.-'",
    "'x*'",
    "'%f[%w]%w+'",
    "'[%w,]+'",
    "'()'",
    "'%b()'",
    "'(a)%1'"
  ]
  @metamethods ~w(__add __concat __index __call __eq __lt __le __len __unm __tostring __name
    __sub __mul __div __mod __idiv __band __shl __bnot __newindex)
  @meta_ops [
    "t + 1",
    "1 + t",
    "t .. 'x'",
    "'x' .. t",
    "t.foo",
    "t(5)",
    "#t",
    "-t",
    "tostring(t)",
    "t == setmetatable({}, getmetatable(t))",
    "t < t",
    "t <= t",
    "t & 1",
    "t[1]",
    "rawlen(t)",
    "rawequal(t, t)",
    "t // 0",
    "t - t",
    "t * 2",
    "t / 2",
    "t % 2",
    "t << 1",
    "~t",
    "(function() t.x = 1 return rawget(t, 'x') end)()"
  ]
  @runtime_errors [
    "local x; return x.y",
    "return undefinedvar.field",
    "local t = {} return t.a.b",
    "return ('x'):nomethod()",
    "local n = 1; return n()",
    "return 'a' + 1",
    "return 1 < 'x'",
    "return 'a' .. true",
    "for i = 1, 10, 0 do end",
    "return 1 // 0",
    "return 1 % 0",
    "return 2^63 | 0",
    "return math.tointeger(2^53) | 0",
    "return ({}) < ({})",
    "local t = setmetatable({}, {__index = function(t, k) error('idx ' .. k) end}) return t.q",
    "return string.rep()",
    "return tostring()",
    "return select(0)",
    "return table.concat({1, {}, 3})",
    "return ('x'):rep(1, 2, 3, {})",
    "return math.floor('a')",
    "return string.char(256)",
    "return utf8.char(-1)",
    "return tonumber('10', 99)",
    "return setmetatable({}, {__index = 1}).x",
    "local a <const> = 1; return a.b.c",
    "return #nil",
    "return -{}",
    "return next({}, 'nokey')",
    "return ipairs()",
    "return rawset({}, nil, 1)",
    "return string.format('%d', 1.5)",
    "return ('x'):format(('y'):rep(3))",
    "return load('return +')()",
    "local x <close> = 42"
  ]
  @load_sources [
    "'return 1 +'",
    "'return ...'",
    "'x = '",
    "'error(\"in load\")'",
    "'return 2^53'",
    "'local x <const> = 1; x = 2'",
    "'return 1'",
    "'\\27Lua'",
    "'goto nowhere'",
    "'break'",
    "'for i = 1 do end'",
    "'return \"unfinished'",
    "'return [[long'"
  ]
  @chunk_names ["nil", "'=chunk'", "'@file.lua'", "'name'", "5"]
  @modes ["nil", "'t'", "'b'", "'bt'", "5"]

  def program do
    {resize(6, list(statement())), final()}
  end

  defp small, do: integer(-4, 4)

  defp scalar, do: elements(@scalars)

  defp expr do
    oneof([
      scalar(),
      {:bin, scalar(), elements(@binops), scalar()},
      {:un, elements(@unops), scalar()},
      {:call, elements(@funcs), scalar()},
      {:call2, elements(@funcs), scalar(), scalar()},
      {:bin, {:bin, scalar(), elements(@binops), scalar()}, elements(@binops), scalar()}
    ])
  end

  defp statement do
    oneof([
      {:print, expr(), expr()},
      {:pcall_expr, expr()},
      {:write, expr(), expr()},
      {:fmt_number, expr()},
      {:error_level, elements([:direct, :closure, :local, :nested, :tail]), elements(@messages),
       integer(-1, 4)},
      {:xpcall, elements(@callees), elements(@handlers), scalar()},
      {:pcall, elements(@callees), scalar(), scalar()},
      {:co_basic, scalar(), scalar(), scalar()},
      {:co_wrap_error, elements(@messages), integer(0, 3)},
      {:co_flags},
      {:co_close, elements([:ok, :error]), elements([:suspended, :dead, :fresh])},
      {:co_misc, integer(0, 7)},
      {:close, elements(["", "error('from B', 0)", "error('from B')"]), elements(@messages)},
      {:meta, list(elements(@metamethods)), elements(@meta_ops)},
      {:format, elements(@formats), scalar()},
      {:string_fn, integer(0, 9), elements(@strings), small(), small()},
      {:pattern, elements(~w(find match gsub gmatch)), elements(@strings), elements(@patterns),
       integer(0, 3)},
      {:runtime_error, elements(@runtime_errors)},
      {:load, elements(@load_sources), elements(@chunk_names), elements(@modes)},
      {:varargs, integer(-4, 4), integer(0, 4)},
      {:tonumber,
       elements(@strings ++ ["'ff'", "'zz'", "'8'", "'1e1'", "'0x1p4'", "' 10 '", "'10'"]),
       integer(1, 37)}
    ])
  end

  defp final do
    oneof([
      {:return, expr(), expr()},
      {:return_none},
      {:top_error, elements(@messages), integer(0, 3)},
      {:top_runtime_error, elements(@runtime_errors)}
    ])
  end

  @doc "The Lua source of a generated program."
  def render({stmts, fin}) do
    Enum.map_join(stmts ++ [fin], "\n", &stmt/1) <> "\n"
  end

  defp e({:bin, a, op, b}), do: "(#{e(a)} #{op} #{e(b)})"
  defp e({:un, op, a}), do: "(#{op}#{e(a)})"
  defp e({:call, f, a}), do: "#{f}(#{e(a)})"
  defp e({:call2, f, a, b}), do: "#{f}(#{e(a)}, #{e(b)})"
  defp e(s) when is_binary(s), do: s

  # a value shown by print: never an address
  defp shown(x),
    do:
      "(function(...) local v = ... if type(v) == 'table' or type(v) == 'function' or type(v) == 'thread' then return type(v) end return v end)(#{x})"

  defp stmt({:print, a, b}), do: "print(pcall(function() return #{e(a)}, #{e(b)} end))"
  defp stmt({:pcall_expr, a}), do: "print(pcall(function() return #{shown(e(a))} end))"

  defp stmt({:write, a, b}),
    do: "print(pcall(function() io.write(#{e(a)}, ' ', #{e(b)}, '\\n') end))"

  defp stmt({:fmt_number, a}),
    do:
      "print(pcall(function() local v = #{e(a)} return math.type(v), v, string.format('%.14g|%s', v, v) end))"

  defp stmt({:error_level, how, msg, lvl}) do
    case how do
      :direct ->
        "print(pcall(error, #{msg}, #{lvl}))"

      :closure ->
        "print(pcall(function() error(#{msg}, #{lvl}) end))"

      :local ->
        "do local function lf(l) error(#{msg}, l) end print(pcall(lf, #{lvl})) end"

      :nested ->
        "print(pcall(function() local function g() error(#{msg}, #{lvl}) end g() end))"

      :tail ->
        "do local function tc() return error(#{msg}, #{lvl}) end print(pcall(tc)) end"
    end
  end

  defp stmt({:xpcall, f, h, a}), do: "print(xpcall(#{f}, #{h}, #{a}))"
  defp stmt({:pcall, f, a, b}), do: "print(pcall(#{f}, #{a}, #{b}))"

  defp stmt({:co_basic, a, b, c}) do
    "do local co = coroutine.create(function(a, b) local c = coroutine.yield(a + b) " <>
      "local d, e = coroutine.yield(c * 2) return d, e, 'end' end) " <>
      "print(coroutine.resume(co, #{a}, #{b})) print(coroutine.resume(co, #{c})) " <>
      "print(coroutine.resume(co, 1, 2)) print(coroutine.resume(co)) " <>
      "print(coroutine.status(co)) end"
  end

  defp stmt({:co_wrap_error, msg, lvl}) do
    "do local f = coroutine.wrap(function() error(#{msg}, #{lvl}) end) print(pcall(f)) " <>
      "print(pcall(f)) end"
  end

  defp stmt({:co_flags}) do
    "print(coroutine.isyieldable(), select(2, coroutine.running()), " <>
      "coroutine.status(coroutine.running())) " <>
      "print(coroutine.wrap(function() return coroutine.isyieldable(), " <>
      "select(2, coroutine.running()), coroutine.status(coroutine.running()) end)())"
  end

  defp stmt({:co_close, kind, state}) do
    close =
      case kind do
        :ok -> "function(_, e) print('closing', e) end"
        :error -> "function() error('cerr', 0) end"
      end

    steps =
      case state do
        :suspended -> "coroutine.resume(co)"
        :dead -> "coroutine.resume(co) coroutine.resume(co)"
        :fresh -> ""
      end

    "do local co = coroutine.create(function() local x <close> = " <>
      "setmetatable({}, {__close = #{close}}) coroutine.yield(1) end) #{steps} " <>
      "print(coroutine.close(co)) print(coroutine.status(co), coroutine.resume(co)) end"
  end

  defp stmt({:co_misc, n}) do
    Enum.at(
      [
        "print(pcall(coroutine.yield, 1))",
        "print(coroutine.wrap(function() print(pcall(coroutine.yield, 5)) return 'after' end)())",
        "do local f = coroutine.wrap(function() return 1 end) f() print(pcall(f)) end",
        "do local co = coroutine.running() print(pcall(coroutine.resume, co)) print(pcall(coroutine.close, co)) end",
        "do local co co = coroutine.create(function() return coroutine.status(co), coroutine.resume(co) end) print(coroutine.resume(co)) end",
        "print(pcall(coroutine.wrap(function() local t <close> = setmetatable({}, {__close = function() error('from __close', 0) end}) error('original', 0) end)))",
        "do local co = coroutine.wrap(function(...) local n = select('#', ...) while true do n = n + select('#', coroutine.yield(n)) end end) print(co(1, 2), co(), co(nil, nil, nil)) end",
        "print(select('#', coroutine.resume(coroutine.create(function() return end))))"
      ],
      n
    )
  end

  defp stmt({:close, b_extra, msg}) do
    "do local ok, e = pcall(function() " <>
      "local a <close> = setmetatable({}, {__close = function(_, e) print('A', e) end}) " <>
      "local b <close> = setmetatable({}, {__close = function(_, e) print('B', e) #{b_extra} end}) " <>
      "error(#{msg}, 0) end) print(ok, e) end"
  end

  defp stmt({:meta, mms, op}) do
    fields =
      mms
      |> Enum.uniq()
      |> Enum.map_join(", ", fn
        "__index" -> "__index = function(t, k) return tostring(k) .. '!' end"
        "__newindex" -> "__newindex = function(t, k, v) rawset(t, k, v * 10) end"
        "__call" -> "__call = function(self, x) return 'called', x end"
        "__eq" -> "__eq = function() return true end"
        "__lt" -> "__lt = function() return true end"
        "__le" -> "__le = function() return false end"
        "__len" -> "__len = function() return 42 end"
        "__tostring" -> "__tostring = function() return 'T' end"
        "__name" -> "__name = 'MyType'"
        "__concat" -> "__concat = function(a, b) return 'cat' end"
        mm -> "#{mm} = function(a, b) return '#{mm}' end"
      end)

    "do local t = setmetatable({}, {#{fields}}) print(pcall(function() return #{shown(op)} end)) end"
  end

  defp stmt({:format, f, a}), do: "print(pcall(string.format, #{f}, #{a}))"

  defp stmt({:string_fn, n, s, i, j}) do
    Enum.at(
      [
        "print(pcall(string.sub, #{s}, #{i}, #{j}))",
        "print(pcall(string.byte, #{s}, #{i}, #{j}))",
        "print(pcall(string.rep, #{s}, #{j}, '-'))",
        "print(#{s}:upper(), #{s}:lower(), #{s}:reverse(), #{s}:len(), ##{s})",
        "print(pcall(string.char, #{i + 100}, #{j + 60}))",
        "print(pcall(function() return (#{s}):rep(#{j}):sub(#{i}) end))",
        "print(pcall(utf8.len, #{s}, #{i}))",
        "print(pcall(string.format, '%q', #{s}))",
        "print(pcall(table.concat, {#{s}, #{i}, #{j}}, #{s}))",
        "print(tostring(#{s}) .. #{i}, #{s} < 'b', #{s} == 'x')"
      ],
      n
    )
  end

  defp stmt({:pattern, fun, s, p, r}) do
    repl =
      Enum.at(["'<%0>'", "{x = 'X', l = 'L'}", "function(c) return c:upper() end", "'%1'"], r)

    case fun do
      "gsub" ->
        "print(pcall(string.gsub, #{s}, #{p}, #{repl}))"

      "gmatch" ->
        "print(pcall(function() local r = {} for a in string.gmatch(#{s}, #{p}) do " <>
          "r[#r + 1] = tostring(a) if #r > 10 then break end end return table.concat(r, ',') end))"

      _ ->
        "print(pcall(string.#{fun}, #{s}, #{p}))"
    end
  end

  defp stmt({:runtime_error, src}), do: "print(pcall(function() #{src} end))"

  # Binary chunks are a deliberate restriction (refused whatever the mode): only mode 't'
  # refuses them in stock Lua too.
  defp stmt({:load, "'\\27Lua'" = src, name, _mode}), do: stmt({:load, src <> " ", name, "'t'"})

  defp stmt({:load, src, name, mode}) do
    "do local f, e = load(#{src}, #{name}, #{mode}) print(type(f), e) " <>
      "if f then print(pcall(f, 1, 2)) end end"
  end

  defp stmt({:varargs, n, k}) do
    args = Enum.take(["'a'", "nil", "'c'", "nil"], k) |> Enum.join(", ")
    sep = if args == "", do: "", else: ", "

    "print(pcall(select, #{n}#{sep}#{args})) print(select('#'#{sep}#{args})) " <>
      "print(pcall(table.unpack, {#{args}}, #{n}, #{k}))"
  end

  defp stmt({:tonumber, s, base}),
    do: "print(pcall(tonumber, #{s}, #{base}), tonumber(#{s}))"

  defp stmt({:return, a, b}),
    do: "return #{shown(e(a))}, #{shown(e(b))}"

  defp stmt({:return_none}), do: "return"
  defp stmt({:top_error, msg, lvl}), do: "error(#{msg}, #{lvl})"
  defp stmt({:top_runtime_error, src}), do: "do #{src} end"
end
