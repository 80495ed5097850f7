#!/usr/bin/env bash
# fnf_jax on a Cloud TPU VM: one host (v5litepod-8, v4-8, ...) or a pod slice of several hosts
# (v5litepod-16 = 4 hosts, v4-32, ...), through `gcloud compute tpus tpu-vm`.
#
# Usage:  launch/tpu_vm.sh [--dry-run] COMMAND [extra --config.* flags for `run`]
#
# Commands (each one gcloud call or a few, printed as it runs them):
#   create   create the TPU VM / slice            needs TPU_NAME ZONE ACCELERATOR RUNTIME_VERSION
#   setup    copy this checkout to every worker (a tarball, `scp --worker=all`), unpack it in
#            ~/$REPO_DIR (replacing an older copy) and install it there with the pinned jax:
#            python3 -m pip install -e . 'jax[tpu]>=0.10.2,<0.13'      needs TPU_NAME ZONE
#   run      start the job on every worker at once, in the background (nohup): each worker
#            writes its own log, ~/$LOG on its disk, and its pid to ~/$LOG.pid
#              python3 -m fnf_jax.main --config=$CONFIG --workdir=$WORKDIR \
#                --config.model.path=$MODEL --config.distributed.enabled=True [extra flags]
#            On a pod slice jax.distributed.initialize() finds the other workers by itself (no
#            coordinator to give). Refuses to start where the previous run is still alive.
#                                                 needs TPU_NAME ZONE WORKDIR MODEL
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
#   WORKDIR          run folder, the same path on every worker: a bucket mounted on all of them
#                    (gcsfuse) or a shared disk; fnf_jax writes it with plain file I/O, so not a
#                    gs:// URL. Rerunning `run` with the same WORKDIR resumes from its newest
#                    checkpoint (after a preemption: create, setup, run again).
#   MODEL            diffusers-format Stable Diffusion folder readable on every worker (fnf_jax
#                    downloads nothing; e.g. copy it with `gcloud storage cp -r` or mount a bucket)
#   CONFIG           default configs/violence.py (a path inside the repository)
#   REPO_DIR         folder under each worker's home for the checkout, default fnf_jax
#   LOG              log file under each worker's home, default fnf_jax.log
#   WORKER           default worker for `logs`
#   DRY_RUN          1 (or --dry-run as the first argument): print every command, one a line,
#                    prefixed with "+ " and shell-quoted, and run none
#
# A whole run (the violence config computes its reference cache first on a fresh WORKDIR):
#   export TPU_NAME=fnf-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-16 \
#          RUNTIME_VERSION=v2-alpha-tpuv5-lite WORKDIR=/mnt/bucket/violence MODEL=/mnt/bucket/sd14
#   launch/tpu_vm.sh create && launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run --config.prompts.path=/mnt/bucket/data/i2p_benchmark.csv
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
LOG="${LOG:-fnf_jax.log}"
SPOT="${SPOT:-0}"
PIN='jax[tpu]>=0.10.2,<0.13'

example() {
  case "$1" in
    TPU_NAME) echo "TPU_NAME=fnf-v5e" ;;
    ZONE) echo "ZONE=us-west4-a" ;;
    ACCELERATOR) echo "ACCELERATOR=v5litepod-8" ;;
    RUNTIME_VERSION) echo "RUNTIME_VERSION=v2-alpha-tpuv5-lite" ;;
    WORKDIR) echo "WORKDIR=/mnt/bucket/runs/violence" ;;
    MODEL) echo "MODEL=/mnt/bucket/models/stable-diffusion-v1-4" ;;
    *) echo "$1=..." ;;
  esac
}

gflags() {
  GFLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GFLAGS+=(--project="$PROJECT")
  fi
}

# remote WORKER COMMAND_LINE: run a shell command line on one worker (or all).
remote() {
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker="$1" --command="$2"
}

check_repo_dir() {
  local simple='^[A-Za-z0-9_][A-Za-z0-9_.-]*$'
  [[ "$REPO_DIR" =~ $simple && "$REPO_DIR" != ".." ]] ||
    die "REPO_DIR must be one folder name under the home directory (got '$REPO_DIR')"
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
    need TPU_NAME ZONE
    check_repo_dir
    gflags
    tarball="${TMPDIR:-/tmp}/fnf_jax-$TPU_NAME.tar.gz"
    x tar -czf "$tarball" -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./demo_out \
      --exclude='*.egg-info' --exclude=__pycache__ .
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REPO_DIR.tar.gz" "${GFLAGS[@]}" \
      --worker=all
    remote all "set -e; rm -rf $(q "$REPO_DIR"); mkdir $(q "$REPO_DIR");\
 tar -xzf $(q "$REPO_DIR.tar.gz") -C $(q "$REPO_DIR"); cd $(q "$REPO_DIR");\
 python3 -m pip install -q --upgrade pip; $(words python3 -m pip install -q -e . "$PIN")"
    ;;
  run)
    need TPU_NAME ZONE WORKDIR MODEL
    check_repo_dir
    gflags
    pid="\"\$HOME\"/$(q "$LOG.pid")"
    remote all "if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then\
 echo \"\$(hostname): a run is still alive (pid \$(cat $pid)); $PROG stop first\" >&2; exit 1; fi;\
 cd $(q "$REPO_DIR") || exit 1; nohup $(words python3 -m fnf_jax.main --config="$CONFIG" \
      --workdir="$WORKDIR" --config.model.path="$MODEL" --config.distributed.enabled=True "$@")\
 > \"\$HOME\"/$(q "$LOG") 2>&1 < /dev/null & echo \$! > $pid; echo \"\$(hostname): started, log ~/$LOG\""
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
    pid="\"\$HOME\"/$(q "$LOG.pid")"
    remote all "if [ -f $pid ]; then kill \"\$(cat $pid)\" 2>/dev/null || true; rm -f $pid; fi"
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
