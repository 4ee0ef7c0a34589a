defmodule LuaSandbox.Packaging.CompileNifTest do
  # The Mix compiler (mix/compile_nif.exs) as a user meets it: a copy of this project built
  # with CARGO_TARGET_DIR set, a dependent app run without cargo, a machine without Rust.
  # One real cargo build (in setup_all), seeded with this checkout's target/ so only the
  # crates whose path changed are rebuilt.
  use ExUnit.Case, async: false

  @moduletag :packaging
  @moduletag timeout: 900_000

  @root Path.expand("../..", __DIR__)
  @sources ~w(mix.exs mix lib native vendor .cargo Cargo.toml Cargo.lock .formatter.exs)
  @lib "priv/native/lua_sandbox_nif.so"

  setup_all do
    tmp = Path.join(System.tmp_dir!(), "lua_sandbox_pkg_#{System.unique_integer([:positive])}")
    proj = copy_project(Path.join(tmp, "proj"))
    target = Path.join(tmp, "cargo_target")
    File.mkdir_p!(target)
    seed = Path.join(@root, "target/release")
    if File.dir?(seed), do: {_, 0} = System.cmd("cp", ["-r", seed, target])

    {output, status} = mix(proj, ["compile"], [{"CARGO_TARGET_DIR", target}])
    on_exit(fn -> File.rm_rf!(tmp) end)
    %{tmp: tmp, proj: proj, target: target, build_output: output, build_status: status}
  end

  test "builds with CARGO_TARGET_DIR set and installs the artifact cargo reported", ctx do
    assert ctx.build_status == 0, ctx.build_output
    built = Path.join(ctx.target, "release/liblua_sandbox_nif.so")
    assert ctx.build_output =~ "Compiled NIF crate lua_sandbox_nif (#{built})"
    refute File.exists?(Path.join(ctx.proj, "target")), "cargo wrote into the project's target/"
    assert File.read!(Path.join(ctx.proj, @lib)) == File.read!(built)
  end

  test "a dependent app compiles and runs with cargo removed from PATH", ctx do
    assert ctx.build_status == 0, ctx.build_output
    app = Path.join(ctx.tmp, "my_agent")
    File.mkdir_p!(Path.join(app, "lib"))

    File.write!(Path.join(app, "mix.exs"), """
    defmodule MyAgent.MixProject do
      use Mix.Project
      def project, do: [app: :my_agent, version: "0.1.0", deps: [{:lua_sandbox, path: #{inspect(ctx.proj)}}]]
      def application, do: [extra_applications: [:logger]]
    end
    """)

    script = ~s|IO.puts("value=" <> inspect(LuaSandbox.run!("return 6 * 7").value))|
    {output, status} = mix(app, ["run", "-e", script], [{"PATH", path_without_cargo()}])
    assert status == 0, output
    assert output =~ "value=42"
    refute output =~ "enoent"
  end

  test "without cargo and without a built library: a message, not :enoent", ctx do
    proj = copy_project(Path.join(ctx.tmp, "no_rust"))
    {output, status} = mix(proj, ["compile"], [{"PATH", path_without_cargo()}])
    assert status != 0
    assert output =~ "lua_sandbox needs Rust ≥ 1.85 (cargo) to build its NIF"
    refute output =~ "enoent"
  end

  test "LUA_SANDBOX_NIF_PATH installs a prebuilt library without cargo", ctx do
    assert ctx.build_status == 0, ctx.build_output
    proj = copy_project(Path.join(ctx.tmp, "prebuilt"))
    prebuilt = Path.join(ctx.target, "release/liblua_sandbox_nif.so")
    env = [{"PATH", path_without_cargo()}, {"LUA_SANDBOX_NIF_PATH", prebuilt}]
    script = ~s|IO.puts("value=" <> inspect(LuaSandbox.run!("return 1 + 1").value))|
    {output, status} = mix(proj, ["run", "-e", script], env)
    assert status == 0, output
    assert output =~ "Installed prebuilt NIF from LUA_SANDBOX_NIF_PATH=#{prebuilt}"
    assert output =~ "value=2"
  end

  test "make runs the mix tests with MIX_ENV=test whatever the caller's environment holds" do
    for env <- [[{"MIX_ENV", "prod"}], [{"MIX_ENV", "dev"}], []] do
      {out, 0} = System.cmd("make", ["-n", "mix-test"], cd: @root, env: env)
      mix_lines = out |> String.split("\n") |> Enum.filter(&(&1 =~ ~r/\bmix (test|compile)\b/))
      assert length(mix_lines) == 2
      for line <- mix_lines, do: assert(line =~ ~r/^MIX_ENV=test /, line)
    end

    {out, 0} = System.cmd("make", ["-n", "mix-test", "MIX_ENV=prod"], cd: @root)
    assert out =~ ~r/^MIX_ENV=test .*mix test/m
  end

  defp copy_project(dest) do
    File.mkdir_p!(dest)

    for s <- @sources,
        File.exists?(Path.join(@root, s)),
        do: File.cp_r!(Path.join(@root, s), Path.join(dest, s))

    dest
  end

  defp mix(dir, args, env) do
    System.cmd("mix", args,
      cd: dir,
      env: [{"MIX_ENV", "dev"}, {"MIX_BUILD_PATH", nil}, {"MIX_TARGET", nil}] ++ env,
      stderr_to_stdout: true
    )
  end

  defp path_without_cargo do
    cargo_dir = Path.dirname(System.find_executable("cargo") || "/nonexistent/cargo")

    System.get_env("PATH")
    |> String.split(":")
    |> Enum.reject(&(&1 == cargo_dir or File.exists?(Path.join(&1, "cargo"))))
    |> Enum.join(":")
  end
end
