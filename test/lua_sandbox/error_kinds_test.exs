defmodule LuaSandbox.ErrorKindsTest do
  # LuaSandbox.Error's @kinds is the one list of error kinds; every other copy must agree.
  use ExUnit.Case, async: true

  alias LuaSandbox.Error

  @root Path.expand("../..", __DIR__)

  defp readme_kinds do
    [_, section] =
      String.split(File.read!(Path.join(@root, "README.md")), "## Error kinds", parts: 2)

    [section | _] = String.split(section, "\n## ", parts: 2)

    Regex.scan(~r/^\| `:([a-z_]+)` \|/m, section, capture: :all_but_first)
    |> List.flatten()
    |> Enum.map(&String.to_atom/1)
  end

  # The names SandboxError::kind_name gives, read from the core's source: the one list on the
  # Rust side (the NIF and the worker both name a kind with it).
  defp native_kinds do
    src = File.read!(Path.join(@root, "native/lua_sandbox_core/src/error.rs"))
    [_, body] = String.split(src, "fn kind_name(&self) -> &'static str {", parts: 2)
    [body | _] = String.split(body, "\n    }\n", parts: 2)

    Regex.scan(~r/=> "([a-z_]+)",/, body, capture: :all_but_first)
    |> List.flatten()
    |> Enum.map(&String.to_atom/1)
  end

  test "the README's table lists exactly Error.kinds/0, in order, with the docs' wording" do
    assert readme_kinds() == Error.kinds()
    assert File.read!(Path.join(@root, "README.md")) =~ Error.kinds_table()
  end

  test "the native kinds are Error.kinds/0 minus the Elixir-only ones" do
    # :killed is internal: the caller that would read it is dead.
    native = native_kinds() -- [:killed]
    assert length(native) > 5, "could not parse the core's error.rs"
    assert Enum.sort(native) == Enum.sort(Error.kinds() -- Error.elixir_only_kinds())
  end

  test "the kind typespec and the moduledoc are built from the same list" do
    {:ok, types} = Code.Typespec.fetch_types(Error)

    {:type, {:kind, spec, []}} = Enum.find(types, &match?({:type, {:kind, _, _}}, &1))

    {:type, _, :union, atoms} = spec
    assert Enum.map(atoms, fn {:atom, _, a} -> a end) == Error.kinds()

    {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(Error)
    for kind <- Error.kinds(), do: assert(doc =~ "`#{inspect(kind)}`")
  end

  test "errors made on the Elixir side carry full stats" do
    assert Map.keys(%Error{}.stats) == [
             :cpu_us,
             :denied,
             :duration_us,
             :instructions,
             :memory_peak,
             :tool_calls
           ]
  end

  test "errors are built only by LuaSandbox.Error's constructors (no struct literal elsewhere in lib/)" do
    literals =
      for file <- Path.wildcard(Path.join(@root, "lib/**/*.ex")),
          Path.basename(file) != "error.ex",
          {line, n} <- file |> File.read!() |> String.split("\n") |> Enum.with_index(1),
          # a construction, not the `%LuaSandbox.Error{}` written in docs and doctests
          Regex.match?(~r/%(LuaSandbox\.)?Error\{\s*(\w+:|$)/, line),
          not String.contains?(line, ["iex>", "`{:error, %", "`%"]),
          # a pattern that binds the struct (`%Error{kind: :timeout} = e`) builds nothing
          not Regex.match?(~r/%(LuaSandbox\.)?Error\{[^}]*\}\s*=[^=>]/, line),
          do: "#{Path.relative_to(file, @root)}:#{n}: #{String.trim(line)}"

    assert literals == []
  end
end
