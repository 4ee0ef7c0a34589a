#!/usr/bin/env bash
# Installs what a fresh machine lacks: Elixir/OTP from Debian, PropEr (property tests) and
# Luerl (benchmark peer). Hex is not reachable here, so nothing comes from Hex.
set -euo pipefail

pkgs=(elixir erlang-dev erlang-proper erlang-luerl)
missing=()

# `ensure_deps.sh bench`: also gnuplot, which draws bench/results.svg (make bench).
if [ "${1:-}" = bench ]; then
  pkgs+=(gnuplot-nox)
  command -v gnuplot >/dev/null 2>&1 || missing+=(gnuplot-nox)
fi

command -v elixir >/dev/null 2>&1 || missing+=(elixir)
command -v erl >/dev/null 2>&1 && [ -d /usr/lib/erlang/usr/include ] || missing+=(erlang-dev)
if command -v erl >/dev/null 2>&1; then
  erl -noshell -eval 'case code:which(proper) of non_existing -> halt(1); _ -> halt(0) end.' \
    || missing+=(erlang-proper)
  erl -noshell -eval 'case code:which(luerl) of non_existing -> halt(1); _ -> halt(0) end.' \
    || missing+=(erlang-luerl)
else
  missing+=(erlang-proper erlang-luerl)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "Missing: ${missing[*]}. Run as root:" >&2
  echo "  apt-get update && apt-get install -y ${pkgs[*]}" >&2
  exit 1
fi

echo "Installing ${missing[*]} from Debian"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${pkgs[@]}"
