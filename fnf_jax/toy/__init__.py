"""The toy world, whole: data (world.py), the analytic judge (judge.py), the learned defect reward
(reward.py), its model family (models.py), pretraining (pretrain.py), and the demo (demo.py,
methods.py) that `make demo` runs, evaluated by the core's eval job (fnf_jax/jobs/evaluate.py).

Nothing outside this package imports it: `fnf_jax.plugins` does, and these lines register the
toy world's jobs, reward, judge and datasets with the core (names only; nothing heavy is
imported here).
"""

from fnf_jax import jobs
from fnf_jax.evaluation import judges
from fnf_jax.data import reward_datasets
from fnf_jax.rewards import registry
from fnf_jax.rewards import trainable

jobs.add("pretrain", "fnf_jax.toy.pretrain:run", "fnf_jax.toy.checks:pretrain")
jobs.add("demo", "fnf_jax.toy.demo:run", "fnf_jax.toy.checks:demo")
judges.add("toy", "fnf_jax.toy.judge:build")
registry.add("toy_defect", "fnf_jax.toy.reward:build", fields=("weights",))
trainable.add("toy_defect", "fnf_jax.toy.reward:trainable", fields=("weights", "seed"))
reward_datasets.add("toy_defects", reward_datasets.Dataset(
    "fnf_jax.toy.data:ToyDefects", heatmaps={"defect": "defect_map"}, scores={}, manual=False,
    train_split="train", eval_splits=("test",)))
