defmodule LuaSandbox.TestPeer do
  @moduledoc false
  # Real `:peer` nodes on loopback, started and stopped by the tests themselves.

  @doc "Makes this VM a distributed node (starting epmd if needed)."
  def ensure_distributed do
    unless Node.alive?() do
      # Tests partition nodes on purpose (Node.disconnect/1, a peer stopped mid-run); OTP's
      # `global` on the peers would answer by asking every other node to disconnect from the
      # ones that saw the lost one, unrelated peers included: off on every peer (`start/1`).
      # (This node's `global` read its setting at boot: it cannot be changed from here.)
      {_, 0} = System.cmd("epmd", ["-daemon"])
      name = :"lua_sandbox_test_#{System.unique_integer([:positive])}@127.0.0.1"
      {:ok, _} = Node.start(name, :longnames)
    end

    :ok
  end

  @doc """
  Starts a peer with our code paths and the :lua_sandbox app running. `vm_args` are extra
  emulator flags, e.g. `["+SDcpu", "1:1"]` for a single dirty CPU scheduler.
  """
  def start(vm_args \\ []) do
    ensure_distributed()
    paths = Enum.flat_map(:code.get_path(), fn p -> [~c"-pa", p] end)
    name = :"peer_#{System.unique_integer([:positive])}"

    {:ok, pid, node} =
      :peer.start_link(%{
        name: name,
        host: ~c"127.0.0.1",
        longnames: true,
        args:
          Enum.map(vm_args, &String.to_charlist/1) ++
            [~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"] ++ paths
      })

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:lua_sandbox])
    {pid, node}
  end

  @doc """
  Runs `fun.(node)` on a fresh peer with a single dirty CPU scheduler (what a kill or deadline
  probe needs to see whether *the* dirty scheduler is free), then stops the peer.
  """
  def with_one_dirty_scheduler(fun) do
    {peer, node} = start(["+SDcpu", "1:1"])

    try do
      1 = :erpc.call(node, :erlang, :system_info, [:dirty_cpu_schedulers_online])
      fun.(node)
    after
      stop(peer)
    end
  end

  @doc """
  Starts a `LuaSandbox.Supervisor` named `name` with `cluster: true` on `node`, under the peer's
  application supervisor (so it outlives the call). Returns its :pg member pid.
  """
  def member(node, name, max_concurrency) do
    spec = {LuaSandbox.Supervisor, name: name, max_concurrency: max_concurrency, cluster: true}
    {:ok, _} = :erpc.call(node, Supervisor, :start_child, [LuaSandbox.AppSupervisor, spec])

    [pid] = :erpc.call(node, :pg, :get_local_members, [LuaSandbox.Cluster.scope(), name])

    pid
  end

  @doc "Stops the member started by member/3."
  def stop_member(node, name) do
    :ok = :erpc.call(node, Supervisor, :terminate_child, [LuaSandbox.AppSupervisor, name])
    :ok = :erpc.call(node, Supervisor, :delete_child, [LuaSandbox.AppSupervisor, name])
  end

  def stop(pid) do
    :peer.stop(pid)
  catch
    :exit, _ -> :ok
  end
end
