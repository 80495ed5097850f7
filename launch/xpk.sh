#!/usr/bin/env bash
# fnf_jax on GKE TPU slices through XPK (https://github.com/AI-Hypercomputer/xpk, `pip install
# xpk`): a cluster of one or more slices, a bucket mounted in every pod (gcsfuse), and the
# training as an XPK workload (a JobSet: every host of every slice runs the same command).
#
# Usage:  launch/xpk.sh [--dry-run] COMMAND [extra --config.* flags for `run`]
#
# Commands:
#   image           build the container image from launch/Dockerfile (this checkout installed
#                   with the TPU jax, Python 3.12) and push it:
#                     docker build -f launch/Dockerfile --build-arg JAX_TARGET=tpu -t $IMAGE .
#                     docker push $IMAGE             needs IMAGE (and `docker`, logged in to
#                   the registry: gcloud auth configure-docker REGION-docker.pkg.dev)
#   cluster         create the cluster (or resize it: run again with another NUM_SLICES)
#                                         needs CLUSTER ZONE TPU_TYPE
#   storage         attach the bucket BUCKET to the cluster as the storage STORAGE, mounted at
#                   MOUNT in the pods of workloads that name it
#                                         needs CLUSTER ZONE STORAGE BUCKET
#   run             create the workload: on every host the preflight, then the training
#                     python -m fnf_jax.main FLAGS --check && exec python -m fnf_jax.main FLAGS
#                   FLAGS = --config=$CONFIG --workdir=$WORKDIR --config.model.path=$MODEL
#                     --config.reward.clip_path=$CLIP --config.reward.weights=$REWARD_WEIGHTS
#                     --config.prompts.path=$PROMPTS --config.distributed.enabled=True [extra]
#                   --check checks the config and that every input it names is in the bucket,
#                   loads nothing and exits 2 naming all that is missing: a pod with a wrong
#                   path fails in seconds, not after the TPU runtime and the weights loaded.
#                   (exec: XPK sends SIGTERM to the command's process, which must be the
#                   training, for it to save a checkpoint; bash would often exec the last
#                   command by itself, exec makes sure.) jax.distributed.initialize()
#                   reads the slice (and multislice) layout GKE and XPK set in the
#                   environment. XPK restarts it up to MAX_RESTARTS times (preemption,
#                   maintenance); each restart resumes from the newest checkpoint in WORKDIR. A
#                   fresh WORKDIR computes the reference cache first.
#                                         needs CLUSTER ZONE WORKLOAD IMAGE TPU_TYPE WORKDIR MODEL
#   list            the cluster's workloads and their states      needs CLUSTER ZONE
#   logs            follow host 0 of slice 0 (kubectl, on the context XPK set up; the user
#                   container XPK names jax-tpu)                   needs WORKLOAD
#   delete          delete the workload                            needs CLUSTER ZONE WORKLOAD
#   cluster-delete  delete the cluster                             needs CLUSTER ZONE
#   help            print this text
#
# Settings (environment variables):
#   CLUSTER      GKE cluster name, e.g. fnf-v5e
#   ZONE         e.g. us-west4-a (XPK creates a regional cluster with TPU nodes in this zone)
#   PROJECT      gcloud project (default: gcloud's configured one)
#   TPU_TYPE     slice type, e.g. v5litepod-16 (4 hosts of 4 chips), v5litepod-8, v4-32
#   NUM_SLICES   slices (default 1); more than 1 is a multislice job (data parallel over DCN)
#   SPOT         1: Spot capacity for `cluster`; RESERVATION=name: a reservation; else on demand
#   WORKLOAD     workload name (lowercase letters, digits, '-'), e.g. fnf-violence
#   IMAGE        the container image, built from launch/Dockerfile by `image`, in Artifact
#                Registry, e.g. us-docker.pkg.dev/PROJECT/REPOSITORY/fnf_jax:TAG
#   STORAGE      XPK storage name of the bucket (run adds --storage=$STORAGE when set)
#   BUCKET       bucket name, without gs://
#   MOUNT        where pods see the bucket, default /models
#   WORKDIR      run folder under MOUNT, e.g. /models/runs/violence (plain file I/O: not gs://)
#   MODEL        diffusers-format Stable Diffusion folder under MOUNT, e.g.
#                /models/stable-diffusion-v1-4
#   CLIP, REWARD_WEIGHTS, PROMPTS
#                the reward's CLIP folder, the reward head's weights and the prompt file.
#                Optional: unset, for CONFIG configs/violence.py they are
#                $MOUNT/clip-vit-large-patch14, $MOUNT/q16/prompts_vit_l14.safetensors and
#                $MOUNT/data/i2p_benchmark.csv (for configs/oversexualization.py the weights are
#                $MOUNT/laion/nsfw_vit_l14.safetensors); other configs have no defaults (give
#                their inputs as extra --config.* flags). "": left out, the config's value stands.
#   CONFIG       default configs/violence.py (a path inside the image: its WORKDIR /fnf_jax
#                holds configs/)
#   MAX_RESTARTS default 10
#   DRY_RUN      1 (or --dry-run as the first argument): print every command, one a line,
#                prefixed with "+ " and shell-quoted, and run none
#
# A whole run:
#   export CLUSTER=fnf-v5e ZONE=us-west4-a TPU_TYPE=v5litepod-16 SPOT=1 STORAGE=models \
#          BUCKET=my-models MOUNT=/models WORKLOAD=fnf-violence IMAGE=us-docker.pkg.dev/p/r/fnf_jax \
#          WORKDIR=/models/runs/violence MODEL=/models/stable-diffusion-v1-4
#   launch/xpk.sh image && launch/xpk.sh cluster && launch/xpk.sh storage
#   launch/xpk.sh run
#   launch/xpk.sh logs; launch/xpk.sh list; launch/xpk.sh delete; launch/xpk.sh cluster-delete
set -euo pipefail

PROG=launch/xpk.sh
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
NUM_SLICES="${NUM_SLICES:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"
MOUNT="${MOUNT:-/models}"
MOUNT="${MOUNT%/}"
SPOT="${SPOT:-0}"

example() {
  case "$1" in
    CLUSTER) echo "CLUSTER=fnf-v5e" ;;
    ZONE) echo "ZONE=us-west4-a" ;;
    TPU_TYPE) echo "TPU_TYPE=v5litepod-16" ;;
    WORKLOAD) echo "WORKLOAD=fnf-violence" ;;
    IMAGE) echo "IMAGE=us-docker.pkg.dev/PROJECT/REPO/fnf_jax:latest" ;;
    STORAGE) echo "STORAGE=models" ;;
    BUCKET) echo "BUCKET=my-models-bucket" ;;
    WORKDIR) echo "WORKDIR=/models/runs/violence" ;;
    MODEL) echo "MODEL=/models/stable-diffusion-v1-4" ;;
    *) echo "$1=..." ;;
  esac
}

where() {
  WHERE=(--cluster="$CLUSTER" --zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    WHERE+=(--project="$PROJECT")
  fi
}

check_workload() {
  [[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "WORKLOAD must be lowercase letters, digits and '-', starting with a letter (got '$WORKLOAD')"
}

case "$CMD" in
  image)
    need IMAGE
    x docker build -f "$ROOT/launch/Dockerfile" --build-arg JAX_TARGET=tpu -t "$IMAGE" "$ROOT"
    x docker push "$IMAGE"
    ;;
  cluster)
    need CLUSTER ZONE TPU_TYPE
    [[ "$SPOT" == 0 || "$SPOT" == 1 ]] || die "SPOT must be 0 or 1 (got '$SPOT')"
    where
    if [[ "$SPOT" == 1 ]]; then
      capacity=(--spot)
    elif [[ -n "${RESERVATION:-}" ]]; then
      capacity=(--reservation="$RESERVATION")
    else
      capacity=(--on-demand)
    fi
    x xpk cluster create "${WHERE[@]}" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" \
      "${capacity[@]}"
    ;;
  storage)
    need CLUSTER ZONE STORAGE BUCKET
    where
    # --size is nominal for a bucket (the PersistentVolume's declared capacity, in GB).
    x xpk storage attach "$STORAGE" --type=gcsfuse --bucket="$BUCKET" --mount-point="$MOUNT" \
      --readonly=false --auto-mount=false --size=1024 "${WHERE[@]}"
    ;;
  run)
    need CLUSTER ZONE WORKLOAD IMAGE TPU_TYPE WORKDIR MODEL
    check_workload
    [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a whole number"
    where
    storage=()
    if [[ -n "${STORAGE:-}" ]]; then
      storage=(--storage="$STORAGE")
    fi
    input_flags "$MOUNT"
    job="$(words python -m fnf_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --config.model.path="$MODEL" ${INPUTS[@]+"${INPUTS[@]}"} \
      --config.distributed.enabled=True "$@")"
    x xpk workload create "${WHERE[@]}" --workload="$WORKLOAD" --docker-image="$IMAGE" \
      --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" \
      ${storage[@]+"${storage[@]}"} --command="$job --check && exec $job"
    ;;
  list)
    need CLUSTER ZONE
    where
    x xpk workload list "${WHERE[@]}"
    ;;
  logs)
    need WORKLOAD
    check_workload
    x kubectl logs --follow --tail=200 --container=jax-tpu \
      --selector="jobset.sigs.k8s.io/jobset-name=$WORKLOAD,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
    ;;
  delete)
    need CLUSTER ZONE WORKLOAD
    check_workload
    where
    x xpk workload delete "${WHERE[@]}" --workload="$WORKLOAD"
    ;;
  cluster-delete)
    need CLUSTER ZONE
    where
    x xpk cluster delete "${WHERE[@]}"
    ;;
  help | -h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    ;;
  *)
    die "unknown command (one of: image cluster storage run list logs delete cluster-delete help)"
    ;;
esac
