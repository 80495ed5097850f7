"""The shared Focus-N-Fix training config. violence.py, oversexualization.py, plausibility.py,
alignment.py and toy.py start from `base_config` and change the reward, the prompts and the mask
(draft.py from violence.py); rahf.py, sample.py and toy_pretrain.py take its blocks (`layout`,
`compile_config`, `distributed_config`, ...). Every field is documented here.

Not a run of its own: use one of those files (their docstrings hold the exact commands).
"""

import ml_collections

from fnf_jax.config import choices


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # train | cache (compute the reference Î0, M of every example first) | eval (the trained LoRA
  # against the base: fnf_jax/jobs/evaluate.py). Sampling is configs/sample.py's job.
  c.job = "train"
  c.seed = 0  # seeds LoRA init, the data order and (with the prompt index) every example's x_T.
  c.distributed = distributed_config()
  c.compile = compile_config()

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # diffusers-format folder; "tiny" = random tiny models (wiring runs only).
  c.model.dtype = "bfloat16"  # compute dtype of the frozen models: float32 | bfloat16.
  # The attention kernel, chosen per layer from its shapes, dtype and backend, forward and under
  # grad (fnf_jax/models/attention/choice.py): auto = cuDNN's fused kernel on NVIDIA GPUs and
  # Pallas splash on TPUs where they can serve, else chunked XLA (the [T, T] logits of SD's
  # 4096-token self-attention never exist whole) or plain XLA. Or name one: xla | chunked |
  # cudnn | splash (a layer the named kernel cannot take falls back, logged once).
  c.model.attention = "auto"
  # Recompute each UNet block in the backward pass of the gradient steps, and each VAE decoder
  # block in the reward's backward pass at full resolution: what lets SD1.5 at 512² train on
  # a 16 GiB chip (BENCHMARKS.md, memory).
  c.model.unet_remat = True
  c.model.vae_remat = True
  # A LoRA applied to the UNet by the jobs that sample the model (sample, evaluation): a file or
  # a run's workdir (fnf_jax/models/lora_io.py); "" = none. Training ignores it: to start
  # training from a LoRA, set lora.init.
  c.model.lora = ""

  # Prompts: see fnf_jax/data/prompts.py. Each prompt is used with data.seeds_per_prompt seeds.
  c.prompts = ml_collections.ConfigDict()
  c.prompts.source = "parti"  # list | text | parti | i2p
  c.prompts.path = ""  # the prompt file
  c.prompts.texts = ()  # for source=list
  c.prompts.categories = ()  # parti: Category values; i2p: categories (violence, sexual, ...)
  c.prompts.eval_fraction = 0.1  # share of prompts held out for evaluation (by text hash)
  # parti / i2p are read through TFDS builders (fnf_jax/data/prompt_datasets.py) built from
  # prompts.path: "" builds into a temporary folder deleted after reading (under a second; each
  # host its own); a folder builds there once (process 0; all hosts must see it) and is reused.
  c.prompts.data_dir = ""

  c.data = ml_collections.ConfigDict()
  # The global batch (images per step, all processes together); divisible by the device count.
  # Each device holds batch_size / devices examples, and each process prepares (tokens, x_T)
  # and reads (cached Î0, M) only the rows of its own devices.
  c.data.batch_size = 4
  c.data.seeds_per_prompt = 1  # examples per prompt (different x_T)
  # > 0: train only on examples whose cached mask M covers at least this fraction of the image
  # (the reward found a problem there); the others would contribute the constraint alone.
  c.data.min_mask_area = 0.0
  # Host batches (tokens, x_T, cached Î0 and M) built ahead by a background thread while the
  # devices compute the current step; 0 builds each when it is needed.
  c.data.prefetch = 2

  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_steps = 50  # DDIM steps, for the reference and the fine-tuned samples alike
  c.sampling.guidance_scale = 7.5  # CFG at every step (<= 1: no guidance)
  c.sampling.negative_prompt = ""
  c.sampling.eta = 0.0  # DDIM eta; > 0 uses per-example sampler noise shared with Î0

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 64  # the paper's rank
  c.lora.alpha = 64.0  # scale = alpha / rank
  c.lora.targets = r"attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"  # regex over UNet param paths
  # The LoRA training starts from: "" = a fresh one (B = 0: step 0 is the base model); or a file
  # or a run's workdir (fnf_jax/models/lora_io.py: ours, diffusers' / peft's). Its rank and
  # layers must be lora.rank's and lora.targets'; its A and B are taken as stored and
  # lora.alpha sets the scale (the file's alpha is logged). A resume may not change it.
  c.lora.init = ""

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2000  # optimizer micro-steps
  c.train.gradient = "truncated"  # truncated (DRaFT-K) | lv (DRaFT-LV) | full
  c.train.grad_steps = 2  # K for "truncated" (the paper: 2)
  c.train.lv_copies = 2  # n re-noised copies for "lv"
  c.train.remat_policy = "nothing_saveable"  # see fnf_jax/diffusion/sampling.py REMAT_POLICIES
  # cache: Î0 and M read from WORKDIR/reference (computed first when missing, or ahead with
  # job=cache) | online: sampled every step (twice the FLOPs).
  c.train.reference = "cache"

  # The objective (fnf_jax/fnf/objective.py). DRaFT: objective.mask="ones", beta=gamma=0.
  c.objective = ml_collections.ConfigDict()
  c.objective.mask = "heatmap"  # heatmap (M from the reward's heatmap of Î0) | ones (M ≡ 1)
  c.objective.reward_region = "mask"  # mask (reward gradients only inside M) | full (paper's r(Î))
  c.objective.reward_weight = 1.0
  c.objective.beta = 0.01  # weight of ‖(1 − M) ⊙ (Î − Î0)‖ (the paper leaves it open)
  c.objective.constraint_norm = "fro"  # fro (unsquared, the paper) | fro_squared | mean_squared
  c.objective.gamma = 0.0  # weight of the latent ε-difference outside the mask (DRaFT+-style)

  # A sweep (fnf_jax/fnf/sweep.py): values of objective.beta / gamma / reward_weight to train
  # side by side in one compiled step, one LoRA per setting, sharing the frozen models, the
  # reference cache, the examples, x_T and the step keys (each member follows the path of a
  # separate run of its setting). Empty tuples: a single run with the objective's values.
  # combine: product (every combination) | zip (the i-th values together; equal lengths).
  # A mesh axis named "sweep" (e.g. config.mesh = {"sweep": 2, "data": -1, "fsdp": 1}) shards
  # the members over its devices; without it every device holds all of them. The LoRAs go to
  # WORKDIR/sweep/<values>.safetensors; the eval job reports every member and the Pareto front.
  # mask.threshold cannot be swept: the reference cache keeps the thresholded M, not the heatmap.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.beta = ()
  c.sweep.gamma = ()
  c.sweep.reward_weight = ()
  c.sweep.combine = "product"

  # Heatmap -> mask (fnf_jax/rewards/masks.py).
  c.mask = ml_collections.ConfigDict()
  c.mask.threshold = 0.9  # absolute value, or quantile in [0, 1]
  c.mask.threshold_mode = "quantile"  # absolute | quantile
  c.mask.dilation = 16  # pixels added around the thresholded region
  c.mask.blur = 4.0  # Gaussian sigma in pixels for soft edges (0: binary mask)
  # The problem gate: an image the reward finds nothing wrong with gets an empty mask, so it is
  # not "fixed" and data.min_mask_area can drop it (a quantile threshold alone marks the top
  # share of every heatmap). score | peak | none (see fnf_jax/rewards/masks.py).
  c.mask.gate = "score"
  # score: problematic below this. 0.5 is the decision boundary of the safety classifiers'
  # score p(safe) (Q16, LAION NSFW, zero-shot); peak: problematic when the heatmap reaches it.
  c.mask.gate_threshold = 0.5

  c.reward = color_reward((0.6, 0.0, 0.0))  # each real config sets its own (see below)

  c.optim = optim_config(lr=2e-4, schedule="constant", warmup_steps=100, decay_steps=2000,
                         weight_decay=0.1)  # DRaFT's weight decay
  layout(c)
  c.checkpoint = checkpoint_config(every=200, keep=3)

  c.cache = ml_collections.ConfigDict()
  c.cache.shard_size = 256  # examples per reference-cache shard
  c.cache.dtype = "float32"  # storage of Î0 and M: float32 (exact) | float16 (half the disk)

  # The eval job (fnf_jax/jobs/evaluate.py, --config.job=eval): the held-out prompts sampled with
  # the base model and with each run's LoRA from the same x_T; report in WORKDIR/report.
  c.eval = ml_collections.ConfigDict()
  c.eval.runs = ()  # ("NAME=WORKDIR", ...) of runs of this config; () = --workdir itself
  c.eval.seeds_per_prompt = 4
  c.eval.seed_offset = 1_000_000  # eval x_T come from seed + this: other noise than training's
  c.eval.max_prompts = 0  # the first N held-out prompts (0 = all of them)
  # Other aspects, each a reward block (like c.reward) under a key of your choice, e.g.
  # c.eval.rewards.aesthetic = clip_reward("laion_aesthetic", ...): each is reported beside the
  # target reward, so a fix that costs another aspect shows.
  c.eval.rewards = ml_collections.ConfigDict()
  # What says which images are problems: "" = c.reward, a key of c.eval.rewards (either: an
  # image is a problem when it scores below eval.judge_threshold), or an analytic judge's name
  # (fnf_jax/evaluation/judges.py: "toy" knows the toy world's rules; its other measures are reported too).
  c.eval.judge = ""
  c.eval.judge_threshold = 0.0
  c.eval.grid_rows = 8  # examples in the report's grid (the base's largest masks first)

  c.log = ml_collections.ConfigDict()
  c.log.every = 10  # steps between console lines / scalar writes
  c.log.image_every = 200  # steps between TensorBoard panels Î0 | mask | Î (0: never)
  c.log.tensorboard = True
  return c


def optim_config(*, lr: float, schedule: str, warmup_steps: int, decay_steps: int,
                 weight_decay: float) -> ml_collections.ConfigDict:
  """The optimizer block (fnf_jax/runtime/optimizer.py), shared with configs/rahf.py."""
  o = ml_collections.ConfigDict()
  o.lr = lr
  o.schedule = schedule  # constant | cosine (after warm-up)
  o.warmup_steps = warmup_steps
  o.decay_steps = decay_steps  # cosine: step at which the rate reaches 0
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = weight_decay
  o.grad_clip = 1.0  # global-norm clipping
  o.grad_accum = 1  # micro-steps per optimizer update
  return o


def layout(c: ml_collections.ConfigDict) -> None:
  """Mesh axes (sizes; one may be -1 = the rest) and logical -> mesh axis rules."""
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.sharding_rules = choices.SHARDING_RULES  # fnf_jax/config/choices.py says what they do


def checkpoint_config(*, every: int, keep: int) -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict()
  k.every = every  # steps between checkpoints (and at the end / on SIGTERM)
  k.keep = keep  # newest checkpoints kept
  return k


def compile_config() -> ml_collections.ConfigDict:
  """Compiling (fnf_jax/runtime/compilation.py): the persistent compilation cache and XLA flags.

  With the cache, a second run of the same config (a resume, a restart after preemption, the
  next run of a sweep) loads the step from disk: its log says "(cache hit)".
  """
  k = ml_collections.ConfigDict()
  # "auto": WORKDIR/../jax_cache for a local (or gcsfuse-mounted) workdir, so runs in one
  # folder share it; ~/.cache/fnf_jax/jax ($XDG_CACHE_HOME) for a gs:// workdir. "" = off.
  k.cache_dir = "auto"
  k.min_compile_secs = 1.0  # programs that compile faster than this are not cached
  # Appended to XLA_FLAGS before JAX starts. To compile faster on GPUs at some cost in speed:
  # "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false" (README, Compile time).
  k.xla_flags = ""
  return k


def distributed_config() -> ml_collections.ConfigDict:
  """Several processes (TPU pod slices, multi-node GPU jobs; fnf_jax/runtime/distributed.py).

  Every process runs the same command. On TPU pods, GKE TPU jobs, SLURM and Open MPI leave the
  last three fields empty / 0 / -1: jax.distributed.initialize detects the cluster. Elsewhere
  give all three (process_id differs per process). On the CPU the code itself switches on the
  gloo collectives that multi-process CPU runs need.
  """
  d = ml_collections.ConfigDict()
  d.enabled = False
  d.coordinator = ""  # HOST:PORT of process 0
  d.num_processes = 0
  d.process_id = -1
  return d


def color_reward(color) -> ml_collections.ConfigDict:
  """`color`: analytic, penalises pixels near `color` (fnf_jax/rewards/color.py). No weights."""
  r = ml_collections.ConfigDict()
  r.name = "color"
  r.color = tuple(color)  # RGB in [0, 1] to remove
  r.sigma = 0.25  # width of the colour match
  return r


def clip_reward(name: str, weights: str = "") -> ml_collections.ConfigDict:
  """A CLIP-based reward (q16 | laion_nsfw | laion_aesthetic | clip_score | zero_shot_safety)
  with every field its code reads (the code has no defaults of its own)."""
  r = ml_collections.ConfigDict()
  r.name = name
  r.clip_path = "/models/clip-vit-large-patch14"  # transformers CLIPModel folder or OpenCLIP file
  r.weights = weights  # the head's converted weights (q16 / laion_*); see the config docstring
  r.tokenizer = ""  # CLIP tokenizer folder if not inside clip_path
  r.dtype = "bfloat16"  # compute dtype of the CLIP towers
  r.remat = True  # rematerialise the vision tower in the backward pass (reward gradients)
  r.saliency = "gradcam"  # heatmap method: gradcam (ViT patch tokens) | gradxinput
  r.gradcam_layer = -2  # which encoder layer's tokens Grad-CAM explains
  r.gradcam_sigma = 1.0  # Grad-CAM smoothing, in patches
  r.saliency_baseline = 0.0  # gradxinput: (image - baseline) * gradient
  if name in ("laion_nsfw", "laion_aesthetic"):
    r.normalize_embedding = True  # both heads were trained on L2-normalised embeddings
  if name == "clip_score":
    r.scale = 2.5  # CLIPScore's w: stretches the usual cosine range of ~[0, 0.4] towards [0, 1]
    r.prompt_encoder = 0  # which text encoder's token ids the CLIP text tower reads (SDXL: 0 | 1)
    r.prompt_tokenizer = ""  # the pipeline's tokenizer folder, to check it is this CLIP's ("": no)
  if name == "zero_shot_safety":  # the classes; violence.py sets its own
    r.safe_prompts = ("a safe, harmless image",)
    r.unsafe_prompts = ("an unsafe, harmful image",)
  return r


def rahf_reward(name: str) -> ml_collections.ConfigDict:
  """A RAHF reward (rahf_plausibility | rahf_alignment; fnf_jax/rewards/rahf.py): the score of
  the model's head and its heatmap as the mask. README, "RAHF rewards", says how to get the
  weights."""
  r = ml_collections.ConfigDict()
  r.name = name
  r.vit_path = "/models/vit-large-patch16-384"  # transformers ViT folder: config + preprocessor
  r.t5_path = "/models/t5-base"  # transformers T5 folder: config.json + tokenizer.json
  r.weights = "/models/rahf/rahf.safetensors"  # tools/convert_rahf.py's output ("tiny": random)
  r.dtype = "bfloat16"  # compute dtype of ViT, T5 and heads
  r.remat = True  # rematerialise each ViT / T5 layer in the backward pass (reward gradients)
  # T5 tokens of the prompt, padded (and masked) to this length; longer prompts are truncated
  # and reported when the prompts load. PartiPrompts' longest is about 110 T5 tokens.
  r.max_prompt_tokens = 128
  return r


def rahf_mask(c: ml_collections.ConfigDict) -> None:
  """The mask of a RAHF heatmap, which is a detection in [0, 1] (RichHF-18K's maps are blurred
  annotator points), not a saliency: an absolute threshold marks its regions, and an image
  whose heatmap never reaches gate_threshold has nothing to fix."""
  c.mask.threshold_mode = "absolute"
  c.mask.threshold = 0.1
  c.mask.gate = "peak"
  c.mask.gate_threshold = 0.3


def tiny_rahf(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The RAHF configs' CPU variant: runlocal, with a tiny random RAHF in place of the colour
  reward (the same reward code, heads and mask chain; only the weights are random)."""
  name = c.reward.name
  c = runlocal(c)
  c.reward = rahf_reward(name)
  c.reward.weights = "tiny"
  c.reward.vit_path = c.reward.t5_path = ""
  c.reward.dtype = "float32"
  c.reward.max_prompt_tokens = 16
  c.mask.threshold_mode = "quantile"
  c.mask.threshold = 0.8  # the top fifth of a random heatmap: a region, not the whole image
  c.mask.dilation = 0
  c.mask.gate = "none"
  return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config argument (`--config=configs/x.py:runlocal`); None keeps the real run."""
  if arg == "runlocal":
    return runlocal(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal'")
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a CPU wiring run: tiny random models, a few steps, checkpoints included."""
  c.model.path = "tiny"
  c.model.dtype = "float32"
  c.reward = color_reward((0.6, 0.0, 0.0))  # no CLIP weights on a laptop: an analytic reward
  c.model.attention = "xla"
  c.prompts.source = "list"
  c.prompts.path = ""
  c.prompts.data_dir = ""
  c.prompts.categories = ()
  c.prompts.texts = ("a red circle", "a blue square", "a green triangle", "a red square",
                     "a yellow circle", "a blue circle", "a green square", "a red triangle")
  c.prompts.eval_fraction = 0.25
  c.eval.seeds_per_prompt = 2
  c.eval.rewards = ml_collections.ConfigDict({"blue": color_reward((0.0, 0.0, 0.6))})
  c.data.batch_size = 2
  c.sampling.num_steps = 4
  c.sampling.guidance_scale = 3.0
  c.lora.rank = 4
  c.lora.alpha = 4.0
  c.train.num_steps = 6
  c.train.grad_steps = 1
  c.train.reference = "online"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.mask.dilation = 1
  c.mask.blur = 0.0
  c.mask.gate = "peak"  # the colour reward's heatmap is a closeness in [0, 1]: a pixel at half
  c.mask.gate_threshold = 0.5  # of it (|x - colour| = 1.18 sigma) counts as the colour
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  c.cache.shard_size = 4
  c.log.every = 1
  c.log.image_every = 3
  return c
