# make demo  — run the CLI on examples/demo.lua (context in, table out, print, a limit)
# make test  — every check: formatters, clippy, cargo test, mix test (warnings as errors)
# make bench — benchmarks side by side with Luerl; make fuzz — the long property run
# make san — generated programs across every library under random limits, with the vendored
#   Lua, csrc/ and the arena (poisoned by hand, src/asan.rs) under ASan + UBSan
#   (native/lua_sandbox_core/tests/generated.rs); a short run is part of `make test`;
#   make fuzz-san — the long one (LUA_SAN_PROGRAMS=20000)
# make stretch — the hole finder: the adversarial (generated bounded-ops included) and stock
#   suites under a build that records the longest CPU stretch between two budget checks
#   (native/lua_sandbox_core/src/stretch.rs); fails above STRETCH_MAX_US (1 ms). Full size:
#   LUA_BOUNDED_MIB=16 LUA_BOUNDED_WORK=1000000 make stretch; STRETCH_TESTS=path runs one file.
#   The log names each stretch of 1 ms or more: where, the test, where it started;
#   LUA_SANDBOX_STRETCH_NATIVE=1 adds the native functions at both ends (slow: for one file).
# make stall-witness — does the machine stall threads (counted as their CPU time) on its own?

SHELL := /bin/bash
# The tests run in MIX_ENV=test whatever the caller's environment or command line holds: set
# per command, not exported, so `MIX_ENV=prod make test` cannot run them against prod config.
TEST_ENV := MIX_ENV=test
LUA_PROPERTY_CASES ?= 10000

.PHONY: all deps build demo test check-format clippy cargo-test mix-test bench fuzz stretch stall-witness san fuzz-san bench-process bench-session-process bench-handle-process

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

# Then the core's bulk and session tests again under the hole finder's build (the `stretch`
# feature): its ticker reads the running frames at every check, so a check made while a frame
# is half moved crashes here, not only in `make stretch` (a Lua function's 9·10^5 results moved
# back over its own function slot did).
cargo-test:
	cargo test --release
	$(STRETCH_CARGO) LUA_SANDBOX_STRETCH_LOG=$(CURDIR)/$(STRETCH_TARGET)/cargo-test.log \
	  cargo test --release -p lua_sandbox_core --features stretch --test bulk --test deep --test session

mix-test: deps
	$(TEST_ENV) mix compile --warnings-as-errors
	$(TEST_ENV) LUA_PROPERTY_CASES=$(LUA_PROPERTY_CASES) mix test --warnings-as-errors

test: check-format clippy cargo-test san mix-test

# The sanitizer build has its own target dir. Stable Rust has no -Zsanitizer: the C (lua-src's
# build and csrc/, both through the cc crate, which reads CFLAGS) is instrumented and the test
# binary linked with gcc's runtimes (rustc links with -nodefaultlibs, so -fsanitize alone would
# not pull them in: they are named, and ASan's check that it comes first is off); `--target`
# keeps the link flags off build scripts and proc macros, which the (uninstrumented) compiler
# loads. Any report aborts the run.
SAN_TARGET := target/san
SAN_HOST := $(shell rustc -vV | sed -n 's/^host: //p')
SAN_CFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g
LUA_SAN_PROGRAMS ?= 300

san:
	CFLAGS="$(SAN_CFLAGS)" CARGO_TARGET_DIR=$(SAN_TARGET) \
	  RUSTFLAGS="-C link-arg=-lasan -C link-arg=-lubsan" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:verify_asan_link_order=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  LUA_GENERATED_PROGRAMS=$(LUA_SAN_PROGRAMS) \
	  cargo test --release --target $(SAN_HOST) -p lua_sandbox_core --features sanitize \
	  --test generated -- --nocapture

fuzz-san:
	$(MAKE) san LUA_SAN_PROGRAMS=20000

bench: deps
	@scripts/ensure_deps.sh bench
	MIX_ENV=prod mix run bench/run.exs

# isolation: :process: runs via a jailed worker side by side with the NIF (bench/process.exs)
bench-process: deps
	$(TEST_ENV) mix run bench/process.exs

# sessions on isolation: :process side by side with the NIF's (bench/session_process.exs)
bench-session-process: deps
	$(TEST_ENV) mix run bench/session_process.exs

# a handle through a tool on isolation: :process and on the NIF (bench/handle_process.exs)
bench-handle-process: deps
	$(TEST_ENV) mix run bench/handle_process.exs

fuzz: deps
	$(TEST_ENV) LUA_PROPERTY_CASES=200000 mix test --only property

STRETCH_TARGET := target/stretch
# Line tables (no change to the code): the native stacks of LUA_SANDBOX_STRETCH_NATIVE=1 then
# name the C functions inlined into their callers (the collector's phases, a table's growth).
STRETCH_CARGO := CARGO_TARGET_DIR=$(STRETCH_TARGET) CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
STRETCH_LOG := $(CURDIR)/$(STRETCH_TARGET)/stretch.log
STRETCH_MAX_US ?= 1000
STRETCH_TESTS ?= test/adversarial test/stock

# Whether the machine itself stalls running threads (bench/stall_witness.c): a thread per CPU
# doing fixed slices of arithmetic prints every slice of STALL_US µs of CPU time or more.
WITNESS_SECONDS ?= 300
STALL_US ?= 1000
stall-witness:
	mkdir -p target && cc -O2 -pthread -o target/stall_witness bench/stall_witness.c
	target/stall_witness $(WITNESS_SECONDS) $(STALL_US)

# The feature build has its own target dir and is installed only for this run: the installed
# library is removed afterwards, so the next build installs the release one again.
stretch: build
	$(STRETCH_CARGO) cargo build --release -p lua_sandbox_nif \
	  --features lua_sandbox_core/stretch
	rm -f $(STRETCH_LOG) $(STRETCH_LOG).test priv/native/lua_sandbox_nif.so
	-$(TEST_ENV) LUA_SANDBOX_NIF_PATH=$(CURDIR)/$(STRETCH_TARGET)/release/liblua_sandbox_nif.so \
	  LUA_SANDBOX_STRETCH_LOG=$(STRETCH_LOG) LUA_SANDBOX_STRETCH_TEST=$(STRETCH_LOG).test \
	  mix test --max-cases 1 $(STRETCH_TESTS)
	rm -f priv/native/lua_sandbox_nif.so
	@echo "longest stretches between two budget checks (µs, where it ended, test, from where):"
	@sort -n $(STRETCH_LOG) | tail -8
	@echo "stretches of 1 ms or more by where they started (count, longest µs, from):"
	@awk -F'\t' '$$1 >= 1000 { k = $$4; sub(/ \|.*/, "", k); n[k]++; if ($$1 + 0 > m[k]) m[k] = $$1 } \
	  END { for (k in n) print n[k] "\t" m[k] "\t" k }' $(STRETCH_LOG) | sort -t "$$(printf '\t')" -k2,2n | tail -15
	@test "$$(sort -n $(STRETCH_LOG) | tail -1 | cut -f1)" -le $(STRETCH_MAX_US)
