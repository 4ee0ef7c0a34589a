//! Terms to Lua values and back, bounded in depth and size, with cycle detection.
//!
//! Only raw access is used on the Lua side (no metamethod runs while a result is read), and no
//! atom is ever created from Lua data.

use std::fmt::Write;

use mlua::{Lua, Table, Value};
use rustler::types::{ListIterator, MapIterator};
use rustler::{Encoder, Env, NewBinary, Term, TermType};

use crate::atoms;
use crate::error::SandboxError;

/// Fixed cost, in bytes, charged per value against `max_result_bytes` on top of string bytes.
pub const VALUE_COST: u64 = 8;

/// One step of a path like `globals.ctx.items[3]`, for error messages.
#[derive(Clone, Debug)]
enum Seg {
    Root(String),
    Key(String),
    Index(i64),
    Other(String),
}

#[derive(Default)]
struct Path(Vec<Seg>);

impl Path {
    fn render(&self) -> String {
        let mut out = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Root(s) => out.push_str(s),
                Seg::Key(k) if is_identifier(k) => {
                    let _ = write!(out, ".{k}");
                }
                Seg::Key(k) => {
                    let _ = write!(out, "[{k:?}]");
                }
                Seg::Index(i) => {
                    let _ = write!(out, "[{i}]");
                }
                Seg::Other(s) => {
                    let _ = write!(out, "[{s}]");
                }
            }
        }
        out
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn lua_err(e: mlua::Error) -> SandboxError {
    match e {
        mlua::Error::MemoryError(_) => SandboxError::MemoryLimit,
        other => SandboxError::Runtime(other.to_string()),
    }
}

/// Elixir terms to Lua values.
pub struct ToLua<'l> {
    lua: &'l Lua,
    max_depth: usize,
    path: Path,
}

impl<'l> ToLua<'l> {
    pub fn new(lua: &'l Lua, max_depth: usize, root: &str) -> Self {
        ToLua {
            lua,
            max_depth,
            path: Path(vec![Seg::Root(root.to_string())]),
        }
    }

    /// Converts `term`; `name` extends the root path (e.g. the global's name).
    pub fn convert_named(&mut self, name: &str, term: Term) -> Result<Value, SandboxError> {
        self.path.0.push(Seg::Key(name.to_string()));
        let v = self.convert(term, 0)?;
        self.path.0.pop();
        Ok(v)
    }

    pub fn convert_indexed(&mut self, index: i64, term: Term) -> Result<Value, SandboxError> {
        self.path.0.push(Seg::Index(index));
        let v = self.convert(term, 0)?;
        self.path.0.pop();
        Ok(v)
    }

    fn invalid(&self, what: &str) -> SandboxError {
        SandboxError::InvalidInput(format!("{} at {}", what, self.path.render()))
    }

    fn convert(&mut self, term: Term, depth: usize) -> Result<Value, SandboxError> {
        match term.get_type() {
            TermType::Atom => {
                let name = term
                    .atom_to_string()
                    .map_err(|_| self.invalid("bad atom"))?;
                Ok(match name.as_str() {
                    "nil" => Value::Nil,
                    "true" => Value::Boolean(true),
                    "false" => Value::Boolean(false),
                    _ => Value::String(self.lua.create_string(name).map_err(lua_err)?),
                })
            }
            TermType::Integer => match term.decode::<i64>() {
                Ok(i) => Ok(Value::Integer(i)),
                Err(_) => Err(self.invalid("integer outside the 64-bit range")),
            },
            TermType::Float => {
                let f: f64 = term.decode().map_err(|_| self.invalid("bad float"))?;
                Ok(Value::Number(f))
            }
            TermType::Binary => {
                let bin: rustler::Binary = term.decode().map_err(|_| self.invalid("bitstring"))?;
                Ok(Value::String(
                    self.lua.create_string(bin.as_slice()).map_err(lua_err)?,
                ))
            }
            TermType::List => self.convert_list(term, depth),
            TermType::Map => self.convert_map(term, depth),
            TermType::Tuple => Err(self.invalid("tuple cannot become a Lua value")),
            TermType::Pid => Err(self.invalid("pid cannot become a Lua value")),
            TermType::Port => Err(self.invalid("port cannot become a Lua value")),
            TermType::Ref => Err(self.invalid("reference cannot become a Lua value")),
            TermType::Fun => Err(self.invalid("function cannot become a Lua value")),
            TermType::Unknown => Err(self.invalid("unsupported term")),
        }
    }

    fn enter(&self, depth: usize) -> Result<usize, SandboxError> {
        if depth >= self.max_depth {
            Err(SandboxError::DepthLimit(format!(
                "value nested deeper than max_depth ({}) at {}",
                self.max_depth,
                self.path.render()
            )))
        } else {
            Ok(depth + 1)
        }
    }

    fn convert_list(&mut self, term: Term, depth: usize) -> Result<Value, SandboxError> {
        let depth = self.enter(depth)?;
        let len = term
            .list_length()
            .map_err(|_| self.invalid("improper list"))?;
        let iter: ListIterator = term.decode().map_err(|_| self.invalid("improper list"))?;
        let table = self
            .lua
            .create_table_with_capacity(len, 0)
            .map_err(lua_err)?;
        for (i, item) in iter.enumerate() {
            let index = i as i64 + 1;
            self.path.0.push(Seg::Index(index));
            let v = self.convert(item, depth)?;
            self.path.0.pop();
            table.raw_set(index, v).map_err(lua_err)?;
        }
        Ok(Value::Table(table))
    }

    fn convert_map(&mut self, term: Term, depth: usize) -> Result<Value, SandboxError> {
        if term.map_get(atoms::struct_key()).is_ok() {
            return Err(self.invalid("struct cannot become a Lua value"));
        }
        let depth = self.enter(depth)?;
        let size = term.map_size().unwrap_or(0);
        let iter = MapIterator::new(term).ok_or_else(|| self.invalid("bad map"))?;
        let table = self
            .lua
            .create_table_with_capacity(0, size)
            .map_err(lua_err)?;
        for (k, v) in iter {
            let (key, seg) = self.convert_key(k)?;
            self.path.0.push(seg);
            let exists = !matches!(table.raw_get::<Value>(key.clone()), Ok(Value::Nil));
            if exists {
                return Err(self.invalid("two map keys become the same Lua key"));
            }
            let value = self.convert(v, depth)?;
            self.path.0.pop();
            table.raw_set(key, value).map_err(lua_err)?;
        }
        Ok(Value::Table(table))
    }

    fn convert_key(&mut self, k: Term) -> Result<(Value, Seg), SandboxError> {
        match k.get_type() {
            TermType::Binary => {
                let bin: rustler::Binary = k.decode().map_err(|_| self.invalid("bitstring key"))?;
                let seg = Seg::Key(String::from_utf8_lossy(bin.as_slice()).into_owned());
                let s = self.lua.create_string(bin.as_slice()).map_err(lua_err)?;
                Ok((Value::String(s), seg))
            }
            TermType::Atom => {
                let name = k
                    .atom_to_string()
                    .map_err(|_| self.invalid("bad atom key"))?;
                match name.as_str() {
                    "true" => Ok((Value::Boolean(true), Seg::Other("true".into()))),
                    "false" => Ok((Value::Boolean(false), Seg::Other("false".into()))),
                    "nil" => Err(self.invalid("nil cannot be a Lua table key")),
                    _ => {
                        let s = self.lua.create_string(&name).map_err(lua_err)?;
                        Ok((Value::String(s), Seg::Key(name)))
                    }
                }
            }
            TermType::Integer => match k.decode::<i64>() {
                Ok(i) => Ok((Value::Integer(i), Seg::Index(i))),
                Err(_) => Err(self.invalid("integer key outside the 64-bit range")),
            },
            TermType::Float => {
                let f: f64 = k.decode().map_err(|_| self.invalid("bad float key"))?;
                // Lua normalises float keys with an integer value to integers.
                const I64_RANGE: std::ops::Range<f64> =
                    -9.223_372_036_854_776e18..9.223_372_036_854_776e18;
                if f.fract() == 0.0 && I64_RANGE.contains(&f) {
                    Ok((Value::Integer(f as i64), Seg::Other(format!("{f}"))))
                } else {
                    Ok((Value::Number(f), Seg::Other(format!("{f}"))))
                }
            }
            _ => Err(self.invalid("map key must be a binary, atom, integer, float or boolean")),
        }
    }
}

/// Lua values to Elixir terms.
pub struct ToTerm<'e> {
    env: Env<'e>,
    max_depth: usize,
    bytes_left: u64,
    max_bytes: u64,
    path: Path,
    visiting: Vec<*const std::ffi::c_void>,
}

impl<'e> ToTerm<'e> {
    pub fn new(env: Env<'e>, max_depth: usize, max_bytes: u64, root: &str) -> Self {
        ToTerm {
            env,
            max_depth,
            bytes_left: max_bytes,
            max_bytes,
            path: Path(vec![Seg::Root(root.to_string())]),
            visiting: Vec::new(),
        }
    }

    /// Converts the `index`-th (1-based) of several values, e.g. a result or tool argument.
    pub fn convert_indexed(&mut self, index: i64, v: &Value) -> Result<Term<'e>, SandboxError> {
        self.path.0.push(Seg::Index(index));
        let t = self.convert(v, 0)?;
        self.path.0.pop();
        Ok(t)
    }

    pub fn convert_root(&mut self, v: &Value) -> Result<Term<'e>, SandboxError> {
        self.convert(v, 0)
    }

    fn charge(&mut self, bytes: u64) -> Result<(), SandboxError> {
        let cost = bytes.saturating_add(VALUE_COST);
        if cost > self.bytes_left {
            self.bytes_left = 0;
            return Err(SandboxError::SizeLimit(format!(
                "result larger than max_result_bytes ({}) at {}",
                self.max_bytes,
                self.path.render()
            )));
        }
        self.bytes_left -= cost;
        Ok(())
    }

    fn unsupported(&self, what: &str) -> SandboxError {
        SandboxError::UnsupportedValue(format!(
            "{what} cannot leave the sandbox (at {})",
            self.path.render()
        ))
    }

    fn convert(&mut self, v: &Value, depth: usize) -> Result<Term<'e>, SandboxError> {
        let env = self.env;
        match v {
            Value::Nil => {
                self.charge(0)?;
                Ok(atoms::nil().encode(env))
            }
            Value::Boolean(b) => {
                self.charge(0)?;
                Ok(b.encode(env))
            }
            Value::Integer(i) => {
                self.charge(0)?;
                Ok(i.encode(env))
            }
            Value::Number(f) => {
                self.charge(0)?;
                Ok(float_term(env, *f))
            }
            Value::String(s) => {
                let bytes = s.as_bytes();
                self.charge(bytes.len() as u64)?;
                Ok(binary_term(env, &bytes))
            }
            Value::Table(t) => self.convert_table(t, depth),
            Value::Function(_) => Err(self.unsupported("a function")),
            Value::Thread(_) => Err(self.unsupported("a coroutine")),
            Value::UserData(_) | Value::LightUserData(_) => Err(self.unsupported("userdata")),
            _ => Err(self.unsupported("this value")),
        }
    }

    fn convert_table(&mut self, t: &Table, depth: usize) -> Result<Term<'e>, SandboxError> {
        let ptr = t.to_pointer();
        if self.visiting.contains(&ptr) {
            return Err(SandboxError::Cycle(format!(
                "table contains itself at {}",
                self.path.render()
            )));
        }
        if depth >= self.max_depth {
            return Err(SandboxError::DepthLimit(format!(
                "value nested deeper than max_depth ({}) at {}",
                self.max_depth,
                self.path.render()
            )));
        }
        self.charge(0)?;
        self.visiting.push(ptr);
        let result = self.convert_table_entries(t, depth + 1);
        self.visiting.pop();
        result
    }

    fn convert_table_entries(&mut self, t: &Table, depth: usize) -> Result<Term<'e>, SandboxError> {
        let mut pairs: Vec<(Value, Value)> = Vec::with_capacity(t.raw_len());
        for pair in t.pairs::<Value, Value>() {
            pairs.push(pair.map_err(lua_err)?);
        }
        let n = pairs.len();
        let is_list = n > 0
            && pairs
                .iter()
                .all(|(k, _)| matches!(k, Value::Integer(i) if *i >= 1 && (*i as u64) <= n as u64));
        if is_list {
            // Keys are distinct integers in 1..=n, so this is a permutation of the slots.
            let mut slots: Vec<Option<Value>> = vec![None; n];
            for (k, v) in pairs {
                if let Value::Integer(i) = k {
                    slots[(i - 1) as usize] = Some(v);
                }
            }
            let mut items = Vec::with_capacity(n);
            for (i, v) in slots.into_iter().enumerate() {
                let v = v.unwrap_or(Value::Nil);
                self.path.0.push(Seg::Index(i as i64 + 1));
                items.push(self.convert(&v, depth)?);
                self.path.0.pop();
            }
            return Ok(items.encode(self.env));
        }
        let mut keys = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n);
        for (k, v) in pairs {
            let (key, seg) = match &k {
                Value::String(s) => {
                    let bytes = s.as_bytes();
                    self.charge(bytes.len() as u64)?;
                    let seg = Seg::Key(String::from_utf8_lossy(&bytes).into_owned());
                    (binary_term(self.env, &bytes), seg)
                }
                Value::Integer(i) => {
                    self.charge(0)?;
                    (i.encode(self.env), Seg::Index(*i))
                }
                Value::Number(f) => {
                    self.charge(0)?;
                    (float_term(self.env, *f), Seg::Other(format!("{f}")))
                }
                Value::Boolean(b) => {
                    self.charge(0)?;
                    (b.encode(self.env), Seg::Other(b.to_string()))
                }
                Value::Table(_) => return Err(self.unsupported("a table key")),
                Value::Function(_) => return Err(self.unsupported("a function key")),
                _ => return Err(self.unsupported("this key")),
            };
            self.path.0.push(seg);
            let value = self.convert(&v, depth)?;
            self.path.0.pop();
            keys.push(key);
            values.push(value);
        }
        Term::map_from_arrays(self.env, &keys, &values)
            .map_err(|_| SandboxError::UnsupportedValue("table keys collide".to_string()))
    }
}

pub fn binary_term<'e>(env: Env<'e>, bytes: &[u8]) -> Term<'e> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    let b: rustler::Binary = bin.into();
    b.encode(env)
}

fn float_term(env: Env<'_>, f: f64) -> Term<'_> {
    if f.is_nan() {
        atoms::nan().encode(env)
    } else if f == f64::INFINITY {
        atoms::infinity().encode(env)
    } else if f == f64::NEG_INFINITY {
        atoms::neg_infinity().encode(env)
    } else {
        f.encode(env)
    }
}
