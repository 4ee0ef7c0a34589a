# Timing, statistics, table and report helpers for bench/run.exs (plain Elixir, no Benchee).
# Not meant to be run on its own: `make bench` runs bench/run.exs, which requires this file.

defmodule Bench.Harness do
  @moduledoc false

  ## Timing

  @doc """
  Calls `fun` repeatedly for about `budget_ms` (at least `min_calls`, at most `max_calls`
  times) and returns `{latencies_ns, wall_ns}`; latencies are in call order, reversed.
  """
  def time_box(fun, budget_ms, min_calls \\ 1, max_calls \\ 1_000_000) do
    budget = budget_ms * 1_000_000
    start = System.monotonic_time(:nanosecond)
    loop(fun, start, start + budget, min_calls, max_calls, 0, [])
  end

  defp loop(fun, start, deadline, min_calls, max_calls, n, acc) do
    t0 = System.monotonic_time(:nanosecond)

    if n >= max_calls or (n >= min_calls and t0 >= deadline) do
      {acc, t0 - start}
    else
      fun.()
      t1 = System.monotonic_time(:nanosecond)
      loop(fun, start, deadline, min_calls, max_calls, n + 1, [t1 - t0 | acc])
    end
  end

  @doc """
  Warm-up, then `rounds` alternating rounds (A, B, A, B, ...). `systems` is a list of
  `%{name:, fun:, budget_ms:, min_calls:, max_calls:, warmup_ms:}`. Returns
  `%{name => %{lat: [ns], wall: ns, calls: n}}`.
  """
  def alternate(systems, rounds) do
    for s <- systems, Map.get(s, :warmup_ms, 0) > 0 do
      time_box(s.fun, s.warmup_ms, 1, Map.get(s, :max_calls, 1_000_000))
    end

    init = Map.new(systems, fn s -> {s.name, %{lat: [], wall: 0, calls: 0}} end)

    Enum.reduce(1..rounds, init, fn _round, acc ->
      Enum.reduce(systems, acc, fn s, acc ->
        :erlang.garbage_collect()

        {lat, wall} =
          time_box(
            s.fun,
            s.budget_ms,
            Map.get(s, :min_calls, 1),
            Map.get(s, :max_calls, 1_000_000)
          )

        Map.update!(acc, s.name, fn r ->
          %{lat: lat ++ r.lat, wall: r.wall + wall, calls: r.calls + length(lat)}
        end)
      end)
    end)
  end

  @doc """
  `procs` processes call `fun` in a loop for `budget_ms`; returns calls per second
  (total calls over the time until the last process stopped).
  """
  def throughput(fun, procs, budget_ms) do
    parent = self()
    start = System.monotonic_time(:nanosecond)
    deadline = start + budget_ms * 1_000_000

    pids =
      for _ <- 1..procs do
        spawn_link(fn ->
          n = count_until(fun, deadline, 0)
          send(parent, {:done, self(), n, System.monotonic_time(:nanosecond)})
        end)
      end

    {calls, last} =
      Enum.reduce(pids, {0, start}, fn pid, {calls, last} ->
        receive do
          {:done, ^pid, n, t} -> {calls + n, max(last, t)}
        end
      end)

    {calls, last - start}
  end

  defp count_until(fun, deadline, n) do
    if System.monotonic_time(:nanosecond) >= deadline do
      n
    else
      fun.()
      count_until(fun, deadline, n + 1)
    end
  end

  @doc "Alternating throughput rounds for several systems; returns `%{name => calls_per_s}`."
  def alternate_throughput(systems, procs, rounds, budget_ms) do
    for {_name, fun} <- systems, do: throughput(fun, procs, 200)

    totals =
      Enum.reduce(1..rounds, %{}, fn _, acc ->
        Enum.reduce(systems, acc, fn {name, fun}, acc ->
          :erlang.garbage_collect()
          {calls, wall} = throughput(fun, procs, budget_ms)
          Map.update(acc, name, {calls, wall}, fn {c, w} -> {c + calls, w + wall} end)
        end)
      end)

    Map.new(totals, fn {name, {calls, wall}} -> {name, calls / (wall / 1.0e9)} end)
  end

  ## Statistics

  def percentile([], _p), do: nil

  def percentile(values, p) do
    sorted = Enum.sort(values)
    idx = round(p / 100 * (length(sorted) - 1))
    Enum.at(sorted, idx)
  end

  def summary(%{lat: lat, wall: wall, calls: calls}) do
    %{
      calls: calls,
      median: percentile(lat, 50),
      p99: percentile(lat, 99),
      tput: if(wall > 0, do: calls / (wall / 1.0e9), else: nil)
    }
  end

  ## Formatting

  def fmt_ns(nil), do: "-"
  def fmt_ns(ns) when ns < 1_000, do: "#{round(ns)} ns"
  def fmt_ns(ns) when ns < 1_000_000, do: "#{fmt_num(ns / 1_000)} µs"
  def fmt_ns(ns) when ns < 1_000_000_000, do: "#{fmt_num(ns / 1_000_000)} ms"
  def fmt_ns(ns), do: "#{fmt_num(ns / 1_000_000_000)} s"

  def fmt_bytes(b) when b < 1024, do: "#{b} B"
  def fmt_bytes(b) when b < 1024 * 1024, do: "#{fmt_num(b / 1024)} KiB"
  def fmt_bytes(b), do: "#{fmt_num(b / (1024 * 1024))} MiB"

  def fmt_rate(nil), do: "-"
  def fmt_rate(r) when r >= 100, do: Integer.to_string(round(r))
  def fmt_rate(r), do: fmt_num(r)

  def fmt_ratio(nil), do: "-"
  def fmt_ratio(r), do: "#{fmt_num(r)}×"

  # three significant digits, no exponent
  def fmt_num(x) when x >= 100, do: Integer.to_string(round(x))
  def fmt_num(x) when x >= 10, do: :erlang.float_to_binary(x / 1, decimals: 1)
  def fmt_num(x), do: :erlang.float_to_binary(x / 1, decimals: 2)

  @doc "A Markdown table from a header and rows of strings."
  def table(header, rows) do
    widths =
      Enum.map(0..(length(header) - 1), fn i ->
        [header | rows] |> Enum.map(&String.length(Enum.at(&1, i))) |> Enum.max()
      end)

    line = fn cells ->
      cells
      |> Enum.zip(widths)
      |> Enum.map(fn {c, w} -> String.pad_trailing(c, w) end)
      |> Enum.join(" | ")
      |> then(&"| #{&1} |")
    end

    sep = "|" <> Enum.map_join(widths, "|", &String.duplicate("-", &1 + 2)) <> "|"
    Enum.join([line.(header), sep | Enum.map(rows, line)], "\n")
  end

  ## Machine

  def machine do
    cpu =
      case File.read("/proc/cpuinfo") do
        {:ok, text} ->
          text
          |> String.split("\n")
          |> Enum.find_value("unknown", fn line ->
            case String.split(line, ":", parts: 2) do
              [k, v] -> if String.trim(k) == "model name", do: String.trim(v)
              _ -> nil
            end
          end)

        _ ->
          "unknown"
      end

    Application.load(:luerl)

    luerl_deb =
      case System.find_executable("dpkg-query") do
        nil ->
          nil

        exe ->
          case System.cmd(exe, ["-W", "-f", "${Version}", "erlang-luerl"], stderr_to_stdout: true) do
            {v, 0} -> v
            _ -> nil
          end
      end

    git =
      case System.cmd("git", ["describe", "--always", "--dirty"], stderr_to_stdout: true) do
        {v, 0} -> String.trim(v)
        _ -> "unknown"
      end

    %{
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      cores: :erlang.system_info(:logical_processors),
      schedulers: System.schedulers_online(),
      dirty_cpu: :erlang.system_info(:dirty_cpu_schedulers_online),
      cpu: cpu,
      otp: "#{:erlang.system_info(:otp_release)} (erts #{:erlang.system_info(:version)})",
      elixir: System.version(),
      luerl:
        "#{Application.spec(:luerl, :vsn) || "?"}" <>
          if(luerl_deb, do: " (Debian erlang-luerl #{luerl_deb})", else: ""),
      git: git,
      load:
        case File.read("/proc/loadavg") do
          {:ok, l} -> l |> String.split() |> Enum.take(3) |> Enum.join(" ")
          _ -> "unknown"
        end
    }
  end

  ## Chart

  @doc "Writes `path` (SVG bar chart of `bars` = [{label, ratio}]) with gnuplot, if installed."
  def chart(bars, path) do
    case System.find_executable("gnuplot") do
      nil ->
        :no_gnuplot

      gnuplot ->
        tmp = path <> ".tmp"

        dir =
          Path.join(System.tmp_dir!(), "lua_sandbox_bench_#{System.unique_integer([:positive])}")

        File.mkdir_p!(dir)
        data = Path.join(dir, "ratios.dat")
        script = Path.join(dir, "ratios.gp")

        File.write!(
          data,
          Enum.map_join(bars, "", fn {label, r} ->
            ~s("#{String.replace(label, "\"", "'")}" #{:erlang.float_to_binary(r / 1, decimals: 3)}\n)
          end)
        )

        File.write!(script, """
        set terminal svg size 1000,560 dynamic enhanced font 'sans,11' background rgb 'white'
        set output '#{tmp}'
        set title 'Luerl time / lua\\_sandbox time (> 1: lua\\_sandbox faster)'
        set style data histograms
        set style fill solid 0.8 border -1
        set boxwidth 0.7
        set logscale y
        set grid ytics
        set ylabel 'ratio (log scale)'
        set xtics rotate by -35 noenhanced
        set bmargin 10
        plot '#{data}' using 2:xtic(1) notitle linecolor rgb '#3b6ea8'
        """)

        result =
          case System.cmd(gnuplot, [script], stderr_to_stdout: true) do
            {_, 0} ->
              File.rename!(tmp, path)
              :ok

            {out, code} ->
              File.rm(tmp)
              {:error, "gnuplot exited #{code}: #{out}"}
          end

        File.rm_rf(dir)
        result
    end
  end
end
