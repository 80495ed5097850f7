"""The Pareto front of an evaluation's methods (fnf_jax/jobs/evaluate.py): the settings of a sweep
(or the methods) that no other beats on both of two measures, and the report's scatter of them.

Each chart puts the headline (y) against another measure (x):
  headline  the judge's problem rate (lower is better) when the judge is analytic: the ground
            truth, never trained on (the toy demo's case); else the target reward's mean (the
            report table's first column; a reward judge's problem rate only thresholds a reward)
  x         PSNR outside M (higher: the image changed less where there was nothing to fix); the
            base and any method that changed nothing there sit at +inf, drawn at the right edge
  x         the second reward: the first key of eval.rewards (in the table's order), else the
            analytic judge's first other measure; no second chart when there is neither
The front is computed over every method, the base among them (it is the "change nothing" end).
Pure Python: no numpy, no jax.
"""

import html
import math

PSNR = {"key": "psnr_outside", "title": "PSNR outside M (dB)", "maximize": True}
WIDTH, HEIGHT = 440, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 26, 44  # the plot's margins: room for ticks and titles
INF_GAP = 40  # px between the largest finite x and the +inf column
# A label's width per character and line height in 11 px sans-serif, rounded up (DejaVu Sans'
# digits are 7 px, its line box 13 px): labels are placed apart by these estimates.
CHAR_W, LINE_H = 7.0, 14
FRONT_COLOR, OTHER_COLOR, BASE_COLOR = "#d62728", "#888", "#1f77b4"


def pareto_front(points, maximize=(True, True)) -> list[int]:
  """The indices of the points that no other point dominates (at least as good on both axes and
  better on one; `maximize` per axis), ordered by x then y. Values may be +-inf, not NaN; equal
  points are all kept."""
  signs = [1.0 if m else -1.0 for m in maximize]
  scored = []
  for i, point in enumerate(points):
    if len(point) != len(signs) or any(math.isnan(float(v)) for v in point):
      raise ValueError(f"point {i} = {point!r}: expected {len(signs)} numbers, none NaN")
    scored.append(tuple(s * float(v) for s, v in zip(signs, point)))

  def dominated(i):
    return any(j != i and q != scored[i] and all(a >= b for a, b in zip(q, scored[i]))
               for j, q in enumerate(scored))

  front = [i for i in range(len(points)) if not dominated(i)]
  return sorted(front, key=lambda i: tuple(float(v) for v in points[i]))


def value(metrics: dict, key: str):
  """A method's number on an axis: a paired measure's mean; PSNR None (unchanged) is +inf;
  None where the method has no such number."""
  v = metrics.get(key)
  if key == PSNR["key"] and v is None and key in metrics:
    return math.inf
  return v["mean"] if isinstance(v, dict) else v


def headline(result: dict) -> dict:
  """The y axis of every chart (module docstring)."""
  if result["judge"].get("kind") == "analytic":
    return {"key": "problem_rate", "title": "problem rate (judge)", "maximize": False}
  return {"key": "reward/target", "title": "target reward", "maximize": True}


def second(result: dict) -> dict | None:
  """The second chart's x axis: the first other reward, else the analytic judge's first other
  measure; None when there is neither."""
  keys = sorted({k for m in result["methods"].values() for k in m})
  rewards = [k for k in keys if k.startswith("reward/") and k != "reward/target"]
  if rewards:
    return {"key": rewards[0], "title": f"reward {rewards[0].split('/', 1)[1]}",
            "maximize": True}
  judge = result["judge"]
  measures = [m for m in judge.get("measures", ()) if f"judge/{m}" in keys]
  if not measures:
    return None
  return {"key": f"judge/{measures[0]}", "title": f"{measures[0].replace('_', ' ')} (judge)",
          "maximize": measures[0] not in judge.get("lower_is_better", ())}


def chart(result: dict, x: dict, y: dict) -> dict:
  """One chart as metrics.json records it: its axes, each method's [x, y] (None for +inf) and
  the front's methods ordered by x. Methods without a number on an axis are left out."""
  names, points = [], []
  for name, m in result["methods"].items():
    p = (value(m, x["key"]), value(m, y["key"]))
    if None not in p:
      names.append(name)
      points.append(p)
  front = pareto_front(points, (x["maximize"], y["maximize"]))
  finite = lambda v: v if math.isfinite(v) else None
  return {"x": x, "y": y, "points": {n: [finite(a), finite(b)] for n, (a, b) in
                                     zip(names, points)},
          "front": [names[i] for i in front]}


def fronts(result: dict) -> list[dict]:
  """The charts of `result` (evaluate.metrics' methods and judge): [] unless there are at least
  two methods besides the base (one method has no trade-off to show)."""
  if len([n for n in result["methods"] if n != "base"]) < 2:
    return []
  y = headline(result)
  return [chart(result, x, y) for x in (PSNR, second(result)) if x is not None]


def _scales(points: dict):
  """(sx, sy, x ticks, y ticks) mapping values to pixels; +inf x (None) to its own column."""
  xs = [p[0] for p in points.values() if p[0] is not None]
  ys = [p[1] for p in points.values()]
  has_inf = len(xs) < len(points)
  right = WIDTH - RIGHT - (INF_GAP if has_inf else 0) - 8
  x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
  y0, y1 = min(ys), max(ys)
  pad = lambda a, b: ((a - 0.5, b + 0.5) if b == a else (a - 0.08 * (b - a), b + 0.08 * (b - a)))
  x0, x1 = pad(x0, x1)
  y0, y1 = pad(y0, y1)
  sx = lambda v: WIDTH - RIGHT - 12 if v is None else LEFT + (v - x0) / (x1 - x0) * (right - LEFT)
  sy = lambda v: HEIGHT - BOTTOM - (v - y0) / (y1 - y0) * (HEIGHT - BOTTOM - TOP)
  ticks_x = [(sx(min(xs)), f"{min(xs):.3g}"), (sx(max(xs)), f"{max(xs):.3g}")] if xs else []
  if has_inf:
    ticks_x.append((sx(None), "∞"))
  ticks_y = [(sy(min(ys)), f"{min(ys):.3g}"), (sy(max(ys)), f"{max(ys):.3g}")]
  return sx, sy, ticks_x, ticks_y


def _place(x: float, y: float, text: str, taken: list) -> tuple[float, float, str]:
  """A label's (x, baseline y, text-anchor) beside its point at (x, y): right of it, else left,
  nearest its height first, clear of the boxes in `taken` (points and placed labels; its own
  box is appended) and inside the chart."""
  w = CHAR_W * len(text)
  sides = ("start", "end") if x + 8 + w <= WIDTH - 2 else ("end", "start")
  first = None
  for shift in (0, LINE_H, -LINE_H, 2 * LINE_H, -2 * LINE_H, 3 * LINE_H, -3 * LINE_H):
    ly = min(max(y + 4 + shift, TOP + LINE_H), HEIGHT - BOTTOM - 2)
    for anchor in sides:
      lx = x + 8 if anchor == "start" else x - 8
      x0 = lx if anchor == "start" else lx - w
      box = (x0, ly - LINE_H + 2, x0 + w, ly + 2)
      if x0 < LEFT + 2 or x0 + w > WIDTH - 2:
        continue
      first = first or (lx, ly, anchor, box)
      if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                 for b in taken):
        taken.append(box)
        return lx, ly, anchor
  lx, ly, anchor, box = first or (x + 8, y + 4, "start", (x + 8, y - 8, x + 8 + w, y + 6))
  taken.append(box)  # no free place: the nearest one
  return lx, ly, anchor


def _axes_svg(ch: dict, ticks_x: list, ticks_y: list) -> list[str]:
  better = lambda a: f"{a['title']} ({'higher' if a['maximize'] else 'lower'} is better)"
  base_y, mid_y = HEIGHT - BOTTOM, (TOP + HEIGHT - BOTTOM) / 2
  parts = [f'<line x1="{LEFT}" y1="{base_y}" x2="{WIDTH - RIGHT}" y2="{base_y}" stroke="#888"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base_y}" stroke="#888"/>',
           f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
           f'{html.escape(better(ch["x"]))}</text>',
           f'<text x="14" y="{mid_y}" text-anchor="middle" transform="rotate(-90 14 {mid_y})">'
           f'{html.escape(better(ch["y"]))}</text>']
  parts += [f'<text x="{x:.1f}" y="{base_y + 14}" text-anchor="middle">{html.escape(t)}</text>'
            for x, t in ticks_x]
  parts += [f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{html.escape(t)}</text>'
            for y, t in ticks_y]
  return parts


def svg_scatter(ch: dict, labels: dict | None = None, base: str = "base") -> str:
  """A chart of `chart` as inline SVG: every method a point labelled with its name (`labels`:
  display names), the front's points filled and joined, the others hollow."""
  title = f"{ch['y']['title']} against {ch['x']['title']}"
  sx, sy, ticks_x, ticks_y = _scales(ch["points"])
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="scatter" width="{WIDTH}" '
           f'height="{HEIGHT}" font-family="sans-serif" font-size="11" '
           f'data-title="{html.escape(title)}">',
           f'<text x="{WIDTH / 2}" y="14" text-anchor="middle">{html.escape(title)}</text>']
  parts += _axes_svg(ch, ticks_x, ticks_y)
  xy = {n: (sx(p[0]), sy(p[1])) for n, p in ch["points"].items()}
  line = " ".join(f"{xy[n][0]:.1f},{xy[n][1]:.1f}" for n in ch["front"])
  parts.append(f'<polyline class="front" fill="none" stroke="{FRONT_COLOR}" stroke-width="1.5" '
               f'stroke-dasharray="4 3" points="{line}"/>')
  taken = [(x - 6, y - 6, x + 6, y + 6) for x, y in xy.values()]  # labels keep off the points
  for name, (x, y) in xy.items():
    on = name in ch["front"]
    color = BASE_COLOR if name == base else (FRONT_COLOR if on else OTHER_COLOR)
    text = (labels or {}).get(name, name)
    parts.append(f'<circle class="{"front" if on else "dominated"}" cx="{x:.1f}" cy="{y:.1f}" '
                 f'r="5" fill="{color if on else "white"}" stroke="{color}" stroke-width="2" '
                 f'data-label="{html.escape(text)}"/>')
    lx, ly, anchor = _place(x, y, text, taken)
    # A white halo keeps a label readable where the front's line crosses it.
    parts.append(f'<text class="point" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" '
                 f'fill="{color}" stroke="white" stroke-width="3" paint-order="stroke">'
                 f'{html.escape(text)}</text>')
  parts.append("</svg>")
  return "".join(parts)
