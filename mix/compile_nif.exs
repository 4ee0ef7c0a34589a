defmodule Mix.Tasks.Compile.LuaSandboxNif do
  @moduledoc """
  Builds the `lua_sandbox_nif` crate with cargo and copies the library into `priv/native/`.

  This replaces `rustler`'s Mix helper, which lives on Hex. Cargo decides what needs
  rebuilding (a no-op build takes a fraction of a second); the library is copied only when
  cargo produced a different one.
  """
  use Mix.Task.Compiler

  @crate "lua_sandbox_nif"

  @impl true
  def run(_args) do
    root = File.cwd!()
    target = Path.join([root, "priv", "native", "#{@crate}.so"])
    built = Path.join([root, "target", "release", "lib#{@crate}.so"])

    {output, status} =
      System.cmd("cargo", ["build", "--release", "--locked", "-p", @crate],
        cd: root,
        stderr_to_stdout: true
      )

    if status != 0 do
      Mix.shell().error(output)
      Mix.raise("cargo build failed with status #{status}")
    end

    if same_file?(built, target) do
      {:noop, []}
    else
      Mix.shell().info("Compiled NIF crate #{@crate} (cargo build --release)")
      File.mkdir_p!(Path.dirname(target))
      # Copy to a temp name and rename, so a running VM never maps a half-written file.
      tmp = target <> ".tmp"
      File.cp!(built, tmp)
      File.rename!(tmp, target)
      # Mix links priv/ into _build before compilers run; on a fresh clone priv/ did not exist
      # yet at that point, so link it now or the NIF would not be found on first load.
      Mix.Project.build_structure()
      {:ok, []}
    end
  end

  defp same_file?(a, b) do
    with {:ok, %{size: size}} <- File.stat(a),
         {:ok, %{size: ^size}} <- File.stat(b) do
      File.read!(a) == File.read!(b)
    else
      _ -> false
    end
  end
end
