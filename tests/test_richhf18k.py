"""The richhf18k TFDS builder on a mini RichHF-18K written in the dataset's schema
(tests/richhf_fixture.py): counts, decoded values, token labels, and every bad record named."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fnf_jax.data import reward_data
from fnf_jax.data import richhf18k
from fnf_jax.data import tfds_lib
from fnf_jax.data import tfrecord
from richhf_fixture import richhf_tokens, write_mini_richhf


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("richhf")
  manifest = write_mini_richhf(root / "manual")
  builder, dropped = tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(root / "data"),
                                      manual_dir=str(root / "manual"))
  return manifest, builder, dropped, root


def _by_filename(source) -> dict:
  return {r["filename"].decode(): r for r in (source[i] for i in range(len(source)))}


def test_counts_and_the_two_bad_records_by_name(built):
  manifest, builder, dropped, _ = built
  for split, info in manifest["splits"].items():
    good = [r for r in info["records"] if not r["bad"]]
    assert builder.info.splits[split].num_examples == len(good)
    assert len(builder.as_data_source(split)) == len(good)
  assert len(builder.as_data_source("train")) == 24 - 2
  want = {(b["split"], b["filename"], b["reason"]) for b in manifest["bad"]}
  got = {(d["split"], d["name"], d["reason"].split(":")[0]) for d in dropped}
  assert got == want
  assert {r for _, _, r in got} == {"missing_image", "bad_artifact_map"}
  missing = next(d for d in dropped if d["reason"].startswith("missing_image"))
  assert missing["name"] in missing["reason"]  # the path of the absent file is in the report
  with open(os.path.join(builder.data_dir, tfds_lib.DROPPED)) as f:
    assert json.load(f) == dropped


def test_decoded_values_and_token_labels(built):
  manifest, builder, _, _ = built
  for split, info in manifest["splits"].items():
    got = _by_filename(builder.as_data_source(split))
    for rec in (r for r in info["records"] if not r["bad"]):
      ex = got[rec["filename"]]
      assert ex["prompt"].decode() == rec["prompt"]
      for m in richhf18k.MAPS:
        assert ex[m].shape == (64, 64) and ex[m].dtype == np.uint8
        np.testing.assert_array_equal(ex[m], rec[m])
      for s in richhf18k.SCORES:
        assert np.float32(ex[s]) == rec["scores"][s]
      with open(rec["image_path"], "rb") as f:
        assert ex["image"] == f.read()
      assert np.asarray(Image.open(io.BytesIO(ex["image"]))).shape == (64, 64, 3)
      # One label per RichHF token of the prompt, in order.
      assert [t.decode() for t in ex["tokens"]] == richhf_tokens(rec["prompt"]) == rec["tokens"]
      assert list(ex["token_label"]) == rec["label"]


def test_decode_resizes_to_the_model(built):
  _, builder, _, _ = built
  decode = reward_data.Decode((32, 48), (16, 16), (("implausibility", "artifact_map"),),
                              (("plausibility", "artifact_score"),))
  ex = decode(builder.as_data_source("dev")[0])
  assert ex["image"].shape == (32, 48, 3) and ex["image"].dtype == np.uint8
  assert ex["heatmap/implausibility"].shape == (16, 16)
  assert ex["heatmap/implausibility"].dtype == np.uint8
  assert isinstance(ex["prompt"], str) and ex["score/plausibility"].dtype == np.float32


def test_a_second_prepare_reuses_the_build(built, monkeypatch):
  _, builder, dropped, root = built
  monkeypatch.setattr(richhf18k.Richhf18k, "_generate_examples",
                      lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
  again, dropped_again = tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(root / "data"),
                                          manual_dir=str(root / "manual"))
  assert dropped_again == dropped
  assert again.info.splits["train"].num_examples == builder.info.splits["train"].num_examples


def test_corrupt_and_mislabelled_records_are_dropped_by_name(tmp_path):
  manifest = write_mini_richhf(tmp_path / "manual", n_train=5, n_dev=3, n_test=3, seed=3)
  dev = manifest["splits"]["dev"]
  records = list(tfrecord.read_records(dev["path"]))
  raw = tfrecord.decode_example(records[1])
  raw["prompt_misalignment_label"] = [b"1"]  # one label, for a prompt of several tokens
  records[1] = tfrecord.encode_example(raw)
  tfrecord.write_records(dev["path"], records)
  with open(dev["path"], "r+b") as f:  # flip a data byte of record 2: its CRC fails
    offset = sum(16 + len(r) for r in records[:2])
    f.seek(offset + 12 + 5)
    byte = f.read(1)
    f.seek(offset + 12 + 5)
    f.write(bytes([byte[0] ^ 0xFF]))
  builder, dropped = tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(tmp_path / "data"),
                                      manual_dir=str(tmp_path / "manual"))
  dev_dropped = [d for d in dropped if d["split"] == "dev"]
  assert len(dev_dropped) == 2 and builder.info.splits["dev"].num_examples == 1
  label = next(d for d in dev_dropped if d["reason"].startswith("bad_label"))
  assert label["name"] == dev["records"][1]["filename"]
  crc = next(d for d in dev_dropped if "CRC" in d["reason"])
  assert crc["name"] == "record 2" and dev["path"] in crc["reason"]


def test_a_file_of_another_schema_is_refused_before_building(tmp_path):
  write_mini_richhf(tmp_path / "manual", n_train=3, n_dev=1, n_test=1)
  tfrecord.write_records(tmp_path / "manual" / "test.tfrecord",
                         [tfrecord.encode_example({"image/encoded": b"x", "label": [3]})])
  with pytest.raises(tfds_lib.DataError) as e:
    tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(tmp_path / "data"),
                     manual_dir=str(tmp_path / "manual"))
  msg = str(e.value)
  assert "test.tfrecord" in msg and "artifact_map" in msg and "image/encoded" in msg
  assert not os.path.exists(tmp_path / "data" / "richhf18k" / "1.0.0" / "dataset_info.json")


def test_missing_manual_files_are_named_with_how_to_get_them(tmp_path):
  manifest = write_mini_richhf(tmp_path / "manual", n_train=3, n_dev=1, n_test=1)
  os.remove(manifest["prompts_path"])
  os.remove(manifest["splits"]["dev"]["path"])
  with pytest.raises(tfds_lib.DataError) as e:
    tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(tmp_path / "data"),
                     manual_dir=str(tmp_path / "manual"))
  msg = str(e.value)
  assert "prompts.json" in msg and "dev.tfrecord" in msg and "extract_pickapic" in msg
  with pytest.raises(tfds_lib.DataError, match="does not exist"):
    tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(tmp_path / "data"),
                     manual_dir=str(tmp_path / "nowhere"))


def test_file_names_outside_images_are_refused_naming_record_and_file(tmp_path):
  manifest = write_mini_richhf(tmp_path / "manual", n_train=3, n_dev=3, n_test=1, seed=5)
  dev = manifest["splits"]["dev"]
  # Real images outside images/, which a record could otherwise reach: one beside the manual
  # folder's files (../), one by an absolute path.
  outside = str(tmp_path / "manual" / "outside.png")
  shutil.copy(dev["records"][0]["image_path"], outside)
  names = {0: "../outside.png", 1: outside}
  records = list(tfrecord.read_records(dev["path"]))
  with open(manifest["prompts_path"]) as f:
    prompts = json.load(f)
  for index, name in names.items():
    raw = tfrecord.decode_example(records[index])
    raw["filename"] = [name.encode()]
    records[index] = tfrecord.encode_example(raw)
    prompts[name] = dev["records"][index]["prompt"]  # only the name is wrong
  tfrecord.write_records(dev["path"], records)
  with open(manifest["prompts_path"], "w") as f:
    json.dump(prompts, f)
  builder, dropped = tfds_lib.prepare(richhf18k.Richhf18k, data_dir=str(tmp_path / "data"),
                                      manual_dir=str(tmp_path / "manual"))
  assert builder.info.splits["dev"].num_examples == 1  # neither image was read in
  got = {d["name"]: d["reason"] for d in dropped if d["split"] == "dev"}
  assert got.keys() == set(names.values())
  for index, name in names.items():
    assert got[name] == (f"unsafe_filename: {dev['path']}: record {index} names {name!r}, not "
                         f"a relative path inside {tmp_path / 'manual' / 'images'}; refused")
