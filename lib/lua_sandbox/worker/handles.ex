defmodule LuaSandbox.Worker.Handles do
  @moduledoc false
  # Handles (`LuaSandbox.handle/1`) under `isolation: :process`: the terms stay in the BEAM and
  # a worker only ever sees indices. Each `%LuaSandbox.Handle{}` in a request's values (the
  # `globals` and `call` arguments of a run, a session's start or call, a tool's `{:ok, value}`
  # reply) is swapped for `{:handle, index}`, the index a new entry of this table; the worker
  # makes the core's handle userdata holding that index (native/lua_sandbox_worker/src/proto.rs
  # documents the wire form, marshal.rs the worker's half). In its answers (results, an error's
  # value, a tool call's arguments) every `{:handle, index}` is swapped back for the term.
  #
  # No user term takes the wire form: values reach a worker through LuaSandbox.Encoding, which
  # turns every tuple into a list, and `wire/2` turns any tuple still there into `{}` (which the
  # worker refuses as the tuple it is); a Lua value never reads back as a tuple. A worker that
  # names an index it was never given (or sends any other tuple) is broken: `unwire/2` says so,
  # and the caller closes the worker, answering `:worker_crashed`.
  #
  # A run's table lives in its caller, for the run (LuaSandbox.Worker's context); a session's in
  # its process, for the session's life, with the NIF's rule (native/lua_sandbox_nif/src/
  # handles.rs): the handles a call made go with it when it is rolled back (it fails, or is
  # cancelled, with `rollback: true`), and a worker restarted from the start options keeps only
  # the start's. Indices are handed out in order, so the next index before a call is the mark
  # to roll back to; they are never handed out twice, so a handle whose term was forgotten can
  # never name another's (the worker is then broken, as for an index never given). Each handle
  # costs what the NIF charges for one: a value of the input's bound (LuaSandbox.Encoding) and
  # a Lua value's bytes of the run's memory, in the worker.

  alias LuaSandbox.Handle

  defstruct next: 0, terms: %{}, start: 0, pending: nil

  @typedoc """
  The handles given to a worker: `terms` by index (all below `next`, the next index handed
  out); `start` the indices a session's start gave (below it: kept across restarts); `pending`
  the session call in progress, `{mark, rollback}`.
  """
  @type t :: %__MODULE__{
          next: non_neg_integer,
          terms: %{non_neg_integer => term},
          start: non_neg_integer,
          pending: {non_neg_integer, boolean} | nil
        }

  @doc "No handles yet."
  @spec new() :: t
  def new, do: %__MODULE__{}

  ## BEAM -> worker

  @doc """
  `request` (a frame's request, src/proto.rs) with every handle in its values swapped for its
  wire form, and the table with the new ones. A session call (`:session_run`) becomes the
  pending one, its mark the table's length before it.
  """
  @spec wire(term, t) :: {term, t}
  def wire({:run, source, opts}, h) do
    {opts, h} = wire_opts(opts, h)
    {{:run, source, opts}, h}
  end

  def wire({:session_new, opts}, h) do
    {opts, h} = wire_opts(opts, h)
    {{:session_new, opts}, %{h | start: h.next}}
  end

  def wire({:session_run, source, opts}, h) do
    h = ended(h, false)
    pending = {h.next, Map.get(opts, :rollback, true)}
    {opts, h} = wire_opts(opts, h)
    {{:session_run, source, opts}, %{h | pending: pending}}
  end

  def wire({:reply, {:ok, value}}, h) do
    {value, h} = swap_in(value, h)
    {{:reply, {:ok, value}}, h}
  end

  def wire(request, h), do: {request, h}

  defp wire_opts(opts, h) do
    {globals, h} =
      Enum.map_reduce(opts.globals, h, fn {name, value}, h ->
        {value, h} = swap_in(value, h)
        {{name, value}, h}
      end)

    {call, h} =
      case opts.call do
        {name, args} ->
          {args, h} = swap_in(args, h)
          {{name, args}, h}

        nil ->
          {nil, h}
      end

    {%{opts | globals: globals, call: call}, h}
  end

  # A first pass that allocates nothing looks for a handle (or a stray tuple); plain data (the
  # common case) crosses as it is, without being copied.
  defp swap_in(term, h) do
    plain(term)
    {term, h}
  catch
    :swap -> swap(term, h)
  end

  defp plain(%Handle{}), do: throw(:swap)
  defp plain(%{__struct__: _}), do: :ok
  defp plain(m) when is_map(m), do: :maps.fold(fn _k, v, _ -> plain(v) end, :ok, m)
  defp plain([h | t]), do: plain(h) && plain(t)
  defp plain(t) when is_tuple(t), do: throw(:swap)
  defp plain(_), do: :ok

  defp swap(%Handle{term: term}, h) do
    {{:handle, h.next}, %{h | next: h.next + 1, terms: Map.put(h.terms, h.next, term)}}
  end

  # Another struct is refused whole by the worker, as by the NIF (no LuaSandbox.Encoder).
  defp swap(%{__struct__: _} = s, h), do: {s, h}

  # Keys stay as they are: a handle (or any map) as a key is refused as a key.
  defp swap(m, h) when is_map(m) do
    {pairs, h} =
      :maps.fold(
        fn k, v, {acc, h} ->
          {v, h} = swap(v, h)
          {[{k, v} | acc], h}
        end,
        {[], h},
        m
      )

    {:maps.from_list(pairs), h}
  end

  defp swap([_ | _] = l, h), do: swap_list(l, [], h)
  defp swap(t, h) when is_tuple(t), do: {{}, h}
  defp swap(other, h), do: {other, h}

  # An improper tail is kept as it is: the worker names it.
  defp swap_list([x | t], acc, h) do
    {x, h} = swap(x, h)
    swap_list(t, [x | acc], h)
  end

  defp swap_list(tail, acc, h), do: {:lists.reverse(acc, tail), h}

  ## worker -> BEAM

  @doc """
  A worker's `answer` with every handle's wire form swapped back for its term: `{:ok, answer,
  table}` (a session call that ended forgets its handles if it is rolled back), or `{:error,
  why}` when the worker named a handle it was never given (or sent another tuple).
  """
  @spec unwire(term, t) :: {:ok, term, t} | {:error, String.t()}
  def unwire({:ok, values, output, stats}, h) do
    with {:ok, values} <- swap_out(values, h),
         do: {:ok, {:ok, values, output, stats}, ended(h, true)}
  end

  def unwire({:error, {kind, message, line, traceback, value}, output, stats}, h) do
    with {:ok, value} <- swap_out(value, h),
         do:
           {:ok, {:error, {kind, message, line, traceback, value}, output, stats},
            ended(h, false)}
  end

  def unwire({:tool_call, name, args}, h) do
    with {:ok, args} <- swap_out(args, h), do: {:ok, {:tool_call, name, args}, h}
  end

  def unwire(answer, h), do: {:ok, answer, h}

  # As on the way in, a first pass that allocates nothing: a result without handles (the
  # common case) is not copied.
  defp swap_out(term, h) do
    tuples(term)
    {:ok, term}
  catch
    :swap -> swap_back(term, h)
  end

  defp swap_back(term, h) do
    {:ok, back(term, h)}
  catch
    {__MODULE__, what} -> {:error, "it named #{what}"}
  end

  defp tuples(t) when is_tuple(t), do: throw(:swap)
  defp tuples([x | t]), do: tuples(x) && tuples(t)
  defp tuples(m) when is_map(m), do: :maps.fold(fn k, v, _ -> tuples(k) && tuples(v) end, :ok, m)
  defp tuples(_), do: :ok

  defp back({:handle, i}, h) do
    case h.terms do
      %{^i => term} -> term
      _ -> throw({__MODULE__, "handle #{inspect(i)}, which it does not have"})
    end
  end

  defp back(t, _h) when is_tuple(t), do: throw({__MODULE__, "a tuple, not a handle"})
  defp back([x | t], h), do: [back(x, h) | back(t, h)]

  defp back(m, h) when is_map(m),
    do: :maps.from_list(:maps.fold(fn k, v, acc -> [{back(k, h), back(v, h)} | acc] end, [], m))

  defp back(other, _h), do: other

  ## sessions

  @doc """
  The pending session call ended without an answer of its own (its caller died while it was
  parked at a tool, and the worker dropped it): it is rolled back, its handles with it.
  """
  @spec dropped(t) :: t
  def dropped(h), do: ended(h, false)

  @doc "The session's worker was restarted from the start options: only the start's handles."
  @spec restarted(t) :: t
  def restarted(h), do: %{forget(h, h.start) | pending: nil}

  # The pending call (if any) ended, `ok` or not: a failed one with rollback forgets its handles.
  defp ended(%{pending: {mark, true}} = h, false), do: %{forget(h, mark) | pending: nil}
  defp ended(%{pending: nil} = h, _ok), do: h
  defp ended(h, _ok), do: %{h | pending: nil}

  # Forgets the terms of the indices from `mark` on (`next` stays: no index is handed out twice).
  defp forget(h, mark), do: %{h | terms: Map.drop(h.terms, Enum.to_list(mark..(h.next - 1)//1))}
end
