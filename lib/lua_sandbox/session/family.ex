defmodule LuaSandbox.Session.Family do
  @moduledoc false
  # The families (a session and its forks, which share one arena: the core's family.rs) this
  # process has a call or fork of in progress. A call of another member from inside one (a tool
  # calling a fork of its own session, or forking it) would wait for the arena its own caller
  # holds, until the deadline or forever: enter/2 raises ArgumentError instead. A tool that runs
  # in a process of its own (under a deadline, LuaSandbox.Runner) acts for its caller and
  # inherits the list (held/0, hold/1). The same call reaching its own session is caught by the
  # session's checkout (it sees the caller's `$callers`).

  @key {__MODULE__, :held}

  @doc "Runs `fun` as a call of `family`; raises if this process already has one."
  @spec enter(reference, (() -> result)) :: result when result: var
  def enter(family, fun) do
    held = held()

    if family in held do
      raise ArgumentError, reentrant("a fork of this session (they share one arena)")
    end

    Process.put(@key, [family | held])

    try do
      fun.()
    after
      Process.put(@key, held)
    end
  end

  @doc "The families this process holds, for a process that acts for it."
  @spec held() :: [reference]
  def held, do: Process.get(@key, [])

  @doc "Takes on the families of the process this one acts for."
  @spec hold([reference]) :: :ok
  def hold([]), do: :ok

  def hold(families) do
    Process.put(@key, families)
    :ok
  end

  @doc "The message of the ArgumentError for a call that would wait for itself."
  @spec reentrant(String.t()) :: String.t()
  def reentrant(what) do
    "a session call cannot reach #{what} while a call of it is in progress in the same " <>
      "process (e.g. from one of its tools): it would wait for itself"
  end
end
