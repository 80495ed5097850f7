"""Files shipped inside the package, found through the package (importlib.resources), never
through a config file's location: a copied config, or one run against a non-editable install,
finds the same files.

    toy_pipeline/             the toy world's diffusers-format model (configs/toy.py)
    toy_defect.safetensors    the toy world's defect reward
    PartiPrompts.tsv          PartiPrompts (github.com/google-research/parti, Apache-2.0:
                              PartiPrompts.LICENSE), the default of prompts.source = "parti"

Imports nothing heavy: configs and fnf_jax.config read it.
"""

import importlib.resources
import os

PARTI_PROMPTS = "PartiPrompts.tsv"


def path(name: str) -> str:
  """The file or folder `name` shipped under fnf_jax/assets, as a path on disk."""
  found = os.fspath(importlib.resources.files(__name__).joinpath(name))
  if not os.path.exists(found):
    raise FileNotFoundError(f"{name!r} is not among fnf_jax's shipped assets ({found}): the "
                            "installation is incomplete; reinstall fnf_jax")
  return found
