defmodule LuaSandbox.SessionCopiesTest do
  # The host-side copies of a session's state — a fork's image, the image of the member that
  # makes room for another's call, the checkpoint before a call — are reserved fallibly
  # (native/lua_sandbox_core/src/slot.rs `CopyRefused`). In a worker (`isolation: :process`)
  # they count against its address-space limit, which a script can reach: a copy that does
  # not fit refuses the fork or the call with `:memory_limit`, the worker and every member
  # kept, instead of crashing the worker.
  use ExUnit.Case, async: true

  alias LuaSandbox.Session

  @mib 1024 * 1024

  setup do
    sup = :"lua_copies_#{System.unique_integer([:positive])}"

    # 16 MiB: the worker's address space is its arena (64 MiB), 64 MiB of run buffers and 64
    # MiB of headroom (native/lua_sandbox_worker/src/jail.rs), room for about ten images of
    # a 10 MiB state next to everything else
    start_supervised!(
      {LuaSandbox.Supervisor,
       name: sup, max_concurrency: 2, isolation: :process, worker_max_memory: 16 * @mib},
      id: sup
    )

    %{sup: sup}
  end

  # Forks `s` until a fork is refused (at most `n` tries): the forks made and the refusal.
  defp fork_until_refused(s, n, forks \\ [])

  defp fork_until_refused(_s, 0, forks), do: {Enum.reverse(forks), :never_refused}

  defp fork_until_refused(s, n, forks) do
    case Session.fork(s) do
      {:ok, f} -> fork_until_refused(s, n - 1, [f | forks])
      {:error, error} -> {Enum.reverse(forks), error}
    end
  end

  test "forks of a large state until one does not fit: :memory_limit, the worker and members kept",
       %{sup: sup} do
    {:ok, s} = Session.start_link(supervisor: sup, max_memory: 16 * @mib)

    # about 10 MiB of state (without rollback: no checkpoint kept whose memory could serve a
    # later copy)
    assert {:ok, %{value: 10_000}} =
             Session.run(
               s,
               "big = {} for i = 1, 10000 do big[i] = string.rep('x', 1000) .. i end return #big",
               rollback: false
             )

    %{os_pid: os_pid, memory: memory} = Session.info(s)
    assert memory > 9 * @mib

    {forks, refused} = fork_until_refused(s, 40)
    assert %LuaSandbox.Error{kind: :memory_limit, message: message} = refused
    assert message =~ "state copies need more memory"
    assert length(forks) >= 3

    # the same worker holds the session and every fork made, each with its state
    assert %{os_pid: ^os_pid, memory: ^memory} = Session.info(s)

    for f <- forks do
      assert %{os_pid: ^os_pid, memory: ^memory} = Session.info(f)
    end

    # no room for another copy: a call that needs one is refused before it runs, the worker
    # kept — the origin's (in the arena) for want of its checkpoint, a fork's for want of the
    # image that makes room for it
    [first | _] = forks
    assert {:error, %{kind: :memory_limit, message: checkpoint}} = Session.run(s, "big = nil")
    assert checkpoint =~ "the checkpoint"
    assert {:error, %{kind: :memory_limit, message: image}} = Session.run(first, "big = nil")
    assert image =~ "an image of a state"
    # without rollback the origin's call needs no copy
    assert {:ok, %{value: 10_000}} = Session.run(s, "return #big", rollback: false)

    # the last forks gone, their images' memory serves the others' calls again. Two, not one:
    # one image freed is no margin. Since the collector finishes the string table's halving
    # right after its sweep (bisected, 2026-12-06), the origin's checkpoint below (the same
    # 16.26 MB as before) was refused after one fork stopped: the copies made in between are
    # their states' whole used arena prefixes, which move with where the collector leaves
    # blocks
    :ok = Session.stop(List.last(forks))
    :ok = Session.stop(Enum.at(forks, -2))
    assert {:ok, %{value: "x10000"}} = Session.run(first, "return big[10000]:sub(-6)")
    assert {:ok, %{value: 10_000}} = Session.run(s, "return #big")
    assert %{os_pid: ^os_pid, calls: 3} = Session.info(s)
  end
end
