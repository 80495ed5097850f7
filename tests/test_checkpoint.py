"""Checkpointer (orbax) round trips, retention, half-written steps, resharding; preemption flag;
LoRA export key layout."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fnf_jax.runtime import checkpoint
from fnf_jax.runtime.sharding import make_mesh
from fnf_jax.fnf.train_step import TrainState


@jax.jit  # one compile instead of dozens of eager op compiles: keeps the test fast on 2 cores
def _state():
  """A tiny TrainState after one AdamW update (non-trivial moments), plus rng keys."""
  k = jax.random.split(jax.random.key(0), 3)
  lora = {"to_q": {"lora_a": jax.random.normal(k[0], (8, 2)),
                   "lora_b": jax.random.normal(k[1], (2, 8))}}
  tx = optax.adamw(1e-2)
  opt = tx.init(lora)
  updates, opt = tx.update(jax.tree.map(jnp.ones_like, lora), opt, lora)
  lora = optax.apply_updates(lora, updates)
  return {"train": TrainState(step=jnp.asarray(1, jnp.int32), lora=lora, opt_state=opt),
          "rng": k[2], "legacy_rng": jax.random.PRNGKey(7)}


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_state_meta_and_typed_keys(tmp_path):
  state, meta = _state(), {"epoch": 2, "position": 17, "config": "tiny"}
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=3, every=1) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state, meta)
    assert ckpt.latest_step() == 5
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored, meta2 = ckpt.restore(None, _abstract(state, one))
  assert meta2 == meta
  assert isinstance(restored["train"], TrainState)
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert restored["legacy_rng"].dtype == jnp.uint32
  _assert_same(restored, state)
  # the restored key continues the same random stream
  np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)),
                                jax.random.normal(state["rng"], (3,)))


def test_keep_newest_n_and_save_interval(tmp_path):
  state = {"w": jnp.arange(4.0)}
  with checkpoint.Checkpointer(tmp_path, keep=2, every=2) as ckpt:
    saved = [ckpt.save(s, state, {"s": s}) for s in range(7)]
    assert saved == [True, False, True, False, True, False, True]
    assert ckpt.save(7, state, {}, force=True)  # forced (preemption / last step) off-interval
    assert not ckpt.save(7, state, {}, force=True)  # already there: skipped, not an error
    assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_latest_step_ignores_half_written_checkpoint(tmp_path):
  state = {"w": jnp.arange(4.0)}
  with checkpoint.Checkpointer(tmp_path, keep=5, every=1) as ckpt:
    ckpt.save(2, state, {"at": 2})
  # What a save killed mid-write leaves behind: orbax writes to `<step>.orbax-checkpoint-tmp`
  # and renames it to `<step>` only once complete.
  tmp = tmp_path / "4.orbax-checkpoint-tmp" / "state"
  tmp.mkdir(parents=True)
  (tmp / "partial.bin").write_bytes(b"\0" * 10)
  with checkpoint.Checkpointer(tmp_path, keep=5, every=1) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [2]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, meta = ckpt.restore(None, _abstract(state, one))
    assert meta == {"at": 2}
    # resuming from 2 and reaching step 4 again replaces the stale temp dir
    assert ckpt.save(4, {"w": jnp.arange(4.0) + 1}, {"at": 4})
    assert ckpt.latest_step() == 4
  assert sorted(os.listdir(tmp_path)) == ["2", "4"]


def test_restore_onto_different_meshes(tmp_path):
  assert len(jax.devices()) == 8, "conftest.py must provide 8 fake CPU devices"
  mesh8 = make_mesh({"data": 2, "fsdp": 4})
  specs = {"kernel": P(None, "fsdp"), "batch": P(("data", "fsdp")), "bias": P(),
           "rng": P(("data", "fsdp"))}
  host = {"kernel": np.arange(6 * 8, dtype=np.float32).reshape(6, 8),
          "batch": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
          "bias": np.float32(3.5) * np.ones((5,), np.float32)}
  state = {k: jax.device_put(v, NamedSharding(mesh8, specs[k])) for k, v in host.items()}
  state["rng"] = jax.device_put(jax.random.split(jax.random.key(1), 8),
                                NamedSharding(mesh8, specs["rng"]))
  assert len(state["kernel"].sharding.device_set) == 8
  with checkpoint.Checkpointer(tmp_path, keep=1, every=1) as ckpt:
    ckpt.save(3, state, {})
    for axes, devices in (({"data": 1, "fsdp": 1}, jax.devices()[:1]),
                          ({"data": 4, "fsdp": 2}, jax.devices())):
      mesh = make_mesh(axes, devices)
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k]))
                  for k, v in state.items()}
      restored, _ = ckpt.restore(3, abstract)
      for k in state:
        assert restored[k].sharding == abstract[k].sharding, k
        assert restored[k].sharding.mesh.shape == mesh.shape
      _assert_same(restored, state)


def test_errors_name_the_problem(tmp_path):
  with checkpoint.Checkpointer(tmp_path, keep=1, every=1) as ckpt:
    with pytest.raises(ValueError, match="bad"):
      ckpt.save(0, {"w": jnp.ones(2)}, {"ok": 1, "bad": object()})
    ckpt.save(0, {"w": jnp.ones(2)}, {})
    with pytest.raises(ValueError, match=r"\['w'\] has no sharding"):
      ckpt.restore(0, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(FileNotFoundError, match=r"step 9 .*available steps: \[0\]"):
      ckpt.restore(9, {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="keep must be"):
    checkpoint.Checkpointer(tmp_path, keep=0, every=1)


def test_sigterm_sets_flag_without_killing():
  before = signal.getsignal(signal.SIGTERM)
  should_stop = checkpoint.install_preemption_handler()
  try:
    assert not should_stop() and not should_stop(3)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not should_stop() and time.time() < deadline:
      time.sleep(0.01)
    assert should_stop() and should_stop(4)
  finally:
    should_stop.uninstall()
  assert signal.getsignal(signal.SIGTERM) == before


def _lora_tree(rank):
  rng = np.random.default_rng(0)
  layer = lambda i, o: {"lora_a": rng.normal(size=(i, rank)).astype(np.float32),
                        "lora_b": rng.normal(size=(rank, o)).astype(np.float32)}
  attn = {"to_q": layer(32, 16), "to_out_0": layer(16, 32)}
  return {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": attn}}},
          "mid_block": {"attentions_0": {"transformer_blocks_0": {"ff": {"net_2": layer(64, 32)}}}},
          "time_embedding": {"linear_1": layer(8, 32)}}


def test_export_lora_safetensors_layout(tmp_path):
  from safetensors import safe_open
  tree, path = _lora_tree(rank=4), tmp_path / "lora" / "lora.safetensors"
  shapes = checkpoint.export_lora_safetensors(tree, path, alpha=8.0, rank=4)
  pre = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
  expected = {f"{pre}.to_q.lora_A.weight": (4, 32), f"{pre}.to_q.lora_B.weight": (16, 4),
              f"{pre}.to_out.0.lora_A.weight": (4, 16), f"{pre}.to_out.0.lora_B.weight": (32, 4),
              "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora_A.weight": (4, 64),
              "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora_B.weight": (32, 4),
              "unet.time_embedding.linear_1.lora_A.weight": (4, 8),
              "unet.time_embedding.linear_1.lora_B.weight": (32, 4)}
  assert shapes == expected
  with safe_open(str(path), framework="numpy") as f:
    assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == expected
    meta = f.metadata()
    a = f.get_tensor(f"{pre}.to_q.lora_A.weight")
    b = f.get_tensor(f"{pre}.to_q.lora_B.weight")
  q = tree["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
  # torch: delta_W [out, in] = B @ A; ours: delta_kernel [in, out] = a @ b, its transpose
  np.testing.assert_allclose(b @ a, (q["lora_a"] @ q["lora_b"]).T, rtol=1e-6)
  assert (meta["alpha"], meta["rank"], meta["format"]) == ("8.0", "4", "pt")
  adapter = json.loads(meta["lora_adapter_metadata"])
  assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 8.0
  assert f"{pre[5:]}.to_out.0" in adapter["unet.target_modules"]
  with pytest.raises(ValueError, match=r"to_q: lora_a \(32, 4\)"):
    checkpoint.export_lora_safetensors(tree, tmp_path / "x.safetensors", alpha=1.0, rank=2)


def test_export_loads_into_diffusers_unet(tmp_path):
  """diffusers + peft (both in the test extra) read the file into a tiny UNet with the right
  scale."""
  pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
      out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
      attention_head_dim=8, norm_num_groups=16)
  sd = unet.state_dict()
  rank, rng = 2, np.random.default_rng(0)
  tree = {}
  for name in ("to_q", "to_k", "to_out_0"):
    torch_name = name.replace("_0", ".0")
    w = sd[f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{torch_name}.weight"]
    tree[name] = {"lora_a": rng.normal(size=(w.shape[1], rank)).astype(np.float32),
                  "lora_b": rng.normal(size=(rank, w.shape[0])).astype(np.float32)}
  lora = {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn2": tree}}}}
  checkpoint.export_lora_safetensors(lora, tmp_path / "lora.safetensors", alpha=8.0, rank=rank)
  unet.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="unet")
  config = next(iter(unet.peft_config.values()))
  assert (config.r, config.lora_alpha) == (rank, 8.0)
  layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
  name = next(iter(layer.lora_A))
  np.testing.assert_allclose(layer.lora_A[name].weight.detach().numpy(), tree["to_q"]["lora_a"].T)
  assert layer.scaling[name] == pytest.approx(8.0 / rank)
  del torch
