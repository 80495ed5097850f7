"""Run configurations (ml_collections); each file's docstring holds its exact commands."""
