# Measuring helpers of bench/process.exs and bench/session_process.exs (isolation: :process).
defmodule Bench.Process do
  def percentiles(samples) do
    s = Enum.sort(samples)
    n = length(s)
    at = fn q -> Enum.at(s, min(n - 1, trunc(q * n))) end
    %{p50: at.(0.5), p99: at.(0.99), n: n}
  end

  def time_us(fun) do
    t0 = System.monotonic_time(:nanosecond)
    fun.()
    (System.monotonic_time(:nanosecond) - t0) / 1000
  end

  def until(fun, deadline_ms \\ 5_000) do
    t0 = System.monotonic_time(:millisecond)

    Stream.repeatedly(fn -> fun.() || (Process.sleep(0) && false) end)
    |> Enum.find(fn r -> r || System.monotonic_time(:millisecond) - t0 > deadline_ms end)
  end

  def row(label, %{p50: p50, p99: p99, n: n}, unit),
    do: "| #{label} | #{fmt(p50)} #{unit} | #{fmt(p99)} #{unit} | #{n} |"

  defp fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 1)
  defp fmt(x), do: to_string(x)
end
