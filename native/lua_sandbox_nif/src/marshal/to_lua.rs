//! Elixir -> Lua: what a rustler term is, for the core's walk
//! (`lua_sandbox_core::marshal::push_globals`/`push_values`, which build the values with the
//! memory limit lifted and the size tracked; see the module doc of `marshal`).

use super::*;
use lua_sandbox_core::handle;
use lua_sandbox_core::marshal::{Bad, Host, Kind};
use std::marker::PhantomData;

/// The NIF's terms for the core's walk: `marshal::push_globals::<Nif>(...)`.
pub struct Nif<'a>(PhantomData<Term<'a>>);

impl<'a> Host for Nif<'a> {
    type Term = Term<'a>;
    type Ref<'t>
        = Term<'a>
    where
        Self: 't;
    type Items<'t>
        = ListIterator<'a>
    where
        Self: 't;
    type Pairs<'t>
        = MapIterator<'a>
    where
        Self: 't;
    /// The term inside the `LuaSandbox.Handle` struct.
    type Handle = Term<'a>;

    fn kind<'t>(term: &'t Term<'a>) -> Kind<'t, Self> {
        let term = *term;
        match term.get_type() {
            TermType::Atom if term == atoms::nil().to_term(term.get_env()) => Kind::Nil,
            TermType::Atom => match term.decode::<bool>() {
                Ok(b) => Kind::Bool(b),
                Err(_) => match term.atom_to_string() {
                    Ok(name) => Kind::Atom(name.into()),
                    Err(_) => Kind::Bad(Bad::Atom),
                },
            },
            TermType::Integer => term.decode().map_or(Kind::Bad(Bad::BigInteger), Kind::Int),
            TermType::Float => term.decode().map_or(Kind::Bad(Bad::Float), Kind::Float),
            TermType::Binary => match term.decode::<rustler::Binary<'a>>() {
                Ok(bin) => Kind::Bin(bin.as_slice()),
                Err(_) => Kind::Bad(Bad::Bitstring),
            },
            TermType::List => Kind::List,
            TermType::Map => match term.map_get(atoms::struct_key()) {
                Err(_) => Kind::Map,
                Ok(name) if name == atoms::handle_struct().to_term(term.get_env()) => term
                    .map_get(atoms::term())
                    .map_or(Kind::Invalid("bad handle"), Kind::Handle),
                Ok(name) => Kind::Struct(name.atom_to_string().unwrap_or_default().into()),
            },
            TermType::Tuple => Kind::NotAValue("tuple"),
            TermType::Pid => Kind::NotAValue("pid"),
            TermType::Port => Kind::NotAValue("port"),
            TermType::Ref => Kind::NotAValue("reference"),
            TermType::Fun => Kind::NotAValue("function"),
            TermType::Unknown => Kind::Invalid("unsupported term"),
        }
    }

    fn items<'t>(term: &'t Term<'a>) -> Result<(usize, ListIterator<'a>), Fail>
    where
        Self: 't,
    {
        let len = term.list_length().map_err(|_| invalid("improper list"))?;
        let iter = term.decode().map_err(|_| invalid("improper list"))?;
        Ok((len, iter))
    }

    fn pairs<'t>(term: &'t Term<'a>) -> Result<(usize, MapIterator<'a>), Fail>
    where
        Self: 't,
    {
        let size = term.map_size().unwrap_or(0);
        let iter = MapIterator::new(*term).ok_or_else(|| invalid("bad map"))?;
        Ok((size, iter))
    }

    fn handle(term: Term<'a>) -> Option<handle::Handle> {
        crate::handles::adopt(term)
    }
}
