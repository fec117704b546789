"""`edgevlm plan`: the memory and speed budget of a bundle on a device. devices.py: the device table (devices.json)
and this machine, measured; budget.py: the arithmetic (pure functions); bundle.py: a bundle's options on a device."""
