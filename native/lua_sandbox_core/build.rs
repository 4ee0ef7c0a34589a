//! Compiles the patched copies of Lua 5.4.9's pattern matcher and sort (`csrc/`).
//!
//! The defines mirror what `lua-src` 551.0.2 uses to build the vendored Lua that `mlua-sys`
//! links, so the copies see the same `luaconf.h` configuration as the rest of the VM. The Lua
//! API symbols they call (`lua_*`, `luaL_*`) resolve from that static library at link time.

use std::env;

fn main() {
    let target = env::var("TARGET").expect("TARGET is set by cargo");
    let mut build = cc::Build::new();
    build
        .include("csrc")
        // The same headers the VM is built from (vendor/lua-src, see its PATCHES.md).
        .include("../../vendor/lua-src/lua-5.4.9")
        .file("csrc/sb_strlib.c")
        .file("csrc/sb_tablib.c")
        .file("csrc/sb_json.c")
        .files(["csrc/sb_baselib.c", "csrc/sb_corolib.c"])
        // lua-src defines LUA_COMPAT_5_3 for every Lua 5.4 build.
        .define("LUA_COMPAT_5_3", None)
        .flag_if_supported("-fno-common");
    if target.contains("linux")
        || target.ends_with("bsd")
        || target.contains("netbsd")
        || target.contains("dragonfly")
    {
        build.define("LUA_USE_LINUX", None);
    } else if target.contains("apple-darwin") {
        build.define("LUA_USE_MACOSX", None);
    } else if target.contains("apple-ios") {
        build.define("LUA_USE_IOS", None);
    } else if target.contains("windows") {
        build.define("LUA_USE_WINDOWS", None);
    } else {
        build.define("LUA_USE_POSIX", None);
    }
    build.compile("lua_sandbox_hardened");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    for f in [
        "sb_strlib.c",
        "sb_tablib.c",
        "sb_json.c",
        "sb_baselib.c",
        "sb_budget.h",
    ] {
        println!("cargo:rerun-if-changed=csrc/{f}");
    }
}
