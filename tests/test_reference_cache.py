"""The reference cache's files: random access by example reading only those bytes, resume, and
the errors of a cache that does not fit."""

import os

import numpy as np
import pytest

from configs import violence
from fnf_jax.fnf import reference_cache as reference
from fnf_jax.data import examples as examples_lib

SIZE = 64


def values(indices):
  rng = np.random.default_rng(int(indices[0]))
  return (rng.random((len(indices), SIZE, SIZE, 3), np.float32),
          rng.random((len(indices), SIZE, SIZE), np.float32))


def compute(chunk, calls=None):
  if calls is not None:
    calls.append([e.index for e in chunk])
  idx = np.asarray([e.index for e in chunk])
  return (idx, *values(idx))


def rchar() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.fixture(name="setting")
def fixture_setting():
  config = violence.get_config("runlocal")
  examples = examples_lib.make_examples([f"p{i}" for i in range(21)], 1, 0)
  return config, examples


def test_rows_read_back_exactly_and_alone(tmp_path, setting):
  config, examples = setting
  workdir = str(tmp_path)
  reference.write(workdir, config, examples, compute, shard_size=8, batch_size=4)
  cache = reference.Cache(workdir, config, examples)
  asked = [20, 3, 17, 3, 0, 9]
  # Each example's values as its batch computed them (batches of 4 within shards of 8; the
  # last batch of 21 examples was padded).
  want = {}
  for k in range(0, 21, 8):
    for s in range(k, min(k + 8, 21), 4):
      idx = list(range(s, min(s + 4, k + 8, 21)))
      ref, mask = values(np.asarray(idx + idx[-1:] * (4 - len(idx))))
      want.update({i: (ref[j], mask[j]) for j, i in enumerate(idx)})
  before = rchar()
  ref, mask = cache.get(asked)
  read = rchar() - before
  for j, i in enumerate(asked):
    np.testing.assert_array_equal(ref[j], want[i][0])
    np.testing.assert_array_equal(mask[j], want[i][1])
    assert cache.area(i) == pytest.approx(float(np.mean(want[i][1])), rel=1e-6)
  returned = ref.nbytes + mask.nbytes
  assert returned <= read <= 2 * returned, (read, returned)


def test_an_interrupted_cache_resumes_at_its_first_unfinished_shard(tmp_path, setting):
  config, examples = setting
  workdir = str(tmp_path)

  def dies_in_shard_2(chunk):
    if chunk[0].index >= 16:
      raise KeyboardInterrupt
    return compute(chunk)

  with pytest.raises(KeyboardInterrupt):
    reference.write(workdir, config, examples, dies_in_shard_2, shard_size=8, batch_size=4)
  assert not reference.is_complete(workdir)
  with pytest.raises(FileNotFoundError, match="job=cache"):
    reference.Cache(workdir, config, examples)
  calls = []
  reference.write(workdir, config, examples, lambda c: compute(c, calls), shard_size=8,
                  batch_size=4)
  assert [c[0] for c in calls] == [16, 20]  # shards 0 and 1 were kept
  assert reference.is_complete(workdir)
  np.testing.assert_array_equal(reference.Cache(workdir, config, examples).get([5])[0][0],
                                values(np.arange(4, 8))[0][1])


def test_a_cache_of_other_settings_or_a_truncated_file_is_refused(tmp_path, setting):
  config, examples = setting
  workdir = str(tmp_path)
  reference.write(workdir, config, examples, compute, shard_size=8, batch_size=4)
  other = violence.get_config("runlocal")
  other.sampling.num_steps = 5
  with pytest.raises(ValueError, match="another model, prompt set or sampling"):
    reference.Cache(workdir, other, examples)
  with pytest.raises(ValueError, match="nothing was overwritten"):
    reference.write(workdir, other, examples, compute, shard_size=8, batch_size=4)
  path = os.path.join(reference.directory(workdir), "shard_00001.p000.reference.npy")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  cache = reference.Cache(workdir, config, examples)
  cache.get([0])  # another shard still reads
  with pytest.raises(ValueError, match=r"shard_00001\.p000\.reference\.npy: row 7 is truncated"):
    cache.get([15])
