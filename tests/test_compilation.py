"""Compiling (fnf_jax/runtime/compilation.py): the persistent cache's folder, XLA flags, and a second
process that loads its programs from the cache instead of compiling them."""

import json
import os
import subprocess
import sys

import ml_collections

from fnf_jax.runtime import compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, ml_collections
from fnf_jax.runtime import compilation
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


class _Program:
  """Stands for a traced program: lower() -> itself; compile() records that it ran and waits
  until the test lets it finish."""

  def __init__(self, name, events, release):
    self.name, self.events, self.release = name, events, release

  def lower(self):
    self.events.append(f"lower {self.name}")
    return self

  def compile(self):
    self.events.append(f"compile {self.name}")
    assert self.release.wait(timeout=120)
    return self.name


def test_each_program_compiles_while_the_next_is_traced():
  import threading  # pylint: disable=g-import-not-at-top
  events, release = [], threading.Event()
  compiler = compilation.Compiler("two fakes")
  compiler.add("a", _Program("a", events, release))
  # The caller would now trace "b": "a" is compiling already, before finish() is called.
  for _ in range(1200):
    if "compile a" in events:
      break
    threading.Event().wait(0.1)
  assert events == ["lower a", "compile a"]
  compiler.add("b", _Program("b", events, release))
  release.set()
  compiled, info = compiler.finish()
  assert compiled == {"a": "a", "b": "b"} and info["cache"] == "off"
  assert events.index("lower b") > events.index("compile a")
