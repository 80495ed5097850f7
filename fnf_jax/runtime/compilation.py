"""Compiling: JAX's persistent compilation cache, XLA flags, and programs compiled ahead of time,
each while the next is traced, with how long it took and whether the cache served them.

The config block (every job's config has it):

    compile.cache_dir         "auto" | "" (off) | a folder. "auto": WORKDIR/../jax_cache for a
                              local workdir (runs side by side share it), else (a gs:// URL)
                              $XDG_CACHE_HOME/fnf_jax/jax (~/.cache/fnf_jax/jax) on each host.
                              JAX writes entries from process 0 only (one writer for a shared
                              folder) and keeps GPU autotuning results in it too. A cache set
                              before the job (JAX_COMPILATION_CACHE_DIR) takes precedence.
    compile.min_compile_secs  programs that compile faster are not cached
    compile.xla_flags         appended to XLA_FLAGS before JAX starts its backend (see README:
                              the GPU compile-time flags)

A second run of the same config loads every program from the cache: its log says
"compiled the train step (4 programs) in N s (cache hit)".
"""

import concurrent.futures
import os
import threading
import time

from absl import logging

_COUNTS = {"requests": 0, "hits": 0}
_LOCK = threading.Lock()
_LISTENING = [False]


def cache_folder(cfg, workdir: str) -> str:
  """The persistent cache folder config.compile names for `workdir` ("" when off)."""
  if cfg.cache_dir != "auto":
    return cfg.cache_dir
  if "://" not in workdir:
    return os.path.join(os.path.dirname(os.path.abspath(workdir.rstrip("/"))), "jax_cache")
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fnf_jax", "jax")


def add_xla_flags(flags: str) -> None:
  """Appends `flags` to XLA_FLAGS (read when JAX starts its backend: call before that)."""
  if flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def setup(cfg, workdir: str) -> str:
  """Applies config.compile: XLA flags, then the persistent cache. Returns the cache folder."""
  add_xla_flags(cfg.xla_flags)
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)

  folder = cache_folder(cfg, workdir)
  already = jax.config.jax_compilation_cache_dir
  if already:
    # Set before the job (JAX_COMPILATION_CACHE_DIR, or a test session's): JAX reads it once.
    logging.info("persistent compilation cache: %s (set before the job; config.compile."
                 "cache_dir = %r not applied)", already, cfg.cache_dir)
    folder = already
  elif folder:
    jax.config.update("jax_compilation_cache_dir", folder)
    # The step takes seconds to minutes to compile, well above any threshold; small programs
    # (a metrics fetch) are cached too when they take min_compile_secs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", cfg.min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("persistent compilation cache: %s", folder)
  _listen()
  return folder


def _listen() -> None:
  """Counts JAX's compilation-cache requests and hits (its monitoring events)."""
  if _LISTENING[0]:
    return
  from jax._src import monitoring  # pylint: disable=g-import-not-at-top

  def on_event(event: str, **kwargs) -> None:
    del kwargs
    key = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "hits"}.get(event)
    if key:
      with _LOCK:
        _COUNTS[key] += 1

  monitoring.register_event_listener(on_event)
  _LISTENING[0] = True


def cache_counts() -> tuple[int, int]:
  """(requests, hits) of the persistent cache so far in this process."""
  with _LOCK:
    return _COUNTS["requests"], _COUNTS["hits"]


def cache_outcome(before: tuple[int, int]) -> str:
  """What the persistent cache did since `cache_counts()` was `before`: "hit" (it served every
  program), "miss" (none), "k of n hit", or "off"."""
  import jax  # pylint: disable=g-import-not-at-top
  asked, served = (n - m for n, m in zip(cache_counts(), before))
  # JAX asks its cache even when no folder is set (and then always misses): that is "off".
  if asked == 0 or not jax.config.jax_compilation_cache_dir:
    return "off"
  return "hit" if served == asked else "miss" if served == 0 else f"{served} of {asked} hit"


class Compiler:
  """Programs compiled while the next one is traced: `add` lowers a program (Python, holding
  the GIL) and hands it at once to a thread that compiles it (XLA releases the GIL), so XLA
  works on one piece while the caller traces the next; `finish` waits for all of them.

    compiler = Compiler("the train step")
    compiler.add("forward", jax.jit(f).trace(...))   # or (jitted, abstract args)
    compiled, info = compiler.finish()

  info: {"seconds", "lower_seconds", "cache"}; cache is "hit" (all from the persistent cache),
  "miss" (all compiled), "k of n hit" or "off". `since`: the time.perf_counter() at which the
  caller began (its own tracing counts as compiling)."""

  def __init__(self, what: str, since: float | None = None):
    _listen()
    self.what = what
    self.tic = time.perf_counter() if since is None else since
    self.lower_seconds = 0.0
    self._before = cache_counts()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    self._futures = {}

  def add(self, name: str, program) -> None:
    lowered = program.lower() if hasattr(program, "lower") else program[0].lower(*program[1])
    # Wall time until the last program is lowered: the caller's tracing included.
    self.lower_seconds = time.perf_counter() - self.tic
    self._futures[name] = self._pool.submit(lowered.compile)

  def finish(self) -> tuple[dict, dict]:
    try:
      compiled = {name: f.result() for name, f in self._futures.items()}
    finally:
      self._pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - self.tic
    cache = cache_outcome(self._before)
    logging.info("compiled %s (%d programs) in %.1f s (cache %s; tracing and lowering %.1f s)",
                 self.what, len(compiled), seconds, cache, self.lower_seconds)
    return compiled, {"seconds": seconds, "lower_seconds": self.lower_seconds, "cache": cache}


def compile_all(programs: dict, what: str, since: float | None = None) -> tuple[dict, dict]:
  """Compiles {name: (jitted, abstract args)} or {name: traced} (`jax.jit(f).trace(...)`) with
  a Compiler: ({name: compiled}, info)."""
  compiler = Compiler(what, since)
  for name, program in programs.items():
    compiler.add(name, program)
  return compiler.finish()
