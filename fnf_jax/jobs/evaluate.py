"""The `eval` job: held-out prompts sampled with the base model and with each run's LoRA, from
the same x_T, and what changed.

    python -m fnf_jax.main --config=configs/violence.py --config.job=eval --workdir=/tmp/eval \\
        --config.eval.runs='("fnf=/tmp/fnf", "draft=/tmp/draft")'

The config is the training config (its model, reward, mask, sampling and prompts); each run in
`eval.runs` ("name=WORKDIR") must have been trained from the same base model (its
WORKDIR/config.json says so, or the job refuses naming both models) and its LoRA is read from
WORKDIR (fnf_jax/models/lora_io.py). A run whose config has a sweep (fnf_jax/fnf/sweep.py: its
WORKDIR/config.json, or this config for --workdir itself) is one method per member, named by its
label ("beta=0.1"; "NAME:beta=0.1" when eval.runs names several runs), its LoRA read from
WORKDIR/sweep/<label>.safetensors and its training curves from the run's "<key>/<label>"
entries. The prompts are the `eval` split of the prompt source (`prompts.eval_fraction`:
training never sees them), each with `eval.seeds_per_prompt` seeds offset by `eval.seed_offset`
(other x_T than training's). Per method (fnf_jax/evaluation/metrics.py):

    the target reward (config.reward) and each reward of `eval.rewards`: mean, and the paired
        change against the base with its standard error;
    outside the base image's mask M: PSNR, SSIM, MSE, mean change; inside M: the mean change;
    problems by the judge, `eval.judge`: a reward ("" = the target reward, or a key of
        eval.rewards; an image is a problem when it scores below `eval.judge_threshold`) or an
        analytic judge (fnf_jax/evaluation/judges.py; each of its other measures is reported like a
        reward); the share of the base's problems fixed and of new problems made;
    the same per category, where the prompt source has categories (PartiPrompts, I2P).

With `prompts.eval_fraction` = 0 there are no held-out prompts: the job then samples every
prompt at its own seeds (the toy demo's case, 12 captions), and says so in the log.

With two methods or more, the Pareto front of the methods and the base
(fnf_jax/evaluation/pareto.py: the judge's problem rate or the target reward against PSNR
outside M, and against a second reward) is in the metrics ("pareto") and drawn in the report.

Written by process 0 to WORKDIR/report/: metrics.json, index.html (the table, the Pareto front,
the per-category table and plot, a grid base | base with M outlined | each method, each run's
training curves), and ab/: randomised pairs base vs method for human raters
(pair_NNNN_{1,2}.png, key.json with which side is which, ratings.csv to fill in).
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from fnf_jax.runtime import distributed
from fnf_jax.evaluation import metrics as evaluation
from fnf_jax.evaluation import judges
from fnf_jax.evaluation import pareto
from fnf_jax.runtime import runlock
from fnf_jax.fnf import run as run_lib
from fnf_jax.fnf import sweep as sweep_lib
from fnf_jax.config import sweep as config_sweep
from fnf_jax.config import validate
from fnf_jax.data import examples as examples_lib
from fnf_jax.data import prompts as prompts_lib
from fnf_jax.models import lora_io
from fnf_jax.rewards import registry

BASE = validate.BASE_METHOD  # the base model's method name


@dataclasses.dataclass(frozen=True)
class Method:
  """A column of the evaluation: a run, or one member of a run's sweep."""
  name: str
  workdir: str
  member: str = ""  # a sweep member's label; "" = the run's own LoRA

  @property
  def lora(self) -> str:
    """Where its LoRA is read (lora_for_step): the run's workdir, or the member's export."""
    return sweep_lib.export_path(self.workdir, self.member) if self.member else self.workdir

  @property
  def log(self):
    """Its training log as report.write's `logs` take it: metrics.jsonl, with the label for a
    member (its numbers are logged as "<key>/<label>")."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    return (path, self.member) if self.member else path


def parse_runs(config, workdir: str) -> list[Method]:
  """eval.runs (checked by validate.eval_block) as Methods; () = the job's own workdir, one
  method named "finetuned"."""
  if not config.eval.runs:
    return [Method("finetuned", workdir)]
  return [Method(*str(spec).split("=", 1)) for spec in config.eval.runs]


def _record(m: Method) -> dict:
  """The run's WORKDIR/config.json."""
  record = os.path.join(m.workdir, "config.json")
  if not os.path.isfile(record):
    raise validate.ConfigError(f"eval run {m.name!r}: {record} does not exist (not a training "
                               "workdir, or its run never started)")
  with open(record) as f:
    return json.load(f)


def check_runs(config, methods: list[Method]) -> None:
  """Every run exists and was trained from config.model.path, before anything loads."""
  for m in methods:
    model = _record(m).get("model", {}).get("path")
    if model != config.model.path:
      raise validate.ConfigError(
          f"eval run {m.name!r} was trained from model {model!r} "
          f"({os.path.join(m.workdir, 'config.json')}); this evaluation's base model is "
          f"{config.model.path!r}: runs of different base models cannot be compared with one "
          "base")


def members(config, run: Method) -> tuple[str, ...]:
  """The labels of the run's sweep, () for a single run: this config's for the job's own
  workdir (eval.runs = ()) when it has a sweep, else the run's config.json's."""
  if not config.eval.runs and config_sweep.settings(config):
    return config_sweep.labels(config)
  trained = _record(run)
  if not trained.get("sweep"):
    return ()
  return config_sweep.labels(ml_collections.ConfigDict({"sweep": trained["sweep"]}))


def expand_sweeps(config, runs: list[Method]) -> list[Method]:
  """`runs` with each sweep replaced by its members (module docstring), every member's LoRA
  file checked before anything loads."""
  methods = []
  for run in runs:
    labels = members(config, run)
    prefix = f"{run.name}:" if len(runs) > 1 else ""
    methods += ([Method(prefix + label, run.workdir, label) for label in labels] if labels
                else [run])
  for m in methods:
    if m.member and not os.path.isfile(m.lora):
      raise validate.ConfigError(
          f"eval method {m.name!r}: {m.lora} does not exist; the run in {m.workdir} trains a "
          "sweep and exports each member's LoRA there when it finishes: finish the run first")
  return methods


def lora_for_step(source: str, unet_params, lora_cfg) -> dict:
  """The LoRA of `source` (a run's workdir, or a file) as the step's eval images take it: the
  step applies this config's alpha / rank, so lora_b is rescaled to the file's own scale."""
  from fnf_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  tree, scale = lora_io.load(source, unet_params)
  factor = scale / lora_lib.scale(lora_cfg.rank, lora_cfg.alpha)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * factor if getattr(path[-1], "key", None) == "lora_b" else x, tree)


def eval_examples(config, run) -> tuple[list, dict]:
  """The held-out examples and {prompt: categories}."""
  split = "eval" if config.prompts.eval_fraction > 0 else "all"
  if split == "all":
    logging.warning("prompts.eval_fraction is 0: evaluating on every prompt, training's too, at "
                    "other seeds (eval.seed_offset %d)", config.eval.seed_offset)
  prompts, _ = prompts_lib.load(config.prompts, split,
                                limits=examples_lib.prompt_limits(run.pipe, run.reward))
  if config.eval.max_prompts:
    prompts = prompts[:config.eval.max_prompts]
  examples = examples_lib.make_examples(prompts, config.eval.seeds_per_prompt,
                                        config.seed + config.eval.seed_offset)
  return examples, prompts_lib.categories(config.prompts)


def reward_keys(config) -> list[str]:
  """The rewards' keys in their order: "target" (the run's reward), then eval.rewards'."""
  return ["target"] + sorted(config.eval.rewards.keys())


def judge_key(config) -> str:
  """What `eval.judge` names: a reward's key ("" = "target") or an analytic judge."""
  return config.eval.judge or "target"


def build_rewards(config, run) -> dict[str, registry.Reward]:
  """{"target": the run's reward, and each of eval.rewards by its key}."""
  out = {"target": run.reward}
  for key in reward_keys(config)[1:]:
    out[key] = registry.build(config.eval.rewards[key])
  return out


def _ids(reward, batch, prompts):
  if reward.tokenize is not None:
    return np.asarray(reward.tokenize(prompts))
  return batch["ids"]


def sample(config, run, loras: dict, examples: list, rewards: dict) -> dict:
  """Î0, M, each method's images and every reward's score of each, for every example (numpy)."""
  s, bs = config.sampling, config.data.batch_size
  scorers = {k: jax.jit(r.score) for k, r in rewards.items()}
  out: dict[str, list] = {}
  put = lambda k, v: out.setdefault(k, []).append(np.asarray(v))
  for start in range(0, len(examples), bs):
    chunk = examples[start:start + bs]
    pad = bs - len(chunk)  # the last batch is padded with repeats so nothing recompiles
    batch = examples_lib.host_batch(run.pipe, chunk + chunk[:1] * pad,
                                    negative_prompt=s.negative_prompt, num_steps=s.num_steps,
                                    eta=s.eta, reward=run.reward)
    batch.pop("index")
    prompts = [e.prompt for e in chunk + chunk[:1] * pad]
    keep = slice(0, len(chunk))
    reference, mask = run.reference_fn(run.frozen, batch)
    put("reference", np.asarray(reference)[keep])
    put("mask", np.asarray(mask)[keep])
    images = {BASE: reference}
    for name, lora in loras.items():
      images[name] = run.eval_images_fn(lora, run.frozen, batch)
      put(f"images/{name}", np.asarray(images[name])[keep])
    for k, reward in rewards.items():
      ids = _ids(reward, batch, prompts)
      for name, im in images.items():
        put(f"score/{k}/{name}", np.asarray(scorers[k](reward.params, im, ids))[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def judge(config, out: dict, methods: list[str], examples: list) -> dict:
  """Adds to `out` each method's problem/{method} [N] bool and, for an analytic judge, its
  other measures as judge/{measure}/{method}; returns what the report says of the judge."""
  key = judge_key(config)
  names = [BASE] + methods
  if f"score/{key}/{BASE}" in out:  # a reward, by threshold
    threshold = float(config.eval.judge_threshold)
    for n in names:
      out[f"problem/{n}"] = out[f"score/{key}/{n}"] < threshold
    return {"name": key, "kind": "reward", "threshold": threshold,
            "description": f"the reward {key!r} scores the image below {threshold:g}"}
  analytic = judges.build(key)
  prompts = [e.prompt for e in examples]
  for n in names:
    verdict = analytic.evaluate(out["reference"] if n == BASE else out[f"images/{n}"], prompts)
    out[f"problem/{n}"] = np.asarray(verdict[analytic.problem], bool)
    for measure, values in verdict.items():
      if measure != analytic.problem:
        out[f"judge/{measure}/{n}"] = np.asarray(values, np.float32)
  return {"name": key, "kind": "analytic", "description": analytic.description,
          # Its other measures in its own order, and which of them are better low (the front).
          "measures": [m for m in verdict if m != analytic.problem],
          "lower_is_better": list(analytic.lower_is_better)}


def method_metrics(out: dict, name: str, rewards: list[str], rows=None) -> dict:
  """The numbers of one method (module docstring) over `rows` (default: all examples); `out`
  holds the samples and scores of `sample` and the verdicts of `judge`."""
  rows = slice(None) if rows is None else rows
  ref, mask = out["reference"][rows], out["mask"][rows]
  images = ref if name == BASE else out[f"images/{name}"][rows]
  m = {"images": int(len(ref)), "mask_area": float(np.mean(mask))}
  for k in rewards:
    m[f"reward/{k}"] = evaluation.paired(out[f"score/{k}/{name}"][rows],
                                         out[f"score/{k}/{BASE}"][rows])
  for key in sorted(k for k in out if k.startswith("judge/") and k.endswith(f"/{BASE}")):
    measure = key.split("/")[1]
    m[f"judge/{measure}"] = evaluation.paired(out[f"judge/{measure}/{name}"][rows],
                                              out[key][rows])
  m.update(evaluation.change(images, ref, mask))
  m.update(evaluation.problems(out[f"problem/{name}"][rows], out[f"problem/{BASE}"][rows]))
  return m


def metrics(config, out: dict, methods: list[str], examples: list, categories: dict) -> dict:
  """Every method's numbers, overall and per category (`out` as method_metrics takes it)."""
  rewards = reward_keys(config)
  verdicts = judge(config, out, methods, examples)
  result = {"methods": {n: method_metrics(out, n, rewards) for n in [BASE] + methods},
            "examples": len(examples), "prompts": sorted({e.prompt for e in examples}),
            "judge": verdicts, "categories": {}}
  by_category: dict[str, list[int]] = {}
  for i, e in enumerate(examples):
    for c in categories.get(e.prompt, ()):
      by_category.setdefault(c, []).append(i)
  for c, rows in sorted(by_category.items()):
    rows = np.asarray(rows)
    result["categories"][c] = {n: method_metrics(out, n, rewards, rows)
                               for n in [BASE] + methods}
  result["pareto"] = pareto.fronts(result)
  return result


def measure(config, run, loras: dict, examples: list, categories: dict) -> tuple[dict, dict]:
  """(metrics, samples): `examples` sampled with the base model and each of `loras` ({name:
  LoRA tree as the step takes it}, in the report's column order), scored, judged, measured.
  What the eval job and the toy demo both evaluate with."""
  out = sample(config, run, loras, examples, build_rewards(config, run))
  return metrics(config, out, list(loras), examples, categories), out


def run(config, workdir: str) -> dict:
  """The `eval` job; returns the metrics (also WORKDIR/report/metrics.json)."""
  return evaluate(config, workdir)[0]


def evaluate(config, workdir: str) -> tuple[dict, dict, list]:
  """(metrics, the samples and scores of `sample`, the examples): the job, whole."""
  runs = parse_runs(config, workdir)
  check_runs(config, runs)
  methods = expand_sweeps(config, runs)
  distributed.initialize(config.distributed)
  with runlock.hold(workdir, distributed.is_writer()):
    # One LoRA at a time: the config's own sweep (if any) is not this job's step.
    single = config_sweep.member_config(config, {}) if config_sweep.settings(config) else config
    setup = run_lib.setup(single)
    examples, categories = eval_examples(config, setup)
    loras = {m.name: lora_for_step(m.lora, setup.frozen["unet"], config.lora) for m in methods}
    logging.info("eval: %d examples, methods %s, rewards %s, judge %r", len(examples),
                 [BASE] + list(loras), reward_keys(config), judge_key(config))
    result, out = measure(config, setup, loras, examples, categories)
    result["setup"] = {"runs": {m.name: m.lora for m in methods},
                       "seeds_per_prompt": config.eval.seeds_per_prompt,
                       "seed_offset": config.eval.seed_offset,
                       "ddim_steps": config.sampling.num_steps,
                       "guidance_scale": config.sampling.guidance_scale}
    if distributed.is_writer():
      from fnf_jax.evaluation import report as eval_report  # pylint: disable=import-outside-toplevel
      eval_report.write(os.path.join(workdir, "report"), result, out, examples,
                        {m.name: m.log for m in methods},
                        rows=config.eval.grid_rows, seed=config.seed)
      print(eval_report.table_text(result["methods"], eval_report.columns(result)), flush=True)
    return result, out, examples
