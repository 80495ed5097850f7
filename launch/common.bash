# The helpers every launch script shares (sourced; not run on its own). The sourcing script
# sets PROG, CMD and DRY_RUN, and defines `example VAR` (a sample value for a message).

die() {
  echo "$PROG $CMD: $*" >&2
  exit 2
}

# need VAR... : every VAR is set and not empty.
need() {
  local v
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || die "$v is not set (see '$PROG help'), e.g. $(example "$v")"
  done
}

# q WORD: WORD quoted for a POSIX shell (as is when it needs no quotes).
q() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# words WORD...: the words quoted and joined by spaces (one shell command line).
words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

# x CMD...: run CMD, or print it under DRY_RUN=1.
x() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(words "$@")"
  else
    "$@"
  fi
}

# input_flags ROOT: sets INPUTS to the --config.* flags naming the reward's and the prompts'
# files, from the settings CLIP, REWARD_WEIGHTS and PROMPTS. One of them unset takes its default
# from the bucket layout under ROOT (the folder the bucket is mounted at; the same layout as
# configs/*.py's /models and launch/gke_job.yaml's):
#   ROOT/stable-diffusion-v1-4/              ROOT/clip-vit-large-patch14/
#   ROOT/q16/prompts_vit_l14.safetensors     ROOT/laion/nsfw_vit_l14.safetensors
#   ROOT/data/i2p_benchmark.csv              ROOT/runs/NAME/        (workdirs)
# Defaults exist only for the configs whose inputs are exactly these (CONFIG = configs/violence.py
# or configs/oversexualization.py, no :variant): any other config, e.g. the RAHF reward's (ViT,
# T5) or a :runlocal variant (no CLIP at all), has fields of other names, so guessing would give
# a wrong or an unknown key; give its files as extra --config.* flags. Set to "" (or ROOT ""):
# no flag, the config's own value stands. The preflight (--check) names whatever is missing.
input_flags() {
  local root="$1" head="" clip prompts weights
  case "$CONFIG" in
    violence.py | */violence.py) head=q16/prompts_vit_l14.safetensors ;;
    oversexualization.py | */oversexualization.py) head=laion/nsfw_vit_l14.safetensors ;;
  esac
  clip="" prompts="" weights=""
  if [[ -n "$root" && -n "$head" ]]; then
    clip="$root/clip-vit-large-patch14"
    weights="$root/$head"
    prompts="$root/data/i2p_benchmark.csv"
  fi
  clip="${CLIP-$clip}"
  weights="${REWARD_WEIGHTS-$weights}"
  prompts="${PROMPTS-$prompts}"
  INPUTS=()
  if [[ -n "$clip" ]]; then
    INPUTS+=(--config.reward.clip_path="$clip")
  fi
  if [[ -n "$weights" ]]; then
    INPUTS+=(--config.reward.weights="$weights")
  fi
  if [[ -n "$prompts" ]]; then
    INPUTS+=(--config.prompts.path="$prompts")
  fi
}
