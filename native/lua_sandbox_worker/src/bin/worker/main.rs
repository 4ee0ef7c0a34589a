//! A minimal jailed worker: builds a sandboxed Lua state in a slot, applies the jail, prints
//! `jail <layers>` (and a `warning` line on stderr for each layer not in force), then answers
//! one request per line on stdin:
//!
//! - `run <lua chunk on one line>` → `ok <tostring of the first result>` or `error <message>`;
//!   the state is restored from its snapshot after each run;
//! - `probe <name> [arg]` (feature `wall-probes`, tests only) → performs a raw system call from
//!   inside the jail and answers `errno <n>` if the call returned (see `probes.rs`).
//!
//! Usage: `worker [max_memory_bytes]` (default 64 MiB).

use std::io::{BufRead, Write};

use lua_sandbox_worker::jail;

// The core's test support builds a state with the sandbox's libraries and runs a chunk in it;
// the worker uses it as is until issue 17 moves the run machinery into the core.
#[path = "../../../../lua_sandbox_core/tests/common/mod.rs"]
mod common;

#[cfg(feature = "wall-probes")]
mod probes;

fn main() {
    let max_memory: usize = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with("--"))
        .map(|s| s.parse().expect("max_memory in bytes"))
        .unwrap_or(64 << 20);
    let mut slot = common::new_slot(max_memory);

    // Test builds only: `--no-jail` serves unjailed, so the wall tests can show that each
    // probe does have an effect when the jail is not there.
    #[cfg(feature = "wall-probes")]
    if std::env::args().any(|a| a == "--no-jail") {
        println!("jail none");
        return serve(&mut slot);
    }

    let layers = match jail::apply(&jail::Config {
        max_memory: max_memory as u64,
    }) {
        Ok(layers) => layers,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    for missing in layers.missing() {
        eprintln!("warning: jail layer not in force: {missing}");
    }
    println!("jail {layers}");
    serve(&mut slot);
}

/// Answers requests, one per line, until stdin closes.
fn serve(slot: &mut lua_sandbox_core::Slot) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    out.flush().ok();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let answer = match op {
            "run" => {
                let a = match common::eval(slot, arg) {
                    Ok(s) => format!("ok {s}"),
                    Err(e) => format!("error {e}"),
                };
                slot.restore();
                a
            }
            #[cfg(feature = "wall-probes")]
            "probe" => probes::probe(arg),
            _ => format!("error unknown request {op:?}"),
        };
        if writeln!(out, "{}", answer.replace('\n', "\\n"))
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
}
