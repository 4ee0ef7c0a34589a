defmodule Mix.Tasks.Compile.LuaSandboxNif do
  @moduledoc """
  Builds the `lua_sandbox_nif` crate with cargo and copies the library into `priv/native/`.

  This replaces `rustler`'s Mix helper, which lives on Hex. The crate is rebuilt only when a
  file under `native/` or `vendor/` or the workspace `Cargo.toml`/`Cargo.lock` is newer than the copied
  library.
  """
  use Mix.Task.Compiler

  @crate "lua_sandbox_nif"

  @impl true
  def run(_args) do
    root = File.cwd!()
    target = Path.join([root, "priv", "native", "#{@crate}.so"])

    if stale?(root, target) do
      build(root, target)
    else
      {:noop, []}
    end
  end

  defp stale?(root, target) do
    case File.stat(target, time: :posix) do
      {:error, _} ->
        true

      {:ok, %{mtime: built}} ->
        sources =
          Path.wildcard(Path.join(root, "native/**/*")) ++
            Path.wildcard(Path.join(root, "vendor/**/*")) ++
            [Path.join(root, "Cargo.toml"), Path.join(root, "Cargo.lock")]

        Enum.any?(sources, fn path ->
          case File.stat(path, time: :posix) do
            {:ok, %{type: :regular, mtime: mtime}} -> mtime > built
            _ -> false
          end
        end)
    end
  end

  defp build(root, target) do
    Mix.shell().info("Compiling NIF crate #{@crate} (cargo build --release)")

    {_, status} =
      System.cmd("cargo", ["build", "--release", "--locked", "-p", @crate],
        cd: root,
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true
      )

    if status != 0 do
      Mix.raise("cargo build failed with status #{status}")
    end

    built = Path.join([root, "target", "release", "lib#{@crate}.so"])
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
