"""Compiling (fnf_jax/compilation.py): the persistent cache's folder, XLA flags, and a second
process that loads its programs from the cache instead of compiling them."""

import json
import os
import subprocess
import sys

import ml_collections

from fnf_jax import compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, ml_collections
from fnf_jax import compilation
cfg = ml_collections.ConfigDict({"cache_dir": sys.argv[1], "min_compile_secs": 0.0,
                                 "xla_flags": ""})
compilation.setup(cfg, "/unused")
x = jnp.ones((64, 64))
programs = {"a": (jax.jit(lambda x: jnp.sin(x) @ x), (x,)),
            "b": (jax.jit(lambda x: jnp.cos(x).sum()), (x,))}
compiled, info = compilation.compile_all(programs, "two programs")
print(json.dumps({"cache": info["cache"], "a": float(compiled["a"](x)[0, 0])}))
"""


def _run(cache_dir: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = ROOT
  out = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_its_programs_from_the_cache(tmp_path):
  folder = str(tmp_path / "jax_cache")
  first, second = _run(folder), _run(folder)
  assert first["cache"] == "miss" and second["cache"] == "hit"
  assert first["a"] == second["a"]
  assert len(os.listdir(folder)) >= 2  # the entries, written once
  assert _run("")["cache"] == "off"


def test_the_cache_folder():
  cfg = lambda d: ml_collections.ConfigDict({"cache_dir": d})
  assert compilation.cache_folder(cfg("auto"), "/runs/violence1") == "/runs/jax_cache"
  assert compilation.cache_folder(cfg("auto"), "/runs/violence1/") == "/runs/jax_cache"
  assert compilation.cache_folder(cfg("/x/cache"), "/runs/a") == "/x/cache"
  assert compilation.cache_folder(cfg(""), "/runs/a") == ""
  os.environ["XDG_CACHE_HOME"], old = "/home/u/.cache", os.environ.get("XDG_CACHE_HOME")
  try:
    assert compilation.cache_folder(cfg("auto"), "gs://b/run") == "/home/u/.cache/fnf_jax/jax"
  finally:
    if old is None:
      del os.environ["XDG_CACHE_HOME"]
    else:
      os.environ["XDG_CACHE_HOME"] = old


def test_xla_flags_are_appended(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  compilation.add_xla_flags("--xla_gpu_autotune_level=0")
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                     "--xla_gpu_autotune_level=0")
  compilation.add_xla_flags("")
  assert os.environ["XLA_FLAGS"].endswith("level=0")
