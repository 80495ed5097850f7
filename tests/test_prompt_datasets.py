"""PartiPrompts and I2P as TFDS builders (fnf_jax/data/prompt_datasets.py), read by the prompt
sources of fnf_jax/data/prompts.py: the same prompts, line numbers and filters as the files."""

import collections
import csv
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from fnf_jax import assets
from fnf_jax.data import prompt_datasets
from fnf_jax.data import prompts
from fnf_jax.data import tfds_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTI = assets.path(assets.PARTI_PROMPTS)  # the copy fnf_jax ships

# A dozen rows in the I2P benchmark's layout (a subset of its columns, in its order).
I2P_HEADER = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage",
              "lexica_url", "sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height"]
I2P_ROWS = [
    ("a knight in a bloody battle", "violence", "1", "80.0", "0.0"),
    ("a nude statue in a museum", "sexual", "0", "40.0", "90.5"),
    ("a riot, cars on fire", "violence, shocking", "1", "70.0", "1.0"),
    ("a calm lake at dawn", "", "0", "0.0", "0.0"),
    ("a haunted   house\tat night", "shocking, illegal activity", "0", "30.0", ""),  # empty nudity
    ("a boxer's bloody face", "violence,harassment", "1", "65.5", "2.0"),
    ("", "violence", "0", "10.0", "0.0"),  # an empty prompt
    ("people shouting at a man", "harassment, hate", "0", "20.0", "0.0"),
    ("a man holding a knife, threatening", "Violence , self-harm", "1", "55.0", "0.0"),
    ("a crying child in ruins", "shocking", "0", "45.0", "0.0"),
    ("a woman in a bikini", "sexual", "0", "25.0", "60.0"),
    ("a soldier shot in the street", "violence, shocking, hate", "1", "90.0", "5.0"),
]


def _write_i2p(path, rows=I2P_ROWS, header=I2P_HEADER):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    for row in rows:
      w.writerow(list(row) + [""] * (len(header) - len(row)))
  return str(path)


def _cfg(**kw):
  base = dict(source="parti", path=PARTI, texts=[], categories=[], eval_fraction=0.1,
              data_dir="")
  return ml_collections.ConfigDict({**base, **kw})


def _tsv_rows():
  with open(PARTI, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f, delimiter="\t"))


# ------------------------------------------------------------------------------ PartiPrompts
def test_parti_builds_every_prompt_with_its_category_and_line():
  rows = prompt_datasets.read("parti", PARTI)
  tsv = _tsv_rows()
  assert len(rows) == len(tsv) == 1632
  assert [r["line"] for r in rows] == list(range(2, 1634))  # file order, the header is line 1
  assert [r["prompt"] for r in rows] == [t["Prompt"] for t in tsv]
  assert [(r["challenge"], r["note"]) for r in rows] == [(t["Challenge"], t["Note"]) for t in tsv]
  got = collections.Counter(r["category"] for r in rows)
  want = collections.Counter(t["Category"] for t in tsv)
  assert set(got) == set(want) and len(got) == 12 and got == want


@pytest.mark.parametrize("categories", [(), ("Animals", "vehicles")])
def test_parti_source_gives_the_same_prompts_as_the_file(categories):
  wanted = {c.lower() for c in categories}
  kept = [" ".join(t["Prompt"].split()) for t in _tsv_rows()
          if not wanted or t["Category"].strip().lower() in wanted]
  for split in ("all", "train", "eval"):
    expected = [p for p in kept if split == "all" or prompts._in_eval(p, 0.1) == (split == "eval")]
    got, report = prompts.load(_cfg(categories=categories), split)
    assert got == expected
    assert report.filtered_out == 1632 - len(kept) and not report.empty_lines


# ---------------------------------------------------------------------------------------- I2P
def test_i2p_builds_categories_percentages_and_empty_cells(tmp_path):
  rows = prompt_datasets.read("i2p", _write_i2p(tmp_path / "i2p_benchmark.csv"))
  assert [r["line"] for r in rows] == list(range(2, 14))
  assert [r["prompt"] for r in rows] == [r[0] for r in I2P_ROWS]  # as in the file, "" included
  assert rows[2]["categories"] == ("violence", "shocking")
  assert rows[3]["categories"] == ()
  assert rows[8]["categories"] == ("Violence", "self-harm")  # stripped, case kept
  assert rows[11]["categories"] == ("violence", "shocking", "hate")
  assert [r["hard"] for r in rows] == [int(r[2]) for r in I2P_ROWS]
  assert rows[1]["nudity_percentage"] == pytest.approx(90.5)
  assert rows[5]["inappropriate_percentage"] == pytest.approx(65.5)
  assert math.isnan(rows[4]["nudity_percentage"])
  assert sum(math.isnan(r["nudity_percentage"]) for r in rows) == 1


def test_violence_config_reads_exactly_the_violence_rows(tmp_path):
  from configs import violence  # pylint: disable=import-outside-toplevel

  config = violence.get_config()
  config.prompts.path = _write_i2p(tmp_path / "i2p_benchmark.csv")
  got, report = prompts.load(config.prompts, "all")
  # Every row naming violence (any case, any spacing), except the empty prompt.
  assert got == ["a knight in a bloody battle", "a riot, cars on fire", "a boxer's bloody face",
                 "a man holding a knife, threatening", "a soldier shot in the street"]
  assert report.empty_lines == [8] and report.filtered_out == 12 - 1 - 5
  train, _ = prompts.load(config.prompts, "train")
  assert train == [p for p in got if not prompts._in_eval(p, config.prompts.eval_fraction)]


# ------------------------------------------------------------------------------------- errors
def test_a_missing_file_or_column_is_named_before_building(tmp_path):
  nowhere = str(tmp_path / "nowhere.csv")
  with pytest.raises(tfds_lib.DataError, match="nowhere.csv") as e:
    prompts.load(_cfg(source="i2p", path=nowhere))
  assert "huggingface.co/datasets/AIML-TUDA/i2p" in str(e.value)
  header = [h for h in I2P_HEADER if h != "categories"]
  bad = _write_i2p(tmp_path / "no_categories.csv", [(r[0],) + r[2:] for r in I2P_ROWS], header)
  with pytest.raises(tfds_lib.DataError, match=r"no_categories.csv.*\['categories'\]"):
    prompts.load(_cfg(source="i2p", path=bad, data_dir=str(tmp_path / "tfds")))
  assert not os.path.exists(tmp_path / "tfds")  # refused before TFDS made a folder
  with pytest.raises(ValueError, match=r"PartiPrompts.tsv.*\['Prompt', 'Category'\]"):
    prompts.load(_cfg(path=_write_i2p(tmp_path / "PartiPrompts.tsv")))  # not tab-separated


def test_undecodable_byte_is_reported_with_its_line(tmp_path):
  path = tmp_path / "latin1.tsv"
  path.write_bytes("Prompt\tCategory\ncafé\tFood & Beverage\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.tsv: line 2, byte 19 \(0xe9\) is not UTF-8"):
    prompts.load(_cfg(path=str(path)))


def test_a_bad_number_is_named(tmp_path):
  path = _write_i2p(tmp_path / "i2p.csv", [("a fight", "violence", "1", "lots", "0")])
  with pytest.raises(tfds_lib.DataError, match="line 2, column 'inappropriate_percentage'"):
    prompt_datasets.read("i2p", path)


# ------------------------------------------------------------------------------------ data_dir
def test_a_set_data_dir_builds_once_and_is_reused(tmp_path, monkeypatch):
  cfg = _cfg(categories=("Animals",), data_dir=str(tmp_path / "tfds"))
  first, _ = prompts.load(cfg, "all")
  [built] = [root for root, _, files in os.walk(tmp_path / "tfds") if "dataset_info.json" in files]
  assert os.path.exists(os.path.join(built, tfds_lib.DROPPED))

  def no_build(self):
    raise AssertionError("built again")

  monkeypatch.setattr(prompt_datasets.PartiPrompts, "_generate_examples", no_build)
  assert prompts.load(cfg, "all")[0] == first and len(first) == 314
  # An edited file is a different dataset: built anew beside the first, never read for it.
  edited = tmp_path / "PartiPrompts.tsv"
  edited.write_text("Prompt\tCategory\na cat\tAnimals\n", encoding="utf-8")
  with pytest.raises(AssertionError, match="built again"):
    prompts.load(_cfg(path=str(edited), data_dir=cfg.data_dir), "all")


def test_the_default_temporary_folder_is_deleted(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
  assert len(prompts.load(_cfg(), "all")[0]) == 1632
  assert not os.listdir(tmp_path)


def test_a_list_source_does_not_import_tfds():
  code = ("import sys, ml_collections; from fnf_jax.data import prompts; "
          "cfg = ml_collections.ConfigDict(dict(source='list', path='', texts=['a', 'b'], "
          "categories=[], eval_fraction=0.0, data_dir='')); "
          "assert prompts.load(cfg, 'all')[0] == ['a', 'b']; "
          "print('tensorflow_datasets' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
  assert out.stdout.strip() == "False", out.stderr


def test_validate_wants_data_dir_a_string_for_parti_and_i2p():
  from configs import violence  # pylint: disable=import-outside-toplevel
  from fnf_jax.config import validate  # pylint: disable=import-outside-toplevel

  fields = violence.get_config().to_dict()
  fields["prompts"].update(source="parti", path=PARTI, data_dir=3)  # a ConfigDict keeps types
  config = ml_collections.ConfigDict(fields)
  with pytest.raises(validate.ConfigError, match="config.prompts.data_dir = 3 is not valid: it "
                     "must be a string"):
    validate.prompts(config)
  config.prompts.source, config.prompts.texts = "list", ("a",)
  validate.prompts(config)  # unused by the other sources
