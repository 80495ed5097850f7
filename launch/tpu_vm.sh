#!/usr/bin/env bash
# fnf_jax on a Cloud TPU VM: one host (v5litepod-8, v4-8, ...) or a pod slice of several hosts
# (v5litepod-16 = 4 hosts, v4-32, ...), through `gcloud compute tpus tpu-vm`.
#
# Usage:  launch/tpu_vm.sh [--dry-run] COMMAND [extra --config.* flags for `run`]
#
# Commands (each one gcloud call or a few, printed as it runs them; every remote command runs on
# all workers at once, --worker=all, so every worker is set up the same way):
#   create   create the TPU VM / slice            needs TPU_NAME ZONE ACCELERATOR RUNTIME_VERSION
#   setup    1. copy this checkout to every worker (a tarball, `scp --worker=all`);
#            2. mount the bucket: gcsfuse --implicit-dirs BUCKET MOUNT (gcsfuse installed from
#               Google's apt repository when missing; nothing is done where MOUNT is mounted);
#            3. unpack the checkout in ~/$REPO_DIR (replacing an older copy) and install it in a
#               fresh virtualenv ~/$VENV with Python $PYTHON_VERSION. The TPU VM images ship
#               Python 3.10 and fnf_jax (like jax) needs 3.11 or 3.12, so setup never uses the
#               system Python: it installs uv (the version pinned in this script's
#               UV_VERSION, by uv's standalone installer, into ~/.local/bin: no root, no shell
#               profile edits), and uv downloads its own build of CPython, the same on every
#               worker:
#                 uv venv --clear --managed-python --python $PYTHON_VERSION ~/$VENV
#                 uv pip install --python ~/$VENV/bin/python -e . 'jax[tpu]>=0.10.2,<0.13'
#               and prints each worker's Python and jax versions. Refuses to run where a job
#               is still alive.                   needs TPU_NAME ZONE BUCKET
#   run      1. mount the bucket where it is not mounted (after a reboot of a worker);
#            2. the preflight on every worker, in the foreground: the run's command with
#               --check (fnf_jax checks the config and that every input it names is there,
#               prints what the run would load, loads nothing); if any worker fails it, the
#               job is not started and its message says what is missing;
#            3. start the job on every worker at once, in the background (nohup): each worker
#               writes its own log, ~/$LOG on its disk, and its pid to ~/$LOG.pid
#                 ~/$VENV/bin/python -m fnf_jax.main --config=$CONFIG --workdir=$WORKDIR \
#                   --config.model.path=$MODEL --config.reward.clip_path=$CLIP \
#                   --config.reward.weights=$REWARD_WEIGHTS --config.prompts.path=$PROMPTS \
#                   --config.distributed.enabled=True [extra flags]
#            On a pod slice jax.distributed.initialize() finds the other workers by itself (no
#            coordinator to give). Refuses to start where the previous run is still alive.
#                                                 needs TPU_NAME ZONE BUCKET WORKDIR MODEL
#   logs [N] follow the log of worker N (default $WORKER, else 0; process 0 logs the metrics)
#   stop     SIGTERM the job on every worker: fnf_jax saves a checkpoint and exits
#   delete   delete the TPU VM / slice (gcloud asks to confirm)
#   help     print this text
#
# Settings (environment variables):
#   TPU_NAME         name of the TPU VM, e.g. fnf-v5e
#   ZONE             e.g. us-west4-a (a zone that has ACCELERATOR)
#   ACCELERATOR      accelerator type, e.g. v5litepod-8 (one host), v5litepod-16 (4 hosts), v4-8
#   RUNTIME_VERSION  TPU software version, e.g. v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4)
#   SPOT             1: a Spot VM (cheaper, can be preempted); default 0
#   PROJECT          gcloud project (default: gcloud's configured one)
#   BUCKET           the Cloud Storage bucket with the models, the data and the runs, without
#                    gs:// (the TPU VM's service account needs read and write access to it)
#   MOUNT            where every worker sees the bucket, default /mnt/bucket. The defaults below
#                    assume this layout in the bucket (configs/*.py's /models, gke_job.yaml's):
#                      stable-diffusion-v1-4/  clip-vit-large-patch14/  data/i2p_benchmark.csv
#                      q16/prompts_vit_l14.safetensors  laion/nsfw_vit_l14.safetensors  runs/
#   WORKDIR          run folder under MOUNT, e.g. /mnt/bucket/runs/violence: every worker writes
#                    the same folder, with plain file I/O (so not a gs:// URL). Rerunning `run`
#                    with the same WORKDIR resumes from its newest checkpoint (after a
#                    preemption: create, setup, run again).
#   MODEL            diffusers-format Stable Diffusion folder readable on every worker, e.g.
#                    /mnt/bucket/stable-diffusion-v1-4 (fnf_jax downloads nothing)
#   CLIP             CLIP ViT-L/14 folder (--config.reward.clip_path)
#   REWARD_WEIGHTS   the reward head's converted weights (--config.reward.weights)
#   PROMPTS          the prompt file (--config.prompts.path)
#                    CLIP, REWARD_WEIGHTS and PROMPTS are optional. Unset, for CONFIG
#                    configs/violence.py they are $MOUNT/clip-vit-large-patch14,
#                    $MOUNT/q16/prompts_vit_l14.safetensors and $MOUNT/data/i2p_benchmark.csv;
#                    for configs/oversexualization.py the weights are
#                    $MOUNT/laion/nsfw_vit_l14.safetensors; other configs have no defaults
#                    (their inputs have other fields: give them as extra --config.* flags).
#                    Set to "": the flag is left out and the config's own value stands.
#   CONFIG           default configs/violence.py (a path inside the repository)
#   REPO_DIR         folder under each worker's home for the checkout, default fnf_jax
#   VENV             folder under each worker's home for the virtualenv, default fnf_venv
#   PYTHON_VERSION   the virtualenv's Python, 3.11 or 3.12 (setup.py's range); default 3.12
#   LOG              log file under each worker's home, default fnf_jax.log
#   WORKER           default worker for `logs`
#   DRY_RUN          1 (or --dry-run as the first argument): print every command, one a line,
#                    prefixed with "+ " and shell-quoted, and run none
#
# A whole run (the violence config computes its reference cache first on a fresh WORKDIR):
#   export TPU_NAME=fnf-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-16 \
#          RUNTIME_VERSION=v2-alpha-tpuv5-lite BUCKET=my-fnf-bucket \
#          WORKDIR=/mnt/bucket/runs/violence MODEL=/mnt/bucket/stable-diffusion-v1-4
#   launch/tpu_vm.sh create && launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run          # the check on every worker, then the job
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh delete
set -euo pipefail

PROG=launch/tpu_vm.sh
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
CMD="${1:-help}"
shift || true
# shellcheck source=launch/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"

CONFIG="${CONFIG:-configs/violence.py}"
REPO_DIR="${REPO_DIR:-fnf_jax}"
VENV="${VENV:-fnf_venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
LOG="${LOG:-fnf_jax.log}"
SPOT="${SPOT:-0}"
MOUNT="${MOUNT:-/mnt/bucket}"
MOUNT="${MOUNT%/}"
PIN='jax[tpu]>=0.10.2,<0.13'
# uv, pinned: a newer uv may pick another CPython build or resolve differently, and every worker
# (and every later setup) must get the same environment.
UV_VERSION=0.13.9

example() {
  case "$1" in
    TPU_NAME) echo "TPU_NAME=fnf-v5e" ;;
    ZONE) echo "ZONE=us-west4-a" ;;
    ACCELERATOR) echo "ACCELERATOR=v5litepod-8" ;;
    RUNTIME_VERSION) echo "RUNTIME_VERSION=v2-alpha-tpuv5-lite" ;;
    BUCKET) echo "BUCKET=my-fnf-bucket" ;;
    WORKDIR) echo "WORKDIR=/mnt/bucket/runs/violence" ;;
    MODEL) echo "MODEL=/mnt/bucket/stable-diffusion-v1-4" ;;
    *) echo "$1=..." ;;
  esac
}

gflags() {
  GFLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GFLAGS+=(--project="$PROJECT")
  fi
}

# remote WORKER COMMAND_LINE: run a shell command line on one worker (or all). With several
# workers gcloud exits non-zero when the command failed on any of them.
remote() {
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker="$1" --command="$2"
}

check_home_folder() {  # VAR: one folder name under the home directory
  local simple='^[A-Za-z0-9_][A-Za-z0-9_.-]*$'
  [[ "${!1}" =~ $simple && "${!1}" != ".." ]] ||
    die "$1 must be one folder name under the home directory (got '${!1}')"
}

check_mount() {
  [[ "$MOUNT" =~ ^/[A-Za-z0-9_./-]+$ && "$MOUNT" != *..* ]] ||
    die "MOUNT must be an absolute path of letters, digits and _ . - / (got '$MOUNT')"
  [[ "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]*[a-z0-9]$ ]] ||
    die "BUCKET must be a bucket name without gs:// (got '$BUCKET')"
}

# The remote command lines below run in each worker's login shell (bash on the TPU VM images);
# they keep to POSIX sh. "$HOME" stays unexpanded here: each worker expands its own.
PID_FILE="\"\$HOME\"/$(q "$LOG.pid")"
VENV_PY="\"\$HOME\"/$(q "$VENV")/bin/python"

# Exits the remote line where the pid file names a live process.
alive_guard() {
  printf '%s' "if [ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then\
 echo \"\$(hostname): a run is still alive (pid \$(cat $PID_FILE)); $PROG stop first\" >&2; exit 1; fi"
}

# Mounts BUCKET at MOUNT unless something is mounted there already; installs gcsfuse from
# Google's apt repository first where it is missing (not on the TPU VM images). The dpkg lock
# timeout: right after boot unattended-upgrades may hold the lock for a minute or two.
mount_line() {
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"
  local keyring=/usr/share/keyrings/cloud.google.asc
  printf '%s' "set -e; if mountpoint -q $(q "$MOUNT"); then\
 echo \"\$(hostname): $MOUNT is mounted already\"; else\
 if ! command -v gcsfuse >/dev/null 2>&1; then\
 curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $keyring >/dev/null;\
 echo \"deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\"\
 | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; $apt update; $apt install -y gcsfuse; fi;\
 sudo mkdir -p $(q "$MOUNT"); sudo chown \"\$(id -u):\$(id -g)\" $(q "$MOUNT");\
 $(words gcsfuse --implicit-dirs --rename-dir-limit=10000 "$BUCKET" "$MOUNT");\
 echo \"\$(hostname): gs://$BUCKET mounted at $MOUNT\"; fi"
  # --rename-dir-limit: orbax writes each checkpoint into a temporary folder and renames it when
  # complete; gcsfuse refuses to rename folders of more objects than this (default 0).
}

# Unpacks the checkout and installs it into a fresh virtualenv with uv's own CPython.
install_line() {
  local uv="\"\$HOME\"/.local/bin/uv" installer="\"\$HOME\"/uv-installer.sh"
  # The installer goes to a file first: `curl | sh` would run half a script after a failed
  # download and carry on with the old (or no) uv.
  printf '%s' "set -e; $(alive_guard); rm -rf $(q "$REPO_DIR"); mkdir $(q "$REPO_DIR");\
 tar -xzf $(q "$REPO_DIR.tar.gz") -C $(q "$REPO_DIR"); cd $(q "$REPO_DIR");\
 case \"\$($uv --version 2>/dev/null)\" in \"uv $UV_VERSION\" | \"uv $UV_VERSION \"*) ;; *)\
 curl -LsSf https://astral.sh/uv/$UV_VERSION/install.sh -o $installer;\
 UV_INSTALL_DIR=\"\$HOME\"/.local/bin UV_NO_MODIFY_PATH=1 sh $installer;; esac;\
 $uv venv -q --clear --managed-python --python $PYTHON_VERSION \"\$HOME\"/$(q "$VENV");\
 $uv pip install -q --python $VENV_PY -e . $(q "$PIN");\
 $VENV_PY -c 'import socket, sys, jax, fnf_jax;\
 print(f\"{socket.gethostname()}: Python {sys.version.split()[0]}, jax {jax.__version__}\")'"
}

case "$CMD" in
  create)
    need TPU_NAME ZONE ACCELERATOR RUNTIME_VERSION
    [[ "$SPOT" == 0 || "$SPOT" == 1 ]] || die "SPOT must be 0 or 1 (got '$SPOT')"
    gflags
    args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GFLAGS[@]}"
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
    if [[ "$SPOT" == 1 ]]; then
      args+=(--spot)
    fi
    x "${args[@]}"
    ;;
  setup)
    need TPU_NAME ZONE BUCKET
    check_home_folder REPO_DIR
    check_home_folder VENV
    check_mount
    [[ "$PYTHON_VERSION" == 3.11 || "$PYTHON_VERSION" == 3.12 ]] ||
      die "PYTHON_VERSION must be 3.11 or 3.12, setup.py's range (got '$PYTHON_VERSION')"
    gflags
    tarball="${TMPDIR:-/tmp}/fnf_jax-$TPU_NAME.tar.gz"
    x tar -czf "$tarball" -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./demo_out \
      --exclude='*.egg-info' --exclude=__pycache__ .
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REPO_DIR.tar.gz" "${GFLAGS[@]}" \
      --worker=all
    remote all "$(mount_line)"
    remote all "$(install_line)"
    ;;
  run)
    need TPU_NAME ZONE BUCKET WORKDIR MODEL
    check_home_folder REPO_DIR
    check_home_folder VENV
    check_mount
    [[ "$WORKDIR" == "$MOUNT"/?* ]] ||
      die "WORKDIR must be under MOUNT ($MOUNT/...): every worker writes the same run folder" \
        "(got '$WORKDIR')"
    gflags
    input_flags "$MOUNT"
    job="$(words -m fnf_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --config.model.path="$MODEL" ${INPUTS[@]+"${INPUTS[@]}"} \
      --config.distributed.enabled=True "$@")"
    remote all "$(mount_line)"
    if ! remote all "cd $(q "$REPO_DIR") && [ -x $VENV_PY ] || { echo \"\$(hostname): no\
 ~/$REPO_DIR or ~/$VENV: $PROG setup first\" >&2; exit 2; };\
 $VENV_PY $job --check || { s=\$?; echo \"\$(hostname): the check failed (exit \$s)\" >&2; exit \$s; }"
    then
      die "the check failed on a worker (its message is above): the job was not started"
    fi
    remote all "$(alive_guard); cd $(q "$REPO_DIR") || exit 1; nohup $VENV_PY $job\
 > \"\$HOME\"/$(q "$LOG") 2>&1 < /dev/null & echo \$! > $PID_FILE;\
 echo \"\$(hostname): started, log ~/$LOG\""
    ;;
  logs)
    need TPU_NAME ZONE
    worker="${1:-${WORKER:-0}}"
    [[ "$worker" =~ ^[0-9]+$ ]] || die "the worker must be a number (got '$worker')"
    gflags
    remote "$worker" "tail -n 200 -F \"\$HOME\"/$(q "$LOG")"
    ;;
  stop)
    need TPU_NAME ZONE
    gflags
    remote all "if [ -f $PID_FILE ]; then kill \"\$(cat $PID_FILE)\" 2>/dev/null || true;\
 rm -f $PID_FILE; fi"
    ;;
  delete)
    need TPU_NAME ZONE
    gflags
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GFLAGS[@]}"
    ;;
  help | -h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    ;;
  *)
    die "unknown command (one of: create setup run logs stop delete help)"
    ;;
esac
