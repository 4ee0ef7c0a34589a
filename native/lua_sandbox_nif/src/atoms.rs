//! Every atom the NIF uses.

rustler::atoms! {
    ok,
    error,
    nil,
    tool_call,
    retry,
    busy,
    arena_busy,
    // session info keys
    memory,
    calls,
    rollbacks,
    lua_print,
    // print modes
    capture,
    send,
    log,
    discard,
    // non-finite floats
    nan,
    infinity,
    neg_infinity,
    // error kinds
    syntax,
    runtime,
    instruction_limit,
    memory_limit,
    output_limit,
    depth_limit,
    size_limit,
    cycle,
    unsupported_value,
    invalid_input,
    tool_limit,
    killed,
    timeout,
    // stats keys
    instructions,
    memory_peak,
    duration_us,
    tool_calls,
    cpu_us,
    denied,
    struct_key = "__struct__",
    handle_struct = "Elixir.LuaSandbox.Handle",
    term,
    // the tags of a result built in pieces (LuaSandbox.Pieces)
    tag_pieces = "$lua_sandbox_pieces",
    tag_walk = "$lua_sandbox_walk",
    tag_term = "$lua_sandbox_term",
}
