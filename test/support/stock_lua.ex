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

  @doc "Runs `src` in stock Lua; the normal form described in the moduledoc."
  def run_stock(port, src, prologue \\ @prologue) do
    Port.command(port, [<<byte_size(prologue)::32>>, prologue, src])

    receive do
      {^port, {:data, reply}} -> decode(reply)
      {^port, {:exit_status, st}} -> raise "stock Lua driver exited with #{st}"
    after
      60_000 -> raise "stock Lua driver did not answer"
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

  @doc "Both outcomes of `src`: `{stock, sandbox}`."
  def compare(port, src, opts \\ []) do
    {run_stock(port, src), run_sandbox(src, opts)}
  end

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
