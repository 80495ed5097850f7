"""A console progress line with rate and ETA (no tqdm dependency; works under absl logging)."""

import sys
import time


class Progress:
  """Prints `label  12/50 [=====>    ] 3.1 it/s ETA 0:00:12  extra` on one updating line."""

  def __init__(self, total: int, label: str = "", stream=None, width: int = 24):
    self.total, self.label, self.width = total, label, width
    self.stream = stream or sys.stderr
    self.start = time.perf_counter()
    self.done = 0

  def eta_seconds(self) -> float:
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
    return (self.total - self.done) / rate if rate else float("nan")

  def update(self, n: int = 1, extra: str = "") -> str:
    self.done = min(self.total, self.done + n)
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    filled = int(self.width * self.done / max(self.total, 1))
    bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
    line = (f"{self.label} {self.done}/{self.total} [{bar[:self.width]}] {rate:.2f} it/s "
            f"ETA {format_seconds(self.eta_seconds())} {extra}").rstrip()
    end = "\n" if self.done >= self.total else ""
    self.stream.write("\r" + line + end)
    self.stream.flush()
    return line


def format_seconds(seconds: float) -> str:
  if seconds != seconds:  # NaN: no rate yet
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
