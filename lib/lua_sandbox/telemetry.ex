defmodule LuaSandbox.Telemetry do
  @moduledoc """
  `:telemetry` events, emitted when the application has the `:telemetry` library loaded (it is
  not a dependency: without it nothing is emitted and nothing is paid). Times are in `:native`
  units (convert with `System.convert_time_unit/3`), as in Ecto, Finch and Oban; `tenant` is
  the run's `tenant:` (or `nil`), `supervisor` its `LuaSandbox.Supervisor`, `chunk` its
  `chunk_name` (a compiled chunk's own name).

    * `[:lua_sandbox, :run, :start]` — a run was admitted and starts. Measurements:
      `monotonic_time`, `system_time`, `queue_time` (waiting for a slot). Metadata:
      `supervisor`, `tenant`, `chunk`.
    * `[:lua_sandbox, :run, :stop]` — it ended. Measurements: `duration` (from the call to the
      end, queueing included), `queue_time`, `monotonic_time`, and the run's `cpu_us`,
      `instructions`, `memory_peak`, `tool_calls` (`LuaSandbox.Result` stats). Metadata: as
      `:start`, plus `kind` (`:ok` or the error kind).
    * `[:lua_sandbox, :run, :rejected]` — a run was refused before it ran. Measurements:
      `count` (1). Metadata: `supervisor`, `tenant`, `kind` (`:overloaded`, `:rate_limited`,
      `:quota_exceeded`), `retry_after_ms`.
    * `[:lua_sandbox, :sandbox, :denied]` — a run called a capability the sandbox does not
      offer ("os.getenv is not available in this sandbox"), once per capability and run.
      Measurements: `count` (calls in that run). Metadata: `supervisor`, `tenant`, `chunk`,
      `capability` (e.g. `"os.getenv"`).
    * `[:lua_sandbox, :session, :call, :start | :stop]` — a `LuaSandbox.Session` call, with the
      measurements and metadata of the run events (`tenant` is the session's `tenant:`) plus
      `session` (its pid). A refused call emits `[:lua_sandbox, :run, :rejected]`.

  With `:telemetry` loaded and no handler attached, a run pays one lookup per event (see
  bench/RESULTS.md).
  """

  @compile {:no_warn_undefined, :telemetry}
  @compile {:inline, enabled?: 0}

  @doc false
  # Loaded, not necessarily started: :telemetry.execute/3 works either way (no handlers).
  def enabled?, do: :erlang.function_exported(:telemetry, :execute, 3)

  @doc false
  # The start of a run (`:run`) or session call (`:session`): returns what stop/2 needs. Event
  # names are literals and times raw BIF reads: with no handler attached this is what a run
  # pays (bench/RESULTS.md, section 9).
  def start(what, t0, queued_us, meta) do
    queue_time =
      if queued_us == 0, do: 0, else: :erlang.convert_time_unit(queued_us, :microsecond, :native)

    :telemetry.execute(
      event(what, :start),
      # system time is monotonic time plus the offset (ERTS's definition): one clock read
      # fewer (~70 ns here) than :erlang.system_time/0
      %{monotonic_time: t0, system_time: t0 + :erlang.time_offset(), queue_time: queue_time},
      meta
    )

    {what, t0, queue_time, meta}
  end

  @doc false
  def stop({what, t0, queue_time, meta}, result) do
    now = :erlang.monotonic_time()

    {kind, stats} =
      case result do
        {:ok, r} -> {:ok, r.stats}
        {:error, e} -> {e.kind, e.stats}
      end

    :telemetry.execute(
      event(what, :stop),
      %{
        duration: now - t0,
        queue_time: queue_time,
        monotonic_time: now,
        cpu_us: stats.cpu_us,
        instructions: stats.instructions,
        memory_peak: stats.memory_peak,
        tool_calls: stats.tool_calls
      },
      Map.put(meta, :kind, kind)
    )
  end

  defp event(:run, :start), do: [:lua_sandbox, :run, :start]
  defp event(:run, :stop), do: [:lua_sandbox, :run, :stop]
  defp event(:session, :start), do: [:lua_sandbox, :session, :call, :start]
  defp event(:session, :stop), do: [:lua_sandbox, :session, :call, :stop]

  @doc false
  def rejected(supervisor, tenant, error) do
    if enabled?() do
      :telemetry.execute([:lua_sandbox, :run, :rejected], %{count: 1}, %{
        supervisor: supervisor,
        tenant: tenant,
        kind: error.kind,
        retry_after_ms: error.retry_after_ms
      })
    end

    :ok
  end

  @doc false
  def denied(supervisor, tenant, chunk, capability, count) do
    if enabled?() do
      :telemetry.execute([:lua_sandbox, :sandbox, :denied], %{count: count}, %{
        supervisor: supervisor,
        tenant: tenant,
        chunk: chunk,
        capability: capability
      })
    end

    :ok
  end
end
