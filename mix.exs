Code.require_file("mix/compile_nif.exs", __DIR__)

defmodule LuaSandbox.MixProject do
  use Mix.Project

  def project do
    [
      app: :lua_sandbox,
      version: "0.1.0",
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

  defp aliases do
    []
  end
end
