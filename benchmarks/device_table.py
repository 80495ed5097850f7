"""The device check's bookkeeping (benchmarks/gpu.sh): results as JSON lines, the final table.

  python benchmarks/device_table.py peer NAME LOG RESULTS     # the peer's JSON line, tagged
  python benchmarks/device_table.py status NAME STATUS LIMIT RESULTS [LOG]
  python benchmarks/device_table.py table RESULTS             # ours vs the PyTorch peer
"""

import json
import sys


def _append(path: str, row: dict) -> None:
  print(json.dumps(row), flush=True)
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def peer(name: str, log: str, results: str) -> None:
  """The peer prints one JSON object last: append it tagged with the piece's name."""
  with open(log) as f:
    lines = [l for l in f.read().splitlines() if l.startswith("{")]
  if lines:
    _append(results, dict(json.loads(lines[-1]), bench=name))


def status(name: str, state: str, limit: str, results: str, log: str = "") -> None:
  row = {"bench": name, "status": state, "limit_s": int(limit)}
  if log:
    with open(log, errors="replace") as f:
      tail = [l for l in f.read().splitlines() if l.strip()][-3:]
    row["last_lines"] = tail
  _append(results, row)


def _rows(results: str) -> list[dict]:
  with open(results) as f:
    return [json.loads(l) for l in f if l.strip()]


def table(results: str) -> str:
  rows = _rows(results)
  step = {r["stage"]: r for r in rows if r.get("bench") == "step" and "stage" in r}
  eager = next((r for r in rows if r.get("bench") == "peer_eager" and "step_s" in r), {})
  compiled = next((r for r in rows if r.get("bench") == "peer_compile" and "step_s" in r), {})
  unet = next((r for r in rows if r.get("bench") == "unet"), {})
  rahf = {r.get("side"): r for r in rows if r.get("bench") == "rahf"}
  failed = [r for r in rows if r.get("status") in ("timeout", "failed")]
  f = lambda v, fmt="{:.2f}": "—" if v is None else fmt.format(v)
  cold = (None if not {"build", "compile", "first_step"} <= set(step)
          else step["build"]["s"] + step["compile"]["s"] + step["first_step"]["s"])
  ours_first = step.get("first_step", {}).get("s")
  steps = step.get("steps", {})
  out = ["| | fnf_jax | PyTorch peer, eager | peer, torch.compile |", "|---|---|---|---|"]
  out.append(f"| build s | {f(step.get('build', {}).get('s'))} | — | — |")
  out.append(f"| compile s ({step.get('compile', {}).get('cache', '—')}) | "
             f"{f(step.get('compile', {}).get('s'))} | — | — |")
  out.append(f"| first step s (ours: after compiling) | {f(ours_first)} | "
             f"{f(eager.get('first_step_s'))} | {f(compiled.get('first_step_s'))} |")
  out.append(f"| to first step, cold, s | {f(cold)} | {f(eager.get('first_step_s'))} | "
             f"{f(compiled.get('first_step_s'))} |")
  out.append(f"| s / step | {f(steps.get('step_s'), '{:.3f}')} | "
             f"{f(eager.get('step_s'), '{:.3f}')} | {f(compiled.get('step_s'), '{:.3f}')} |")
  ips = steps.get("images_per_s")
  out.append(f"| images / s | {f(ips, '{:.3f}')} | {f(eager.get('images_per_s'), '{:.3f}')} | "
             f"{f(compiled.get('images_per_s'), '{:.3f}')} |")
  if ips and eager.get("images_per_s"):
    out.append(f"| ours / peer | | {ips / eager['images_per_s']:.2f}× | "
               + (f"{ips / compiled['images_per_s']:.2f}× |" if compiled.get("images_per_s")
                  else "— |"))
  out.append(f"| peak GiB | {f(steps.get('peak_gib'))} | {f(eager.get('peak_gib'))} | "
             f"{f(compiled.get('peak_gib'))} |")
  out.append(f"| UNet forward, batch {unet.get('batch', 8)}, ms (compile s) | "
             f"{f(unet.get('ms'))} ({f(unet.get('compile_s'), '{:.1f}')}) | — | — |")
  out.append(f"| RAHF features forward s | {f(rahf.get('jax', {}).get('s'), '{:.4f}')} | "
             f"{f(rahf.get('torch', {}).get('s'), '{:.4f}')} | — |")
  for r in failed:
    out.append(f"| {r['bench']}: {r['status']} (limit {r['limit_s']} s) | | | |")
  return "\n".join(out)


def main(argv):
  command, args = argv[1], argv[2:]
  if command == "peer":
    peer(*args)
  elif command == "status":
    status(*args)
  elif command == "table":
    print(table(*args))
  else:
    raise SystemExit(f"unknown command {command!r}: peer | status | table")


if __name__ == "__main__":
  main(sys.argv)
