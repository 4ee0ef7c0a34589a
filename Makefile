# make demo  — run the CLI on examples/demo.lua (context in, table out, print, a limit)
# make test  — every check: formatters, clippy, cargo test, mix test (warnings as errors)
# make bench — benchmarks side by side with Luerl; make fuzz — the long property run

SHELL := /bin/bash
# The tests run in MIX_ENV=test whatever the caller's environment or command line holds: set
# per command, not exported, so `MIX_ENV=prod make test` cannot run them against prod config.
TEST_ENV := MIX_ENV=test
LUA_PROPERTY_CASES ?= 10000

.PHONY: all deps build demo test check-format clippy cargo-test mix-test bench fuzz

all: test

deps:
	@scripts/ensure_deps.sh

build: deps
	$(TEST_ENV) mix compile --warnings-as-errors

demo: deps
	MIX_ENV=dev mix lua_sandbox.run examples/demo.lua --global 'name=Ada' --max-instructions 5000000
	@echo
	@echo "--- the same script with a tight instruction budget:"
	-MIX_ENV=dev mix lua_sandbox.run examples/demo.lua --global 'name=Ada' --max-instructions 2000
	@echo
	@echo "--- an agent-shaped OTP tree handling model-written scripts (examples/agent.exs):"
	MIX_ENV=dev mix run examples/agent.exs

check-format: deps
	$(TEST_ENV) mix format --check-formatted
	cargo fmt --all -- --check

clippy:
	cargo clippy --release --all-targets -- -D warnings

cargo-test:
	cargo test --release

mix-test: deps
	$(TEST_ENV) mix compile --warnings-as-errors
	$(TEST_ENV) LUA_PROPERTY_CASES=$(LUA_PROPERTY_CASES) mix test --warnings-as-errors

test: check-format clippy cargo-test mix-test

bench: deps
	MIX_ENV=prod mix run bench/run.exs

fuzz: deps
	$(TEST_ENV) LUA_PROPERTY_CASES=200000 mix test --only property
