"""Video input: clips decoded in-process with PyAV, sampled and laid out as each family's HF video processor does."""
