defmodule LuaSandbox.Supervisor.Slots do
  @moduledoc false
  # The concurrency bound of one LuaSandbox.Supervisor, taken by every run in the process that
  # runs it. A slot is a row in a public ETS table; the number of rows is the number of runs.
  # Taking one costs an insert and a size read (~1 µs), not a call to a process: the keeper
  # (this GenServer) is only told, once per caller process, to monitor it, and deletes a dead
  # caller's rows, so a run whose caller was killed gives its slot back.
  #
  # Order matters for that: a caller asks to be watched *before* it inserts its row, so there is
  # no moment at which it holds a row nobody would clean up. Two callers racing for the last
  # slot may both be refused (each sees the other's row); neither can over-admit.

  use GenServer

  def child_spec({name, _max} = arg),
    do: %{id: {__MODULE__, name}, start: {__MODULE__, :start_link, [arg]}}

  def start_link({name, max}), do: GenServer.start_link(__MODULE__, {name, max})

  @doc "Takes a slot of supervisor `sup` for the calling process: `{:ok, slot}` or `:full`."
  def checkout(sup) do
    {tab, max, keeper} = lookup!(sup)
    watched = {__MODULE__, keeper}

    unless Process.get(watched) do
      send(keeper, {:watch, self()})
      Process.put(watched, true)
    end

    key = {self(), make_ref()}

    try do
      :ets.insert(tab, {key})

      if :ets.info(tab, :size) > max do
        :ets.delete(tab, key)
        :full
      else
        {:ok, {tab, key}}
      end
    rescue
      # the table went with its keeper: the supervisor stopped meanwhile
      ArgumentError -> not_running!(sup)
    end
  end

  @doc "Gives a slot back."
  def checkin({tab, key}) do
    :ets.delete(tab, key)
    :ok
  rescue
    ArgumentError -> :ok
  end

  @doc "How many runs hold a slot now."
  def count(sup) do
    {tab, _max, _keeper} = lookup!(sup)
    :ets.info(tab, :size) || not_running!(sup)
  end

  defp lookup!(sup) do
    case :persistent_term.get({__MODULE__, sup}, nil) do
      {_tab, _max, keeper} = entry ->
        if Process.alive?(keeper), do: entry, else: not_running!(sup)

      nil ->
        not_running!(sup)
    end
  end

  defp not_running!(LuaSandbox.TaskSupervisor = sup) do
    started? = List.keymember?(Application.started_applications(), :lua_sandbox, 0)

    if started?,
      do: raise(ArgumentError, "supervisor #{inspect(sup)} is not running"),
      else:
        raise(
          ArgumentError,
          "supervisor #{inspect(sup)} is not running: the :lua_sandbox application is not " <>
            "started (e.g. in a release's `bin/app eval`); start it first with " <>
            "Application.ensure_all_started(:lua_sandbox)"
        )
  end

  defp not_running!(sup),
    do: raise(ArgumentError, "supervisor #{inspect(sup)} is not running")

  @impl true
  # The entry outlives a keeper that was killed; lookup!/1 checks that the keeper is alive, and
  # a new supervisor of the same name replaces it.
  def init({name, max}) do
    tab = :ets.new(__MODULE__, [:set, :public, write_concurrency: true, read_concurrency: true])
    :persistent_term.put({__MODULE__, name}, {tab, max, self()})
    {:ok, %{name: name, tab: tab, watched: %{}}}
  end

  @impl true
  def handle_info({:watch, pid}, state) do
    if Map.has_key?(state.watched, pid) do
      {:noreply, state}
    else
      Process.monitor(pid)
      {:noreply, put_in(state.watched[pid], true)}
    end
  end

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    :ets.match_delete(state.tab, {{pid, :_}})
    {:noreply, %{state | watched: Map.delete(state.watched, pid)}}
  end

  def handle_info(_other, state), do: {:noreply, state}
end
