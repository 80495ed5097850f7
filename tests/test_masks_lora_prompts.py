"""Masks from heatmaps, LoRA on a frozen tree, and prompt sources."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fnf_jax import assets
from fnf_jax.fnf import method
from fnf_jax.data import prompts
from fnf_jax.models import lora
from fnf_jax.rewards import masks
from fnf_jax.rewards import registry

PARTI = assets.path(assets.PARTI_PROMPTS)  # the copy fnf_jax ships


# ------------------------------------------------------------------------------------ masks
def test_mask_chain_threshold_dilate_blur():
  heat = np.zeros((1, 8, 8), np.float32)
  heat[0, 3, 4] = 1.0
  up = masks.resize(jnp.asarray(heat), (16, 16))
  assert up.shape == (1, 16, 16)
  m = masks.from_heatmap(jnp.asarray(heat), (8, 8), threshold_value=0.5, dilation=1)
  expected = np.zeros((8, 8))
  expected[2:5, 3:6] = 1
  np.testing.assert_array_equal(m[0], expected)
  soft = masks.blur(m, 1.0)
  assert 0 < float(soft[0, 1, 4]) < 1 and float(soft.max()) <= 1.0


def test_quantile_threshold_keeps_top_share_and_nothing_for_empty_heatmap():
  heat = jnp.arange(100, dtype=jnp.float32).reshape(1, 10, 10)
  m = masks.threshold(heat, 0.9, "quantile")
  assert int(m.sum()) == 10
  assert int(masks.threshold(jnp.zeros((1, 10, 10)), 0.9, "quantile").sum()) == 0
  with pytest.raises(ValueError, match="absolute"):
    masks.threshold(heat, 0.5, "otsu")


def test_color_reward_heatmap_marks_the_colour():
  cfg = ml_collections.ConfigDict(dict(name="color", color=(1.0, 0.0, 0.0), sigma=0.2))
  reward = registry.build(cfg)
  img = np.ones((1, 8, 8, 3), np.float32)
  img[0, :4, :4] = (1.0, 0.0, 0.0)
  heat = reward.heatmap(reward.params, jnp.asarray(img), None)
  assert float(heat[0, 0, 0]) == pytest.approx(1.0) and float(heat[0, 7, 7]) < 1e-3
  assert float(reward.score(reward.params, jnp.asarray(img), None)[0]) == pytest.approx(-0.25, abs=1e-3)
  with pytest.raises(ValueError, match="available"):
    registry.build(ml_collections.ConfigDict(dict(name="nope")))


def test_gate_empties_clean_images_and_min_mask_area_keeps_the_others():
  """A mixed batch for the `color` reward (red patches on half the images): with the
  :runlocal mask settings (top-10 % quantile, then the heatmap-peak gate) the clean images get
  empty masks, and data.min_mask_area selects exactly the problematic examples."""
  from configs import violence  # pylint: disable=import-outside-toplevel
  from fnf_jax.fnf import run as run_lib  # pylint: disable=import-outside-toplevel
  from fnf_jax.data import examples as examples_lib  # pylint: disable=import-outside-toplevel

  config = violence.get_config("runlocal")
  reward = registry.build(config.reward)  # removes (0.6, 0, 0)
  rng = np.random.default_rng(0)
  images = rng.uniform(0.3, 1.0, (8, 32, 32, 3)).astype(np.float32)
  images[..., 1] = 0.9  # green everywhere: nothing near the reward's colour ...
  problematic = np.array([True, False] * 4)
  for i in np.nonzero(problematic)[0]:  # ... except a patch of it on every other image
    y, x = rng.integers(0, 24, 2)
    images[i, y:y + 8, x:x + 8] = (0.6, 0.0, 0.0)
  m = np.asarray(method.reward_mask(reward, config.mask, reward.params, jnp.asarray(images),
                                        None))
  assert (m[~problematic] == 0).all() and (m[problematic].mean(axis=(1, 2)) > 0.05).all()
  # Without the gate the quantile marks 10 % of every image, clean or not.
  config.mask.gate = "none"
  ungated = np.asarray(method.reward_mask(reward, config.mask, reward.params,
                                              jnp.asarray(images), None))
  assert (ungated[~problematic].mean(axis=(1, 2)) >= 0.1).all()

  class Cached:  # the reference cache, holding the gated masks (it records each one's area)
    def area(self, index):
      return float(np.mean(m[index]))

  examples = examples_lib.make_examples([f"p{i}" for i in range(8)], 1, 0)
  config.data.min_mask_area, config.train.reference = 0.01, "cache"
  kept = run_lib.select_examples(config, examples, Cached())
  assert [e.index for e in kept] == list(np.nonzero(problematic)[0])


def test_score_gate_uses_the_reward_score():
  heat = jnp.ones((3, 4, 4))
  keep = masks.problematic(heat, jnp.asarray([0.2, 0.5, 0.9]), "score", 0.5)
  np.testing.assert_array_equal(keep, [True, False, False])
  np.testing.assert_array_equal(masks.problematic(heat * jnp.asarray([0.4, 0.5, 1.0])[:, None, None],
                                                  None, "peak", 0.5), [False, True, True])
  with pytest.raises(ValueError, match="'score', 'peak', 'none'"):
    masks.problematic(heat, None, "always", 0.5)


# ------------------------------------------------------------------------------------- lora
def _base():
  k = jax.random.split(jax.random.key(0), 3)
  return {"blk": {"attn1": {"to_q": {"kernel": jax.random.normal(k[0], (6, 4)), "bias": jnp.zeros(4)},
                            "to_out_0": {"kernel": jax.random.normal(k[1], (4, 6))}},
                  "conv": {"kernel": jax.random.normal(k[2], (3, 3, 2, 2))}}}


def test_lora_targets_init_and_merge():
  base = _base()
  params = lora.init(jax.random.key(1), base, rank=2)
  assert set(params["blk"]["attn1"]) == {"to_q", "to_out_0"}
  np.testing.assert_array_equal(params["blk"]["attn1"]["to_q"]["lora_b"], 0.0)
  merged = lora.merge(base, params, scale=2.0)
  np.testing.assert_array_equal(merged["blk"]["attn1"]["to_q"]["kernel"], base["blk"]["attn1"]["to_q"]["kernel"])
  assert merged["blk"]["conv"]["kernel"] is base["blk"]["conv"]["kernel"]  # untouched, not copied
  params["blk"]["attn1"]["to_q"]["lora_b"] = jnp.ones((2, 4))
  merged = lora.merge(base, params, scale=2.0)
  delta = merged["blk"]["attn1"]["to_q"]["kernel"] - base["blk"]["attn1"]["to_q"]["kernel"]
  np.testing.assert_allclose(delta, 2.0 * params["blk"]["attn1"]["to_q"]["lora_a"] @ jnp.ones((2, 4)), rtol=1e-6)


def test_lora_bad_patterns():
  with pytest.raises(ValueError, match="matches no parameter"):
    lora.targets(_base(), "to_v")
  with pytest.raises(ValueError, match="dense kernels"):
    lora.targets(_base(), "kernel$")


# ---------------------------------------------------------------------------------- prompts
def _cfg(**kw):
  base = dict(source="list", path="", texts=[], categories=[], eval_fraction=0.2)
  return ml_collections.ConfigDict({**base, **kw})


def test_parti_categories_and_deterministic_split():
  cfg = _cfg(source="parti", path=PARTI, categories=["Animals"])
  train, _ = prompts.load(cfg, "train")
  evals, _ = prompts.load(cfg, "eval")
  everything, report = prompts.load(cfg, "all")
  assert len(everything) == 314 and report.filtered_out == 1632 - 314
  assert not set(train) & set(evals) and len(train) + len(evals) == 314
  assert 0.1 < len(evals) / 314 < 0.3
  assert prompts.load(cfg, "train")[0] == train  # stable


def test_i2p_layout_filters_on_categories(tmp_path):
  path = tmp_path / "i2p.csv"
  path.write_text('prompt,categories,hard\n"a fight, with blood","violence, shocking",1\n'
                  "a calm lake,,0\nnude statue,sexual,0\n")
  got, _ = prompts.load(_cfg(source="i2p", path=str(path), categories=["violence"], eval_fraction=0.0))
  assert got == ["a fight, with blood"]
  with pytest.raises(ValueError, match="column"):
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    prompts.load(_cfg(source="i2p", path=str(bad)))


def test_text_file_reports_empty_and_overlong_lines(tmp_path, caplog):
  path = tmp_path / "p.txt"
  path.write_text("a red circle\n\n   \n" + "word " * 100 + "\nblue square\n")
  got, report = prompts.load(_cfg(source="text", path=str(path), eval_fraction=0.0),
                             limits=[prompts.TokenLimit("words", lambda p: len(p.split()) + 2, 77),
                                     prompts.TokenLimit("letters", len, 20)])
  assert report.empty_lines == [2, 3]
  assert report.too_long == {"words": (77, [4]), "letters": (20, [4])}
  assert len(got) == 3  # over-long prompts are kept (the tokenizer truncates them), and reported
  assert "2 empty line(s)" in report.summary("p.txt") and "longer than words's 77 tokens, truncated (lines 4)" in report.summary("p.txt")
  with pytest.raises(FileNotFoundError, match="nowhere.txt"):
    prompts.load(_cfg(source="text", path=str(tmp_path / "nowhere.txt")))
  with pytest.raises(ValueError, match="parti"):
    prompts.load(_cfg(source="csv"))
