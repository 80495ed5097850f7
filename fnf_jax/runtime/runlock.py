"""One run per workdir: WORKDIR/run.lock, held by process 0 of the run that writes there.

The lock file says who holds it (host, pid, start) and is touched every HEARTBEAT_S seconds by a
background thread. Another run meets it with a message naming the file and the holder. A lock
left behind by a killed run does not block: it is taken over when its holder's pid is gone on
this host, or when its heartbeat is older than STALE_S (the holder was on another host: a
preempted pod restarting elsewhere on the same bucket).
"""

import contextlib
import json
import os
import socket
import threading
import time

from absl import logging

from fnf_jax.config import errors

NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirLockedError(errors.StopError):
  """Another run holds the workdir."""


class UnwritableWorkdirError(errors.StopError):
  """The workdir cannot be created or written."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _holder(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _stale(path: str, holder: dict) -> str | None:
  """Why the lock at `path` no longer holds, or None while its run is alive."""
  if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
    return f"its process {holder.get('pid')} on this host is gone"
  try:
    age = time.time() - os.path.getmtime(path)
  except FileNotFoundError:
    return "it was removed"
  if age > STALE_S:
    return f"its heartbeat is {age:.0f} s old (> {STALE_S:.0f} s)"
  return None


def _create(path: str) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
  return True


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True):
  """Holds WORKDIR/run.lock for the block (no-op where `enabled` is False: processes > 0)."""
  if not enabled:
    yield
    return
  path = os.path.join(workdir, NAME)
  try:  # the run's first write into the workdir: where it cannot write, it stops here
    os.makedirs(workdir, exist_ok=True)
    created = _create(path)
  except OSError as e:
    raise UnwritableWorkdirError(
        f"{workdir}: the workdir cannot be written ({e.strerror}: {e.filename}); a run writes "
        "its checkpoints (each the size of the LoRA and its optimizer state), metrics and "
        "record there. Use a --workdir this user can write, or fix its permissions") from None
  if not created:
    holder = _holder(path)
    why = _stale(path, holder)
    if why is None:
      raise WorkdirLockedError(
          f"{workdir} is in use by another run ({path}: host {holder.get('host', '?')}, pid "
          f"{holder.get('pid', '?')}, started {holder.get('started', '?')}); two runs on one "
          "workdir would overwrite each other's checkpoints. Wait for it to end, or use "
          f"another workdir; if no run is active, delete {path}")
    logging.warning("taking over %s: %s", path, why)
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    if not _create(path):
      raise WorkdirLockedError(f"{path}: another run took the workdir at the same moment")
  stop = threading.Event()

  def beat():
    while not stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(path)

  thread = threading.Thread(target=beat, daemon=True, name="fnf-runlock")
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
