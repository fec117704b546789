"""Other programs' runtimes that edgevlm is measured and verified against (benchmark and verify peers), kept out of
runtimes/, which holds only what edgevlm itself runs on a device."""
