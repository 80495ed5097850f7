"""The `demo` job (configs/toy.py): references, Focus-N-Fix and DRaFT from the same start, then
the eval job's evaluation (fnf_jax/jobs/evaluate.py) on held-out seeds, judged by the toy world's
analytic judge, and WORKDIR/report.

Layout of WORKDIR:
    fnf/     the Focus-N-Fix run (its reference cache, checkpoints, metrics.jsonl, lora)
    draft/   the DRaFT run (the same reference cache, linked)
    report/  the eval job's report (fnf_jax/evaluation/report.py): index.html, grid.png,
             metrics.json, ab/
With a sweep (configs/toy.py:sweep) fnf/ trains every member in one run (fnf/sweep/<label>
.safetensors), each member is a method of the evaluation ("fnf:beta=0.1", as the eval job names
it) and the report draws their Pareto front with the base and DRaFT.
A finished run is resumed, not repeated: train() picks up from its checkpoints. The model and
reward are loaded once, each method's step is built once (`fnf.run.setup`), and the evaluation
reuses the Focus-N-Fix run's compiled reference and sampler. The same numbers come from
`--config.job=eval --config.eval.runs='("draft=WORKDIR/draft", "fnf=WORKDIR/fnf")'` on this
config, which reads the LoRAs back from the runs' checkpoints.
"""

import os
import time

from absl import logging

from fnf_jax.config import sweep as sweep_config
from fnf_jax.fnf import sweep as sweep_lib
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


def table_text(result: dict, labels: dict | None = None) -> str:
  return eval_report.table_text(result["methods"], COLUMNS, labels or NAMES)


def _train(config, workdir: str):
  """Caches the references, trains DRaFT and Focus-N-Fix (a sweep's members in one run) and
  returns (the Run to evaluate with, {method: LoRA} in the report's column order, {method: its
  training log as report.write takes it}, {run: training seconds})."""
  runs = {m: os.path.join(workdir, m) for m in ("fnf", "draft")}
  configs = {m: method_config(config, m) for m in ("fnf", "draft")}
  fnf_run = run_lib.setup(configs["fnf"])
  setups = {"fnf": fnf_run, "draft": run_lib.setup(configs["draft"], base=fnf_run)}
  if config.train.reference == "cache":
    cache_job.cache(configs["fnf"], runs["fnf"], run=fnf_run)
    _share_cache(runs["fnf"], runs["draft"])
  trained, seconds = {}, {}
  for method in ("draft", "fnf"):  # also the report's column order
    tic = time.time()
    _, trained[method] = train_lib.fit(configs[method], runs[method], run=setups[method])
    seconds[method] = round(time.time() - tic, 1)
    logging.info("%s: trained in %.0f s", method, seconds[method])
  members = sweep_config.labels(config)
  if not members:
    logs = {m: os.path.join(runs[m], "metrics.jsonl") for m in runs}
    return fnf_run, trained, logs, seconds
  # A sweep: its members' LoRAs are stacked [N, ...]; the evaluation samples one LoRA at a time
  # with the sweep-free config's step (the same models). Named as the eval job names them.
  eval_run = run_lib.setup(sweep_config.member_config(config, {}), base=fnf_run)
  loras = {"draft": trained["draft"]}
  logs = {"draft": os.path.join(runs["draft"], "metrics.jsonl")}
  for i, label in enumerate(members):
    loras[f"fnf:{label}"] = sweep_lib.member(trained["fnf"], i)
    logs[f"fnf:{label}"] = (os.path.join(runs["fnf"], "metrics.jsonl"), label)
  return eval_run, loras, logs, seconds


def names(loras: dict) -> dict:
  """Display names: NAMES, and "FnF beta=0.1" for a sweep's member "fnf:beta=0.1"."""
  return {**NAMES, **{m: "FnF " + m.split(":", 1)[1] for m in loras if m.startswith("fnf:")}}


def run(config, workdir: str) -> dict:
  """The demo job; returns the metrics (also in WORKDIR/report/metrics.json)."""
  t0 = time.time()
  eval_run, loras, logs, seconds = _train(config, workdir)
  examples, categories = eval_job.eval_examples(config, eval_run)
  result, out = eval_job.measure(config, eval_run, loras, examples, categories)
  for method in loras:
    if method in seconds:
      result["methods"][method]["train_seconds"] = seconds[method]
  swept = sweep_config.settings(config)
  result["setup"] = {
      # The pool; training uses those with data.min_mask_area (the count is in the log).
      "example_pool": len(eval_run.examples), "min_mask_area": config.data.min_mask_area,
      "eval_examples": len(examples),
      "train_steps": config.train.num_steps, "batch_size": config.data.batch_size,
      "ddim_steps": config.sampling.num_steps, "guidance_scale": config.sampling.guidance_scale,
      "grad_steps": config.train.grad_steps,
      **({"sweep": swept, "train_seconds": seconds} if swept else
         {"beta": config.objective.beta}),
      "lora_rank": config.lora.rank, "lr": config.optim.lr,
      "total_seconds": round(time.time() - t0, 1),
  }
  title = ("Focus-N-Fix, a sweep over β, vs global DRaFT on the toy world" if swept else
           "Focus-N-Fix vs global DRaFT on the toy world")
  folder = eval_report.write(os.path.join(workdir, "report"), result, out, examples, logs,
                             rows=config.eval.grid_rows, seed=config.seed, labels=names(loras),
                             title=title)
  print(table_text(result, names(loras)), flush=True)
  logging.info("report: %s", os.path.join(folder, "index.html"))
  return result
