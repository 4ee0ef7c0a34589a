defmodule LuaSandbox.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    children = [
      # The cluster's :pg scope and this node's view of the members' loads (LuaSandbox.Cluster),
      # on every node, so that a node can route `node: :any` runs without being a member.
      %{id: :pg, start: {:pg, :start_link, [LuaSandbox.Cluster.scope()]}},
      LuaSandbox.Cluster,
      {LuaSandbox.Supervisor,
       name: LuaSandbox.TaskSupervisor,
       max_concurrency: LuaSandbox.Supervisor.default_max_concurrency(),
       cluster: Application.get_env(:lua_sandbox, :cluster, false)}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: LuaSandbox.AppSupervisor)
  end
end
