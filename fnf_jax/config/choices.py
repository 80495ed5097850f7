"""The valid values of every enumerated config field, in one light module.

`fnf_jax.config.validate` checks configs against these before anything heavy is imported (no jax
here), and the modules that act on a field take their choices from here too, so a new value is
added in one place.
"""

# model / reward compute dtypes; the reference cache's storage dtypes.
DTYPES = ("float32", "bfloat16")
CACHE_DTYPES = ("float32", "float16")
# Attention kernels (fnf_jax/models/attention/choice.py, whose REQUESTS these are): auto (the
# backend's fused kernel where it serves: cuDNN on NVIDIA GPUs, Pallas splash on TPUs; chunked
# XLA elsewhere), or one named, which falls back per layer where it cannot serve.
ATTENTION = ("auto", "xla", "chunked", "cudnn", "splash")

# Prompt sources (fnf_jax/data/prompts.py) and their splits.
PROMPT_SOURCES = ("list", "text", "parti", "i2p")
# The header columns a parti (tab-separated) / i2p (comma-separated) prompt file must have.
PROMPT_COLUMNS = {"parti": ("Prompt", "Category"), "i2p": ("prompt", "categories")}
PROMPT_SPLITS = ("train", "eval", "all")

# The training step: where the gradient flows through the sampler, where Î0 comes from, M.
GRADIENT_MODES = ("truncated", "lv", "full")
REFERENCE_MODES = ("online", "cache")
MASK_MODES = ("heatmap", "ones")
# jax.checkpoint_policies for the gradient steps (fnf_jax/diffusion/sampling.py): what one step's forward
# keeps for its backward. nothing_saveable keeps only the step's input and recomputes the UNet
# (least memory; in the training step's per-step VJPs the first evaluation is then dropped, so
# the UNet still runs once); dots_with_no_batch_dims_saveable keeps weight-side matmul outputs;
# dots_saveable keeps every matmul output (most memory).
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")

# The objective (fnf_jax/fnf/objective.py) and the heatmap -> mask chain (fnf_jax/rewards/masks.py).
REWARD_REGIONS = ("full", "mask")
CONSTRAINT_NORMS = ("fro", "fro_squared", "mean_squared")
THRESHOLD_MODES = ("absolute", "quantile")
# Which images keep a mask at all: those the reward's score calls problematic, those whose
# heatmap peak reaches a threshold, or all (fnf_jax/rewards/masks.py).
MASK_GATES = ("score", "peak", "none")
# Saliency heatmaps of the CLIP rewards (fnf_jax/rewards/saliency.py).
SALIENCY_METHODS = ("gradxinput", "gradcam")

# The logical -> mesh axis rules (config.sharding_rules; fnf_jax/runtime/sharding.py applies
# them): the batch over every device of the data and fsdp axes, the large parameter dimensions
# over fsdp, the rest replicated. The first matching rule wins.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("mlp", "fsdp"),
    ("conv_out", "fsdp"),
    ("vocab", "fsdp"),
    ("embed", None),
    ("conv_in", None),
    ("norm", None),
    ("heads", None),
    ("length", None),
)

# Learning-rate shapes after the linear warm-up (fnf_jax/runtime/optimizer.py).
LR_SCHEDULES = ("constant", "cosine")
