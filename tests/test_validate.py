"""Every bad choice or range of a config fails through `python -m fnf_jax.main` within seconds,
before anything is loaded or compiled, with a message naming the key, the value and what is valid.
"""

import concurrent.futures
import os
import subprocess
import sys

import pytest

from fnf_jax.config import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "configs/violence.py:runlocal"
# The real violence config with what a laptop has: tiny models, the shipped PartiPrompts file.
REAL = ("model.path=tiny", "prompts.source=parti", "prompts.path=")

# (config, override, what the message must say)
CASES = [
    # every enumerated field of the training configs
    (TRAIN, "job=bogus", "config.job = 'bogus' is not one of ['cache', 'demo', 'eval', 'eval_reward', 'pretrain', 'sample', 'train', 'train_reward']"),
    (TRAIN, "model.dtype=float16", "config.model.dtype = 'float16' is not one of ('float32', 'bfloat16')"),
    (TRAIN, "model.attention=flash", "config.model.attention = 'flash' is not one of ('auto', 'xla', 'chunked', 'cudnn', 'splash')"),
    (TRAIN, "compile.xla_flags=xla_gpu_autotune_level=0", "config.compile.xla_flags = 'xla_gpu_autotune_level=0': 'xla_gpu_autotune_level=0' is not an XLA flag"),
    (TRAIN, "prompts.source=csv", "config.prompts.source = 'csv' is not one of ('list', 'text', 'parti', 'i2p')"),
    (TRAIN, "train.gradient=bogus", "config.train.gradient = 'bogus' is not one of ('truncated', 'lv', 'full')"),
    (TRAIN, "train.remat_policy=all", "config.train.remat_policy = 'all' is not one of ('nothing_saveable', "),
    (TRAIN, "train.reference=disk", "config.train.reference = 'disk' is not one of ('online', 'cache')"),
    (TRAIN, "objective.mask=zeros", "config.objective.mask = 'zeros' is not one of ('heatmap', 'ones')"),
    (TRAIN, "objective.reward_region=inside", "config.objective.reward_region = 'inside' is not one of ('full', 'mask')"),
    (TRAIN, "objective.constraint_norm=l1", "config.objective.constraint_norm = 'l1' is not one of ('fro', 'fro_squared', 'mean_squared')"),
    (TRAIN, "mask.gate=always", "config.mask.gate = 'always' is not one of ('score', 'peak', 'none')"),
    (TRAIN, "mask.threshold_mode=otsu", "config.mask.threshold_mode = 'otsu' is not one of ('absolute', 'quantile')"),
    (TRAIN, "optim.schedule=linear", "config.optim.schedule = 'linear' is not one of ('constant', 'cosine')"),
    (TRAIN, "cache.dtype=int8", "config.cache.dtype = 'int8' is not one of ('float32', 'float16')"),
    (TRAIN, "reward.name=nope", "config.reward.name = 'nope' is not one of ('clip_score', 'color', 'laion_aesthetic', 'laion_nsfw', 'q16', 'rahf_alignment', 'rahf_plausibility', 'toy_defect', 'zero_shot_safety')"),
    (TRAIN, "reward.name=q16", "config.reward.clip_path is missing: config.reward has no field 'clip_path'"),
    ("configs/violence.py", REAL + ("reward.saliency=lime",), "config.reward.saliency = 'lime' is not one of ('gradxinput', 'gradcam')"),
    ("configs/violence.py", REAL + ("reward.dtype=int8",), "config.reward.dtype = 'int8' is not one of ('float32', 'bfloat16')"),
    # sizes, counts and ranges
    (TRAIN, "seed=-1", "config.seed = -1 is not valid: it must be an integer >= 0"),
    (TRAIN, "data.batch_size=0", "config.data.batch_size = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "data.seeds_per_prompt=0", "config.data.seeds_per_prompt = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "data.min_mask_area=1.5", "config.data.min_mask_area = 1.5 is not valid: it must be a number in [0.0, 1.0]"),
    (TRAIN, "data.prefetch=-1", "config.data.prefetch = -1 is not valid: it must be an integer >= 0"),
    (TRAIN, "mask.gate_threshold=inf", "config.mask.gate_threshold = inf is not valid"),
    (TRAIN, "data.min_mask_area=0.1", "it needs config.train.reference = 'cache', not 'online'"),
    (TRAIN, "prompts.eval_fraction=1.0", "config.prompts.eval_fraction = 1.0 is not valid: it must be a number in [0.0, 1.0)"),
    (TRAIN, "sampling.num_steps=0", "config.sampling.num_steps = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "sampling.guidance_scale=-1.0", "config.sampling.guidance_scale = -1.0 is not valid: it must be a number in [0.0, inf)"),
    (TRAIN, "sampling.eta=2.0", "config.sampling.eta = 2.0 is not valid: it must be a number in [0.0, 1.0]"),
    (TRAIN, "lora.rank=0", "config.lora.rank = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "lora.alpha=0.0", "config.lora.alpha = 0.0 is not valid: it must be a number in (0.0, inf)"),
    (TRAIN, "lora.targets=attn[", "config.lora.targets = 'attn[' is not a valid regex"),
    (TRAIN, "train.num_steps=0", "config.train.num_steps = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "train.grad_steps=5", "config.train.grad_steps = 5 is not valid: it must be an integer in [1, 4]"),
    (TRAIN, "train.lv_copies=0", "config.train.lv_copies = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "objective.reward_weight=0.0", "config.objective.reward_weight = 0.0 is not valid: it must be a number in (0.0, inf)"),
    (TRAIN, "objective.beta=-0.1", "config.objective.beta = -0.1 is not valid: it must be a number in [0.0, inf)"),
    (TRAIN, "objective.gamma=-1.0", "config.objective.gamma = -1.0 is not valid: it must be a number in [0.0, inf)"),
    (TRAIN, "mask.threshold=1.5", "config.mask.threshold = 1.5 is not valid: it must be a number in [0.0, 1.0]"),
    (TRAIN, "mask.dilation=-1", "config.mask.dilation = -1 is not valid: it must be an integer >= 0"),
    (TRAIN, "mask.blur=-1.0", "config.mask.blur = -1.0 is not valid: it must be a number in [0.0, inf)"),
    (TRAIN, "reward.sigma=0.0", "config.reward.sigma = 0.0 is not valid: it must be a number in (0.0, inf)"),
    (TRAIN, "optim.lr=0.0", "config.optim.lr = 0.0 is not valid: it must be a number in (0.0, 1.0]"),
    (TRAIN, "optim.lr=1e30", "config.optim.lr = 1e+30 is not valid: it must be a number in (0.0, 1.0]"),
    (TRAIN, "optim.lr=-0.001", "config.optim.lr = -0.001 is not valid: it must be a number in (0.0, 1.0]"),
    (TRAIN, "optim.warmup_steps=-1", "config.optim.warmup_steps = -1 is not valid: it must be an integer >= 0"),
    (TRAIN, "optim.decay_steps=0", "config.optim.decay_steps = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "optim.b1=1.0", "config.optim.b1 = 1.0 is not valid: it must be a number in [0.0, 1.0)"),
    (TRAIN, "optim.b2=-0.5", "config.optim.b2 = -0.5 is not valid: it must be a number in [0.0, 1.0)"),
    (TRAIN, "optim.weight_decay=-0.1", "config.optim.weight_decay = -0.1 is not valid: it must be a number in [0.0, inf)"),
    (TRAIN, "optim.grad_clip=0.0", "config.optim.grad_clip = 0.0 is not valid: it must be a number in (0.0, inf)"),
    (TRAIN, "optim.grad_accum=0", "config.optim.grad_accum = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "mesh.fsdp=0", "axis sizes must be integers >= 1, with at most one -1"),
    (TRAIN, "mesh.fsdp=3", "config.data.batch_size = 2 is not divisible by the mesh size 3"),
    # against the devices found (8 fake CPU devices here), once the runtime has started
    (TRAIN, "data.batch_size=3", "config.data.batch_size = 3 is not divisible by the mesh size 8 (the devices of all processes"),
    # several processes
    (TRAIN, "distributed.num_processes=-2", "config.distributed.num_processes = -2 is not valid: it must be an integer >= 0"),
    (TRAIN, ("distributed.enabled=True", "distributed.coordinator=10.0.0.2:1234"), "also set --config.distributed.num_processes, --config.distributed.process_id (have coordinator='10.0.0.2:1234', num_processes=0, process_id=-1)"),
    (TRAIN, ("distributed.enabled=True", "distributed.coordinator=10.0.0.2", "distributed.num_processes=2", "distributed.process_id=0"), "config.distributed.coordinator = '10.0.0.2' is not HOST:PORT"),
    (TRAIN, ("distributed.enabled=True", "distributed.coordinator=10.0.0.2:1234", "distributed.num_processes=2", "distributed.process_id=2"), "config.distributed.process_id = 2 is not below config.distributed.num_processes = 2"),
    (TRAIN, "distributed.enabled=True", "no coordinator is configured and this machine is in no cluster JAX detects. Set --config.distributed.coordinator=HOST:PORT"),
    (TRAIN, "checkpoint.every=0", "config.checkpoint.every = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "checkpoint.keep=0", "config.checkpoint.keep = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "cache.shard_size=0", "config.cache.shard_size = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "log.every=0", "config.log.every = 0 is not valid: it must be an integer >= 1"),
    (TRAIN, "log.image_every=-1", "config.log.image_every = -1 is not valid: it must be an integer >= 0"),
    (TRAIN, "model.path=/nonexistent/sd15", "config.model.path = '/nonexistent/sd15': no such folder"),
    (TRAIN, "lora.init=/nowhere/lora.safetensors", "config.lora.init = '/nowhere/lora.safetensors': no such file or folder"),
    ("configs/violence.py", "model.path=", "config.model.path is empty. Get a diffusers-format"),
    ("configs/violence.py", "model.path=tiny", "config.prompts.path = 'data/i2p_benchmark.csv': no such file"),
    # the RAHF rewards: their folders and file, before the diffusion model loads
    ("configs/plausibility.py:runlocal", "reward.max_prompt_tokens=1", "config.reward.max_prompt_tokens = 1 is not valid: it must be an integer >= 2"),
    ("configs/alignment.py:runlocal", "reward.weights=/nowhere/rahf.safetensors", "config.reward.vit_path is empty. Get the ViT that RAHF was fine-tuned from"),
    ("configs/alignment.py:runlocal", ("reward.weights=/nowhere/rahf.safetensors", "reward.vit_path=tests", "reward.t5_path=tests"), "config.reward.weights = '/nowhere/rahf.safetensors': no such file"),
    # the sample job
    ("configs/sample.py:runlocal", "seeds=()", "config.seeds = () is not valid: it must be a non-empty tuple"),
    ("configs/sample.py:runlocal", "batch_size=0", "config.batch_size = 0 is not valid: it must be an integer >= 1"),
    ("configs/sample.py:runlocal", "prompts.split=test", "config.prompts.split = 'test' is not one of ('train', 'eval', 'all')"),
    ("configs/sample.py:runlocal", "sampling.num_steps=0", "config.sampling.num_steps = 0 is not valid"),
    ("configs/sample.py:runlocal", "model.lora=/nowhere/run", "config.model.lora = '/nowhere/run': no such file or folder"),
    # the toy world's jobs
    ("configs/toy.py:runlocal", "eval.seeds_per_prompt=0", "config.eval.seeds_per_prompt = 0 is not valid: it must be an integer >= 1"),
    ("configs/toy.py:runlocal", "draft.objective.reward_region=all", "the DRaFT run (config.draft applied): config.objective.reward_region = 'all' is not one of ('full', 'mask')"),
    ("configs/toy_pretrain.py:runlocal", "vae.steps=0", "config.vae.steps = 0 is not valid: it must be an integer >= 1"),
    ("configs/toy_pretrain.py:runlocal", "unet.ema_decay=1.0", "config.unet.ema_decay = 1.0 is not valid: it must be a number in [0.0, 1.0)"),
    ("configs/toy_pretrain.py:runlocal", "defect_rate=2.0", "config.defect_rate = 2.0 is not valid: it must be a number in [0.0, 1.0]"),
    ("configs/toy_pretrain.py:runlocal", "reward.lr=0.0", "config.reward.lr = 0.0 is not valid: it must be a number in (0.0, inf)"),
]


def _overrides(case) -> tuple[str, ...]:
  return (case[1],) if isinstance(case[1], str) else case[1]


def _run(index, case, tmp_path):
  workdir = os.path.join(tmp_path, f"case_{index}")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # -X importtime lists every module the process imported (on stderr): what it loaded.
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fnf_jax.main",
                         f"--config={case[0]}", f"--workdir={workdir}",
                         *[f"--config.{o}" for o in _overrides(case)]],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  return proc, imported, workdir


# Nothing slow may come before a bad value's message. A static check (fnf_jax/config/validate.py)
# fails before jax is imported; one that needs the devices (fnf_jax/runtime/preflight.py: the
# batch against the mesh, the cluster) before any model, optimizer or checkpointer is.
STATIC_HEAVY = {"jax", "flax", "optax", "orbax", "tensorflow", "fnf_jax.models"}
PREFLIGHT_HEAVY = {"optax", "orbax", "tensorflow", "fnf_jax.models", "fnf_jax.jobs.train"}
PREFLIGHT = ("config.data.batch_size = 3 is not divisible", "no coordinator is configured")


def test_every_bad_value_fails_fast_with_key_value_and_valid_values(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda ic: _run(*ic, str(tmp_path)), enumerate(CASES)))
  for case, (proc, imported, workdir) in zip(CASES, results):
    where, message = f"{case[0]} {' '.join(_overrides(case))}", case[2]
    assert proc.returncode == 2, (where, proc.stderr[-2000:])
    assert "FATAL: " in proc.stderr and message in proc.stderr, (where, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, where
    heavy = PREFLIGHT_HEAVY if message.startswith(PREFLIGHT) else STATIC_HEAVY
    assert not heavy & imported, (where, sorted(heavy & imported))
    assert not os.path.exists(workdir), where  # nothing was written


def test_the_configs_as_shipped_are_valid():
  import importlib.util  # pylint: disable=import-outside-toplevel

  for name, arg in (("violence", "runlocal"), ("oversexualization", "runlocal"),
                    ("plausibility", "runlocal"), ("alignment", "runlocal"), ("draft", "runlocal"),
                    ("toy", None),
                    ("toy", "runlocal"), ("toy_pretrain", None), ("toy_pretrain", "runlocal"),
                    ("sample", "runlocal")):
    spec = importlib.util.spec_from_file_location(f"c_{name}", f"{ROOT}/configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    validate.validate(module.get_config(arg))


def test_a_missing_field_is_named():
  import ml_collections  # pylint: disable=import-outside-toplevel

  with pytest.raises(validate.ConfigError, match=r"config.train.gradient is missing: "
                     r"config.train has no field 'gradient'"):
    validate.training(ml_collections.ConfigDict(
        {"seed": 0, "distributed": {"enabled": False, "coordinator": "", "num_processes": 0,
         "process_id": -1}, "compile": {"cache_dir": "", "min_compile_secs": 1.0,
         "xla_flags": ""}, "model": {"path": "tiny", "dtype": "float32",
         "attention": "xla", "unet_remat": False, "vae_remat": False}, "prompts": {"source": "list", "texts": ("a",),
         "eval_fraction": 0.0}, "data": {"batch_size": 1, "seeds_per_prompt": 1,
         "min_mask_area": 0.0, "prefetch": 0}, "sampling": {"num_steps": 1, "guidance_scale": 1.0,
         "negative_prompt": "", "eta": 0.0}, "lora": {"rank": 1, "alpha": 1.0, "targets": "x"},
         "train": {"num_steps": 1}}))


# Numeric fields where 0 or -1 means something (the config files document each): everything
# else must be refused at those values.
MEANINGFUL = {
    0: {"data.min_mask_area",  # no area filter
        "compile.min_compile_secs",  # every program cached
        "data.prefetch",  # batches built on the training thread
        "distributed.num_processes", "distributed.process_id",  # detected from the cluster
        "log.image_every", "mask.blur", "mask.dilation", "mask.threshold",
        "mask.gate_threshold",  # a score gate at 0 (rewards may be negative)
        "objective.beta", "objective.gamma", "draft.objective.beta", "draft.objective.gamma",
        "optim.b1", "optim.b2", "optim.warmup_steps", "optim.weight_decay",
        "prompts.eval_fraction", "sampling.eta", "sampling.guidance_scale",
        "seed", "data_seed", "eval.seed_offset", "defect_rate", "eval.guidance_scale",
        "eval.max_prompts",  # every held-out prompt
        "eval.judge_threshold",  # rewards may be negative
        "reward.warmup_steps", "reward.weight_decay", "unet.caption_dropout", "unet.ema_decay",
        "unet.warmup_steps", "unet.weight_decay", "vae.defect_rate", "vae.defect_weight",
        "vae.kl_weight", "vae.min_defect_recall", "vae.warmup_steps", "vae.weight_decay"},
    -1: {"distributed.process_id",  # detected from the cluster
         "mesh.data", "mesh.fsdp",  # "the rest of the devices"
         "mask.gate_threshold", "eval.judge_threshold"},
}


def _numeric_leaves(node, prefix=""):
  for key in node.keys():
    value = node[key]
    if hasattr(value, "keys"):
      yield from _numeric_leaves(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}{key}", node, key
    elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
      yield f"{prefix}{key}", node, key


def test_counts_rates_and_seeds_out_of_range_are_refused():
  import copy  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel

  accepted = []
  for name, arg in (("violence", "runlocal"), ("toy", None), ("toy_pretrain", None),
                    ("sample", "runlocal")):
    spec = importlib.util.spec_from_file_location(f"c_{name}", f"{ROOT}/configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.get_config(arg)
    for key, _, _ in list(_numeric_leaves(base)):
      original = eval(f"base.{key}")  # pylint: disable=eval-used
      bad_values = [(), (1.5,)] if isinstance(original, tuple) else [0, -1]
      for bad in bad_values:
        if not isinstance(bad, tuple) and key in MEANINGFUL[bad]:
          continue
        config = copy.deepcopy(base)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
          node = node[p]
        with config.unlocked():
          node[leaf] = bad if not isinstance(original, float) or isinstance(bad, tuple) \
              else float(bad)
        try:
          validate.validate(config)
          accepted.append(f"{name}: {key} = {bad!r}")
        except validate.ConfigError as e:
          assert key.split(".")[-1] in str(e), (name, key, str(e))
  assert not accepted, "\n".join(accepted)
