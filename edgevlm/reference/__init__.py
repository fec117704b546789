"""The embedded default and its tooling, apart from the checkpoint adapters in families/: the reference VLM's trainer
(train.py), its synthetic scenes (scenes.py, also the calibration and probe images of export and verify), task
accuracy (evaluate.py), tokenizer training (tokenizers.py) and random-weight presets of public shapes (presets.py)."""
