"""Configs checked before anything loads: the static checks, the valid choices, the errors a run stops with. No jax."""
