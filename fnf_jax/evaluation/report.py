"""The `eval` job's report folder (fnf_jax/jobs/evaluate.py): static files, no JavaScript, no network.

    metrics.json    every number (methods, and per category)
    index.html      the summary table, the per-category table and plot (categories.png),
                    the grid (grid.png: rows are examples, the base's largest masks first;
                    columns base | base with M outlined | each method), each run's training
                    curves (inline SVG from its metrics.jsonl; a sweep member's are its
                    "<key>/<label>" entries), and with two methods or more the Pareto front
                    (fnf_jax/evaluation/pareto.py: result["pareto"], inline SVG scatters)
    ab/             pairs base vs method in random order for human raters: pair_NNNN_1.png and
                    pair_NNNN_2.png, key.json (which side is which; keep it from the raters),
                    ratings.csv (one row per pair to fill in: 1, 2 or same)
"""

import csv
import html
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from fnf_jax.evaluation import pareto

BASE = "base"
OUTLINE = (255, 0, 255)
GAP_GRAY = 102  # 0.4 of white, between and around the tiles
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
# (key in a method's metrics, column title, format)
COLUMNS = (("reward/target", "target reward", "{:+.3f}"),
           ("problem_rate", "problem rate (judge)", "{:.3f}"),
           ("fixed_rate", "base problems fixed", "{:.3f}"),
           ("new_problem_rate", "new problems", "{:.3f}"),
           ("psnr_outside", "PSNR outside M (dB)", "{:.1f}"),
           ("ssim_outside", "SSIM outside M", "{:.4f}"),
           ("mse_outside", "MSE outside M", "{:.2e}"),
           ("change_inside", "change inside M", "{:.4f}"))


def _cell(m: dict, key: str, fmt: str) -> str:
  """One table cell; key "K:F" is field F of the paired numbers K (key "reward/target:mean")."""
  key, _, field = key.partition(":")
  v = m.get(key)
  if field and isinstance(v, dict):
    v = v[field]
  if isinstance(v, dict):  # a reward: mean, and the paired change ± its standard error
    se = v.get("change_se")
    change = "" if v["change"] == 0 and se in (0, None) else (
        f" ({v['change']:+.3f}" + (f" ± {se:.3f})" if se is not None else ")"))
    return fmt.format(v["mean"]) + change
  return "—" if v is None else fmt.format(v)


def columns(result: dict) -> tuple:
  """COLUMNS with each other reward after the target's and an analytic judge's measures last."""
  keys = sorted({k for m in result["methods"].values() for k in m})
  extra = [k for k in keys if k.startswith("reward/") and k != "reward/target"]
  measured = [k for k in keys if k.startswith("judge/")]
  return (COLUMNS[:1] + tuple((k, k.split("/", 1)[1], "{:+.3f}") for k in extra) + COLUMNS[1:]
          + tuple((k, f"{k.split('/', 1)[1].replace('_', ' ')} (judge)", "{:.3f}")
                  for k in measured))


def table_rows(methods: dict, cols, labels: dict | None = None) -> list[list[str]]:
  """[header, one row per method] of cells; `labels` = display names by method."""
  return [["method"] + [title for _, title, _ in cols]] + [
      [(labels or {}).get(n, n)] + [_cell(m, k, f) for k, _, f in cols]
      for n, m in methods.items()]


def table(methods: dict, cols, labels: dict | None = None) -> str:
  rows = table_rows(methods, cols, labels)
  cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in r)
  return ("<table><tr>" + cells(rows[0], "th") + "</tr>" +
          "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows[1:]) + "</table>")


def table_text(methods: dict, cols, labels: dict | None = None) -> str:
  """The table in Markdown (readable as plain text too): what the jobs print."""
  rows = table_rows(methods, cols, labels)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                    *map(line, rows[1:])])


def grid(images: np.ndarray, outlines: np.ndarray | None = None, cols: int = 8, scale: int = 1,
         gap: int = 2) -> np.ndarray:
  """Tiles [N, H, W, 3] in [0, 1] -> one uint8 image, each upscaled `scale`x (nearest), `gap`
  px apart on gray; with outlines [N, H, W] bool, those pixels' outline drawn in magenta."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
  tiles = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  tiles = np.repeat(np.repeat(tiles, scale, 1), scale, 2)
  if outlines is not None:
    big = np.repeat(np.repeat(np.asarray(outlines, bool), scale, 1), scale, 2)
    inner = big.copy()  # erode by one pixel: the outline is the mask minus its interior
    inner[:, 1:] &= big[:, :-1]
    inner[:, :-1] &= big[:, 1:]
    inner[:, :, 1:] &= big[:, :, :-1]
    inner[:, :, :-1] &= big[:, :, 1:]
    tiles[big & ~inner] = OUTLINE
  n, h, w, _ = tiles.shape
  rows = -(-n // cols)
  canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), GAP_GRAY, np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    canvas[gap + r * (h + gap):gap + r * (h + gap) + h,
           gap + c * (w + gap):gap + c * (w + gap) + w] = tiles[i]
  return canvas


def grid_rows(mask: np.ndarray, rows: int) -> list[int]:
  """The examples shown: the base's largest masks first (its problems), then clean ones."""
  area = mask.reshape(len(mask), -1).mean(1)
  order = [int(i) for i in np.argsort(-area, kind="stable")]
  problems = [i for i in order if area[i] > 0][:max(rows - 2, 1)]
  clean = [i for i in range(len(area)) if area[i] == 0][:rows - len(problems)]
  return (problems + clean)[:rows]


def category_plot(path: str, result: dict, key: str = "reward/target") -> bool:
  """A bar chart PNG of `key`'s mean per category and method; False when there are none."""
  cats = result["categories"]
  if not cats:
    return False
  methods = list(result["methods"])
  values = {c: [_value(cats[c][m].get(key)) for m in methods] for c in cats}
  flat = [v for vs in values.values() for v in vs if v is not None]
  lo, hi = min(flat + [0.0]), max(flat + [0.0])
  hi = hi if hi > lo else lo + 1
  bar, group, top, left, height = 10, 10 * len(methods) + 14, 30, 60, 220
  width = left + group * len(cats) + 120
  im = Image.new("RGB", (width, height + 110), "white")
  d = ImageDraw.Draw(im)
  y = lambda v: top + (hi - v) / (hi - lo) * height
  d.line([(left, y(0)), (width - 110, y(0))], fill="#888")
  d.text((left, 8), f"{key} by category", fill="black")
  d.text((4, top - 6), f"{hi:.3g}", fill="black")
  d.text((4, top + height - 6), f"{lo:.3g}", fill="black")
  for g, c in enumerate(cats):
    x0 = left + g * group + 7
    for k, v in enumerate(values[c]):
      if v is not None:
        d.rectangle([x0 + k * bar, min(y(v), y(0)), x0 + (k + 1) * bar - 2, max(y(v), y(0))],
                    fill=PALETTE[k % len(PALETTE)])
    d.text((x0, top + height + 8 + 12 * (g % 4)), c[:14], fill="black")
  for k, m in enumerate(methods):
    d.rectangle([width - 104, top + 14 * k, width - 96, top + 14 * k + 8],
                fill=PALETTE[k % len(PALETTE)])
    d.text((width - 92, top - 2 + 14 * k), m[:14], fill="black")
  im.save(path)
  return True


def _value(v):
  return v["mean"] if isinstance(v, dict) else v


def svg_curve(series: dict[str, list[tuple[float, float]]], title: str, *, width: int = 360,
              height: int = 220, colors: dict | None = None, labels: dict | None = None) -> str:
  """A line chart of {name: [(step, value)]} as inline SVG; `colors` / `labels` by name (default:
  the palette in order, the names)."""
  points = [p for s in series.values() for p in s]
  if not points:
    return f"<p>{html.escape(title)}: no data</p>"
  xs, ys = [p[0] for p in points], [p[1] for p in points]
  x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
  y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
  left, bottom = 56, 40  # room for a y label such as "0.000957", and for the x labels
  sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - 10)
  sy = lambda y: height - bottom + (y - y0) / (y1 - y0) * (bottom + 20 - height)
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="14" text-anchor="middle">{html.escape(title)}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" '
           'stroke="#888"/>',
           f'<line x1="{left}" y1="20" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
           f'<text x="{left}" y="{height - bottom + 14}">{x0:g}</text>',
           f'<text x="{width - 10}" y="{height - bottom + 14}" text-anchor="end">step {x1:g}'
           '</text>',
           f'<text x="{left - 3}" y="{height - bottom}" text-anchor="end">{y0:.3g}</text>',
           f'<text x="{left - 3}" y="26" text-anchor="end">{y1:.3g}</text>']
  for k, (name, s) in enumerate(series.items()):
    color = (colors or {}).get(name, PALETTE[k % len(PALETTE)] if colors is None else "#333")
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
    parts.append(f'<text x="{width - 12}" y="{34 + 14 * k}" text-anchor="end" '
                 f'fill="{color}">{html.escape((labels or {}).get(name, name))}</text>')
  parts.append("</svg>")
  return "".join(parts)


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def history(log) -> list[dict]:
  """A method's training log rows: `log` is a run's metrics.jsonl, or (metrics.jsonl, label) for
  a member of a sweep, whose numbers are logged as "<key>/<label>" (renamed "<key>" here)."""
  if isinstance(log, str):
    return _read_jsonl(log)
  path, member = log
  suffix = "/" + member
  return [{"step": r["step"], **{k[:-len(suffix)]: v for k, v in r.items() if k.endswith(suffix)}}
          for r in _read_jsonl(path)]


def front_section(result: dict, labels: dict | None = None) -> str:
  """The Pareto front's HTML (result["pareto"], fnf_jax/evaluation/pareto.py); "" when there is
  none (fewer than two methods)."""
  charts = result.get("pareto") or []
  if not charts:
    return ""
  label = lambda m: html.escape((labels or {}).get(m, m))
  on = "".join(f"<li>{html.escape(c['y']['title'])} against {html.escape(c['x']['title'])}: "
               f"{', '.join(label(m) for m in c['front'])}</li>" for c in charts)
  return (f"<h2>Pareto front</h2>\n<p>Each method a point; filled and joined: those no other "
          f"method beats on both measures (the base's PSNR outside M is infinite: it changed "
          f"nothing). On the front:</p><ul>{on}</ul>\n"
          + "".join(pareto.svg_scatter(c, labels) for c in charts))


def _png(path: str, image: np.ndarray, min_side: int = 128) -> None:
  """A [H, W, 3] image in [0, 1], enlarged (nearest) to at least `min_side` for raters."""
  array = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  scale = max(1, -(-min_side // min(array.shape[:2])))
  Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale),
                                Image.NEAREST).save(path)


def write_ab(folder: str, out: dict, examples: list, methods: list[str], seed: int) -> int:
  """The blinded A/B folder (module docstring); returns the number of pairs."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng([seed, 0xAB])
  pairs = [(i, m) for i in range(len(examples)) for m in methods]
  key, rows = {}, []
  for n, k in enumerate(rng.permutation(len(pairs))):
    i, method = pairs[int(k)]
    name = f"pair_{n:04d}"
    sides = [BASE, method] if rng.random() < 0.5 else [method, BASE]
    for side, who in enumerate(sides, 1):
      _png(os.path.join(folder, f"{name}_{side}.png"),
           out["reference"][i] if who == BASE else out[f"images/{method}"][i])
    key[name] = {"example": i, "prompt": examples[i].prompt, "seed": examples[i].seed,
                 "method": method, "1": sides[0], "2": sides[1]}
    rows.append([name, examples[i].prompt, "", ""])
  with open(os.path.join(folder, "key.json"), "w") as f:
    json.dump(key, f, indent=1)
  with open(os.path.join(folder, "ratings.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["pair", "prompt", "preferred (1, 2 or same)", "notes"])
    w.writerows(rows)
  return len(pairs)


def write(folder: str, result: dict, out: dict, examples: list, logs: dict, *,
          rows: int, seed: int, labels: dict | None = None, title: str | None = None) -> str:
  """The folder (module docstring) from `result` (eval_job.metrics, plus an optional "setup"
  dict shown as is) and the samples `out`; `labels` = display names by method (the files and
  keys keep the names), `title` the page's heading. `logs`: each method's training log, as
  `history` takes it."""
  os.makedirs(folder, exist_ok=True)
  label = lambda m: (labels or {}).get(m, m)
  with open(os.path.join(folder, "metrics.json"), "w") as f:
    json.dump(result, f, indent=1)
  methods = [m for m in result["methods"] if m != BASE]
  chosen = grid_rows(out["mask"], rows)
  tiles, outlines = [], []
  empty = np.zeros(out["mask"].shape[1:], bool)
  for i in chosen:
    tiles += [out["reference"][i], out["reference"][i]] + [out[f"images/{m}"][i] for m in methods]
    outlines += [empty, out["mask"][i] > 0.5] + [empty] * len(methods)
  scale = max(1, 128 // out["reference"].shape[1])
  Image.fromarray(grid(np.stack(tiles), np.stack(outlines), 2 + len(methods), scale)).save(
      os.path.join(folder, "grid.png"))
  has_plot = category_plot(os.path.join(folder, "categories.png"), result)
  pairs = write_ab(os.path.join(folder, "ab"), out, examples, methods, seed)
  cols = columns(result)
  history_of = {m: history(log) for m, log in logs.items()}
  curves = "".join(svg_curve({m: [(r["step"], r[k]) for r in h if k in r]
                              for m, h in history_of.items()}, curve_title, labels=labels)
                   for k, curve_title in (("reward", "reward on training batches"),
                                          ("change_outside", "mean |Î − Î0| outside M")))
  per_category = "".join(f"<h3>{html.escape(c)}</h3>" + table(ms, cols, labels)
                         for c, ms in result["categories"].items())
  shown = "".join(f"<li>{html.escape(examples[i].prompt)} (seed {examples[i].seed})</li>"
                  for i in chosen)
  setup = (f"<h2>Setup</h2><pre>{html.escape(json.dumps(result['setup'], indent=1))}</pre>"
           if result.get("setup") else "")
  heading = html.escape(title or f"Evaluation on {result['examples']} held-out examples")
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{heading}</title>
<style>body{{font-family:sans-serif;max-width:72em;margin:2em auto}}
table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 8px;
text-align:right}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>{heading}</h1>
<p>{result['examples']} examples. Each method's image Î against the base model's Î0 from the
same prompt and x_T. Rewards and the judge's measures: mean (paired change against the base ±
its standard error). PSNR, SSIM and MSE compare Î with Î0 outside the base's mask M; the change
inside M is the mean absolute difference there. A problem: {html.escape(
    result['judge']['description'])} (judge {html.escape(result['judge']['name'])}).</p>
{table(result['methods'], cols, labels)}
{front_section(result, labels)}
<h2>By category</h2>
{'<img src="categories.png" alt="target reward by category">' if has_plot else '<p>The prompt source has no categories.</p>'}
{per_category}
<h2>Samples</h2>
<p>Columns: base | base with M outlined | {' | '.join(html.escape(label(m)) for m in methods)}.
Rows:</p>
<ol>{shown}</ol>
<img src="grid.png" alt="samples">
<h2>Training curves</h2>
{curves}
<h2>Human study</h2>
<p><a href="ab/ratings.csv">ab/</a>: {pairs} blinded pairs (base vs a method, sides random);
ab/key.json says which is which.</p>
{setup}
</body></html>
"""
  with open(os.path.join(folder, "index.html"), "w", encoding="utf-8") as f:
    f.write(page)
  return folder
