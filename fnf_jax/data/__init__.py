"""Prompt sources and the toy world's procedural data."""
