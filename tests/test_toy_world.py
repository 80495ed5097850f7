"""The toy world: data generator, analytic judge, toy model configs and tokenizer, export."""

import json
import os

import jax
import numpy as np
import pytest

from fnf_jax.diffusion import pipeline
from fnf_jax.models import clip
from fnf_jax.models import clip_tokenizer
from fnf_jax.models import convert
from fnf_jax.models import unet as unet_lib
from fnf_jax.models import vae as vae_lib
from fnf_jax.models import export
from fnf_jax.toy import judge
from fnf_jax.toy import models
from fnf_jax.toy import world as toy_world

N = 512  # rates on >= 256 samples are good to about +-3% at 30%
PROMPTS = ["a red circle", "a blue triangle"]


@pytest.fixture(scope="module")
def data():
  return toy_world.batch(range(N), seed=0)


# --------------------------------------------------------------------------------- data


def test_examples_are_deterministic_and_seeded():
  a, b = toy_world.example(5, seed=3), toy_world.example(5, seed=3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["image"], toy_world.example(5, seed=4)["image"])
  batch = toy_world.batch([5, 6], seed=3)
  np.testing.assert_array_equal(batch["image"][0], a["image"])
  assert batch["caption"][0] == a["caption"] and batch["image"].shape == (2, 32, 32, 3)


def test_defect_rate_only_toggles_blotches():
  for i in range(40):
    none, some, all_ = (toy_world.example(i, defect_rate=r) for r in (0.0, 0.3, 1.0))
    assert not none["has_defect"] and all_["has_defect"]
    assert none["caption"] == some["caption"] == all_["caption"]
    np.testing.assert_array_equal(none["shape_mask"], all_["shape_mask"])
    if some["has_defect"]:
      np.testing.assert_array_equal(some["defect_mask"], all_["defect_mask"])
  with pytest.raises(ValueError, match="defect_rate"):
    toy_world.example(0, defect_rate=1.5)


def test_captions_cover_the_world(data):
  caps = toy_world.captions()
  assert len(caps) == len(set(caps)) == 12 and "a yellow triangle" in caps
  assert set(data["caption"]) == set(caps)
  assert all(c == toy_world.caption(col, s)
             for c, col, s in zip(data["caption"], data["color"], data["shape"]))


def test_defect_rate_and_masks(data):
  images, has, masks, shapes = (data[k] for k in ("image", "has_defect", "defect_mask",
                                                   "shape_mask"))
  assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
  assert abs(has.mean() - 0.3) <= 0.05, has.mean()
  assert masks.shape == shapes.shape == (N, 32, 32) and masks.dtype == bool
  sizes = masks.sum((1, 2))
  assert (sizes[has] >= toy_world.MIN_DEFECT_PIXELS).all() and (sizes[~has] == 0).all()
  assert not (masks & ~shapes).any()  # the blotch lies on the shape...
  assert (sizes[has] < shapes.sum((1, 2))[has]).all()  # ...and leaves part of it visible
  assert (images[masks].max(-1) < 0.3).all()  # dark, as the judge expects
  # Shapes stay inside the image with a margin: the border is background.
  assert not shapes[:, [0, -1], :].any() and not shapes[:, :, [0, -1]].any()


def test_grid_png(tmp_path, data):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path = toy_world.save_grid(str(tmp_path / "g" / "grid.png"), data["image"][:10], cols=4,
                             scale=2, masks=data["defect_mask"][:10])
  with Image.open(path) as im:
    assert im.size == (4 * 66 + 2, 3 * 66 + 2)


# --------------------------------------------------------------------------------- judge


def test_judge_calibration(data):
  images = data["image"]
  colors, shapes = np.array(judge.color(images)), np.array(judge.shape(images))
  found = judge.defects(images)
  has = data["has_defect"]
  color_acc = (colors == np.array(data["color"])).mean()
  shape_acc = (shapes == np.array(data["shape"])).mean()
  recall, fpr = found["has_defect"][has].mean(), found["has_defect"][~has].mean()
  print(f"judge on {N} images: colour {color_acc:.4f}, shape {shape_acc:.4f}, defect recall "
        f"{recall:.4f}, false positives {fpr:.4f}")
  assert color_acc >= 0.97 and shape_acc >= 0.9 and recall >= 0.95 and fpr <= 0.02
  inter = (found["defect_mask"] & data["defect_mask"])[has].sum((1, 2))
  union = (found["defect_mask"] | data["defect_mask"])[has].sum((1, 2))
  assert (inter / union).mean() >= 0.9
  assert judge.prompt_fidelity(images, data["caption"]).mean() >= 0.9


def test_judge_scores_and_errors(data):
  i = data["shape"].index("circle")
  image, color = data["image"][i:i + 1], data["color"][i]
  other = next(c for c in toy_world.COLORS if c != color)
  got = [judge.prompt_fidelity(image, [c])[0] for c in
         (f"a {color} circle", f"a {color} square", f"a {other} circle", f"a {other} square")]
  assert got == [1.0, 0.5, 0.5, 0.0]
  blank = np.ones((1, 32, 32, 3), np.float32)
  assert judge.color(blank) == judge.shape(blank) == [judge.NONE]
  assert not judge.defects(blank)["has_defect"][0]
  with pytest.raises(ValueError, match="one colour"):
    judge.prompt_fidelity(image, ["a photo of a cat"])
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    judge.defects(np.zeros((2, 32, 32)))


# --------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return models.write_tokenizer(str(tmp_path_factory.mktemp("toy_tokenizer")))


def test_tokenizer_one_token_per_word(tokenizer_dir):
  tok = clip_tokenizer.load(tokenizer_dir)
  for word in models.WORDS:
    assert len(tok.encode(word)) == 1, word
  for caption in toy_world.captions():
    assert len(tok.encode(caption)) == 3, caption
  assert len(tok.encode("a purple hexagon")) > 3  # unknown words fall back to letters
  cfg = models.text_config()
  ids = tok(["a red circle"])[0]
  assert ids.shape == (models.MAX_TOKENS,) and ids[0] == cfg["bos_token_id"] and ids[4] == cfg["eos_token_id"]
  assert tok.vocab_size == cfg["vocab_size"] and tok.pad_token_id == cfg["pad_token_id"]


def test_tokenizer_writer_reproduces_the_shipped_vocabulary(tokenizer_dir):
  """The one small-tokenizer writer (models/clip_vocab.py) spells the toy words exactly as the
  tokenizer shipped with the toy model: same vocab.json and merges.txt, byte for byte."""
  shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fnf_jax",
                         "assets", "toy_pipeline", "tokenizer")
  for name in ("vocab.json", "merges.txt"):
    with open(os.path.join(shipped, name), "rb") as a, open(os.path.join(tokenizer_dir, name),
                                                             "rb") as b:
      assert a.read() == b.read(), name


def test_configs_parse_and_sizes():
  unet_cfg = unet_lib.UNetConfig.from_dict(models.unet_config())
  vae_cfg = vae_lib.VAEConfig.from_dict(models.vae_config())
  text_cfg = clip.CLIPTextConfig.from_dict(models.text_config())
  assert vae_cfg.downsample_factor == 2 and unet_cfg.sample_size * 2 == toy_world.SIZE
  assert unet_cfg.cross_attention_dims[0] == text_cfg.hidden_size
  unet = unet_lib.UNet2DConditionModel(unet_cfg)
  n = models.count_params(convert.abstract_params(unet, *unet_lib.dummy_inputs(unet_cfg)))
  assert 2e6 <= n <= 3.5e6, n
  assert models.latent_scaling_factor(np.array([2.0, -2.0] * 4)) == pytest.approx(0.5)


# --------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
  """(in-memory pipeline, its folder, the loaded pipeline); biases perturbed so they count."""
  base = models.build_pipeline(tokenizer_dir, seed=0)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                        base.params)
  ours = models.build_pipeline(tokenizer_dir, params=params)
  folder = export.export_pipeline(
      str(tmp_path_factory.mktemp("export") / "toy_sd"), unet_config=models.unet_config(),
      unet_params=params["unet"], vae_config=models.vae_config(), vae_params=params["vae"],
      text_config=models.text_config(), text_params=params["text_encoder"],
      tokenizer_dir=tokenizer_dir, scheduler_config=models.scheduler_config())
  return ours, folder, pipeline.load(folder)


@pytest.fixture(scope="module")
def latents():
  return np.random.default_rng(0).standard_normal((len(PROMPTS), 16, 16, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def generated(exported, latents):
  _, _, loaded = exported
  return loaded.generate(PROMPTS, latents=latents, num_inference_steps=2, guidance_scale=2.0)


def test_state_dict_keys_and_layouts(exported):
  ours, _, _ = exported
  sd = export.state_dict(ours.params["unet"])
  assert "time_embedding.linear_1.weight" in sd  # a genuine name, not a list entry
  key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
  np.testing.assert_array_equal(sd[key], ours.params["unet"]["down_blocks_1"]["attentions_0"][
      "transformer_blocks_0"]["attn1"]["to_out_0"]["kernel"].T)
  assert sd["conv_in.weight"].shape == (32, 4, 3, 3)


def test_export_round_trip(exported, latents, generated):
  ours, folder, loaded = exported
  for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
               "vae/config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
               "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
    assert os.path.isfile(os.path.join(folder, name)), name
  with open(os.path.join(folder, "text_encoder/config.json")) as f:
    assert json.load(f)["architectures"] == ["CLIPTextModel"]
  flat = jax.tree_util.tree_leaves_with_path
  a, b = flat(ours.params), flat(loaded.params)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  expected = ours.generate(PROMPTS, latents=latents, num_inference_steps=2, guidance_scale=2.0)
  np.testing.assert_array_equal(generated, expected)
  assert generated.shape == (2, 32, 32, 3) and generated.std() > 1e-2


def test_export_refuses_to_clobber_and_checks_shapes(exported, tmp_path, tokenizer_dir):
  ours, folder, _ = exported
  kwargs = dict(unet_config=models.unet_config(), unet_params=ours.params["unet"],
                vae_config=models.vae_config(), vae_params=ours.params["vae"],
                text_config=models.text_config(), text_params=ours.params["text_encoder"],
                tokenizer_dir=tokenizer_dir, scheduler_config=models.scheduler_config())
  with pytest.raises(FileExistsError, match="overwrite=True"):
    export.export_pipeline(folder, **kwargs)
  (tmp_path / "precious.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a pipeline"):
    export.export_pipeline(str(tmp_path), overwrite=True, **kwargs)
  wrong = {**models.vae_config(), "latent_channels": 8}
  with pytest.raises(convert.CheckpointError, match="vae_params"):
    export.export_pipeline(str(tmp_path / "new"), **{**kwargs, "vae_config": wrong})
  assert not (tmp_path / "new").exists()


def test_export_is_a_diffusers_checkpoint(exported, latents):
  """diffusers loads the folder and computes what we compute (whole-image parity of the loaded
  pipeline is test_pipeline's job; this checks the weights landed where diffusers expects)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  _, folder, loaded = exported
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  assert type(ref.scheduler).__name__ == "DDIMScheduler"
  ids = loaded.tokenize(PROMPTS)[0]
  ref_ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=models.MAX_TOKENS).input_ids
  np.testing.assert_array_equal(ids, np.asarray(ref_ids))

  rng = np.random.default_rng(2)
  x, t = latents, np.array([10.0, 700.0], np.float32)
  context = rng.standard_normal((2, models.MAX_TOKENS, 64)).astype(np.float32)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    unet_ref = nhwc(ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
    text_ref = ref.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    vae_ref = nhwc(ref.vae.decode(nchw(x)).sample)
  p = loaded.params
  unet_ours = jax.jit(loaded.unet.apply)({"params": p["unet"]}, x, t, context)
  text_ours = jax.jit(loaded.text_encoders[0].apply)({"params": p["text_encoder"]}, ids)
  vae_ours = jax.jit(lambda v, z: loaded.vae.apply(v, z, method=loaded.vae.decode))(
      {"params": p["vae"]}, x)
  for name, ours_out, theirs in (("unet", unet_ours, unet_ref), ("vae", vae_ours, vae_ref),
                                 ("text", text_ours.last_hidden_state, text_ref)):
    rel = np.abs(np.asarray(ours_out) - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-4, f"{name}: relative difference {rel}"
