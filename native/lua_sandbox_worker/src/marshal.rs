//! The worker's terms ([`proto::Term`]) to Lua values and back, by the core's walks
//! (`lua_sandbox_core::marshal`), the NIF's own: the order of the checks, the bounds (depth,
//! size: `max_result_bytes`, 8 bytes per value on top of string bytes; cycles; the memory limit
//! checked while building), the meter that charges every value to the run's budget, the
//! failures and their messages, and the soundness rule (no Lua API call made here may raise)
//! are the core's. This module is the protocol side: what a term is for the walk to Lua
//! ([`Proto`]) and the bytes the walk from Lua writes (a [`Sink`] encoding straight into the
//! external term format). The test suites that run the API under both isolations hold the two
//! hosts to the same answers.
//!
//! Handles: the BEAM keeps the terms (`LuaSandbox.Worker.Handles`) and sends each handle as
//! `{:handle, index}` (`proto.rs`); the worker pushes the core's handle userdata for that index
//! under the token of its run's (or session's) [`Handles`], and reads one of its own back as
//! `{:handle, index}`. Any other userdata is one the host cannot take, as in the NIF.

use std::ffi::c_int;

use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::ffi;
use lua_sandbox_core::handle::{self, NotOurs, Token};
use lua_sandbox_core::marshal::{
    invalid, push_checked, read_value, read_values, Bad, FailKind, Host, Kind, Sink, Tally,
};
use lua_sandbox_core::session::Store;

use crate::proto::{self, Term};

pub use lua_sandbox_core::marshal::{ArgsError, Bounds, Fail};

// ---------------------------------------------------------------------------------------------
// Handles

/// The handles of a run or a session in the worker: only their token, lent to the run's scope
/// as the NIF lends its store. The terms, the count and the rollback of a session's handles
/// are the BEAM's (`LuaSandbox.Worker.Handles`), which checks every index named here.
#[derive(Default)]
pub struct Handles(Token);

impl Store for Handles {
    /// Nothing to roll back here: the BEAM forgets a rolled-back call's handles.
    fn mark(&self) -> usize {
        0
    }

    fn truncate(&mut self, _mark: usize) {}

    /// The same token: the handles in the copied state stay valid in the fork.
    fn fork(&self) -> Handles {
        Handles(self.0)
    }
}

/// Runs `f` on the active run's [`Handles`] (lent to its scope, `run.rs`).
fn with_handles<R>(f: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    lua_sandbox_core::scope::with_handles::<Handles, R>(f)
}

// ---------------------------------------------------------------------------------------------
// Terms to Lua

pub use lua_sandbox_core::marshal::{globals_push, values_push};

/// The protocol's terms for the core's walk: `marshal::push_globals::<Proto>(...)`.
pub struct Proto;

impl Host for Proto {
    type Term = Term;
    type Ref<'t> = &'t Term;
    type Items<'t> = std::slice::Iter<'t, Term>;
    type Pairs<'t> = Pairs<'t>;
    /// The index of `{:handle, index}`.
    type Handle = u64;

    fn kind<'t>(term: &'t Term) -> Kind<'t, Proto> {
        match term {
            Term::Atom(a) => match a.as_str() {
                "nil" => Kind::Nil,
                "true" => Kind::Bool(true),
                "false" => Kind::Bool(false),
                name => Kind::Atom(name.into()),
            },
            Term::Int(i) => Kind::Int(*i),
            Term::Float(f) => Kind::Float(*f),
            Term::Bin(b) => Kind::Bin(b),
            Term::List(_) => Kind::List,
            Term::Map(pairs) => match pairs
                .iter()
                .find(|(k, _)| k.as_atom() == Some("__struct__"))
            {
                // A handle crosses as `{:handle, index}`, never as its struct.
                Some((_, name)) => Kind::Struct(name.as_atom().unwrap_or_default().into()),
                None => Kind::Map,
            },
            Term::Tuple(_) => term
                .as_handle()
                .map_or(Kind::NotAValue("tuple"), Kind::Handle),
            Term::Other("improper list") => Kind::Invalid("improper list"),
            Term::Other("big integer") => Kind::Bad(Bad::BigInteger),
            Term::Other("bitstring") => Kind::Bad(Bad::Bitstring),
            Term::Other(what) => Kind::NotAValue(what),
            Term::Raw(_) => Kind::Invalid("unsupported term"),
        }
    }

    fn items<'t>(term: &'t Term) -> Result<(usize, std::slice::Iter<'t, Term>), Fail>
    where
        Self: 't,
    {
        match term {
            Term::List(items) => Ok((items.len(), items.iter())),
            _ => Err(invalid("unsupported term")),
        }
    }

    fn pairs<'t>(term: &'t Term) -> Result<(usize, Pairs<'t>), Fail>
    where
        Self: 't,
    {
        match term {
            Term::Map(pairs) => Ok((pairs.len(), Pairs(pairs.iter()))),
            _ => Err(invalid("unsupported term")),
        }
    }

    fn handle(index: u64) -> Option<handle::Handle> {
        with_handles(|h| h.0.handle(index))
    }
}

/// A map's pairs as the walk takes them.
pub struct Pairs<'t>(std::slice::Iter<'t, (Term, Term)>);

impl<'t> Iterator for Pairs<'t> {
    type Item = (&'t Term, &'t Term);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }
}

// ---------------------------------------------------------------------------------------------
// Lua to terms

/// The `n` values from absolute index `first` of `l`'s stack as one encoded list
/// ([`Term::Raw`]), read by the core's walk (`lua_sandbox_core::marshal::read_values`); paths in
/// errors look like `root[i]...` once the caller roots the failure (`Fail::into_error`, or
/// `Fail::into_args_error` for a tool call's arguments). The stack is left as it was.
///
/// # Safety
/// `first..first + n` must be valid indices of `l`, which must not be running.
pub unsafe fn to_terms(
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
) -> Result<Term, Fail> {
    let mut bytes = Bytes::default();
    if n > 0 {
        proto::put_header(&mut bytes.out, false, n as u32);
    }
    // SAFETY: forwarded contract.
    unsafe { read_values(&mut bytes, l, first, n, bounds) }?;
    proto::put_nil(&mut bytes.out);
    Ok(Term::Raw(bytes.out))
}

/// The value at absolute index `idx`, encoded ([`Term::Raw`]), the path rooted at `root`.
///
/// # Safety
/// As for [`to_terms`].
pub unsafe fn to_term(
    l: *mut ffi::lua_State,
    idx: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Term, SandboxError> {
    let mut bytes = Bytes::default();
    // SAFETY: forwarded contract.
    unsafe { read_value(&mut bytes, l, idx, bounds) }.map_err(|f| f.into_error(root))?;
    Ok(Term::Raw(bytes.out))
}

/// Lua values written straight into the external term format: the bytes held are about the
/// bytes `max_result_bytes` counts, with no tree of terms in between. A value is where its
/// bytes were written.
#[derive(Default)]
struct Bytes {
    out: Vec<u8>,
    /// For each table being read whose keys are still all positive integers: each entry's
    /// key and its value's bytes in `out`, relative to the table's header.
    entries: Vec<Entry>,
}

#[derive(Clone, Copy)]
struct Entry {
    key: i64,
    start: usize,
    end: usize,
}

/// Where a value's bytes are in `out`.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// A table being written: where its header is, and where its entries start in `entries`.
struct Table {
    header: usize,
    base: usize,
}

impl Bytes {
    /// The bytes `put` writes, as a value.
    fn put(&mut self, put: impl FnOnce(&mut Vec<u8>)) -> Span {
        let start = self.out.len();
        put(&mut self.out);
        Span {
            start,
            end: self.out.len(),
        }
    }

    /// Rewrites the map of `count` entries at `header` (keys `1..count`, each once) as the
    /// list of its values in key order, in place when they came in order (the array part,
    /// the common case): each value moves down over the keys before it.
    fn rewrite_as_list(&mut self, header: usize, base: usize, count: u32) {
        let in_order = self.entries[base..]
            .iter()
            .zip(1..)
            .all(|(e, k)| e.key == k);
        if in_order {
            let mut w = header + proto::HEADER_BYTES;
            for e in &self.entries[base..] {
                let (start, end) = (header + e.start, header + e.end);
                self.out.copy_within(start..end, w);
                w += end - start;
            }
            self.out.truncate(w);
        } else {
            // Distinct integers in 1..=n, out of order: a permutation (rare), copied once.
            self.entries[base..].sort_unstable_by_key(|e| e.key);
            let map = self.out.split_off(header);
            self.out.extend([0; proto::HEADER_BYTES]);
            for e in &self.entries[base..] {
                self.out.extend_from_slice(&map[e.start..e.end]);
            }
        }
        proto::set_header(&mut self.out, header, false, count);
        proto::put_nil(&mut self.out);
    }
}

impl Sink for Bytes {
    type Value = Span;
    type Table = Table;

    fn nil(&mut self) -> Span {
        self.put(|out| proto::put_atom(out, "nil"))
    }

    fn boolean(&mut self, b: bool) -> Span {
        self.put(|out| proto::put_atom(out, if b { "true" } else { "false" }))
    }

    fn integer(&mut self, i: i64) -> Span {
        self.put(|out| proto::put_int(out, i))
    }

    /// NaN and the infinities as the NIF sends them (`:nan`, `:infinity`, `:neg_infinity`).
    fn float(&mut self, f: f64) -> Span {
        self.put(|out| {
            if f.is_nan() {
                proto::put_atom(out, "nan")
            } else if f == f64::INFINITY {
                proto::put_atom(out, "infinity")
            } else if f == f64::NEG_INFINITY {
                proto::put_atom(out, "neg_infinity")
            } else {
                proto::put_float(out, f)
            }
        })
    }

    fn string(&mut self, tally: &mut Tally, bytes: &[u8]) -> Result<Span, Fail> {
        tally.charge(bytes.len() as u64)?;
        Ok(self.put(|out| proto::put_bin(out, bytes)))
    }

    unsafe fn handle(&mut self, l: *mut ffi::lua_State, idx: c_int) -> Result<Span, NotOurs> {
        // No store (never in a run): no handle is ours.
        let token = with_handles(|h| h.0).unwrap_or_default();
        // SAFETY: the trait's contract.
        let index = unsafe { token.index_of(l, idx) }?;
        Ok(self.put(|out| proto::put_handle(out, index)))
    }

    /// Written as a map (key, value, key, value...) under a header filled in at the end.
    fn begin(&mut self) -> Table {
        let header = self.out.len();
        proto::put_header(&mut self.out, true, 0);
        Table {
            header,
            base: self.entries.len(),
        }
    }

    fn entry(
        &mut self,
        table: &mut Table,
        _key: Span,
        index: Option<i64>,
        value: Span,
    ) -> Result<(), Fail> {
        if let Some(key) = index {
            let entry = Entry {
                key,
                start: value.start - table.header,
                end: value.end - table.header,
            };
            push_checked(&mut self.entries, entry)?;
        }
        Ok(())
    }

    fn list(&mut self, table: Table, n: usize) -> Result<Span, Fail> {
        let count = u32::try_from(n).map_err(|_| Fail::new(FailKind::Memory))?;
        self.rewrite_as_list(table.header, table.base, count);
        self.entries.truncate(table.base);
        Ok(Span {
            start: table.header,
            end: self.out.len(),
        })
    }

    fn map(&mut self, table: Table, n: usize) -> Result<Span, Fail> {
        let count = u32::try_from(n).map_err(|_| Fail::new(FailKind::Memory))?;
        proto::set_header(&mut self.out, table.header, true, count);
        self.entries.truncate(table.base);
        Ok(Span {
            start: table.header,
            end: self.out.len(),
        })
    }
}
