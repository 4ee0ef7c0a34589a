defmodule LuaSandbox.Test.User do
  @moduledoc false
  # For test/lua_sandbox/encoder_test.exs: defined here so protocol consolidation sees the impl.
  @derive {LuaSandbox.Encoder, only: [:name, :joined]}
  defstruct [:name, :joined, :password_hash]
end

defmodule LuaSandbox.Test.Money do
  @moduledoc false
  defstruct [:cents, :currency]

  defimpl LuaSandbox.Encoder do
    def encode(%{cents: c, currency: cur}), do: %{amount: c / 100, currency: cur}
  end
end

defmodule LuaSandbox.Test.Secret do
  @moduledoc false
  @derive {LuaSandbox.Encoder, except: [:value]}
  defstruct [:label, :value]
end
