# Under both isolations (LuaSandbox.Isolation): LuaSandbox.OptionsTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.OptionsTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation

    defp run(source, opts \\ []),
      do: LuaSandbox.run(source, LuaSandbox.Isolation.opts(@isolation, opts))

    alias LuaSandbox.{Error, Options}

    describe "compile/2 validates like run/2" do
      test "a non-binary source is an ArgumentError" do
        assert_raise ArgumentError, ~r/source must be a string/, fn -> LuaSandbox.compile(123) end
      end

      test "bad options are ArgumentErrors, not NIF decode errors" do
        assert_raise ArgumentError, ~r/chunk_name/, fn ->
          LuaSandbox.compile("return 1", chunk_name: 5)
        end

        assert_raise ArgumentError, ~r/max_source/, fn ->
          LuaSandbox.compile("return 1", max_source: -1)
        end

        assert_raise ArgumentError, fn -> LuaSandbox.compile("return 1", nope: 1) end
        assert_raise ArgumentError, fn -> LuaSandbox.compile("return 1", :bad) end
      end

      test "compile!/2 returns the chunk or raises the error" do
        assert %LuaSandbox.Chunk{name: "c"} = LuaSandbox.compile!("return 1", chunk_name: "c")
        assert_raise Error, ~r/syntax/, fn -> LuaSandbox.compile!("return +") end
      end

      test "a compile error has full stats" do
        {:error, e} = LuaSandbox.compile("return +")
        assert e.stats.instructions == 0
      end
    end

    describe "a forged chunk" do
      # Every entry that takes a chunk: run/2 (directly and from a session) and modules.
      # (sessions: :nif only, not yet supported on :process)
      @entries [run: &__MODULE__.run_chunk/1, module: &__MODULE__.run_module/1] ++
                 if(@isolation == :nif,
                   do: [
                     session: &__MODULE__.run_in_session/1,
                     session_module: &__MODULE__.start_session_with_module/1
                   ],
                   else: []
                 )

      def run_chunk(chunk), do: run(chunk)
      def run_module(chunk), do: run("return require('m')", modules: %{m: chunk})

      def run_in_session(chunk) do
        {:ok, s} = LuaSandbox.Session.start_link()
        LuaSandbox.Session.run(s, chunk)
      end

      def start_session_with_module(chunk),
        do: LuaSandbox.Session.start_link(modules: %{m: chunk})

      test "is an ArgumentError or :invalid_input on every entry, never a NIF decode error" do
        real = LuaSandbox.compile!("return 1")

        forged = [
          struct(LuaSandbox.Chunk, %{}),
          %LuaSandbox.Chunk{ref: 1, name: "x"},
          %LuaSandbox.Chunk{ref: real.ref, name: 5},
          %LuaSandbox.Chunk{ref: make_ref(), name: "x"}
        ]

        for chunk <- forged, {entry, fun} <- @entries do
          outcome =
            try do
              fun.(chunk)
            rescue
              e -> e
            catch
              :exit, reason -> {:exit, reason}
            end

          assert match?(%ArgumentError{}, outcome) or
                   match?({:error, %Error{kind: :invalid_input}}, outcome),
                 "#{entry} with #{inspect(chunk, structs: false)}: #{inspect(outcome)}"
        end
      end
    end

    describe "max_memory" do
      test "below the documented minimum is an ArgumentError" do
        min = Options.min_memory()
        assert min == 256 * 1024

        for bad <- [0, 1, min - 1] do
          assert_raise ArgumentError, ~r/max_memory must be at least/, fn ->
            run("return 1", max_memory: bad)
          end
        end
      end

      test "the minimum is enough for a trivial run with a tool, a module and a global" do
        opts = [
          max_memory: Options.min_memory(),
          tools: [add: fn [a, b] -> a + b end],
          modules: [m: "return {k = 1}"],
          globals: [ctx: %{items: [1, 2, 3]}]
        ]

        assert {:ok, %{values: [3, 1, 3]}} =
                 run("return tools.add(1, 2), require('m').k, #ctx.items", opts)
      end
    end

    describe "names" do
      test "must be non-empty UTF-8 strings or atoms" do
        for bad <- [<<0xFF>>, "", 1, nil, true, {:a}] do
          assert_raise ArgumentError, ~r/name must be a non-empty UTF-8 string or an atom/, fn ->
            run("return 1", globals: %{bad => 1})
          end

          assert_raise ArgumentError, ~r/name/, fn ->
            run("return 1", tools: %{bad => fn _ -> 1 end})
          end

          assert_raise ArgumentError, ~r/name/, fn ->
            run("return 1", modules: %{bad => "return 1"})
          end

          assert_raise ArgumentError, ~r/call name/, fn ->
            run("return 1", call: {bad, []})
          end
        end
      end

      test "two names that become one Lua name are an ArgumentError" do
        assert_raise ArgumentError, ~r/more than once/, fn ->
          run("return 1", globals: %{"a" => 1, a: 2})
        end

        assert_raise ArgumentError, ~r/more than once/, fn ->
          run("return 1", globals: [a: 1, a: 2])
        end
      end

      test "keyword lists are accepted wherever a map of names is" do
        opts = [
          globals: [x: 2],
          tools: [double: fn [n] -> n * 2 end],
          modules: [inc: "return function(n) return n + 1 end"]
        ]

        assert {:ok, %{value: 5}} = run("return require('inc')(tools.double(x))", opts)
      end

      test "something that is neither a map nor a keyword list is an ArgumentError" do
        assert_raise ArgumentError, ~r/globals must be a map or a keyword list/, fn ->
          run("return 1", globals: [1, 2])
        end
      end
    end

    describe "chunk_name" do
      test "with a NUL or a newline is an ArgumentError" do
        for bad <- ["a\0b", "a\nb", "a\rb"] do
          assert_raise ArgumentError, ~r/NUL or a newline/, fn ->
            run("return 1", chunk_name: bad)
          end

          assert_raise ArgumentError, ~r/NUL or a newline/, fn ->
            LuaSandbox.compile("return 1", chunk_name: bad)
          end
        end
      end
    end

    describe "call: arguments" do
      test "more than the documented limit is :invalid_input with a clear message" do
        max = Options.max_call_args()
        assert max == 100_000
        args = List.duplicate(1, max + 1)

        assert {:error, %Error{kind: :invalid_input, message: msg, stats: stats}} =
                 run("function f(...) return 1 end", call: {"f", args})

        assert msg == "call: has 100001 arguments, more than the limit of 100000"
        assert stats.instructions == 0
      end

      test "the limit itself works" do
        args = List.duplicate(1, Options.max_call_args())

        assert {:ok, %{value: 100_000}} =
                 run("function f(...) return select('#', ...) end", call: {"f", args})
      end
    end

    describe "the documentation" do
      test "the README's options table is the one LuaSandbox's docs render" do
        readme = File.read!(Path.expand("../../README.md", __DIR__))
        assert readme =~ Options.table()
      end

      test "every option has a row and a typespec clause" do
        {:ok, types} = Code.Typespec.fetch_types(LuaSandbox)

        {:type, {:option, {:type, _, :union, clauses}, []}} =
          Enum.find(types, &match?({:type, {:option, _, _}}, &1))

        typed = for {:type, _, :tuple, [{:atom, _, k}, _]} <- clauses, do: k
        assert Enum.sort(typed) == Enum.sort(Keyword.keys(Options.defaults()))
      end
    end
  end
end

defmodule LuaSandbox.OptionsDefaultsTest do
  use ExUnit.Case, async: true

  test "the precomputed normalized defaults equal the validated defaults" do
    assert LuaSandbox.Options.validate!([]) ==
             LuaSandbox.Options.validate!(LuaSandbox.Options.defaults())
  end

  test "unknown options and non-keyword lists are ArgumentErrors" do
    assert_raise ArgumentError, ~r/unknown option :nope/, fn ->
      LuaSandbox.run("return 1", nope: 1)
    end

    assert_raise ArgumentError, ~r/keyword list/, fn -> LuaSandbox.run("return 1", [1]) end
    assert_raise ArgumentError, ~r/keyword list/, fn -> LuaSandbox.run("return 1", %{}) end
  end
end
