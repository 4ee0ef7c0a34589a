defmodule LuaSandbox.Isolation do
  @moduledoc false
  # The API test modules run under both isolations (issue 18): each such file wraps its module
  # in `for isolation <- LuaSandbox.Isolation.all()`, naming it `Module.concat(Base, isolation)`
  # and sending its runs through `opts/2`, which picks the supervisor of that isolation. The
  # :process one (LuaSandbox.Isolation.Process) is started by test_helper.exs, before the tests,
  # and outlives them all. Tests of what a :process supervisor does not support yet
  # (none at the moment) are generated for :nif only. Sessions on it run in a worker of their
  # own each, with their forks (session_test.exs, session_caller_test.exs,
  # session_fork_test.exs). Tests that time the NIF's dirty schedulers on a peer node have a
  # worker counterpart instead (bounded_ops_test.exs: a session call's cancel).

  @process LuaSandbox.Isolation.Process

  @doc "The isolations every parametrized API test module runs under."
  def all, do: [:nif, :process]

  @doc "`opts` with the supervisor of `isolation` (unless the test names one)."
  def opts(isolation, opts), do: Keyword.put_new(opts, :supervisor, supervisor(isolation))

  @doc "The supervisor runs of `isolation` go to."
  def supervisor(:nif), do: LuaSandbox.TaskSupervisor

  def supervisor(:process), do: @process

  @doc """
  Starts the :process supervisor, once, from test_helper.exs: before any test, so no test's
  process is ever its parent and no run can find it half started (its Task.Supervisor, which
  registers the name, starts before its pool of workers).
  """
  def start_process do
    {:ok, _pid} =
      LuaSandbox.Supervisor.start_link(
        name: @process,
        isolation: :process,
        max_concurrency: 8,
        # the adversarial suite runs some scripts with 128 MiB
        worker_max_memory: 256 * 1024 * 1024
      )

    :ok
  end
end
