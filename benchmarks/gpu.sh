#!/usr/bin/env bash
# The device check: one call of at most 5 minutes on one H100/H200 (machine start excluded).
# Each piece runs under its own time limit, in this order, and every result is a JSON line in
# $OUT/results.jsonl the moment it is measured (a killed call still returns what it measured):
#   1. step          our Focus-N-Fix step, SD1.5 at 512², 4 images, 50 DDIM steps, CFG 7.5,
#                    K = 2, LoRA r = 64, cached reference, bfloat16, attention auto:
#                    build s, compile s, first step s, 3 timed steps, images/s, peak GiB
#   2. peer_eager    the PyTorch peer (../shared/bench/peer_draft_torch.py: diffusers + peft),
#                    the same settings, eager
#   3. unet          our SD1.5 UNet forward at batch 8, bfloat16: compile s, ms
#   4. rahf          RAHF's features forward (ViT-L/16-384 + t5-base, batch 4), ours and
#                    transformers'
#   5. peer_compile  the peer with torch.compile, last (it compiles for minutes)
# then the table of ours against the peer ($OUT/table.md). With --with-flags, before the
# peer_compile piece: our step again with the GPU compile-time flags of config.compile.xla_flags.
#
# The GPU machine has jax but no ml-collections or diffusers and no network: before the call,
# copy the wheels and the peer into the git-ignored .whl/ (it travels with the checkout):
#     echo /.whl/ >> .git/info/exclude
#     mkdir -p .whl && cp ../shared/device/wheels/*.whl ../shared/bench/peer_draft_torch.py .whl/
# then run `OUT=$OUT bash benchmarks/gpu.sh`. `bash benchmarks/gpu.sh --dry-run` runs the same
# pieces on tiny shapes on a CPU (the check that the script works before device time is spent;
# about 2 minutes on 2 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
FLAGS_PIECE=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --with-flags) FLAGS_PIECE=1 ;;
    *) echo "unknown argument $arg (--dry-run, --with-flags)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/fnf_device_check}
mkdir -p "$OUT"
export RESULTS=$OUT/results.jsonl
: > "$RESULTS"
BUDGET=${BUDGET:-290}  # seconds for all pieces together
START=$SECONDS
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
TABLE="$PY benchmarks/device_table.py"
$PY - <<'EOF'
import json, os, subprocess
import jax
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if os.path.exists(
                         "/usr/bin/nvidia-smi") else ""
row = {"bench": "env", "jax": jax.__version__, "backend": jax.default_backend(),
       "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": gpu}
print(json.dumps(row))
open(os.environ["RESULTS"], "a").write(json.dumps(row) + "\n")
EOF

if [ $DRY = 1 ]; then
  STEP="--model tiny --batch 2 --steps 3 --grad_steps 2 --rank 4 --iters 3 --dtype float32"
  PEER_ARGS="--tiny --repeats 3"
  UNET="--config tiny --batch 8 --iters 3 --dtype float32 --torch no"
  RAHF="--config tiny --batch 2 --iters 2"
else
  STEP="--model sd15 --batch 4 --steps 50 --grad_steps 2 --rank 64 --iters 3 --dtype bfloat16"
  PEER_ARGS="--images 4 --steps 50 --grad-steps 2 --rank 64 --repeats 3"
  UNET="--config sd15 --batch 8 --iters 10 --dtype bfloat16 --torch no"
  RAHF="--config real --batch 4 --iters 3"
fi

FAILED=""
piece() {  # name, limit in seconds, command...: its output in $OUT/name.log
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped (the budget of $BUDGET s is spent)"
    $TABLE status "$name" skipped "$limit" "$RESULTS" >/dev/null
    return
  fi
  echo "== $name (limit $limit s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then
    tail -n 2 "$OUT/$name.log"
  else
    local state=failed
    [ $rc = 124 ] || [ $rc = 137 ] && state=timeout
    echo "== $name: $state (exit $rc), last lines:"; tail -n 8 "$OUT/$name.log"
    $TABLE status "$name" "$state" "$limit" "$RESULTS" "$OUT/$name.log" >/dev/null
    FAILED="$FAILED $name"
  fi
}
have() { $PY -c "import $1" 2>/dev/null; }

piece step 150 $PY benchmarks/train_step.py $STEP --attention auto
if have diffusers && have peft; then
  piece peer_eager 60 $PY "$PEER" $PEER_ARGS
  $TABLE peer peer_eager "$OUT/peer_eager.log" "$RESULTS" >/dev/null
else
  echo "== peer: skipped (diffusers / peft not importable; copy the wheels into .whl/)"
fi
piece unet 40 $PY benchmarks/unet.py $UNET --attention auto --passes forward
if have torch && have transformers; then
  piece rahf 40 $PY benchmarks/rahf.py $RAHF --forward_only
else
  piece rahf 40 $PY benchmarks/rahf.py $RAHF --forward_only --torch no
fi
if [ $FLAGS_PIECE = 1 ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false" \
    piece step_xla_flags 120 $PY benchmarks/train_step.py $STEP --attention auto
fi
if have diffusers && have peft; then
  piece peer_compile 300 $PY "$PEER" $PEER_ARGS --compile
  $TABLE peer peer_compile "$OUT/peer_compile.log" "$RESULTS" >/dev/null
fi
$TABLE table "$RESULTS" | tee "$OUT/table.md"
echo "results in $OUT (results.jsonl, table.md, one log per piece); $((SECONDS - START)) s"
if [ -n "$FAILED" ]; then echo "failed:$FAILED"; exit 1; fi
