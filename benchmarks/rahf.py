"""Benchmark of RAHF in Flax (fnf_jax/models/rahf.py) against transformers' ViT + T5 in PyTorch
eager, in the same run with the same weights.

  python benchmarks/rahf.py --config real --batch 4 --iters 3      # ViT-L/16-384 + t5-base
  python benchmarks/rahf.py --config tiny --batch 4 --iters 10

Compared (both sides): the fusion features, ViT -> projection -> T5 encoder over
[577 image tokens ; prompt tokens], forward, and forward+backward (the gradient of
mean(features²) with respect to the pixels, what a reward's gradient costs). Ours alone: the
whole `rahf_plausibility` reward (score forward+backward through the heads, heatmap forward).
Random weights (the PyTorch models' initialisation, converted to ours, so both compute the same
numbers: the run prints their agreement). Times are medians of --iters runs after one warm-up.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from results import emit  # noqa: E402  (benchmarks/results.py)
from fnf_jax.models import rahf  # noqa: E402
from fnf_jax.models import t5  # noqa: E402
from fnf_jax.models import vit  # noqa: E402

CONFIGS = {
    "real": (vit.PRESETS["vit-large-patch16-384"], t5.PRESETS["t5-base"]),
    "tiny": (vit.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, image_size=96, patch_size=16),
             t5.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4)),
}


def timed(fn, iters: int) -> float:
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def torch_models(vit_config, t5_config):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  v = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=vit_config.hidden_size, num_hidden_layers=vit_config.num_hidden_layers,
      num_attention_heads=vit_config.num_attention_heads,
      intermediate_size=vit_config.intermediate_size, image_size=vit_config.image_size[0],
      patch_size=vit_config.patch_size), add_pooling_layer=False).eval()
  e = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=t5_config.vocab_size, d_model=t5_config.d_model, d_kv=t5_config.d_kv,
      d_ff=t5_config.d_ff, num_layers=t5_config.num_layers, num_heads=t5_config.num_heads,
      relative_attention_num_buckets=t5_config.relative_attention_num_buckets,
      relative_attention_max_distance=t5_config.relative_attention_max_distance,
      feed_forward_proj=t5_config.feed_forward_proj)).eval()
  proj = torch.nn.Linear(vit_config.hidden_size, t5_config.d_model)
  return v, e, proj


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_tokens", type=int, default=32)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--torch", choices=("yes", "no"), default="yes")
  p.add_argument("--forward_only", action="store_true",
                 help="only the features forward (the device check's RAHF piece)")
  p.add_argument("--json", default=None, help="also append one JSON line per result here")
  args = p.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top

  vit_config, t5_config = CONFIGS[args.config]
  config = rahf.RAHFConfig(vit_config, t5_config, rahf.RAHFHeads(scores=("plausibility",),
                                                                 heatmaps=("implausibility",)))
  tv, te, tproj = torch_models(vit_config, t5_config)
  sd = {k: v.detach().numpy() for k, v in tv.state_dict().items()}
  params = dict(rahf.init_params(config, 0))
  params["vit"] = vit.params_from_state_dict(sd, vit_config, where="torch ViT",
                                             add_pooling_layer=False)
  params["t5"] = t5.params_from_state_dict({k: v.detach().numpy() for k, v in
                                            te.state_dict().items()}, t5_config, where="torch T5")
  params["visual_token_projection"] = {"kernel": tproj.weight.detach().numpy().T,
                                       "bias": tproj.bias.detach().numpy()}
  params = jax.device_put(params)  # once: numpy arguments would be copied in at every call
  rng = np.random.default_rng(0)
  b, (h, w), length = args.batch, vit_config.image_size, args.prompt_tokens
  pixels = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
  ids = rng.integers(3, t5_config.vocab_size, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  model = rahf.RAHF(config)

  def features(p, x):
    return model.apply({"params": p}, x, ids, mask, method=rahf.RAHF.features)

  fwd = jax.jit(features)
  bwd = jax.jit(jax.grad(lambda p, x: jnp.mean(jnp.square(features(p, x))), argnums=1))
  score_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(
      {"params": p}, x, ids, mask, heatmaps=(), scores=("plausibility",))[1]["plausibility"]),
                                argnums=1))
  heat = jax.jit(lambda p, x: model.apply({"params": p}, x, ids, mask, heatmaps=(
      "implausibility",), scores=())[0]["implausibility"])
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; config {args.config}, "
        f"batch {b}, {h}x{w}, {length} prompt tokens")
  ours = {}
  passes = (("features forward", lambda: fwd(params, pixels)),
            ("features forward+backward", lambda: bwd(params, pixels)),
            ("reward score forward+backward", lambda: score_grad(params, pixels)),
            ("reward heatmap forward", lambda: heat(params, pixels)))
  kind = jax.devices()[0].device_kind
  for name, fn in passes[:1] if args.forward_only else passes:
    tic = time.perf_counter()
    jax.block_until_ready(fn())  # compile and first run
    first = time.perf_counter() - tic
    ours[name] = timed(lambda fn=fn: jax.block_until_ready(fn()), args.iters)
    print(f"{name:30s} jax   {ours[name]:8.3f} s")
    emit({"bench": "rahf", "side": "jax", "pass": name, "config": args.config, "batch": b,
          "device": kind, "first_s": round(first, 2), "s": round(ours[name], 4)}, args.json)
  if args.torch == "no":
    return
  device = "cuda" if torch.cuda.is_available() else "cpu"  # beside ours on the same machine
  tv, te, tproj = tv.to(device), te.to(device), tproj.to(device)
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device)
  tids, tmask = torch.from_numpy(ids).long().to(device), torch.from_numpy(mask).long().to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def torch_features(xx):
    image = tproj(tv(pixel_values=xx).last_hidden_state)
    tokens = torch.cat([image, te.get_input_embeddings()(tids)], 1)
    attend = torch.cat([torch.ones(image.shape[:2], dtype=tmask.dtype, device=tmask.device),
                        tmask], 1)
    out = te(inputs_embeds=tokens, attention_mask=attend).last_hidden_state
    n = vit_config.grid
    return out[:, 1:1 + n[0] * n[1]]

  def torch_forward():
    with torch.no_grad():
      out = torch_features(x)
    sync()
    return out

  def torch_backward():
    xx = x.clone().requires_grad_(True)
    torch_features(xx).square().mean().backward()
    sync()
    return xx.grad

  ref = torch_forward().cpu().numpy().reshape(b, *vit_config.grid, -1)
  err = np.linalg.norm(np.asarray(fwd(params, pixels)) - ref) / np.linalg.norm(ref)
  print(f"PyTorch eager (torch {torch.__version__} on {device}, {torch.get_num_threads()} threads); "
        f"features agree to rel err {err:.1e}")
  for name, fn in (("features forward", torch_forward),
                   ("features forward+backward", torch_backward)):
    if name not in ours:
      continue
    t = timed(fn, args.iters)
    print(f"{name:30s} torch {t:8.3f} s   JAX/PyTorch {ours[name] / t:.2f}")
    emit({"bench": "rahf", "side": "torch", "pass": name, "config": args.config, "batch": b,
          "device": device, "s": round(t, 4), "rel_err": float(err)}, args.json)


if __name__ == "__main__":
  main()
