// Not part of the published crate: this copy is patched (PATCHES.md), and the C it compiles is
// read by mlua-sys's build script, not by rustc, so cargo would not see an edit to it. Watching
// the sources here makes an edit rebuild this crate and, through it, the Lua that mlua-sys builds.
fn main() {
    println!("cargo:rerun-if-changed=lua-5.4.9");
    println!("cargo:rerun-if-changed=src");
}
