# Under both isolations (LuaSandbox.Isolation): LuaSandbox.EncoderTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.EncoderTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation

    defp run(source, opts),
      do: LuaSandbox.run(source, LuaSandbox.Isolation.opts(@isolation, opts))

    defp run!(source, opts),
      do: LuaSandbox.run!(source, LuaSandbox.Isolation.opts(@isolation, opts))

    alias LuaSandbox.Error
    alias LuaSandbox.Test.{Money, Secret, User}

    defp value(src, opts), do: run!(src, opts).value

    describe "built-in implementations" do
      test "dates and times become ISO 8601 strings, URIs their string" do
        globals = %{
          d: ~D[2026-12-01],
          t: ~T[08:30:00],
          n: ~N[2026-12-01 08:30:00],
          dt: DateTime.from_naive!(~N[2026-12-01 08:30:00], "Etc/UTC"),
          u: URI.parse("https://example.com/a?b=1")
        }

        assert value("return {d, t, n, dt, u}", globals: globals) == [
                 "2026-12-01",
                 "08:30:00",
                 "2026-12-01T08:30:00",
                 "2026-12-01T08:30:00Z",
                 "https://example.com/a?b=1"
               ]
      end
    end

    describe "derived and hand-written implementations" do
      test "only: keeps the named fields" do
        user = %User{name: "ada", joined: ~D[1843-01-01], password_hash: "x"}

        assert value("return u", globals: %{u: user}) ==
                 %{"name" => "ada", "joined" => "1843-01-01"}
      end

      test "except: drops the named fields" do
        assert value("return s", globals: %{s: %Secret{label: "k", value: "v"}}) == %{
                 "label" => "k"
               }
      end

      test "a defimpl's result is encoded in turn" do
        assert value("return m.amount, m.currency",
                 globals: %{m: %Money{cents: 250, currency: "EUR"}}
               ) ==
                 2.5
      end

      test "deriving with an unknown field fails at compile time" do
        # The macro @derive expands, called directly (a module defined here would warn that
        # the protocol is already consolidated).
        assert_raise ArgumentError, ~r/unknown fields \[:nope\]/, fn ->
          apply(LuaSandbox.Encoder.Any, :"MACRO-__deriving__", [
            __ENV__,
            Bad,
            %{__struct__: Bad, a: 1},
            [only: [:nope]]
          ])
        end
      end
    end

    describe "where it applies" do
      test "globals, call: arguments and tool results, nested anywhere" do
        tools = %{today: fn [] -> {:ok, %{date: ~D[2026-12-01], tags: [{:ok, 1}]}} end}
        src = "function f(x) local r = tools.today() return x[1], r.date, r.tags[1] end"

        assert run!(src, call: {"f", [[~T[10:00:00]]]}, tools: tools).values ==
                 ["10:00:00", "2026-12-01", ["ok", 1]]
      end

      # sessions are not yet supported on :process
      if @isolation == :nif do
        test "sessions: globals at start and call: arguments" do
          {:ok, s} = LuaSandbox.Session.start_link(globals: [d: ~D[2026-12-01]])
          assert {:ok, _} = LuaSandbox.Session.run(s, "function f(t) return d, t end")

          assert {:ok, %{values: ["2026-12-01", "10:00:00"]}} =
                   LuaSandbox.Session.call(s, "f", [~T[10:00:00]])

          LuaSandbox.Session.stop(s)
        end
      end

      test "tuples become lists" do
        assert value("return t[1], t[2], #t", globals: %{t: {:ok, 42}}) == "ok"
        assert run!("return t[2]", globals: %{t: {:ok, 42}}).value == 42
      end

      test "a struct without an implementation is :invalid_input naming the path" do
        assert {:error, %Error{kind: :invalid_input, message: msg}} =
                 run("return 1", globals: %{ctx: %{at: [%ExUnit.Test{}]}})

        assert msg =~ "globals.ctx.at[1]"
      end

      test "plain data crosses unchanged" do
        data = %{"a" => [1, 2.5, "x", true, %{"b" => [false]}]}

        assert LuaSandbox.Encoding.encode(data, LuaSandbox.Encoding.bound(1_048_576, nil, nil)) ==
                 {:ok, data}

        assert value("return d", globals: %{d: data}) == data
      end
    end
  end
end
