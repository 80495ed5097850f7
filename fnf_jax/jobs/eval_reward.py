"""The `eval_reward` job: RAHF's metrics of a heatmap reward model on a held-out split.

    python -m fnf_jax.main --config=configs/rahf.py --config.job=eval_reward --workdir=DIR

Scores the weights `eval.weights` ("" = what train_reward exported to WORKDIR/export/; "init" =
the model as training starts, a baseline; or a file) on the split `eval.split`, every example
once in the stored order. For each score head: PLCC and SRCC against the annotators' score; for
each heatmap head: MSE over all examples and over those with an empty ground truth, and CC, KLD,
SIM, NSS and AUC-Judd over the others (fnf_jax/rewards/heatmap_metrics.py), the ground truth
resized to the model's heatmap size. Written by process 0 to WORKDIR/eval/<split>[-<tag>].json
and a page WORKDIR/eval/<split>[-<tag>].html with the first `eval.html_examples` examples'
image, true and predicted heatmaps (tag: "init" for the baseline, the file's stem for another
file).
"""

import base64
import functools
import html
import io
import json
import os

import jax
import numpy as np
from absl import logging
from PIL import Image

from fnf_jax.runtime import distributed
from fnf_jax.runtime import log as metrics_lib
from fnf_jax.runtime import runlock
from fnf_jax.runtime import sharding
from fnf_jax.rewards import training
from fnf_jax.data import reward_data
from fnf_jax.rewards import heatmap_metrics

INIT = "init"


def run(config, workdir: str) -> dict:
  distributed.initialize(config.distributed)
  with runlock.hold(workdir, distributed.is_writer()):
    setup = training.setup(config, workdir)
    return evaluate(setup, workdir, config.eval.weights or os.path.join(
        workdir, training.EXPORT, setup.model.export_name))


def _params(setup, weights: str):
  if weights == INIT:
    return setup.model.init()
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"eval.weights: {weights!r} does not exist (train_reward writes "
                            f"WORKDIR/{training.EXPORT}/{setup.model.export_name})")
  return setup.model.load(weights)


def evaluate(setup, workdir: str, weights: str) -> dict:
  """The report of `weights` on config.eval.split (module docstring); also written to disk."""
  config = setup.config
  e = config.eval
  params = sharding.put(_params(setup, weights), training.param_shardings(setup))
  source = setup.builder.as_data_source(e.split)
  n, size = len(source), e.batch_size
  batch_at = reward_data.EvalBatch(source, setup.decode, size, training.rows(setup, size))
  apply = jax.jit(functools.partial(training.predict, setup))
  heat_rows = {k: [] for k in setup.heatmaps}
  scores = {k: ([], []) for k in setup.scores}
  shown = []
  batches = range(reward_data.num_eval_batches(n, size))
  for k, host in zip(batches, reward_data.stream(batch_at, batches, config.data.workers)):
    batch = training.device_batch(setup, host, size)
    heat, score = apply(params, batch)
    valid = np.arange(k * size, (k + 1) * size) < n  # the global rows that are not padding
    got = {k: distributed.gather(v)[valid] for k, v in heat.items()}
    true = {k: reward_data.unit(distributed.gather(batch[f"heatmap/{k}"])[valid])
            for k in setup.heatmaps}
    for k in setup.heatmaps:
      heat_rows[k] += [heatmap_metrics.example_metrics(p, g, e.threshold)
                       for p, g in zip(got[k], true[k])]
    for k in setup.scores:
      scores[k][0].extend(distributed.gather(score[k])[valid].tolist())
      scores[k][1].extend(distributed.gather(batch[f"score/{k}"])[valid].tolist())
    if len(shown) < e.html_examples and setup.heatmaps:
      images = distributed.gather(batch["image"])[valid]
      for i in range(min(len(images), e.html_examples - len(shown))):
        shown.append((images[i], {k: (true[k][i], got[k][i]) for k in setup.heatmaps}))
  report = {
      "split": e.split, "examples": n, "weights": weights, "dataset": config.data.name,
      "model": setup.model.name,
      "dropped_when_built": sum(1 for d in setup.dropped if d["split"] == e.split),
      "heatmaps": {k: heatmap_metrics.summarize(rows) for k, rows in heat_rows.items()},
      "scores": {k: heatmap_metrics.score_report(*scores[k]) for k in setup.scores}}
  _write(workdir, report, shown, _tag(weights, setup))
  return report


def _tag(weights: str, setup) -> str:
  if weights == INIT:
    return INIT
  if os.path.basename(weights) == setup.model.export_name:
    return ""
  return os.path.splitext(os.path.basename(weights))[0]


def _write(workdir: str, report: dict, shown: list, tag: str) -> None:
  if not distributed.is_writer():
    return
  folder = os.path.join(workdir, "eval")
  os.makedirs(folder, exist_ok=True)
  stem = os.path.join(folder, report["split"] + (f"-{tag}" if tag else ""))
  for path, text in ((stem + ".json", json.dumps(report, indent=1, sort_keys=True)),
                     (stem + ".html", page(report, shown))):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  logging.info("eval_reward: %s -> %s.json, %s.html", _summary(report), stem, stem)


def _summary(report: dict) -> str:
  parts = [f"{k} CC {m['cc']:.3f} AUC-Judd {m['auc_judd']:.3f} MSE {m['mse_all']:.4f}"
           for k, m in report["heatmaps"].items()]
  parts += [f"{k} PLCC {m['plcc']:.3f} SRCC {m['srcc']:.3f}" for k, m in report["scores"].items()]
  return f"{report['split']} ({report['examples']} examples): " + "; ".join(parts)


def _png(array: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(metrics_lib.to_uint8(array[None])[0]).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def page(report: dict, shown: list) -> str:
  """A self-contained HTML page: the metric tables, then image | true | predicted per head."""
  esc = html.escape
  out = [f"<html><head><meta charset='utf-8'><title>eval_reward {esc(report['split'])}</title>"
         "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:right}"
         " img{image-rendering:pixelated;width:192px}</style></head><body>",
         f"<h1>{esc(report['model'])} on {esc(report['dataset'])}[{esc(report['split'])}]</h1>",
         f"<p>{report['examples']} examples; weights {esc(report['weights'])}</p>"]
  for kind in ("heatmaps", "scores"):
    if not report[kind]:
      continue
    cols = sorted({c for m in report[kind].values() for c in m})
    out.append(f"<h2>{kind}</h2><table><tr><th></th>"
               + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for k, m in report[kind].items():
      out.append(f"<tr><th>{esc(k)}</th>" + "".join(
          f"<td>{m[c]:.4g}</td>" if isinstance(m[c], float) else f"<td>{m[c]}</td>"
          for c in cols) + "</tr>")
    out.append("</table>")
  if shown:
    heads = list(shown[0][1])
    out.append("<h2>examples</h2><table><tr><th>image</th>" + "".join(
        f"<th>{esc(k)} true</th><th>{esc(k)} predicted</th>" for k in heads) + "</tr>")
    for image, maps in shown:
      cells = [_png(image)]
      w = image.shape[1]
      for k in heads:
        true, pred = maps[k]
        panel = metrics_lib.heatmap_panel(image[None], true[None], pred[None])[0]
        cells += [_png(panel[:, w:2 * w]), _png(panel[:, 2 * w:])]
      out.append("<tr>" + "".join(f"<td><img src='{c}'></td>" for c in cells) + "</tr>")
    out.append("</table>")
  out.append("</body></html>")
  return "\n".join(out)
