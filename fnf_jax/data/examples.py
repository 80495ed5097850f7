"""Training examples (prompt, seed) and the deterministic feed that batches them.

An example is a prompt and a seed; the seed alone determines its initial noise x_T (and its
sampler noise when eta > 0), so the reference model and the fine-tuned model see the same noise,
a cached reference stays valid, and a resumed run sees exactly the batches it would have seen.
The feed's position counts examples consumed, across epochs; each epoch is a fresh permutation.
"""

import dataclasses
import functools

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  index: int  # position in the canonical (prompt-major) list; the reference cache's key
  prompt: str
  seed: int


def make_examples(prompts: list[str], seeds_per_prompt: int, base_seed: int) -> list[Example]:
  return [Example(i * seeds_per_prompt + j, p, base_seed + i * seeds_per_prompt + j)
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


def host_batch(pipe, examples: list[Example], *, negative_prompt: str, num_steps: int,
               eta: float) -> dict:
  """The step's inputs for `examples` as numpy arrays (every process builds the global batch)."""
  prompts = [e.prompt for e in examples]
  batch = {
      "ids": pipe.tokenize(prompts),
      "neg_ids": pipe.tokenize([negative_prompt] * len(examples)),
      "x_T": np.stack([initial_noise(e.seed, pipe.latent_shape) for e in examples]),
      "index": np.asarray([e.index for e in examples], np.int32),
  }
  if eta > 0:
    batch["noise"] = np.stack([sampler_noise(e.seed, num_steps, pipe.latent_shape)
                               for e in examples], axis=1)
  return batch
