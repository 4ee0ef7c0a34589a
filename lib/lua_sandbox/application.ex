defmodule LuaSandbox.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    children = [
      {LuaSandbox.Supervisor,
       name: LuaSandbox.TaskSupervisor,
       max_concurrency: LuaSandbox.Supervisor.default_max_concurrency()}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: LuaSandbox.AppSupervisor)
  end
end
