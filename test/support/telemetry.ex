defmodule LuaSandbox.TestTelemetry do
  @moduledoc false
  # Loads the real :telemetry library (test/support/telemetry/, vendored for the tests only)
  # into this VM and starts it: compiled from its .erl sources, the application loaded from
  # its .app.src. The `telemetry` module itself is loaded last, once the application runs,
  # because LuaSandbox emits as soon as that module is loaded (LuaSandbox.Telemetry).

  @dir Path.expand("telemetry", __DIR__)

  def start! do
    unless :erlang.module_loaded(:telemetry) do
      modules =
        for src <- Path.wildcard(Path.join(@dir, "*.erl")) do
          {:ok, mod, bin} =
            :compile.file(String.to_charlist(src), [
              :binary,
              :return_errors,
              i: String.to_charlist(@dir)
            ])

          {mod, src, bin}
        end

      {[telemetry], rest} = Enum.split_with(modules, &(elem(&1, 0) == :telemetry))
      Enum.each(rest, &load/1)

      {:ok, [{:application, :telemetry, spec}]} =
        :file.consult(Path.join(@dir, "telemetry.app.src"))

      spec = Keyword.put(spec, :modules, Enum.map(modules, &elem(&1, 0)))

      case :application.load({:application, :telemetry, spec}) do
        :ok -> :ok
        {:error, {:already_loaded, :telemetry}} -> :ok
      end

      {:ok, _} = Application.ensure_all_started(:telemetry)
      load(telemetry)
    end

    {:ok, _} = Application.ensure_all_started(:telemetry)
    :ok
  end

  defp load({mod, src, bin}) do
    {:module, ^mod} = :code.load_binary(mod, String.to_charlist(src), bin)
  end
end
