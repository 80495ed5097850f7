"""The `demo` job (configs/toy.py): references, Focus-N-Fix and DRaFT from the same start, the
judge's evaluation on held-out seeds, and WORKDIR/report.

Layout of WORKDIR:
    fnf/     the Focus-N-Fix run (its reference cache, checkpoints, metrics.jsonl, lora)
    draft/   the DRaFT run (the same reference cache, linked)
    report/  index.html, grid.png, metrics.json
A finished run is resumed, not repeated: train() picks up from its checkpoints. The model and
reward are loaded once, each method's step is built once (`train.setup`), and the evaluation
reuses the Focus-N-Fix run's compiled reference and sampler.
"""

import os
import time

from absl import logging

from fnf_jax import eval_job
from fnf_jax import train as train_lib
from fnf_jax.data import examples as examples_lib
from fnf_jax.reference import directory as reference_directory
from fnf_jax.toy import evaluate
from fnf_jax.toy import judge
from fnf_jax.toy import report as report_lib
from fnf_jax.toy.methods import method_config


def _share_cache(source_workdir: str, workdir: str) -> None:
  """Points workdir/reference at the other run's cache (same model, examples, sampling, mask)."""
  os.makedirs(workdir, exist_ok=True)
  link = reference_directory(workdir)
  if not os.path.lexists(link):
    os.symlink(os.path.abspath(reference_directory(source_workdir)), link)


def eval_examples(config) -> list:
  prompts = list(config.prompts.texts)
  return examples_lib.make_examples(prompts, config.eval.seeds_per_prompt,
                                    config.seed + config.eval.seed_offset)


def sample_all(run, loras: dict, examples: list, config) -> dict:
  """Î0 and M of the base model and each LoRA's images and rewards, for every example; numpy.
  The eval job's sampling (fnf_jax/eval_job.py), in the demo's names."""
  out = eval_job.sample(config, run, loras, examples, {"target": run.reward})
  return {"reference": out["reference"], "mask": out["mask"],
          **{f"images_{m}": out[f"images/{m}"] for m in loras},
          **{f"reward_{m}": out[f"score/target/{m}"] for m in ("base", *loras)}}


def run(config, workdir: str) -> dict:
  """The demo job; returns the metrics (also in WORKDIR/report/metrics.json)."""
  t0 = time.time()
  runs = {m: os.path.join(workdir, m) for m in ("fnf", "draft")}
  configs = {m: method_config(config, m) for m in ("fnf", "draft")}
  fnf_run = train_lib.setup(configs["fnf"])
  setups = {"fnf": fnf_run, "draft": train_lib.setup(configs["draft"], base=fnf_run)}
  if config.train.reference == "cache":
    train_lib.cache(configs["fnf"], runs["fnf"], run=fnf_run)
    _share_cache(runs["fnf"], runs["draft"])
  loras, seconds = {}, {}
  for method in ("draft", "fnf"):
    tic = time.time()
    _, loras[method] = train_lib.fit(configs[method], runs[method], run=setups[method])
    seconds[method] = time.time() - tic
    logging.info("%s: trained in %.0f s", method, seconds[method])

  examples = eval_examples(config)
  out = sample_all(fnf_run, loras, examples, config)
  captions = [e.prompt for e in examples]
  metrics = {"base": evaluate.method_metrics(out["reference"], out["reference"], out["mask"],
                                             captions, out["reward_base"])}
  base_verdict = judge.evaluate(out["reference"], captions)
  for method in ("draft", "fnf"):
    metrics[method] = evaluate.method_metrics(
        out[f"images_{method}"], out["reference"], out["mask"], captions,
        out[f"reward_{method}"], base=base_verdict)
    metrics[method]["train_seconds"] = round(seconds[method], 1)
  metrics["setup"] = {
      # The pool; training uses those with data.min_mask_area (the count is in the log).
      "example_pool": len(fnf_run.examples), "min_mask_area": config.data.min_mask_area,
      "eval_examples": len(examples),
      "train_steps": config.train.num_steps, "batch_size": config.data.batch_size,
      "ddim_steps": config.sampling.num_steps, "guidance_scale": config.sampling.guidance_scale,
      "grad_steps": config.train.grad_steps, "beta": config.objective.beta,
      "lora_rank": config.lora.rank, "lr": config.optim.lr,
      "total_seconds": round(time.time() - t0, 1),
  }
  folder = report_lib.write(os.path.join(workdir, "report"), metrics, out, captions,
                            {m: os.path.join(runs[m], "metrics.jsonl") for m in runs},
                            rows=config.eval.grid_rows)
  table = report_lib.table_text(metrics)
  print(table, flush=True)
  logging.info("report: %s", os.path.join(folder, "index.html"))
  return metrics
