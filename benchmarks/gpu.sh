#!/usr/bin/env bash
# The GPU benchmark, in one call (one H100/H200; see BENCHMARKS.md for the figures):
#   1. our SD1.5 UNet forward at batch 8, bfloat16, cuDNN and XLA attention;
#   2. our full Focus-N-Fix step at 512², 50 DDIM steps, CFG 7.5, K = 2, LoRA r = 64, the cached
#      reference, 4 images a step;
#   3. the PyTorch peer (diffusers + peft, peer_draft_torch.py) with the same settings, eager
#      and with torch.compile;
#   4. RAHF (ViT-L/16-384 + t5-base) at 384², batch 4, beside transformers' ViT + T5 on the GPU;
#   5. the train_reward step on that RAHF (all six heads, batch 8) and the richhf18k data
#      source through grain at 384² (inline threads and 4 worker processes).
# The GPU machine has jax but no ml-collections or diffusers and no network: before the call,
# copy the wheels and the peer into the git-ignored .whl/ (it travels with the checkout):
#     echo /.whl/ >> .git/info/exclude
#     mkdir -p .whl && cp ../shared/device/wheels/*.whl ../shared/bench/peer_draft_torch.py .whl/
# then run `bash benchmarks/gpu.sh` there. `bash benchmarks/gpu.sh --dry-run` runs the same
# commands on tiny shapes on a CPU (a check that the script works before GPU time is spent).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp}/fnf_gpu_bench
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
fi
PEER=.whl/peer_draft_torch.py
[ -f "$PEER" ] || PEER=../shared/bench/peer_draft_torch.py
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

if [ $DRY = 1 ]; then
  UNET="--config tiny --batch 2 --iters 2"
  STEP="--model tiny --batch 2 --steps 3 --grad_steps 2 --rank 4 --reference cache --iters 2"
  PEER_ARGS="--tiny --repeats 1"
  RAHF="--config tiny --batch 2 --iters 2"
  REWARD_STEP="--model tiny --batch 2 --iters 2"
  REWARD_DATA="--examples 32 --batch 8 --workers 2"
  ATTN_FAST=xla DTYPE=float32
else
  UNET="--config sd15 --batch 8 --iters 20"
  STEP="--model sd15 --batch 4 --steps 50 --grad_steps 2 --rank 64 --reference cache --iters 5"
  PEER_ARGS="--images 4 --steps 50 --grad-steps 2 --rank 64"
  RAHF="--config real --batch 4 --iters 5"
  REWARD_STEP="--model real --batch 8 --iters 5"
  REWARD_DATA="--examples 512 --batch 16 --workers 4"
  ATTN_FAST=cudnn DTYPE=bfloat16
fi

FAILED=""
run() {  # name, command...: the command's output in $OUT/name.log, its last line printed
  # A failure does not stop the others (device time is short); the exit status says it.
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then tail -n 3 "$OUT/$name.log"; else
    echo "FAILED ($name), last lines:"; tail -n 20 "$OUT/$name.log"; FAILED="$FAILED $name"; fi
}

run unet_$ATTN_FAST $PY benchmarks/unet.py $UNET --dtype $DTYPE --attention $ATTN_FAST --torch no
run unet_xla $PY benchmarks/unet.py $UNET --dtype $DTYPE --attention xla --torch no
run step_$ATTN_FAST $PY benchmarks/train_step.py $STEP --dtype $DTYPE --attention $ATTN_FAST
if $PY -c "import torch, transformers" 2>/dev/null; then
  run rahf $PY benchmarks/rahf.py $RAHF
else
  echo "== rahf: skipped (torch / transformers not importable; copy the wheels into .whl/)"
fi
run reward_step $PY benchmarks/reward_train.py step $REWARD_STEP
run reward_data $PY benchmarks/reward_train.py data $REWARD_DATA
if $PY -c "import diffusers, peft" 2>/dev/null; then
  run peer_eager $PY "$PEER" $PEER_ARGS
  run peer_compile $PY "$PEER" $PEER_ARGS --compile
else
  echo "== peer: skipped (diffusers / peft not importable; copy the wheels into .whl/)"
fi
echo "logs in $OUT"
if [ -n "$FAILED" ]; then echo "failed:$FAILED"; exit 1; fi
