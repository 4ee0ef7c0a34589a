# Property tests run here too (tagged :property); `make fuzz` runs only them, with more cases.
ExUnit.start(exclude: [])
