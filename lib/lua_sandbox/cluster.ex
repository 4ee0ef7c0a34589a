defmodule LuaSandbox.Cluster do
  @moduledoc false
  # Routing runs across a cluster of sandbox nodes (`node: :any`), on Erlang distribution and
  # `:pg`. Three parts:
  #
  #   * the scope: a `:pg` scope named LuaSandbox.Cluster.Scope, started by the application on every
  #     node. A supervisor started with `cluster: true` is a member of the group named after
  #     it (its LuaSandbox.Cluster.Member process joins), so `node: :any, supervisor: S` picks
  #     among the supervisors named S on every connected node.
  #   * the view (this GenServer, one per node): a public ETS table of every member's last
  #     published load, `{member_pid, running, capacity, queue}`. Members send their load to
  #     every view (the group @views) when it changes, checked every @publish_ms, and every
  #     @heartbeat_ms regardless (so a view that joins late learns it). Picking reads only
  #     this node's ETS table and :pg's: no message on the path of a run.
  #   * the router (run/2): power of two choices on the view, skipping a member at capacity
  #     while another has room; a run that certainly never started is retried once elsewhere.
  #
  # :pg is the truth of who is a member (it drops a member whose process or node is gone); the
  # view only holds loads, and a view entry without a member is never picked.

  use GenServer

  alias LuaSandbox.{Chunk, Encoding, Error, Supervisor}

  @scope LuaSandbox.Cluster.Scope
  @table __MODULE__
  @views {__MODULE__, :views}

  @doc "The :pg scope the application owns."
  def scope, do: @scope

  @doc "The :pg group of the views (one per node)."
  def views_group, do: @views

  @doc false
  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @impl true
  def init(nil) do
    :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
    {ref, _groups} = :pg.monitor_scope(@scope)
    :ok = :pg.join(@scope, @views, self())
    {:ok, ref}
  end

  @impl true
  def handle_info({:load, member, running, capacity, queue}, ref) do
    :ets.insert(@table, {member, running, capacity, queue})
    {:noreply, ref}
  end

  def handle_info({ref, :leave, _group, pids}, ref) do
    Enum.each(pids, &:ets.delete(@table, &1))
    {:noreply, ref}
  end

  def handle_info(_other, ref), do: {:noreply, ref}

  ## Routing

  @doc """
  Runs `source` on a member of the group `opts[:supervisor]`, local or remote (`node: :any`).
  Retries once on another member when the run certainly never started (the member was gone
  before accepting it, or answered :overloaded); a run in flight on a member that goes away
  answers :node_down and is not replayed. The first try does not queue (a full member answers
  :overloaded at once); the retry waits in its member's queue up to `queue_timeout`.
  """
  def run(source, opts) do
    local_only = too_large(source, opts)
    attempt(source, opts, local_only, [], 2, local_only)
  end

  defp attempt(source, opts, local_only, tried, tries, last) do
    case pick(opts[:supervisor], tried, local_only != nil) do
      nil ->
        {:error, last || no_member(opts[:supervisor])}

      member ->
        # A run that may still be retried elsewhere does not wait in this member's queue.
        try_opts = if tries > 1, do: Keyword.put(opts, :queue_timeout, 0), else: opts

        case charged(member, fn -> run_on(member, source, try_opts) end) do
          {:not_started, error} when tries > 1 ->
            attempt(source, opts, local_only, [member | tried], tries - 1, error)

          {:not_started, error} ->
            {:error, error}

          result ->
            result
        end
    end
  end

  defp run_on(member, source, opts) when node(member) == node() do
    opts = Keyword.put(opts, :node, nil)

    result =
      if opts[:timeout] == :infinity,
        do: Supervisor.run_local(source, opts),
        else: Supervisor.run_on(node(), source, opts)

    not_started(result, node())
  rescue
    # its supervisor stopped between the pick and the checkout
    ArgumentError -> {:not_started, Supervisor.unreachable(node())}
  end

  defp run_on(member, source, opts) do
    node(member) |> Supervisor.run_on(source, opts) |> not_started(node(member))
  end

  defp not_started({:error, %Error{kind: :overloaded} = error}, _node),
    do: {:not_started, error}

  defp not_started({:not_started, _reason}, node),
    do: {:not_started, Supervisor.unreachable(node)}

  defp not_started(result, _node), do: result

  @doc """
  A member of `group` by power of two choices on the published load, excluding `tried` (and
  remote members if `local_only`); `nil` if there is none.
  """
  def pick(group, tried \\ [], local_only \\ false) do
    members = :pg.get_members(@scope, group)
    members = if local_only, do: Enum.filter(members, &(node(&1) == node())), else: members

    case members -- tried do
      [] ->
        nil

      [one] ->
        one

      candidates ->
        all = List.to_tuple(candidates)
        n = tuple_size(all)
        i = :rand.uniform(n)
        j = rem(i + :rand.uniform(n - 1) - 1, n) + 1
        a = load(elem(all, i - 1))
        b = load(elem(all, j - 1))
        best = if score(b) < score(a), do: b, else: a

        best =
          if full?(best), do: candidates |> Enum.map(&load/1) |> Enum.min_by(&score/1), else: best

        elem(best, 0)
    end
  end

  # {pid, running, capacity, queue}; a member not yet heard of counts as empty.
  defp load(pid) do
    case :ets.lookup(@table, pid) do
      [entry] -> entry
      [] -> {pid, 0, 0, 0}
    end
  end

  # Capacity 0: not heard of yet.
  defp full?({_, running, capacity, queue}), do: capacity > 0 and running + queue >= capacity
  defp score({_, running, capacity, queue}), do: (running + queue) / max(capacity, 1)

  # While this node runs on a member, the member counts one more run in this node's view, so a
  # burst from this node spreads instead of piling on the member that looked emptiest before its
  # next publication. A publication during the run already counts it, so until the next one
  # the view undercounts by the runs of this node that ended meanwhile (never below 0).
  defp charged(pid, run) do
    :ets.update_counter(@table, pid, {2, 1}, {pid, 0, 0, 0})

    try do
      run.()
    after
      :ets.update_counter(@table, pid, {2, -1, 0, 0}, {pid, 0, 0, 0})
    end
  end

  defp no_member(group) do
    Error.new(:node_down, "no member of the cluster group #{inspect(group)} is reachable",
      stats: Error.empty_stats()
    )
  end

  @doc """
  `nil` if the run's input (source and options, as sent) fits `max_remote_bytes`, else the
  :invalid_input error that refuses to send it to another node.
  """
  def too_large(source, opts) do
    max = opts[:max_remote_bytes]

    case input_bytes(source, opts, max) do
      bytes when is_integer(bytes) and bytes <= max ->
        nil

      bytes ->
        Error.new(
          :invalid_input,
          "the run's input #{bytes_text(bytes, max)} more than max_remote_bytes (#{max}) " <>
            "to send to another node",
          stats: Error.empty_stats()
        )
    end
  end

  # A source alone over the bound decides without walking the options. Otherwise the options
  # are counted first, within `max` values: :erlang.external_size/1 walks a term as the tree
  # it stands for (exponential in shared subterms), and each value takes a byte at least.
  defp input_bytes(source, _opts, max) when is_binary(source) and byte_size(source) > max,
    do: byte_size(source)

  defp input_bytes(source, opts, max) do
    input = if is_struct(source, Chunk), do: opts, else: {source, opts}

    if Encoding.values_within?(input, max),
      do: :erlang.external_size(input),
      else: :over
  end

  # Each value takes a byte at least: more values than max_remote_bytes is more bytes.
  defp bytes_text(:over, max), do: "holds more than #{max} values (a byte each at least),"
  defp bytes_text(bytes, _max), do: "is #{bytes} bytes,"
end
