//! Placeholder until the budgeted builtins land.
pub fn install(_lua: &mlua::Lua, _string: &mlua::Table, _table: &mlua::Table) -> mlua::Result<()> {
    Ok(())
}
