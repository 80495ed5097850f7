"""Training examples (prompt, seed) and the deterministic feed that batches them.

An example is a prompt and a seed; the seed alone determines its initial noise x_T (and its
sampler noise when eta > 0), so the reference model and the fine-tuned model see the same noise,
a cached reference stays valid, and a resumed run sees exactly the batches it would have seen.
The feed's position counts examples consumed, across epochs; each epoch is a fresh permutation.

Random streams: an example's seed is a 63-bit hash of (base seed, index), so two base seeds
(`--config.seed`) share no x_T; the training loop's LoRA init and per-step keys come from a
split of `jax.random.key(config.seed)` (fnf_jax/jobs/train.py), and the feed's order from numpy's
generator on (seed, epoch): none of the three streams reuses another's values.
"""

import dataclasses
import functools
import queue
import threading
from typing import Callable, Iterable, Iterator

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  index: int  # position in the canonical (prompt-major) list; the reference cache's key
  prompt: str
  seed: int


def example_seed(base_seed: int, index: int) -> int:
  """The seed of example `index` under `base_seed`: a 63-bit hash of both (fits jax's int64)."""
  state = np.random.SeedSequence([base_seed, index]).generate_state(1, np.uint64)[0]
  return int(state >> np.uint64(1))


def make_examples(prompts: list[str], seeds_per_prompt: int, base_seed: int) -> list[Example]:
  return [Example(i * seeds_per_prompt + j, p, example_seed(base_seed, i * seeds_per_prompt + j))
          for i, p in enumerate(prompts) for j in range(seeds_per_prompt)]


class Feed:
  """Global batches of examples at any position (so resuming mid-epoch is just a number)."""

  def __init__(self, examples: list[Example], batch_size: int, shuffle_seed: int):
    if not examples:
      raise ValueError("no training examples")
    self.examples, self.batch_size, self.shuffle_seed = examples, batch_size, shuffle_seed

  @functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.examples))

  def batch_at(self, position: int) -> list[Example]:
    n = len(self.examples)
    return [self.examples[int(self._order(p // n)[p % n])]
            for p in range(position, position + self.batch_size)]


def initial_noise(seed: int, latent_shape: tuple[int, ...]) -> np.ndarray:
  """x_T of one example (the `sample` job draws it the same way)."""
  return np.asarray(jax.random.normal(jax.random.key(seed), latent_shape))


def sampler_noise(seed: int, num_steps: int, latent_shape: tuple[int, ...]) -> np.ndarray:
  return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1),
                                      (num_steps,) + tuple(latent_shape)))


def prompt_limits(pipe, reward=None) -> list:
  """The token limits of the tokenizers that read a job's prompts (fnf_jax.data.prompts): the
  pipeline's first text encoder (CLIP's encode counts no bos / eos: +2), and the reward's own
  tokenizer where it has one. Every job that reads prompts passes these, so each reports an
  over-long prompt the same way."""
  from fnf_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  tok = pipe.tokenizers[0]
  limits = [prompts_lib.TokenLimit("the text encoder", lambda p: len(tok.encode(p)) + 2,
                                   tok.model_max_length)]
  if reward is not None and reward.prompt_limit is not None:
    limits.append(reward.prompt_limit)
  return limits


def host_batch(pipe, examples: list[Example], *, negative_prompt: str, num_steps: int,
               eta: float, reward=None) -> dict:
  """The step's inputs for `examples` as numpy arrays (each process passes its own rows of the
  global batch: fnf_jax.data.batch.host_rows); with a reward that tokenizes prompts its own way,
  also its ids ("reward_ids")."""
  prompts = [e.prompt for e in examples]
  batch = {
      "ids": pipe.tokenize(prompts),
      "neg_ids": pipe.tokenize([negative_prompt] * len(examples)),
      "x_T": np.stack([initial_noise(e.seed, pipe.latent_shape) for e in examples]),
      "index": np.asarray([e.index for e in examples], np.int32),
  }
  if reward is not None and reward.tokenize is not None:
    batch["reward_ids"] = np.asarray(reward.tokenize(prompts), np.int32)
  if eta > 0:
    batch["noise"] = np.stack([sampler_noise(e.seed, num_steps, pipe.latent_shape)
                               for e in examples], axis=1)
  return batch


_END = object()


def prefetch(make: Callable[[int], dict], positions: Iterable[int], depth: int) -> Iterator[dict]:
  """make(p) for each position, in order, built up to `depth` ahead by a background thread, so
  the host prepares the next batches while the devices compute (depth 0: built when asked).

  An exception in `make` is raised by the iterator at that item; closing the iterator stops
  the thread.
  """
  if depth <= 0:
    yield from map(make, positions)
    return
  items: queue.Queue = queue.Queue(maxsize=depth)
  closed = threading.Event()

  def put(item) -> bool:
    while not closed.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for p in positions:
        if not put((make(p), None)):
          return
    except BaseException as e:  # pylint: disable=broad-except  # re-raised by the consumer
      put((None, e))
      return
    put((_END, None))

  threading.Thread(target=work, daemon=True, name="fnf-prefetch").start()
  try:
    while True:
      item, error = items.get()
      if error is not None:
        raise error
      if item is _END:
        return
      yield item
  finally:
    closed.set()
