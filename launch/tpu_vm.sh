#!/usr/bin/env bash
# Run an fnf_jax job on every worker of a Cloud TPU VM (single host or pod slice).
#
#   TPU_NAME=fnf-v5e ZONE=us-west4-a WORKDIR=/mnt/bucket/run1 \
#   MODEL=/mnt/bucket/models/sd14 CONFIG=configs/violence.py launch/tpu_vm.sh [extra --config.* flags]
#
# The model folder must already be on the VMs or in a bucket they can read (fnf_jax downloads
# nothing); copy it with `gcloud storage cp -r`. On a pod slice every worker runs the same
# command; jax.distributed.initialize() is called because we pass --config.distributed=True.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${MODEL:?set MODEL}"
CONFIG="${CONFIG:-configs/violence.py}"
REPO_DIR="${REPO_DIR:-fnf_jax}"

gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$(git rev-parse --show-toplevel)" "$TPU_NAME:~/$REPO_DIR"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/$REPO_DIR
  python3 -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.13'
  python3 -m fnf_jax.main --config=$CONFIG --workdir=$WORKDIR \
    --config.model.path=$MODEL --config.distributed=True $*"
