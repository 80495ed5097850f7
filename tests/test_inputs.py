"""Every input a config names is checked before anything loads (fnf_jax/config/inputs.py), all
the missing ones reported in one message with where to get each (fnf_jax/config/sources.py),
exit 2; `--check` runs only the checks and says what a run would read.

Each case runs `python -m fnf_jax.main` in a working directory outside the checkout (so the
configs' relative paths, data/..., find nothing) under `-X importtime`, which lists every module
the process imported: "nothing loaded" is asserted as "no model module imported".
"""

import os
import shutil
import struct
import subprocess
import sys

import json
import numpy as np
import pytest
from safetensors.numpy import save_file

from fnf_jax import assets
from fnf_jax.config import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = assets.path("toy_pipeline")
# Loading a model or a reward imports these; a check that fails before any load imports none.
LOADERS = {"fnf_jax.models.unet", "fnf_jax.models.vae", "fnf_jax.models.clip",
           "fnf_jax.diffusion.pipeline", "fnf_jax.jobs.train", "optax", "orbax"}

# config -> the inputs its real run names, none of which a fresh machine has.
MISSING = {
    "violence": ("model.path", "prompts.path", "reward.clip_path", "reward.weights"),
    "oversexualization": ("model.path", "prompts.path", "reward.clip_path", "reward.weights"),
    "draft": ("model.path", "prompts.path", "reward.clip_path", "reward.weights"),
    "plausibility": ("model.path", "reward.vit_path", "reward.t5_path", "reward.weights"),
    "alignment": ("model.path", "reward.vit_path", "reward.t5_path", "reward.weights"),
    "rahf": ("data.manual_dir", "model.vit_path", "model.t5_path"),
    "sample": ("model.path",),
}


def run(cwd, config, *flags, check=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "fnf_jax.main", f"--config={config}",
       f"--workdir={cwd}/run", *[f"--config.{f}" for f in flags], *(["--check"] if check else [])],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
  imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  proc.stderr = "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("import time:"))
  return proc, imported


def fatal(proc) -> str:
  """The FATAL message (its lines), after checking exit 2 and no traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc.stderr[proc.stderr.index("FATAL: "):]


@pytest.mark.parametrize("name", sorted(MISSING))
def test_a_fresh_machine_hears_of_every_missing_input_at_once(name, tmp_path):
  proc, imported = run(tmp_path, f"{ROOT}/configs/{name}.py")
  message = fatal(proc)
  keys = tuple(k for k in MISSING[name] if f"config.{k} " in message)
  assert keys == MISSING[name], message
  n = len(MISSING[name])
  assert message.startswith(f"FATAL: {n} input{'s' if n > 1 else ''} the config names "), message
  assert message.count("\n  ") >= n and f"  {n}. " in message and f"  {n + 1}. " not in message
  # Each says where to get it: the command, writing where the config looks.
  for key in MISSING[name]:
    assert f"then pass --config.{key}=" in message, (key, message)
  assert not imported & LOADERS, sorted(imported & LOADERS)


def i2p_file(folder) -> str:
  path = os.path.join(folder, "i2p_benchmark.csv")
  with open(path, "w", encoding="utf-8") as f:
    f.write("prompt,categories,hard\na violent scene,violence,1\n")
  return path


def test_violence_with_sd_but_no_q16_weights_fails_before_loading_sd(tmp_path):
  clip = tmp_path / "clip"
  clip.mkdir()
  proc, imported = run(tmp_path, f"{ROOT}/configs/violence.py", f"model.path={TOY}",
                       f"prompts.path={i2p_file(tmp_path)}", f"reward.clip_path={clip}")
  message = fatal(proc)
  assert message.startswith("FATAL: 1 input the config names is missing"), message
  assert "config.reward.weights = '/models/q16/prompts_vit_l14.safetensors': no such file" in message
  assert "tools/convert_q16.py prompts.p /models/q16/prompts_vit_l14.safetensors" in message
  assert not imported & LOADERS, sorted(imported & LOADERS)


def toy_copy(tmp_path):
  folder = tmp_path / "sd"
  shutil.copytree(TOY, folder)
  return folder


def truncate(path, keep: int):
  with open(path, "r+b") as f:
    f.truncate(keep)


BAD_FILES = ["empty prompts", "binary prompts", "header only", "empty model folder",
             "truncated weights", "not safetensors"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_one_fatal_message_before_anything_loads(case, tmp_path):
  flags = ["prompts.source=text", f"prompts.path={tmp_path / 'prompts.txt'}",
           f"model.path={TOY}", "reward.name=color"]
  (tmp_path / "prompts.txt").write_text("a red circle\n")
  want = ""
  if case == "empty prompts":
    (tmp_path / "prompts.txt").write_text("\n \n")
    want = "has no prompt in it"
  elif case == "binary prompts":
    (tmp_path / "prompts.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    want = "is not UTF-8"
  elif case == "header only":
    flags[:2] = ["prompts.source=i2p", f"prompts.path={tmp_path / 'i2p.csv'}"]
    (tmp_path / "i2p.csv").write_text("prompt,categories\n")
    want = "has no prompt in it"
  elif case == "empty model folder":
    (tmp_path / "sd").mkdir()
    flags[2] = f"model.path={tmp_path / 'sd'}"
    want = "no model_index.json in the folder"
  elif case == "truncated weights":
    folder = toy_copy(tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with open(path, "rb") as f:
      keep = 8 + struct.unpack("<Q", f.read(8))[0] + 1000  # the header and 1000 bytes of data
    truncate(path, keep)
    flags[2] = f"model.path={folder}"
    want = f"unet/diffusion_pytorch_model.safetensors is truncated ({keep:,} of "
  elif case == "not safetensors":
    folder = toy_copy(tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"PK\x03\x04 a zip")
    flags[2] = f"model.path={folder}"
    want = "vae/diffusion_pytorch_model.safetensors is not a safetensors file"
  proc, imported = run(tmp_path, f"{ROOT}/configs/violence.py:runlocal", *flags)
  message = fatal(proc)
  assert want in message and message.count("FATAL") == 1, message
  assert not imported & LOADERS, sorted(imported & LOADERS)


def test_nan_weights_stop_the_load_in_one_fatal_line(tmp_path):
  # Only reading the weights finds a NaN: the load stops there, one message naming the file.
  folder = toy_copy(tmp_path)
  path = folder / "vae" / "diffusion_pytorch_model.safetensors"
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  tensors = load_file(str(path))
  key = sorted(k for k in tensors if k.endswith("weight"))[0]
  tensors[key] = np.full_like(tensors[key], np.nan)
  save_file(tensors, str(path))
  proc, _ = run(tmp_path, f"{ROOT}/configs/sample.py", f"model.path={folder}",
                "sampling.num_steps=1")
  message = fatal(proc)
  assert "hold NaN or infinite values" in message and str(path) in message, message


def test_check_says_what_a_run_would_read_and_loads_nothing(tmp_path):
  proc, imported = run(tmp_path, f"{ROOT}/configs/violence.py", f"model.path={TOY}",
                       "prompts.source=parti", "prompts.path=", "reward.name=zero_shot_safety",
                       f"reward.clip_path={TOY}/text_encoder",
                       "mesh.data=-1", "data.batch_size=8", check=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert out.startswith("check passed: job 'train'"), out
  assert f"  model.path = {TOY}" in out and f"  reward.clip_path = {TOY}/text_encoder" in out
  # mesh.data = -1 takes every device: the 8 fake CPU devices of conftest.py's XLA_FLAGS.
  assert "mesh: {'data': 8, 'fsdp': 1} (8 devices)" in out, out
  assert "diffusion weights: " in out and "per device (fsdp = 1)" in out
  assert f"compilation cache: {tmp_path}/jax_cache" in out
  assert not imported & LOADERS, sorted(imported & LOADERS)
  # The shipped PartiPrompts file is the parti default; no data/ folder is needed.
  assert os.path.isfile(sources.default_prompt_file("parti"))


def test_the_weights_memory_comes_from_the_headers_alone(tmp_path):
  from fnf_jax.runtime import plan  # pylint: disable=import-outside-toplevel
  save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros((5,), np.int64)},
            str(tmp_path / "m.safetensors"))
  assert plan.safetensors_elements(str(tmp_path / "m.safetensors")) == {"F32": 12, "I64": 5}
  # float32 weights loaded in bfloat16: 2 bytes each; integers keep their width (counted 1/elem).
  assert plan.weights_bytes(str(tmp_path), "bfloat16") == 12 * 2 + 5
  with open(tmp_path / "m.safetensors", "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    assert json.loads(f.read(n))["a"]["dtype"] == "F32"


@pytest.mark.parametrize("argv, want", [
    (["--config=configs/violence.py:runlocal", "--config.train.num_steps=abc"],
     "FATAL: flag --config.train.num_steps=abc: invalid literal for int()"),
    (["--config=configs/nothere.py"], "FATAL: --config=configs/nothere.py: no such config file"),
    (["--config=configs/violence.py:runlocall"],
     "FATAL: --config=configs/violence.py:runlocall: ValueError: unknown config argument "
     "'runlocall'; valid: 'runlocal'"),
])
def test_a_bad_command_line_is_one_fatal_line(argv, want, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "fnf_jax.main", *argv, f"--workdir={tmp_path}"],
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(want), proc.stderr


def test_the_readme_lists_every_source_in_the_messages_words():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  start, end = readme.index("<!-- sources -->\n"), readme.index("\n<!-- /sources -->")
  assert readme[start + len("<!-- sources -->\n"):end] == sources.markdown(), (
      "README.md's list of inputs differs from fnf_jax/config/sources.py: paste the output of "
      "`python -m fnf_jax.config.sources` between the <!-- sources --> markers")
  assert set(sources.KEYS) == set(sources.SOURCES)
