//! The worker process of `isolation: :process` (issue 18), rustler-free. This crate holds the
//! jail the worker applies to itself ([`jail`]) and, in `src/bin/worker.rs`, a minimal worker:
//! it builds a sandboxed Lua state in a slot (lua_sandbox_core), applies the jail, prints the
//! layers in force, then answers one request per line on stdin. The pool that drives it from
//! the BEAM waits for issue 17's restructured core.

pub mod jail;
