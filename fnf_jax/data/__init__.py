"""Prompt sources and the training examples (prompt, seed) built from them."""
