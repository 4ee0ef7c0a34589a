defmodule Mix.Tasks.Compile.LuaSandboxNif do
  @moduledoc """
  Builds the `lua_sandbox_nif` crate with cargo and installs the library as
  `priv/native/lua_sandbox_nif.so`.

  This replaces `rustler`'s Mix helper, which lives on Hex.

    * The artifact's path comes from cargo's own report (`--message-format=json`), so
      `CARGO_TARGET_DIR` and macOS (`.dylib`, installed as `.so` as the BEAM expects; the
      `-undefined dynamic_lookup` link flags are in `.cargo/config.toml`) work.
    * cargo is not called at all when the installed library is newer than every Rust and C
      source (`native/**`, `vendor/**`, `Cargo.toml`, `Cargo.lock`): a dependent app's
      `mix compile`, `mix test` and `mix run` work without cargo once the library is built.
    * `LUA_SANDBOX_NIF_PATH=/path/to/liblua_sandbox_nif.so` installs a prebuilt library instead
      of building one.
    * Without cargo and without a built library it stops with a message saying what to install.
    * cargo's progress is shown while it builds (the first build takes a few minutes).
  """
  use Mix.Task.Compiler

  @crate "lua_sandbox_nif"
  @env "LUA_SANDBOX_NIF_PATH"
  @needs "lua_sandbox needs Rust ≥ 1.85 (cargo) to build its NIF"

  @impl true
  def run(_args) do
    root = Path.expand("..", __DIR__)
    target = Path.join([root, "priv", "native", "#{@crate}.so"])

    cond do
      prebuilt = System.get_env(@env) ->
        install_prebuilt(prebuilt, target)

      fresh?(root, target) ->
        {:noop, []}

      cargo = System.find_executable("cargo") ->
        build(cargo, root, target)

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

  defp build(cargo, root, target) do
    first? = not File.exists?(target)

    if first? do
      Mix.shell().info(
        "lua_sandbox: building its NIF with cargo (release, the first build takes a few minutes)"
      )
    end

    args = [
      "build",
      "--release",
      "--locked",
      "-p",
      @crate,
      "--message-format=json-render-diagnostics"
    ]

    port =
      Port.open({:spawn_executable, cargo}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        {:cd, root},
        {:args, args}
      ])

    {artifact, status, log} = collect(port, nil, [], "")

    cond do
      status != 0 ->
        Mix.shell().error(log |> Enum.reverse() |> Enum.join("\n"))
        Mix.raise("cargo build failed with status #{status}")

      is_nil(artifact) ->
        Mix.raise("cargo build reported no #{@crate} library")

      same_file?(artifact, target) ->
        {:noop, []}

      true ->
        install(artifact, target, "Compiled NIF crate #{@crate} (#{artifact})")
    end
  end

  # cargo writes JSON messages on stdout and its human progress ("Compiling mlua ...") and
  # rendered diagnostics on stderr; the port merges them and JSON lines start with '{'.
  defp collect(port, artifact, log, partial) do
    receive do
      {^port, {:data, {:noeol, chunk}}} ->
        collect(port, artifact, log, partial <> chunk)

      {^port, {:data, {:eol, chunk}}} ->
        line = partial <> chunk

        case line do
          "{" <> _ ->
            collect(port, artifact(line) || artifact, log, "")

          _ ->
            if String.match?(line, ~r/^\s*(Compiling|Downloading|Downloaded|warning|error)/) do
              Mix.shell().info(line)
            end

            collect(port, artifact, [line | log], "")
        end

      {^port, {:exit_status, status}} ->
        {artifact, status, log}
    end
  end

  defp artifact(line) do
    with %{"reason" => "compiler-artifact", "target" => %{"name" => @crate} = t} = msg <-
           decode(line),
         true <- "cdylib" in t["kind"] do
      Enum.find(msg["filenames"], &(Path.extname(&1) in [".so", ".dylib", ".dll"]))
    else
      _ -> nil
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

  defp same_file?(a, b) do
    with {:ok, %{size: size}} <- File.stat(a),
         {:ok, %{size: ^size}} <- File.stat(b) do
      File.read!(a) == File.read!(b)
    else
      _ -> false
    end
  end
end
