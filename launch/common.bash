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
