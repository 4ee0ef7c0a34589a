defmodule LuaSandbox.Isolation do
  @moduledoc false
  # The API test modules run under both isolations (issue 18): each such file wraps its module
  # in `for isolation <- LuaSandbox.Isolation.all()`, naming it `Module.concat(Base, isolation)`
  # and sending its runs through `opts/2`, which picks the supervisor of that isolation. The
  # :process one (LuaSandbox.Isolation.Process) is started once, on first use, unlinked from
  # any test, and outlives them all. Tests of what a :process supervisor does not support yet
  # (compiled chunks, print: {:send, ...}, handles, sessions) are generated for :nif only.

  @process LuaSandbox.Isolation.Process

  @doc "The isolations every parametrized API test module runs under."
  def all, do: [:nif, :process]

  @doc "`opts` with the supervisor of `isolation` (unless the test names one)."
  def opts(isolation, opts), do: Keyword.put_new(opts, :supervisor, supervisor(isolation))

  @doc "The supervisor runs of `isolation` go to."
  def supervisor(:nif), do: LuaSandbox.TaskSupervisor

  def supervisor(:process) do
    unless Process.whereis(@process), do: start_process()
    @process
  end

  # Several test modules may ask at once: one of them starts it, the others see it running.
  defp start_process do
    :global.trans({{__MODULE__, :start}, self()}, fn ->
      unless Process.whereis(@process) do
        {:ok, pid} =
          LuaSandbox.Supervisor.start_link(
            name: @process,
            isolation: :process,
            max_concurrency: 8
          )

        Process.unlink(pid)
      end
    end)
  end
end
