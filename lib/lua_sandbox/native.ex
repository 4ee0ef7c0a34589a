defmodule LuaSandbox.Native do
  @moduledoc false
  # NIF stubs, grouped by concern. Loaded from priv/native by @on_load.
  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:lua_sandbox), ~c"native/lua_sandbox_nif")
    :erlang.load_nif(path, 0)
  end

  # running code (dirty CPU), and a first attempt at a short run (normal scheduler)
  def run_start(_source, _opts), do: :erlang.nif_error(:nif_not_loaded)
  def run_try(_source, _opts), do: :erlang.nif_error(:nif_not_loaded)
  def run_resume(_run, _reply), do: :erlang.nif_error(:nif_not_loaded)

  # sessions: a state across calls (session_new/session_run dirty CPU; info normal)
  def session_new(_opts), do: :erlang.nif_error(:nif_not_loaded)
  def session_run(_session, _source, _opts), do: :erlang.nif_error(:nif_not_loaded)
  # a first attempt on the normal scheduler (:retry when it did not finish within its slice)
  def session_try(_session, _source, _opts), do: :erlang.nif_error(:nif_not_loaded)
  def session_info(_session), do: :erlang.nif_error(:nif_not_loaded)
  def session_fork(_session), do: :erlang.nif_error(:nif_not_loaded)

  # compiled chunks (dirty CPU)
  def compile(_source, _opts), do: :erlang.nif_error(:nif_not_loaded)
  # {bytecode, name} of a chunk, for a worker of isolation: :process (normal scheduler, no copy)
  def chunk_bytecode(_chunk), do: :erlang.nif_error(:nif_not_loaded)
end
