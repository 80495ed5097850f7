"""The demo's report: metrics.json, grid.png and a static index.html (no JavaScript, no network).

    table_text(metrics)   the summary table, as printed and as pasted in the README
    write(folder, ...)    metrics.json + grid.png + index.html; returns the folder
"""

import html
import json
import os

import numpy as np

from fnf_jax import eval_report
from fnf_jax.toy import world

# (key in metrics.json, column title, format); the order of the printed and HTML tables.
COLUMNS = (
    ("defect_rate", "defect rate (judge)", "{:.3f}"),
    ("reward", "reward", "{:+.3f}"),
    ("psnr_outside", "PSNR outside M (dB)", "{:.1f}"),
    ("ssim_outside", "SSIM outside M", "{:.4f}"),
    ("change_inside", "change inside M", "{:.4f}"),
    ("prompt_fidelity", "prompt fidelity (judge)", "{:.3f}"),
)
NAMES = {"base": "base", "draft": "DRaFT", "fnf": "Focus-N-Fix"}
CURVES = (("reward", "reward on training batches"),
          ("change_outside", "mean |Î − Î0| outside M"))


def _cell(value, fmt: str) -> str:
  return "—" if value is None else fmt.format(value)


def table_rows(metrics: dict) -> list[list[str]]:
  header = ["method"] + [title for _, title, _ in COLUMNS]
  return [header] + [[NAMES[m]] + [_cell(metrics[m].get(k), f) for k, _, f in COLUMNS]
                     for m in NAMES if m in metrics]


def table_text(metrics: dict) -> str:
  """A Markdown table (readable as plain text too)."""
  rows = table_rows(metrics)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                    *map(line, rows[1:])])


def grid_images(out: dict, rows: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Tiles [rows * 4] (base | base with M outlined | DRaFT | Focus-N-Fix per row) with their
  outline masks; the rows are the examples with the largest masks first (the base model's
  defects), then clean ones."""
  area = out["mask"].reshape(len(out["mask"]), -1).mean(1)
  order = list(np.argsort(-area, kind="stable"))
  defective = [i for i in order if area[i] > 0][: max(rows - 2, 1)]
  clean = [i for i in range(len(area)) if area[i] == 0][: rows - len(defective)]
  chosen = (defective + clean)[:rows]
  tiles, outlines = [], []
  empty = np.zeros(out["mask"].shape[1:], bool)
  for i in chosen:
    tiles += [out["reference"][i], out["reference"][i], out["images_draft"][i],
              out["images_fnf"][i]]
    outlines += [empty, out["mask"][i] > 0.5, empty, empty]
  return np.stack(tiles), np.stack(outlines), chosen


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def svg_curve(series: dict[str, list[tuple[float, float]]], title: str, **kwargs) -> str:
  """The eval report's chart (fnf_jax/eval_report.py) in the demo's colours and names."""
  return eval_report.svg_curve(series, title, colors={"draft": "#d62728", "fnf": "#1f77b4"},
                               labels=NAMES, **kwargs)


def write(folder: str, metrics: dict, out: dict, captions: list[str], logs: dict[str, str], *,
          rows: int = 8) -> str:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  tiles, outlines, chosen = grid_images(out, rows)
  world.save_grid(os.path.join(folder, "grid.png"), tiles, cols=4, scale=4, masks=outlines)

  history = {m: _read_jsonl(p) for m, p in logs.items()}
  curves = "".join(
      svg_curve({m: [(r["step"], r[key]) for r in h if key in r] for m, h in history.items()},
                title) for key, title in CURVES)
  rows_html = table_rows(metrics)
  table = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows_html[0]) + "</tr>"
  table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows_html[1:]) + "</table>"
  labels = "".join(f"<li>{html.escape(captions[i])}</li>" for i in chosen)
  setup = html.escape(json.dumps(metrics.get("setup", {})))
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fnf_jax toy demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>Focus-N-Fix vs global DRaFT on the toy world</h1>
<p>Held-out seeds of every prompt. Defect rate and prompt fidelity are the analytic judge's
(it knows the ground truth and was never used in training); PSNR / SSIM compare each method's
image Î with the base image Î0 outside the reward's mask M of Î0; the change inside M is the mean
absolute difference there.</p>
{table}
<h2>Samples</h2>
<p>Columns: base | base with M outlined | DRaFT | Focus-N-Fix. Rows (prompts):</p>
<ol>{labels}</ol>
<img src="grid.png" alt="base | mask | DRaFT | Focus-N-Fix">
<h2>Training curves</h2>
{curves}
<h2>Setup</h2><pre>{setup}</pre>
</body></html>
"""
  with open(os.path.join(folder, "index.html"), "w", encoding="utf-8") as f:
    f.write(page)
  return folder
