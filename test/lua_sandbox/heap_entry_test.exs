defmodule LuaSandbox.HeapEntryTest do
  # Every path by which host bytes enter a run's Lua heap counts against max_memory: a value
  # larger than the limit is :memory_limit on each of them, and the same path with a small value
  # runs (so the limit, not something else, refused the big one).
  #
  # The paths are found, not remembered: every option of the one options list
  # (LuaSandbox.Options, which sessions share) and every public function of LuaSandbox and
  # LuaSandbox.Session is either the way in of an entry below or declared, with the reason, as
  # carrying no host bytes into a heap. A new option or function fails the suite until someone
  # says which it is.
  use ExUnit.Case, async: true

  alias LuaSandbox.{Error, Session}

  @limit 2_000_000
  @big 4_000_000

  defp tool(fun), do: [tools: %{t: fun}]

  # name => fn payload -> result of a run that hands `payload` (a binary) to the heap
  defp entries do
    %{
      globals: fn p -> LuaSandbox.run("return #g", [globals: %{g: p}] ++ opts()) end,
      call_args: fn p ->
        LuaSandbox.run("function f(s) return #s end", [call: {"f", [p]}] ++ opts())
      end,
      handles: fn p ->
        hs = List.duplicate(LuaSandbox.handle(:x), div(byte_size(p), 64))
        LuaSandbox.run("return #h", [globals: %{h: hs}] ++ opts())
      end,
      modules: fn p ->
        LuaSandbox.run(
          "return #require('m')",
          [modules: %{m: "return [[" <> p <> "]]"}, max_source: 2 * @big] ++ opts()
        )
      end,
      tool_ok: fn p ->
        LuaSandbox.run("return #tools.t()", tool(fn _ -> {:ok, p} end) ++ opts())
      end,
      tool_error: fn p ->
        LuaSandbox.run(
          "local v, e = tools.t() return #e",
          tool(fn _ -> {:error, p} end) ++ opts()
        )
      end,
      tool_raise: fn p ->
        LuaSandbox.run(
          "local ok, e = pcall(tools.t) return #e",
          tool(fn _ -> raise p end) ++ opts()
        )
      end,
      session_tool_raise: fn p ->
        {:ok, s} = Session.start_link(tool(fn _ -> raise p end) ++ opts())
        result = Session.run(s, "local ok, e = pcall(tools.t) return #e")
        Session.stop(s)
        result
      end,
      session_call_args: fn p ->
        {:ok, s} = Session.start_link(opts())
        {:ok, _} = Session.run(s, "function f(s) return #s end")
        result = Session.call(s, "f", [p])
        Session.stop(s)
        result
      end,
      chunk_name: fn p ->
        LuaSandbox.run("return 1", [chunk_name: p] ++ opts())
      end,
      session_globals: fn p ->
        {:ok, s} = Session.start_link(opts())
        result = Session.run(s, "return #g", globals: %{g: p})
        Session.stop(s)
        result
      end,
      session_start_globals: fn p ->
        case Session.start_link([globals: %{g: p}] ++ opts()) do
          {:ok, s} ->
            result = Session.run(s, "return #g")
            Session.stop(s)
            result

          refused ->
            refused
        end
      end,
      session_set: fn p ->
        {:ok, s} = Session.start_link(opts())
        result = with :ok <- Session.set(s, "g", p), do: Session.run(s, "return #g")
        Session.stop(s)
        result
      end,
      session_get_name: fn p ->
        {:ok, s} = Session.start_link(opts())
        result = Session.get(s, p)
        Session.stop(s)
        with {:ok, nil} <- result, do: {:ok, :absent}
      end,
      session_run_source: fn p ->
        {:ok, s} = Session.start_link([max_source: 2 * @big] ++ opts())
        result = Session.run(s, "return [[" <> p <> "]]")
        Session.stop(s)
        result
      end,
      source: fn p ->
        LuaSandbox.run("return #[[" <> p <> "]]", [max_source: 2 * @big] ++ opts())
      end
    }
  end

  # How each way in (an option, or a public function's argument) reaches the heap: the entries
  # that exercise it, or why it carries no host bytes into a heap.
  @ways_in %{
    {:option, :globals} => [:globals, :handles, :session_globals, :session_start_globals],
    {:option, :call} => [:call_args],
    {:option, :tools} => [:tool_ok, :tool_error, :tool_raise, :session_tool_raise],
    {:option, :modules} => [:modules],
    {:option, :chunk_name} => [:chunk_name],
    {:option, :max_instructions} => "an integer limit",
    {:option, :max_memory} => "an integer limit",
    {:option, :max_depth} => "an integer limit",
    {:option, :max_result_bytes} => "an integer limit",
    {:option, :max_output} => "an integer limit",
    {:option, :max_source} => "an integer limit",
    {:option, :max_tool_calls} => "an integer limit",
    {:option, :max_remote_bytes} => "an integer limit",
    {:option, :timeout} => "an integer or :infinity",
    {:option, :print} => "output leaves the heap; a {:send, pid, tag} tag stays in Rust",
    {:option, :supervisor} => "names a process",
    {:option, :node} => "names a node",
    {:option, :tenant} => "stays in Elixir (quotas and metrics)",
    {:option, :queue_timeout} => "an integer or :infinity (the wait for a slot)",
    {:function, LuaSandbox.Session, :fork} => "copies a state already inside the heap's bounds",
    {:function, LuaSandbox, :run} => [:source],
    {:function, LuaSandbox, :run!} => "run/2",
    {:function, LuaSandbox, :async} => "run/2 in a task",
    {:function, LuaSandbox, :async_stream} => "run/2 in tasks",
    {:function, LuaSandbox, :await} => "takes a task",
    {:function, LuaSandbox, :await_many} => "takes tasks",
    {:function, LuaSandbox, :compile} =>
      "the chunk is made outside any run (max_source bounds it) and loaded by run/2",
    {:function, LuaSandbox, :compile!} => "compile/2",
    {:function, LuaSandbox, :describe} => "builds text in Elixir",
    {:function, LuaSandbox, :describe_tools} => "builds text in Elixir",
    {:function, LuaSandbox, :handle} => [:handles],
    {:function, LuaSandbox, :metrics} => "reads counters",
    {:function, Session, :start_link} => [:session_start_globals],
    {:function, Session, :run} => [:session_run_source, :session_globals],
    {:function, Session, :call} => [:session_call_args],
    {:function, Session, :set} => [:session_set],
    {:function, Session, :get} => [:session_get_name],
    {:function, Session, :info} => "reads counters",
    {:function, Session, :stop} => "frees the state",
    {:function, Session, :child_spec} => "start_link/1"
  }

  defp found_ways_in do
    options = for {key, _} <- LuaSandbox.Options.defaults(), do: {:option, key}

    functions =
      for mod <- [LuaSandbox, Session],
          {name, _arity} <- mod.__info__(:functions),
          # GenServer callbacks of Session, not its API
          name not in [
            :init,
            :handle_call,
            :handle_cast,
            :handle_info,
            :handle_continue,
            :code_change,
            :terminate
          ],
          uniq: true,
          do: {:function, mod, name}

    options ++ functions
  end

  test "every option and public function is a way in with entries, or says why it is not" do
    assert Enum.sort(found_ways_in() -- Map.keys(@ways_in)) == []
    assert Enum.sort(Map.keys(@ways_in) -- found_ways_in()) == []
  end

  test "every entry belongs to a way in, and every way in that names entries has them" do
    named = @ways_in |> Map.values() |> Enum.filter(&is_list/1) |> List.flatten()
    assert Enum.sort(Enum.uniq(named)) == Enum.sort(Map.keys(entries()))
  end

  defp opts, do: [max_memory: @limit]

  @entry_names @ways_in
               |> Map.values()
               |> Enum.filter(&is_list/1)
               |> List.flatten()
               |> Enum.uniq()

  for name <- @entry_names do
    test "#{name}: more bytes than max_memory is :memory_limit, a few bytes run" do
      entry = Map.fetch!(entries(), unquote(name))
      assert {:ok, _} = entry.(:binary.copy("a", 1_000))

      assert {:error, %Error{kind: :memory_limit}} = entry.(:binary.copy("a", @big)),
             "#{unquote(name)} let #{@big} bytes into a #{@limit}-byte heap"
    end
  end
end
