"""The `demo` job (configs/toy.py): references, Focus-N-Fix and DRaFT from the same start, then
the eval job's evaluation (fnf_jax/jobs/evaluate.py) on held-out seeds, judged by the toy world's
analytic judge, and WORKDIR/report.

Layout of WORKDIR:
    fnf/     the Focus-N-Fix run (its reference cache, checkpoints, metrics.jsonl, lora)
    draft/   the DRaFT run (the same reference cache, linked)
    report/  the eval job's report (fnf_jax/evaluation/report.py): index.html, grid.png,
             metrics.json, ab/
A finished run is resumed, not repeated: train() picks up from its checkpoints. The model and
reward are loaded once, each method's step is built once (`fnf.run.setup`), and the evaluation
reuses the Focus-N-Fix run's compiled reference and sampler. The same numbers come from
`--config.job=eval --config.eval.runs='("draft=WORKDIR/draft", "fnf=WORKDIR/fnf")'` on this
config, which reads the LoRAs back from the runs' checkpoints.
"""

import os
import time

from absl import logging

from fnf_jax.jobs import evaluate as eval_job
from fnf_jax.evaluation import report as eval_report
from fnf_jax.fnf import run as run_lib
from fnf_jax.jobs import cache as cache_job
from fnf_jax.jobs import train as train_lib
from fnf_jax.fnf.reference_cache import directory as reference_directory
from fnf_jax.toy.methods import method_config

NAMES = {"base": "base", "draft": "DRaFT", "fnf": "Focus-N-Fix"}
# The printed table (and the README's): (key in a method's metrics, title, format).
COLUMNS = (
    ("problem_rate", "defect rate (judge)", "{:.3f}"),
    ("reward/target:mean", "reward", "{:+.3f}"),
    ("psnr_outside", "PSNR outside M (dB)", "{:.1f}"),
    ("ssim_outside", "SSIM outside M", "{:.4f}"),
    ("change_inside", "change inside M", "{:.4f}"),
    ("judge/prompt_fidelity:mean", "prompt fidelity (judge)", "{:.3f}"),
)


def _share_cache(source_workdir: str, workdir: str) -> None:
  """Points workdir/reference at the other run's cache (same model, examples, sampling, mask)."""
  os.makedirs(workdir, exist_ok=True)
  link = reference_directory(workdir)
  if not os.path.lexists(link):
    os.symlink(os.path.abspath(reference_directory(source_workdir)), link)


def table_text(result: dict) -> str:
  return eval_report.table_text(result["methods"], COLUMNS, NAMES)


def run(config, workdir: str) -> dict:
  """The demo job; returns the metrics (also in WORKDIR/report/metrics.json)."""
  t0 = time.time()
  runs = {m: os.path.join(workdir, m) for m in ("fnf", "draft")}
  configs = {m: method_config(config, m) for m in ("fnf", "draft")}
  fnf_run = run_lib.setup(configs["fnf"])
  setups = {"fnf": fnf_run, "draft": run_lib.setup(configs["draft"], base=fnf_run)}
  if config.train.reference == "cache":
    cache_job.cache(configs["fnf"], runs["fnf"], run=fnf_run)
    _share_cache(runs["fnf"], runs["draft"])
  loras, seconds = {}, {}
  for method in ("draft", "fnf"):  # also the report's column order
    tic = time.time()
    _, loras[method] = train_lib.fit(configs[method], runs[method], run=setups[method])
    seconds[method] = time.time() - tic
    logging.info("%s: trained in %.0f s", method, seconds[method])

  examples, categories = eval_job.eval_examples(config, fnf_run)
  result, out = eval_job.measure(config, fnf_run, loras, examples, categories)
  for method in loras:
    result["methods"][method]["train_seconds"] = round(seconds[method], 1)
  result["setup"] = {
      # The pool; training uses those with data.min_mask_area (the count is in the log).
      "example_pool": len(fnf_run.examples), "min_mask_area": config.data.min_mask_area,
      "eval_examples": len(examples),
      "train_steps": config.train.num_steps, "batch_size": config.data.batch_size,
      "ddim_steps": config.sampling.num_steps, "guidance_scale": config.sampling.guidance_scale,
      "grad_steps": config.train.grad_steps, "beta": config.objective.beta,
      "lora_rank": config.lora.rank, "lr": config.optim.lr,
      "total_seconds": round(time.time() - t0, 1),
  }
  folder = eval_report.write(
      os.path.join(workdir, "report"), result, out, examples,
      {m: os.path.join(runs[m], "metrics.jsonl") for m in runs}, rows=config.eval.grid_rows,
      seed=config.seed, labels=NAMES, title="Focus-N-Fix vs global DRaFT on the toy world")
  print(table_text(result), flush=True)
  logging.info("report: %s", os.path.join(folder, "index.html"))
  return result
