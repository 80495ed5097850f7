"""Logical axis names -> mesh shardings: one translation for parameters and batch arrays, a
golden table of how an SD1.5-shaped UNet is split on a 2 x 4 mesh of fake CPU devices, and the
warning for a large parameter that stays replicated."""

import logging
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from fnf_jax.diffusion import random_models
from fnf_jax.runtime import sharding
from fnf_jax.data import batch as batch_lib
from fnf_jax.models import convert
from fnf_jax.models import unet as unet_lib

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "sd15_unet_kernels_2x4.txt")
RULES = (("batch", ("data", "fsdp")), ("mlp", "fsdp"), ("conv_out", "fsdp"), ("vocab", "fsdp"))


def _table(abstract, shardings) -> list[str]:
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  specs = traverse_util.flatten_dict(shardings, is_leaf=lambda _, x: hasattr(x, "spec"))
  return [f"{'/'.join(k)} {tuple(v.shape)} {tuple(specs[k].spec)}"
          for k, v in sorted(flat.items()) if k[-1] == "kernel"]


def test_sd15_unet_kernels_on_a_2x4_mesh_match_the_golden_table():
  """Which kernels of SD1.5's UNet (abstract: no weights) are split over fsdp, and along which
  dimension. Regenerate with FNF_UPDATE_GOLDEN=1 after a deliberate change of the rules."""
  cfg = unet_lib.UNetConfig.from_dict(random_models.SD15_UNET)
  abstract = convert.abstract_params(unet_lib.UNet2DConditionModel(cfg),
                                     *unet_lib.dummy_inputs(cfg))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  table = _table(abstract, sharding.logical_shardings(abstract, mesh, RULES))
  if os.environ.get("FNF_UPDATE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      f.write("\n".join(table) + "\n")
  with open(GOLDEN) as f:
    assert table == f.read().splitlines()
  split = [row for row in table if "'fsdp'" in row]
  # Every kernel but the two time-embedding MLP layers (whose [*, embed] axes no rule maps) is
  # split over the 4 fsdp devices: along its output (Dense) or output channels (Conv), except
  # the attention and feed-forward output projections [mlp, embed], split along their input.
  assert len(table) == 282 and len(split) == 280
  by_input = [r.split()[0] for r in split if r.endswith("('fsdp', None)")]
  assert all(r.endswith("'fsdp')") for r in split if r.split()[0] not in by_input)
  assert by_input and all(p.endswith(("to_out_0/kernel", "ff/net_2/kernel")) for p in by_input)
  assert {r.split()[0] for r in table if r not in split} == {
      "time_embedding/linear_1/kernel", "time_embedding/linear_2/kernel"}


def _boxed(shape, names):
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32), names)


def test_large_replicated_parameter_is_named_in_a_warning(caplog):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  tree = {"square": _boxed((1536, 1536), ("embed", "embed")),  # no rule: replicated, warned
          "odd": _boxed((1536, 1001), ("embed", "mlp")),  # 1001 % 4: replicated, warned
          "split": _boxed((1536, 1024), ("embed", "mlp")),  # split over fsdp: fine
          "small": _boxed((64, 64), ("embed", "embed"))}  # replicated but small: fine
  with caplog.at_level(logging.WARNING):
    out = sharding.logical_shardings(tree, mesh, RULES)
  assert out["split"].spec == P(None, "fsdp") and out["odd"].spec == P(None, None)
  warned = sorted(r.getMessage() for r in caplog.records if "is replicated" in r.getMessage())
  assert len(warned) == 2
  assert "['odd'] (1536, 1001)" in warned[0] and "('embed', 'mlp')" in warned[0]
  assert "['square'] (1536, 1536)" in warned[1] and "8 devices" in warned[1]
  # Pure data parallelism replicates every parameter by design: no warning.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    sharding.logical_shardings(tree, sharding.make_mesh({"data": 8, "fsdp": 1}), RULES)
  assert not [r for r in caplog.records if "is replicated" in r.getMessage()]


def test_batch_arrays_use_the_same_translation():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  batch = {"ids": np.zeros((1, 8, 77), np.int32), "x_T": np.zeros((8, 8, 8, 4)),
           "noise": np.zeros((4, 8, 8, 8, 4))}
  out = batch_lib.batch_shardings(batch, mesh, RULES)
  assert out["ids"].spec == P(None, ("data", "fsdp"), None)
  assert out["noise"].spec == P(None, ("data", "fsdp"), None, None, None)
  assert out["x_T"].spec == sharding.logical_to_spec(("batch", None, None, None), RULES)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh({"data": 4, "fsdp": 4})
