#!/usr/bin/env bash
# fnf_jax on NVIDIA GPUs: one host with all its GPUs, or several hosts with one process each.
#
# Usage:  launch/gpu.sh [--dry-run] COMMAND [extra --config.* flags]
#
# Every command that trains runs the preflight first, the same command with --check (fnf_jax
# checks the config and that every input it names is there, prints what it would load, loads
# nothing, and exits 2 naming all that is missing), and starts the training only if it passed.
#
# Commands:
#   setup   install this checkout with the pinned CUDA jax into the current Python (a venv):
#             $PYTHON -m pip install -e <this checkout> 'jax[cuda12]>=0.10.2,<0.13'
#           fnf_jax needs Python 3.11 or 3.12; where the system has another, make the venv with
#           uv (https://docs.astral.sh/uv, e.g. `pip install --user uv==0.13.9`), which
#           downloads its own CPython:
#             uv venv --seed --python 3.12 .venv     # --seed: with pip, for setup
#             PYTHON=.venv/bin/python launch/gpu.sh setup
#   local   one host, all of its GPUs: one process, jax sees every visible GPU (restrict with
#           CUDA_VISIBLE_DEVICES) and the batch is split over them.     needs WORKDIR MODEL
#             $PYTHON -m fnf_jax.main --config=$CONFIG --workdir=$WORKDIR --config.model.path=$MODEL \
#               [--config.reward.clip_path=$CLIP --config.reward.weights=$REWARD_WEIGHTS \
#                --config.prompts.path=$PROMPTS] --check
#             $PYTHON -m fnf_jax.main ... (the same without --check)
#   node    one process of a multi-node job, without a scheduler: run it on every node, with
#           the same COORDINATOR and NUM_PROCESSES and PROCESS_ID = 0 .. NUM_PROCESSES-1
#           (process 0 listens on COORDINATOR's port; start it first or together). Each node
#           runs its own check first.
#             ... --config.distributed.enabled=True --config.distributed.coordinator=$COORDINATOR
#                 --config.distributed.num_processes=$NUM_PROCESSES
#                 --config.distributed.process_id=$PROCESS_ID
#                                        needs WORKDIR MODEL COORDINATOR NUM_PROCESSES PROCESS_ID
#   slurm   the same job under SLURM, one task per node: inside an allocation (sbatch or salloc)
#           the check on every node (srun ... --check), then
#             srun --nodes=$NODES --ntasks-per-node=1 --gpus-per-node=$GPUS_PER_NODE \
#               env JAX_LOCAL_DEVICE_IDS=0,..,$GPUS_PER_NODE-1 $PYTHON -m fnf_jax.main ... \
#               --config.distributed.enabled=True
#           jax.distributed.initialize() reads the coordinator, process count and id from
#           SLURM's variables, so the other three distributed fields stay empty. JAX_LOCAL_DEVICE_IDS
#           matters: under SLURM jax otherwise gives each process only the GPU numbered by its
#           SLURM_LOCALID (one process per GPU), i.e. GPU 0 alone with one task per node.
#                                        needs WORKDIR MODEL NODES GPUS_PER_NODE
#   help    print this text
#
# Settings (environment variables):
#   WORKDIR        run folder; with several nodes a filesystem they all see (NFS, Lustre, a
#                  mounted bucket). Running the same command again resumes from its newest
#                  checkpoint.
#   MODEL          diffusers-format Stable Diffusion folder (fnf_jax downloads nothing)
#   CLIP, REWARD_WEIGHTS, PROMPTS
#                  optional: the reward's CLIP folder (--config.reward.clip_path), the reward
#                  head's weights (--config.reward.weights), the prompt file
#                  (--config.prompts.path); unset or "", the config's own values stand
#                  (configs/violence.py: /models/clip-vit-large-patch14, ...)
#   CONFIG         default configs/violence.py
#   PYTHON         default python3 (e.g. .venv/bin/python)
#   COORDINATOR    HOST:PORT of process 0, reachable from every node, e.g. node0:12355
#   NUM_PROCESSES  number of processes (= nodes)
#   PROCESS_ID     this node's process, 0 .. NUM_PROCESSES-1
#   NODES          SLURM nodes (default $SLURM_JOB_NUM_NODES inside an allocation)
#   GPUS_PER_NODE  GPUs on each node (default $SLURM_GPUS_ON_NODE inside an allocation)
#   DRY_RUN        1 (or --dry-run as the first argument): print every command, one a line,
#                  prefixed with "+ " and shell-quoted, and run none
#
# Examples:
#   WORKDIR=/data/runs/violence MODEL=/models/sd14 launch/gpu.sh local
#   # two nodes by hand (on node0 with PROCESS_ID=0, on node1 with PROCESS_ID=1):
#   COORDINATOR=node0:12355 NUM_PROCESSES=2 PROCESS_ID=0 WORKDIR=/nfs/runs/v MODEL=/nfs/sd14 \
#     launch/gpu.sh node
#   # SLURM, in an sbatch script with #SBATCH --nodes=4 --gpus-per-node=8:
#   WORKDIR=/nfs/runs/v MODEL=/nfs/sd14 launch/gpu.sh slurm --config.data.batch_size=32
set -euo pipefail

PROG=launch/gpu.sh
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
PYTHON="${PYTHON:-python3}"
NODES="${NODES:-${SLURM_JOB_NUM_NODES:-}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
PIN='jax[cuda12]>=0.10.2,<0.13'

example() {
  case "$1" in
    WORKDIR) echo "WORKDIR=/data/runs/violence" ;;
    MODEL) echo "MODEL=/models/stable-diffusion-v1-4" ;;
    COORDINATOR) echo "COORDINATOR=node0:12355" ;;
    NUM_PROCESSES) echo "NUM_PROCESSES=2" ;;
    PROCESS_ID) echo "PROCESS_ID=0" ;;
    NODES) echo "NODES=2" ;;
    GPUS_PER_NODE) echo "GPUS_PER_NODE=8" ;;
    *) echo "$1=..." ;;
  esac
}

need_int() {
  local v
  for v in "$@"; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
  done
}

# The training command, without the distributed flags.
main_cmd() {
  input_flags ""
  MAIN=("$PYTHON" -m fnf_jax.main --config="$CONFIG" --workdir="$WORKDIR"
    --config.model.path="$MODEL" ${INPUTS[@]+"${INPUTS[@]}"})
}

# checked CMD...: CMD with --check (the preflight), then CMD itself if that passed.
checked() {
  if ! x "$@" --check; then
    die "the check failed (its message is above): the training was not started"
  fi
  x "$@"
}

case "$CMD" in
  setup)
    x "$PYTHON" -m pip install -e "$ROOT" "$PIN"
    ;;
  local)
    need WORKDIR MODEL
    main_cmd
    checked "${MAIN[@]}" "$@"
    ;;
  node)
    need WORKDIR MODEL COORDINATOR NUM_PROCESSES PROCESS_ID
    need_int NUM_PROCESSES PROCESS_ID
    ((PROCESS_ID < NUM_PROCESSES)) ||
      die "PROCESS_ID must be below NUM_PROCESSES (got $PROCESS_ID of $NUM_PROCESSES)"
    [[ "$COORDINATOR" =~ ^[^:]+:[0-9]+$ ]] || die "COORDINATOR must be HOST:PORT (got '$COORDINATOR')"
    main_cmd
    checked "${MAIN[@]}" --config.distributed.enabled=True \
      --config.distributed.coordinator="$COORDINATOR" \
      --config.distributed.num_processes="$NUM_PROCESSES" \
      --config.distributed.process_id="$PROCESS_ID" "$@"
    ;;
  slurm)
    need WORKDIR MODEL NODES GPUS_PER_NODE
    need_int NODES GPUS_PER_NODE
    ((GPUS_PER_NODE > 0)) || die "GPUS_PER_NODE must be at least 1"
    ids=0
    for ((i = 1; i < GPUS_PER_NODE; i++)); do
      ids+=",$i"
    done
    main_cmd
    checked srun --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" \
      env JAX_LOCAL_DEVICE_IDS="$ids" "${MAIN[@]}" --config.distributed.enabled=True "$@"
    ;;
  help | -h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    ;;
  *)
    die "unknown command (one of: setup local node slurm help)"
    ;;
esac
