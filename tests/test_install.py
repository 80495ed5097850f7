"""fnf_jax installed as a wheel (not editable) and run from a folder outside the checkout, with
config files copied elsewhere: the shipped assets (the toy model, its reward, PartiPrompts) are
found through the installed package, not through a config file's location or the checkout.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(site folder holding the installed wheel, copied configs folder, a working directory)."""
  tmp = tmp_path_factory.mktemp("install")
  # The wheel builds from a copy of the files git keeps (tracked or new, not ignored): a clone.
  src = tmp / "src"
  files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  for name in files:
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(src / os.path.dirname(name), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
  wheel = next((tmp / "dist").glob("fnf_jax-*.whl"))
  site = tmp / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                  str(wheel)], check=True, capture_output=True, timeout=300)
  configs = tmp / "my_configs"
  shutil.copytree(src / "configs", configs)
  shutil.rmtree(src)  # nothing of the checkout's copy is left to find
  work = tmp / "work"
  work.mkdir()
  return site, configs, work


def run(installed, *args):
  site, _, work = installed
  # The installed copy first on the path (this venv also has the checkout installed editable).
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True,
                        text=True, timeout=600)


def test_the_package_comes_from_the_wheel(installed):
  site, _, _ = installed
  proc = run(installed, "-c", "import fnf_jax, fnf_jax.assets as a; print(fnf_jax.__file__); "
             "print(a.path('toy_pipeline')); print(a.path('PartiPrompts.tsv'))")
  assert proc.returncode == 0, proc.stderr
  for line in proc.stdout.split():
    assert line.startswith(str(site)), proc.stdout


def test_a_copied_toy_config_checks_against_the_installed_assets(installed):
  site, configs, work = installed
  proc = run(installed, "-m", "fnf_jax.main", f"--config={configs}/toy.py",
             f"--workdir={work}/toy", "--check")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"model.path = {site}/fnf_jax/assets/toy_pipeline" in proc.stdout, proc.stdout


def test_a_copied_sample_config_runs_the_toy_model(installed):
  _, configs, work = installed
  proc = run(installed, "-m", "fnf_jax.main", f"--config={configs}/sample.py:runlocal",
             f"--workdir={work}/sample", "--config.sampling.num_steps=2",
             "--config.prompts.texts=('a red circle',)", "--config.batch_size=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(n.endswith(".png") for n in os.listdir(work / "sample" / "samples"))
