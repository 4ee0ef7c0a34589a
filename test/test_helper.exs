# Property tests run here too (tagged :property); `make fuzz` runs only them, with more cases.
ExUnit.start(exclude: [])
# The supervisor the API and adversarial test modules run their :process variants on.
LuaSandbox.Isolation.start_process()
