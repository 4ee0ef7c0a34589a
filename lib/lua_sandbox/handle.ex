defmodule LuaSandbox.Handle do
  @moduledoc """
  An opaque handle: any Elixir term passed into a script as an unforgeable userdata.

  Made with `LuaSandbox.handle/1`. Inside Lua a handle can be stored, passed around, compared
  and handed to tools, but not created, read, changed or converted (`tostring` gives
  `"handle"`). A tool that receives it, and the caller that gets it back in a result, see the
  original term. A handle is valid in the run it was passed to, and in a `LuaSandbox.Session`
  for the session's life (one made by a call that is rolled back goes with the call).

      iex> conn = LuaSandbox.handle({:db_conn, make_ref()})
      iex> {:ok, r} = LuaSandbox.run("return type(c), tostring(c), c == c", globals: %{c: conn})
      iex> r.values
      ["userdata", "handle", true]
  """

  @enforce_keys [:term]
  defstruct [:term]

  @type t :: %__MODULE__{term: term}
end
