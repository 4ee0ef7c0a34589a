Code.require_file("mix/compile_nif.exs", __DIR__)

defmodule LuaSandbox.MixProject do
  use Mix.Project

  @version "0.1.0"
  @source_url "https://github.com/lua-sandbox/lua_sandbox"

  def project do
    [
      app: :lua_sandbox,
      version: @version,
      description:
        "Run untrusted Lua 5.4 from Elixir: real Lua in a Rust NIF, a fresh state " <>
          "per run, instruction/memory/output limits, and runs that stop when their caller dies.",
      source_url: @source_url,
      package: package(),
      docs: docs(),
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      # The crate is built by our own compiler task (no Hex, so no rustler_mix).
      compilers: [:lua_sandbox_nif] ++ Mix.compilers(),
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      aliases: aliases(),
      # PropEr and Luerl come from Debian into OTP's lib dir, not from Hex.
      xref: [exclude: [:proper, :proper_types, :luerl]],
      test_coverage: [ignore_modules: []]
    ]
  end

  def application do
    [
      mod: {LuaSandbox.Application, []},
      extra_applications: [:logger]
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]

  # What a Hex package (or a git/path dependency) must carry to build the NIF on the user's
  # machine: the crate, the vendored Lua, the lock file and the cargo config.
  defp package do
    [
      licenses: ["MIT"],
      links: %{"GitHub" => @source_url, "Changelog" => "#{@source_url}/blob/main/CHANGELOG.md"},
      files: ~w(lib mix native vendor .cargo Cargo.toml Cargo.lock mix.exs .formatter.exs
                README.md LICENSE CHANGELOG.md)
    ]
  end

  defp docs do
    [
      main: "LuaSandbox",
      source_ref: "v#{@version}",
      extras: ["README.md", "CHANGELOG.md", "bench/RESULTS.md"],
      groups_for_modules: [
        "Running code": [LuaSandbox, LuaSandbox.Chunk, LuaSandbox.Supervisor],
        Data: [LuaSandbox.Result, LuaSandbox.Error, LuaSandbox.Encoder]
      ]
    ]
  end

  defp aliases do
    []
  end
end
