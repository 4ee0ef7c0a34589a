defmodule Mix.Tasks.Compile.LuaSandboxNif do
  @moduledoc """
  Builds the `lua_sandbox_nif` crate with cargo and installs the library as
  `priv/native/lua_sandbox_nif.so`, and the worker binary of `isolation: :process`
  (`lua_sandbox_worker`) as `priv/native/lua_sandbox_worker`, so a release carries both.
  In `MIX_ENV=test` it also builds the worker with its test-only `wall-probes` feature, installed
  outside `priv/` (`_build/test/lua_sandbox_worker_probes`) so no release can carry it.

  This replaces `rustler`'s Mix helper, which lives on Hex.

    * The artifact's path comes from cargo's own report (`--message-format=json`), so
      `CARGO_TARGET_DIR` and macOS (`.dylib`, installed as `.so` as the BEAM expects; the
      `-undefined dynamic_lookup` link flags are in `.cargo/config.toml`) work.
    * cargo is not called at all when the installed library is newer than every Rust and C
      source (`native/**`, `vendor/**`, `Cargo.toml`, `Cargo.lock`): a dependent app's
      `mix compile`, `mix test` and `mix run` work without cargo once the library is built.
    * `LUA_SANDBOX_NIF_PATH=/path/to/liblua_sandbox_nif.so` installs a prebuilt library instead
      of building one (and no worker: `isolation: :process` then says the worker is missing).
    * Without cargo and without a built library it stops with a message saying what to install.
    * cargo's progress is shown while it builds (the first build takes a few minutes).
  """
  use Mix.Task.Compiler

  @crate "lua_sandbox_nif"
  @worker_crate "lua_sandbox_worker"
  @env "LUA_SANDBOX_NIF_PATH"
  @needs "lua_sandbox needs Rust ≥ 1.85 (cargo) to build its NIF"

  @impl true
  def run(_args) do
    root = Path.expand("..", __DIR__)
    target = Path.join([root, "priv", "native", "#{@crate}.so"])
    # The worker's jail is Linux's (namespaces, Landlock, seccomp): elsewhere it is not built.
    linux? = :os.type() == {:unix, :linux}
    worker = if linux?, do: Path.join([root, "priv", "native", @worker_crate])
    probes = if linux? and Mix.env() == :test, do: probes_path()

    cond do
      prebuilt = System.get_env(@env) ->
        install_prebuilt(prebuilt, target)

      Enum.all?([target, worker, probes], &(&1 == nil or fresh?(root, &1))) ->
        {:noop, []}

      cargo = System.find_executable("cargo") ->
        # The probes build first: both link target/release/worker, the release one last.
        if probes, do: build_worker_probes(cargo, root, probes)
        build(cargo, root, target, worker)

      File.exists?(target) ->
        Mix.shell().error(
          "#{@needs}; cargo is not on PATH, so the installed library (older than the sources) is used as it is"
        )

        {:noop, []}

      true ->
        Mix.raise(
          "#{@needs}: cargo is not on PATH. Install Rust from https://rustup.rs, or point " <>
            "#{@env} at a prebuilt lib#{@crate} library."
        )
    end
  end

  @doc false
  # Where the test-only worker (feature `wall-probes`) is installed: outside priv/.
  def probes_path, do: Path.join(Mix.Project.build_path(), "#{@worker_crate}_probes")

  defp install_prebuilt(path, target) do
    unless File.regular?(path) do
      Mix.raise("#{@env} is set to #{inspect(path)}, which is not a file")
    end

    install(path, target, "Installed prebuilt NIF from #{@env}=#{path}")
  end

  # The installed library is up to date when every source is older than it. Strictly: mtimes
  # are whole seconds, and a source edited in the second the library was installed may be newer
  # (then cargo is asked, which costs a fraction of a second when nothing changed).
  defp fresh?(root, target) do
    case File.stat(target, time: :posix) do
      {:ok, %{mtime: installed}} ->
        root |> sources() |> Enum.all?(&(mtime(&1) < installed))

      {:error, _} ->
        false
    end
  end

  defp sources(root) do
    [Path.join(root, "Cargo.toml"), Path.join(root, "Cargo.lock")] ++
      Path.wildcard(Path.join(root, "native/**")) ++
      Path.wildcard(Path.join(root, "vendor/**")) ++
      Path.wildcard(Path.join(root, ".cargo/**"))
  end

  defp mtime(path) do
    case File.stat(path, time: :posix) do
      {:ok, %{mtime: t}} -> t
      # a source that vanished since the wildcard: something changed, rebuild
      {:error, _} -> :infinity
    end
  end

  defp build(cargo, root, target, worker) do
    first? = not File.exists?(target)

    if first? do
      Mix.shell().info(
        "lua_sandbox: building its NIF with cargo (release, the first build takes a few minutes)"
      )
    end

    packages = ["-p", @crate] ++ if(worker, do: ["-p", @worker_crate], else: [])
    artifacts = cargo_build(cargo, root, packages)

    nif =
      case artifacts[@crate] do
        nil ->
          Mix.raise("cargo build reported no #{@crate} library")

        artifact ->
          if same_file?(artifact, target),
            do: {:noop, []},
            else: install(artifact, target, "Compiled NIF crate #{@crate} (#{artifact})")
      end

    cond do
      worker == nil -> :ok
      artifact = artifacts[@worker_crate] -> install_executable(artifact, worker)
      true -> Mix.raise("cargo build reported no #{@worker_crate} binary")
    end

    nif
  end

  defp build_worker_probes(cargo, root, probes) do
    args = ["-p", @worker_crate, "--features", "wall-probes"]

    case cargo_build(cargo, root, args)[@worker_crate] do
      nil -> Mix.raise("cargo build reported no #{@worker_crate} binary with wall-probes")
      artifact -> install_executable(artifact, probes)
    end
  end

  # `cargo build --release` of `packages`: `%{crate => artifact path}`.
  defp cargo_build(cargo, root, packages) do
    args =
      ["build", "--release", "--locked"] ++
        packages ++ ["--message-format=json-render-diagnostics"]

    port =
      Port.open({:spawn_executable, cargo}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        {:cd, root},
        {:args, args}
      ])

    {artifacts, status, log} = collect(port, %{}, [], "")

    if status != 0 do
      Mix.shell().error(log |> Enum.reverse() |> Enum.join("\n"))
      Mix.raise("cargo build failed with status #{status}")
    end

    artifacts
  end

  # cargo writes JSON messages on stdout and its human progress ("Compiling mlua ...") and
  # rendered diagnostics on stderr; the port merges them and JSON lines start with '{'.
  defp collect(port, artifacts, log, partial) do
    receive do
      {^port, {:data, {:noeol, chunk}}} ->
        collect(port, artifacts, log, partial <> chunk)

      {^port, {:data, {:eol, chunk}}} ->
        line = partial <> chunk

        case line do
          "{" <> _ ->
            collect(port, Map.merge(artifacts, artifact(line)), log, "")

          _ ->
            if String.match?(line, ~r/^\s*(Compiling|Downloading|Downloaded|warning|error)/) do
              Mix.shell().info(line)
            end

            collect(port, artifacts, [line | log], "")
        end

      {^port, {:exit_status, status}} ->
        {artifacts, status, log}
    end
  end

  # The NIF's library, or the worker crate's `worker` binary, as `%{crate => path}`.
  defp artifact(line) do
    case decode(line) do
      %{"reason" => "compiler-artifact", "target" => %{"name" => @crate} = t} = msg ->
        lib = Enum.find(msg["filenames"], &(Path.extname(&1) in [".so", ".dylib", ".dll"]))
        if "cdylib" in t["kind"] and lib, do: %{@crate => lib}, else: %{}

      %{"reason" => "compiler-artifact", "target" => %{"name" => "worker"} = t} = msg ->
        if "bin" in t["kind"], do: %{@worker_crate => hd(msg["filenames"])}, else: %{}

      _ ->
        %{}
    end
  end

  # Only the few fields above are needed, and Jason is on Hex: OTP 25 has no JSON module.
  # Erlang's own term scanner cannot read JSON either, so pull the fields with patterns on
  # cargo's fixed, compact output.
  defp decode(line) do
    with [_, reason] <- Regex.run(~r/"reason":"([a-z-]+)"/, line),
         [_, name] <- Regex.run(~r/"target":\{[^}]*?"name":"([^"]+)"/, line),
         [_, kinds] <- Regex.run(~r/"target":\{[^}]*?"kind":\[([^\]]*)\]/, line),
         [_, files] <- Regex.run(~r/"filenames":\[([^\]]*)\]/, line) do
      %{
        "reason" => reason,
        "target" => %{"name" => name, "kind" => strings(kinds)},
        "filenames" => strings(files)
      }
    else
      _ -> nil
    end
  end

  defp strings(list) do
    ~r/"((?:[^"\\]|\\.)*)"/
    |> Regex.scan(list, capture: :all_but_first)
    |> Enum.map(fn [s] -> String.replace(s, ~r/\\(.)/, "\\1") end)
  end

  defp install(from, target, message) do
    Mix.shell().info(message)
    File.mkdir_p!(Path.dirname(target))
    # Copy to a temp name and rename, so a running VM never maps a half-written file.
    tmp = target <> ".tmp"
    File.cp!(from, tmp)
    File.rename!(tmp, target)
    # Mix links priv/ into _build before compilers run; on a fresh clone priv/ did not exist
    # yet at that point, so link it now or the NIF would not be found on first load.
    Mix.Project.build_structure()
    {:ok, []}
  end

  defp install_executable(from, target) do
    unless same_file?(from, target) do
      File.mkdir_p!(Path.dirname(target))
      tmp = target <> ".tmp"
      File.cp!(from, tmp)
      File.chmod!(tmp, 0o755)
      File.rename!(tmp, target)
      Mix.Project.build_structure()
    end

    :ok
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
