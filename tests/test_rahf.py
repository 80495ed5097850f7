"""RAHF (fnf_jax/models/rahf.py) and its rewards (fnf_jax/rewards/rahf.py) against a PyTorch
computation: a state dict in the public reimplementation's layout (its key names and shapes,
built here from transformers' ViT and T5 and PyTorch heads written from the paper's
description) converts into params whose forward equals PyTorch's; the rewards' gradients, their
heatmap as a mask, and the errors of bad folders and files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.models import convert
from fnf_jax.models import rahf
from fnf_jax.models import rahf_convert
from fnf_jax.models import t5_tokenizer
from fnf_jax.rewards import masks
from fnf_jax.rewards import rahf as rahf_reward
from fnf_jax.rewards import registry

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn

D = 64  # T5 width: the score head's channels are D, D/2, ..., D/64
HEAT_CONVS, HEAT_UPS, HEAT_LAST, SCORE_MLP = (16, 12), (12, 8, 8, 6), 6, (24, 10)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           image_size=48, patch_size=16)  # a 3×3 grid
T5 = dict(d_model=D, d_kv=16, d_ff=80, num_layers=2, num_decoder_layers=1, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16)
WORDS = ("a", "red", "circle", "photo", "of", "cat", "holding", "sign", "two", "hands")


class Norm(nn.Module):  # the reimplementation's T5-style norm over channels of [B, C, H, W]
  def __init__(self, c):
    super().__init__()
    self.scale = nn.Parameter(0.5 + torch.rand(c, 1, 1))

  def forward(self, x):
    return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8) * self.scale


def conv(i, o):
  return nn.Conv2d(i, o, 3, padding=1)


class Heatmap(nn.Module):
  def __init__(self, d):
    super().__init__()
    a, b = HEAT_CONVS
    self.conv_layers = nn.Sequential(conv(d, a), nn.ReLU(), Norm(a), conv(a, b), nn.ReLU(), Norm(b))
    self.deconv_layers, self.conv_layers2 = nn.ModuleList(), nn.ModuleList()
    c_in = b
    for c in HEAT_UPS:
      self.deconv_layers.append(nn.Sequential(
          nn.ConvTranspose2d(c_in, c, 3, stride=2, padding=1, output_padding=1), Norm(c),
          nn.ReLU()))
      self.conv_layers2.append(nn.Sequential(conv(c, c), Norm(c), nn.ReLU(), conv(c, c), Norm(c)))
      c_in = c
    self.last_conv1, self.last_conv2 = conv(c_in, HEAT_LAST), conv(HEAT_LAST, 1)

  def forward(self, x):
    x = self.conv_layers(x)
    for up, block in zip(self.deconv_layers, self.conv_layers2):
      x = up(x)
      x = torch.relu(x + block(x))
    return torch.sigmoid(self.last_conv2(torch.relu(self.last_conv1(x)))).squeeze(1)


class Score(nn.Module):
  def __init__(self, d, cells):
    super().__init__()
    chans, layers, c_in = (d, d // 2, d // 4, d // 8, d // 16, d // 64), [], d
    for c in chans:
      layers += [conv(c_in, c), Norm(c), nn.ReLU()]
      c_in = c
    self.conv_layers = nn.Sequential(*layers)
    (m1, m2) = SCORE_MLP
    self.linear_layers = nn.Sequential(nn.Linear(c_in * cells, m1), nn.ReLU(), nn.Linear(m1, m2),
                                       nn.ReLU(), nn.Linear(m2, 1), nn.Sigmoid())

  def forward(self, x):
    return self.linear_layers(self.conv_layers(x).flatten(1)).flatten()


class TorchRAHF(nn.Module):
  """The multi-head model's layout: vit, t5, visual_token_projection, heatmap_predictor.<name>,
  score_predictor.<name>."""

  def __init__(self, vocab_size: int):
    super().__init__()
    self.vit = transformers.ViTModel(transformers.ViTConfig(**VIT))
    self.t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=vocab_size, **T5))
    self.visual_token_projection = nn.Linear(VIT["hidden_size"], D)
    self.grid = VIT["image_size"] // VIT["patch_size"]
    self.heatmap_predictor = nn.ModuleDict({k: Heatmap(D) for k in rahf.HEATMAP_TYPES})
    self.score_predictor = nn.ModuleDict({k: Score(D, self.grid ** 2) for k in rahf.SCORE_TYPES})

  def features(self, pixels_nchw, ids, mask):
    vis = self.visual_token_projection(self.vit(pixel_values=pixels_nchw).last_hidden_state)
    tokens = torch.cat([vis, self.t5.encoder.embed_tokens(ids)], 1)
    attend = torch.cat([torch.ones(vis.shape[:2], dtype=mask.dtype), mask], 1)
    out = self.t5.encoder(inputs_embeds=tokens, attention_mask=attend).last_hidden_state
    n = self.grid
    return out[:, 1:1 + n * n].transpose(1, 2).reshape(out.shape[0], -1, n, n)

  def forward(self, pixels_nchw, ids, mask):
    grid = self.features(pixels_nchw, ids, mask)
    return ({k: h(grid) for k, h in self.heatmap_predictor.items()},
            {k: s(grid) for k, s in self.score_predictor.items()})


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, its state dict as numpy, vit folder, t5 folder)."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("rahf")
  vit_dir, t5_dir = str(root / "vit"), str(root / "t5")
  model = TorchRAHF(t5_tokenizer.write_tiny_tokenizer(t5_dir, WORDS)).eval()
  with torch.no_grad():  # non-trivial biases everywhere (PyTorch initialises some at zero)
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.add_(0.05 * torch.randn_like(p))
  model.vit.save_pretrained(vit_dir)
  model.t5.save_pretrained(t5_dir)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, sd, vit_dir, t5_dir


def _inputs(batch=2, length=7, seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal((batch, VIT["image_size"], VIT["image_size"], 3)).astype(np.float32)
  ids = rng.integers(3, len(WORDS) + 3, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  ids[1, 4:], mask[1, 4:] = 0, 0  # a padded prompt
  return pixels, ids, mask


def _config(sd, vit_dir, t5_dir):
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
  import convert_rahf  # pylint: disable=import-outside-toplevel
  return convert_rahf.model_config(vit_dir, t5_dir, sd)


@pytest.fixture(scope="module")
def converted(reference):
  """(config, params) of the reference's state dict, as tools/convert_rahf.py converts it."""
  _, sd, vit_dir, t5_dir = reference
  config = _config(sd, vit_dir, t5_dir)
  return config, rahf_convert.convert_state_dict(sd, config, where="test")


def test_converted_heads_equal_pytorch_on_the_same_features(reference, converted):
  model = reference[0]
  config, params = converted
  assert config.heads.heat_ups == HEAT_UPS and config.heads.score_mlp == SCORE_MLP
  grid = np.random.default_rng(1).standard_normal((2, D, 3, 3)).astype(np.float32)
  with torch.no_grad():
    t_heat = model.heatmap_predictor["implausibility"](torch.from_numpy(grid)).numpy()
    t_score = model.score_predictor["plausibility"](torch.from_numpy(grid)).numpy()
  x = jnp.asarray(grid.transpose(0, 2, 3, 1))
  # Jitted, as the rewards run them: eagerly, each op of the heads would compile on its own.
  heat = jax.jit(rahf.HeatmapHead(config.heads).apply)(
      {"params": params["heatmap_implausibility"]}, x)
  score = jax.jit(rahf.ScoreHead(config.heads).apply)({"params": params["score_plausibility"]}, x)
  assert heat.shape == (2, 48, 48)  # 16× the grid: the input resolution
  assert np.abs(np.asarray(heat) - t_heat).max() <= 1e-5
  assert np.abs(np.asarray(score) - t_score).max() <= 1e-5


def test_converted_model_equals_pytorch_end_to_end(reference, converted):
  model = reference[0]
  config, params = converted
  pixels, ids, mask = _inputs()
  heat, score = jax.jit(rahf.RAHF(config).apply)({"params": params}, pixels, ids, mask)
  with torch.no_grad():
    t_heat, t_score = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                            torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
  for k in rahf.HEATMAP_TYPES:
    assert rel_err(heat[k], t_heat[k].numpy()) <= 1e-4, k
  for k in rahf.SCORE_TYPES:
    assert np.abs(np.asarray(score[k]) - t_score[k].numpy()).max() <= 1e-5, k


def _convert(tmp_path, sd, vit_dir, t5_dir, name="rahf.safetensors"):
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
  import convert_rahf  # pylint: disable=import-outside-toplevel
  ckpt = str(tmp_path / "rahf.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, ckpt)
  out = str(tmp_path / name)
  convert_rahf.main([ckpt, "--vit", vit_dir, "--t5", t5_dir, "--out", out])
  return out


@pytest.fixture(scope="module")
def weights(reference, tmp_path_factory):
  """The reference converted by the tool's command line: the file the rewards read."""
  _, sd, vit_dir, t5_dir = reference
  return _convert(tmp_path_factory.mktemp("converted"), sd, vit_dir, t5_dir)


def _reward_cfg(name, weights, vit_dir, t5_dir, length=12):
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(name=name, vit_path=vit_dir, t5_path=t5_dir,
                                        weights=weights, dtype="float32", remat=False,
                                        max_prompt_tokens=length))


def test_the_rewards_read_the_converted_file_with_prompts_in_t5_tokens(reference, weights):
  model, _, vit_dir, t5_dir = reference
  reward = registry.build(_reward_cfg("rahf_plausibility", weights, vit_dir, t5_dir))
  # The reward holds its two heads only.
  assert sorted(reward.params) == ["heatmap_implausibility", "score_plausibility", "t5",
                                   "visual_token_projection", "vit"]
  prompts = ["a red circle", "two cat holding a sign of a photo"]
  ids = reward.tokenize(prompts)
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  images = np.random.default_rng(2).uniform(size=(2, 48, 48, 3)).astype(np.float32)
  # Score and heatmap in one program: one compile instead of two.
  score, heat = jax.jit(lambda p, x, i: (reward.score(p, x, i), reward.heatmap(p, x, i)))(
      reward.params, images, ids)
  mask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    t_heat, t_score = model(torch.from_numpy((images.transpose(0, 3, 1, 2) - 0.5) / 0.5),
                            torch.from_numpy(ids).long(), torch.from_numpy(mask))
  assert np.abs(np.asarray(score) - t_score["plausibility"].numpy()).max() <= 1e-5
  assert rel_err(heat, t_heat["implausibility"].numpy()) <= 1e-4
  assert reward.prompt_limit.max_tokens == 12 and reward.prompt_limit.count("a red circle") == 4
  alignment = registry.build(_reward_cfg("rahf_alignment", weights, vit_dir, t5_dir))
  assert np.abs(np.asarray(jax.jit(alignment.score)(alignment.params, images, ids))
                - t_score["alignment"].numpy()).max() <= 1e-5


def test_plausibility_gradients_are_finite_and_nonzero_and_its_heatmap_makes_a_mask():
  reward = registry.build(_reward_cfg("rahf_plausibility", "tiny", "", "", length=8))
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(reward.tokenize(["a red circle", "a blue square"]))
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(threshold=0.8, threshold_mode="quantile", dilation=0,
                                       blur=0.0, gate="none", gate_threshold=0.0))

  def grad_heat_mask(p, x):  # one program, as in the train step (one compile, not three)
    heat = reward.heatmap(p, x, ids)
    grad = jax.grad(lambda x: jnp.sum(reward.score(p, x, ids)))(x)
    return grad, heat, masks.from_config(heat, (32, 32), cfg)

  grad, heat, mask = jax.jit(grad_heat_mask)(reward.params, images)
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  assert heat.shape == (2, 64, 64) and float(heat.min()) >= 0 and float(heat.max()) <= 1
  assert mask.shape == (2, 32, 32) and 0.1 < float(mask.mean()) < 0.35  # the top fifth


def test_bad_folders_and_files_are_named(reference, converted, weights, tmp_path):
  _, sd, vit_dir, t5_dir = reference
  # A ViT of another patch size, or another width, than the converted weights.
  for field, value in (("patch_size", 8), ("hidden_size", 40)):
    other = tmp_path / f"vit_{field}"
    other.mkdir()
    cfg = json.load(open(os.path.join(vit_dir, "config.json")))
    cfg[field] = value
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.CheckpointError, match=rf"{weights}: 'vit/.*' has shape .* but "
                       rf"the ViT at '{other}' makes it"):
      registry.build(_reward_cfg("rahf_plausibility", weights, str(other), t5_dir))
  # A T5 folder without tokenizer.json.
  bare = tmp_path / "t5_bare"
  bare.mkdir()
  (bare / "config.json").write_text(open(os.path.join(t5_dir, "config.json")).read())
  with pytest.raises(convert.CheckpointError, match=rf"{bare}.*tokenizer.json"):
    registry.build(_reward_cfg("rahf_plausibility", weights, vit_dir, str(bare)))
  # A checkpoint without the misalignment head: converts, but rahf_alignment names what is missing.
  partial = {k: v for k, v in sd.items() if not k.startswith("heatmap_predictor.misalignment.")}
  partial_file = _convert(tmp_path, partial, vit_dir, t5_dir, name="partial.safetensors")
  with pytest.raises(convert.CheckpointError, match=rf"(?s){partial_file} has no heatmap head "
                     r"'misalignment' \(it has \['implausibility'\]\).*convert_rahf.py"):
    registry.build(_reward_cfg("rahf_alignment", partial_file, vit_dir, t5_dir))
  # A checkpoint with a head cut short fails in the conversion, naming the key.
  broken = {k: v for k, v in sd.items() if k != "score_predictor.overall.linear_layers.4.weight"}
  with pytest.raises(convert.CheckpointError,
                     match=r"missing 'score_predictor.overall.linear_layers.4.weight'"):
    rahf_convert.convert_state_dict(broken, converted[0], where="broken.pth")
  # Not our layout at all.
  with pytest.raises(convert.CheckpointError, match=r"not RAHF weights in fnf_jax's layout"):
    rahf.read_heads(os.path.join(vit_dir, "model.safetensors"))


@pytest.mark.parametrize("name", ["plausibility", "alignment"])
def test_the_cpu_variants_train_and_resume(name, tmp_path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  from fnf_jax import main  # pylint: disable=import-outside-toplevel
  from test_train import read_metrics  # pylint: disable=import-outside-toplevel

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", f"{root}/configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  # One step and its checkpoint, then a resume for one more: all a resume needs (more steps
  # would rerun the same compiled programs).
  config.train.num_steps, config.checkpoint.every, config.log.every = 1, 1, 1
  config.log.image_every, config.log.tensorboard = 0, False
  config.mesh = {"data": 2, "fsdp": 1}  # the batch of 2, one example a device
  workdir = str(tmp_path)
  main.run_job(config, workdir)
  config.train.num_steps = 2  # a resume that trains one step more
  main.run_job(config, workdir)
  rows = read_metrics(workdir)
  assert sorted(rows) == [1, 2]
  assert all(np.isfinite(r["loss"]) and 0 < r["reward"] < 1 for r in rows.values())
  assert any(r["mask_area"] > 0 for r in rows.values())
