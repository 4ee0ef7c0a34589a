//! The worker process of `isolation: :process` (issue 18), rustler-free: the jail the worker
//! applies to itself ([`jail`]), the frames it speaks with the BEAM ([`proto`]) and, in
//! `src/bin/worker/`, the worker binary (built by the Mix compiler and installed in `priv/`).

pub mod jail;
pub mod proto;
