"""The one name -> entry table (fnf_jax/registry.py) and the five tables built on it: jobs,
judges, rewards, trainable models, reward datasets. Fast: nothing here imports jax."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
import types

import pytest

from fnf_jax import jobs, plugins
from fnf_jax.data import reward_datasets
from fnf_jax.evaluation import judges
from fnf_jax.registry import Registry, UnknownName, resolve
from fnf_jax.rewards import registry, trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Widget:
  make: str


def test_add_get_names_contains():
  table = Registry("widget", "config.widget", {"b": Widget("m:b")})
  table.add("a", Widget("m:a"))
  assert table.names() == ["a", "b"]  # sorted, not in insertion order
  assert table.get("a") == Widget("m:a")
  assert "a" in table and "z" not in table
  assert table.entries() == {"a": Widget("m:a"), "b": Widget("m:b")}
  table.entries()["c"] = Widget("m:c")  # a copy: the table is changed only through add
  assert "c" not in table


def test_a_name_registered_twice_raises_and_keeps_the_first():
  table = Registry("widget", entries={"a": Widget("m:a")})
  with pytest.raises(ValueError, match="widget 'a' registered twice"):
    table.add("a", Widget("m:other"))
  assert table.get("a") == Widget("m:a")


def test_an_unknown_name_lists_the_valid_ones():
  keyed = Registry("widget", "config.widget", {"b": 1, "a": 2})
  with pytest.raises(UnknownName) as e:
    keyed.get("z")
  # Both: jobs and datasets raised KeyError, judges, rewards and models ValueError.
  assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
  # The message itself, not KeyError's repr of it.
  assert str(e.value) == "config.widget = 'z' is not one of ['a', 'b']"
  with pytest.raises(UnknownName) as e:
    Registry("widget", entries={"a": 1}).get("z")
  assert str(e.value) == "widget 'z' is not registered; available: ['a']"


def test_plugins_add_their_entries_on_the_first_lookup(tmp_path, monkeypatch):
  table = Registry("widget", entries={"core": 1})
  monkeypatch.setitem(sys.modules, "fake_table", types.SimpleNamespace(TABLE=table))
  (tmp_path / "fake_plugin.py").write_text(
      "import fake_table\nfake_table.TABLE.add('from_plugin', 2)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(plugins, "PACKAGES", ("fake_plugin",))
  monkeypatch.setattr(plugins, "_loaded", False)
  try:
    table.add("added", 3)  # the plugins' own calls: adding loads nothing
    assert "fake_plugin" not in sys.modules
    assert table.get("from_plugin") == 2
    assert table.names() == ["added", "core", "from_plugin"]  # loaded once, not again
  finally:
    sys.modules.pop("fake_plugin", None)


def test_resolve_imports_the_module_only_when_asked():
  assert resolve("os.path:join") is os.path.join
  assert resolve("fnf_jax.registry:Registry") is Registry
  with pytest.raises(ValueError, match="'os.path' is not a 'module:attr' target"):
    resolve("os.path")
  with pytest.raises(AttributeError):
    resolve("os.path:no_such_function")


# table, its entries (the toy world's included) and the message an unknown name gets.
TABLES = [
    (jobs.JOBS, ["cache", "demo", "eval", "eval_reward", "pretrain", "sample", "train",
                 "train_reward"], "config.job = 'nope' is not one of {}"),
    (judges.JUDGES, ["toy"], "judge 'nope' is not registered; available: {}"),
    (registry.REWARDS, ["clip_score", "color", "laion_aesthetic", "laion_nsfw", "q16",
                        "rahf_alignment", "rahf_plausibility", "toy_defect", "zero_shot_safety"],
     "reward 'nope' is not registered; available: {}"),
    (trainable.FAMILIES, ["rahf", "toy_defect"], "model.name = 'nope' is not one of {}"),
    (reward_datasets.DATASETS, ["richhf18k", "toy_defects"], "data.name = 'nope' is not one of {}"),
]


@pytest.mark.parametrize("table, names, message", TABLES, ids=lambda t: getattr(t, "kind", ""))
def test_the_five_tables_are_registries(table, names, message):
  assert isinstance(table, Registry)
  assert table.names() == names
  with pytest.raises(UnknownName) as e:
    table.get("nope")
  assert str(e.value) == message.format(names)
  for entry in table.entries().values():  # every target's module is there (not imported)
    targets = [entry] if isinstance(entry, str) else [
        getattr(entry, f) for f in ("run", "check", "builder") if hasattr(entry, f)]
    for target in targets:
      assert importlib.util.find_spec(target.partition(":")[0]), target


def test_the_modules_functions_are_the_tables():
  assert jobs.names() == jobs.JOBS.names()
  assert jobs.get("train") == jobs.Job("fnf_jax.jobs.train:train",
                                       "fnf_jax.config.validate:training")
  assert jobs.resolve is resolve
  assert registry.entries()["color"] == registry.Entry("fnf_jax.rewards.color:build",
                                                       ("color", "sigma"))
  assert trainable.FAMILIES.get("toy_defect") == registry.Entry(
      "fnf_jax.toy.reward:trainable", ("weights", "seed"))
  assert reward_datasets.get("toy_defects").builder == "fnf_jax.toy.data:ToyDefects"
  assert judges.JUDGES.get("toy") == "fnf_jax.toy.judge:build"
  # The errors callers catch today: the message of each build.
  with pytest.raises(ValueError, match="available"):
    judges.build("nope")
  with pytest.raises(ValueError, match="model.name = 'nope'"):
    trainable.build(types.SimpleNamespace(name="nope"))
  with pytest.raises(KeyError, match="data.name = 'nope'"):
    reward_datasets.get("nope")


def test_validating_reads_the_tables_without_jax():
  code = ("import sys, fnf_jax.config.validate\n"
          "from fnf_jax.rewards import trainable\n"
          "heavy = {'jax', 'numpy', 'flax'} & set(sys.modules)\n"
          "assert not heavy, heavy\n"
          "from fnf_jax import jobs\n"
          "from fnf_jax.evaluation import judges\n"
          "from fnf_jax.rewards import registry\n"
          "from fnf_jax.data import reward_datasets\n"
          "for table in (jobs, judges, registry, trainable, reward_datasets):\n"
          "  assert table.names(), table\n"
          # The plugins loaded (the toy world's entries): still nothing heavy.
          "heavy = {'jax', 'numpy', 'flax'} & set(sys.modules)\n"
          "assert not heavy, heavy\n"
          "assert 'fnf_jax.jobs.sample' not in sys.modules  # targets stay unimported\n")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
