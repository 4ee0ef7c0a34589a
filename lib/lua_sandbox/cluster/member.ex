defmodule LuaSandbox.Cluster.Member do
  @moduledoc false
  # Makes a LuaSandbox.Supervisor started with `cluster: true` a member of the :pg group named
  # after it (see LuaSandbox.Cluster), and publishes its load to every node's view: when it
  # changed since the last look (every @publish_ms), and every @heartbeat_ms regardless.
  #
  # It is the supervisor's last child, so it joins once the supervisor can take runs and, the
  # children stopping in reverse order, leaves before it stops taking them.

  use GenServer

  alias LuaSandbox.Cluster
  alias LuaSandbox.Supervisor.Slots

  @publish_ms 10
  @heartbeat_ms 500

  def child_spec({name, _max} = arg),
    do: %{id: {__MODULE__, name}, start: {__MODULE__, :start_link, [arg]}}

  def start_link(arg), do: GenServer.start_link(__MODULE__, arg)

  @doc """
  The load a member publishes: `{running, capacity, queue}`, `queue` being the number of runs
  waiting in the supervisor's queue (LuaSandbox.Supervisor.Slots).
  """
  def load(name, _capacity), do: Slots.load(name)

  @impl true
  def init({name, capacity}) do
    :ok = :pg.join(Cluster.scope(), name, self())
    state = %{name: name, capacity: capacity, last: nil, beat: 0}
    {:ok, publish(state), {:continue, :tick}}
  end

  @impl true
  def handle_continue(:tick, state) do
    Process.send_after(self(), :tick, @publish_ms)
    {:noreply, state}
  end

  @impl true
  def handle_info(:tick, state) do
    Process.send_after(self(), :tick, @publish_ms)
    {:noreply, publish(state)}
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp publish(%{last: last, beat: beat} = state) do
    load = load(state.name, state.capacity)
    beat = beat + @publish_ms

    if load != last or beat >= @heartbeat_ms do
      {running, capacity, queue} = load
      message = {:load, self(), running, capacity, queue}
      Enum.each(:pg.get_members(Cluster.scope(), Cluster.views_group()), &send(&1, message))
      %{state | last: load, beat: 0}
    else
      %{state | beat: beat}
    end
  end
end
