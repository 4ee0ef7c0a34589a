# Property tests run here too (tagged :property); `make fuzz` runs only them, with more cases.
# `make stretch` adds a formatter that names the running test in the hole finder's log.
formatters =
  if System.get_env("LUA_SANDBOX_STRETCH_TEST"),
    do: [ExUnit.CLIFormatter, LuaSandbox.StretchFormatter],
    else: [ExUnit.CLIFormatter]

ExUnit.start(exclude: [], formatters: formatters)
# The supervisor the API and adversarial test modules run their :process variants on.
LuaSandbox.Isolation.start_process()
