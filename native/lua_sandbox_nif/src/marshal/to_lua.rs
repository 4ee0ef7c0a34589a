//! Elixir -> Lua: terms built into Lua values on the stack, with the memory limit lifted and
//! the size tracked here (see the module doc of `marshal`).

use super::*;
use lua_sandbox_core::marshal as shared;

/// Sets each `(name, term)` as a global of `l` (`lua_sandbox_core::marshal::push_globals`).
///
/// # Safety
/// `l` must be a non-running state whose memory limit the caller lifted (see the module doc);
/// `limit` is the run's limit, checked here.
pub unsafe fn push_globals(
    l: *mut ffi::lua_State,
    globals: &[(String, Term)],
    max_depth: usize,
    limit: usize,
) -> Result<(), SandboxError> {
    // SAFETY: forwarded contract.
    unsafe { shared::push_globals(l, globals, max_depth, limit, |b| Builder { b }) }
}

/// Converts `terms` to Lua values left on top of `l`'s stack
/// (`lua_sandbox_core::marshal::push_values`): how many were pushed.
///
/// # Safety
/// As for [`push_globals`].
pub unsafe fn push_values(
    l: *mut ffi::lua_State,
    terms: &[Term],
    max_depth: usize,
    root: &str,
    limit: usize,
) -> Result<c_int, SandboxError> {
    // SAFETY: forwarded contract.
    unsafe { shared::push_values(l, terms, max_depth, root, limit, |b| Builder { b }) }
}

struct Builder {
    b: Build,
}

impl<'a> Push<Term<'a>> for Builder {
    fn build(&mut self) -> &mut Build {
        &mut self.b
    }

    /// Pushes the Lua value for `term` (exactly one slot on success).
    unsafe fn push(
        &mut self,
        l: *mut ffi::lua_State,
        term: &Term<'a>,
        depth: usize,
    ) -> Result<(), Fail> {
        let term = *term;
        self.b.meter.value(0)?;
        // SAFETY: the trait's contract: one free slot; tables check for more.
        unsafe {
            match term.get_type() {
                TermType::Atom if term == atoms::nil().to_term(term.get_env()) => {
                    ffi::lua_pushnil(l)
                }
                ty @ (TermType::Atom | TermType::Integer | TermType::Float | TermType::Binary) => {
                    self.push_scalar(l, term, ty, "")?
                }
                TermType::List => self.push_list(l, term, depth)?,
                TermType::Map => self.push_map(l, term, depth)?,
                TermType::Tuple => return Err(invalid("tuple cannot become a Lua value")),
                TermType::Pid => return Err(invalid("pid cannot become a Lua value")),
                TermType::Port => return Err(invalid("port cannot become a Lua value")),
                TermType::Ref => return Err(invalid("reference cannot become a Lua value")),
                TermType::Fun => return Err(invalid("function cannot become a Lua value")),
                TermType::Unknown => return Err(invalid("unsupported term")),
            }
        }
        Ok(())
    }
}

impl Builder {
    unsafe fn push_list(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        depth: usize,
    ) -> Result<(), Fail> {
        let depth = self.b.enter(depth)?;
        let len = term.list_length().map_err(|_| invalid("improper list"))?;
        let iter: ListIterator = term.decode().map_err(|_| invalid("improper list"))?;
        self.b
            .reserve(len.saturating_mul(16).saturating_add(LUA_VALUE_BYTES))?;
        let narr = c_int::try_from(len).map_err(|_| Fail::new(FailKind::Memory))?;
        // SAFETY: as in `push` (the trait's contract).
        unsafe {
            if ffi::lua_checkstack(l, 3) == 0 {
                return Err(stack_exhausted());
            }
            ffi::lua_createtable(l, narr, 0);
            let t = ffi::lua_gettop(l);
            for (i, item) in iter.enumerate() {
                let index = i as i64 + 1;
                self.push(l, &item, depth)
                    .map_err(|f| f.at(Seg::Index(index)))?;
                ffi::lua_rawseti(l, t, index);
            }
        }
        Ok(())
    }

    unsafe fn push_map(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        depth: usize,
    ) -> Result<(), Fail> {
        if let Ok(name) = term.map_get(atoms::struct_key()) {
            if name == atoms::handle_struct().to_term(term.get_env()) {
                let inner = term
                    .map_get(atoms::term())
                    .map_err(|_| invalid("bad handle"))?;
                self.b.reserve(LUA_VALUE_BYTES)?;
                // SAFETY: as in `push` (the trait's contract) (limit lifted, one slot free: callers check).
                return unsafe { crate::handles::push(l, inner) }.map_err(invalid);
            }
            let module = name.atom_to_string().unwrap_or_default();
            let module = module.strip_prefix("Elixir.").unwrap_or(&module);
            return Err(invalid(&format!(
                "struct {module} cannot become a Lua value (no LuaSandbox.Encoder)"
            )));
        }
        let depth = self.b.enter(depth)?;
        let size = term.map_size().unwrap_or(0);
        let iter = MapIterator::new(term).ok_or_else(|| invalid("bad map"))?;
        self.b
            .reserve(size.saturating_mul(40).saturating_add(LUA_VALUE_BYTES))?;
        let nrec = c_int::try_from(size).map_err(|_| Fail::new(FailKind::Memory))?;
        // SAFETY: as in `push` (the trait's contract).
        unsafe {
            if ffi::lua_checkstack(l, 4) == 0 {
                return Err(stack_exhausted());
            }
            ffi::lua_createtable(l, 0, nrec);
            let t = ffi::lua_gettop(l);
            let mut seen = KeyKinds::default();
            for (k, v) in iter {
                self.b.meter.value(0)?;
                let kind = k.get_type();
                self.push_key(l, k, kind).map_err(|f| f.at(term_seg(k)))?;
                seen.admit(key_kind(kind), l, t)
                    .map_err(|f| f.at(term_seg(k)))?;
                self.push(l, &v, depth).map_err(|f| f.at(term_seg(k)))?;
                ffi::lua_rawset(l, t);
            }
        }
        Ok(())
    }

    /// Pushes a map key.
    unsafe fn push_key(
        &mut self,
        l: *mut ffi::lua_State,
        k: Term,
        kind: TermType,
    ) -> Result<(), Fail> {
        match kind {
            TermType::Atom if k == atoms::nil().to_term(k.get_env()) => {
                Err(invalid("nil cannot be a Lua table key"))
            }
            // SAFETY: `push_map` reserved the slot.
            ty @ (TermType::Atom | TermType::Integer | TermType::Float | TermType::Binary) => unsafe {
                self.push_scalar(l, k, ty, " key")
            },
            _ => Err(invalid(
                "map key must be a binary, atom, integer, float or boolean",
            )),
        }
    }

    /// Pushes a boolean, non-nil atom, integer, float or binary, as a value or a map key
    /// (`role` is `""` or `" key"`, for messages). Lua turns float keys with an integer value
    /// into integers itself; NaN cannot come from Erlang. `ty` is `term`'s type, which the
    /// caller has already asked the VM for.
    unsafe fn push_scalar(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        ty: TermType,
        role: &str,
    ) -> Result<(), Fail> {
        // SAFETY: as in `push` (the trait's contract); the caller guarantees one free slot.
        unsafe {
            match ty {
                TermType::Atom => {
                    if let Ok(b) = term.decode::<bool>() {
                        ffi::lua_pushboolean(l, c_int::from(b));
                    } else {
                        let name = term
                            .atom_to_string()
                            .map_err(|_| invalid(&format!("bad atom{role}")))?;
                        self.b.reserve(name.len() + LUA_VALUE_BYTES)?;
                        push_str(l, name.as_bytes());
                    }
                }
                TermType::Integer => match term.decode::<i64>() {
                    Ok(i) => ffi::lua_pushinteger(l, i),
                    Err(_) => {
                        return Err(invalid(&format!("integer{role} outside the 64-bit range")))
                    }
                },
                TermType::Float => {
                    let f: f64 = term
                        .decode()
                        .map_err(|_| invalid(&format!("bad float{role}")))?;
                    ffi::lua_pushnumber(l, f);
                }
                TermType::Binary => {
                    let bin: rustler::Binary = term
                        .decode()
                        .map_err(|_| invalid(&format!("bitstring{role}")))?;
                    self.b.reserve(bin.len() + LUA_VALUE_BYTES)?;
                    self.b.meter.value(bin.len())?;
                    push_str(l, bin.as_slice());
                }
                _ => return Err(invalid("unsupported term")),
            }
        }
        Ok(())
    }
}

/// The path segment of a map key term (only computed for error messages).
fn term_seg(k: Term) -> Seg {
    match k.get_type() {
        TermType::Binary => match k.decode::<rustler::Binary>() {
            Ok(b) => key_seg(b.as_slice()),
            Err(_) => Seg::Other("?".into()),
        },
        TermType::Atom => match k.atom_to_string() {
            Ok(a) if a == "true" || a == "false" => Seg::Other(a),
            Ok(a) => Seg::Key(a),
            Err(_) => Seg::Other("?".into()),
        },
        TermType::Integer => k.decode::<i64>().map_or(Seg::Other("?".into()), Seg::Index),
        _ => Seg::Other(format!("{k:?}")),
    }
}

/// A map key's kind for [`KeyKinds`].
fn key_kind(kind: TermType) -> KeyKind {
    match kind {
        TermType::Binary => KeyKind::String,
        TermType::Atom => KeyKind::Atom,
        TermType::Integer => KeyKind::Integer,
        TermType::Float => KeyKind::Float,
        _ => KeyKind::Other,
    }
}
