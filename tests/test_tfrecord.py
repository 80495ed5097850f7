"""fnf_jax.data.tfrecord: TFRecord framing, CRC32C, the tf.train.Example codec (checked against
protobuf built from a runtime descriptor), and the mini RichHF-18K fixture read back."""

import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from fnf_jax.data import tfrecord
from fnf_jax.data.tfrecord import ExampleError, TFRecordError
from richhf_fixture import FEATURES, MAPS, SCORES, richhf_tokens, write_mini_richhf


# ---- CRC32C ------------------------------------------------------------------------------------

def test_crc32c_known_vectors():
  for crc in (tfrecord.crc32c, tfrecord._crc32c_fallback):
    assert crc(b"123456789") == 0xE3069283
    assert crc(bytes(32)) == 0x8A9136AA
    assert crc(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4
    assert crc(bytes(range(32))) == 0x46DD794E
    assert crc(b"") == 0


@pytest.mark.parametrize("n", [4096, 4096 + 63, 64 * 1000 + 7, (1 << 20) + 64 * 5 + 3])
def test_crc32c_numpy_lanes_match_bytewise(n):
  data = np.random.default_rng(n).bytes(n)
  assert tfrecord._crc_np(data) == tfrecord._crc_py(data)
  assert tfrecord._crc32c_fallback(data) == tfrecord.crc32c(data)


def test_masked_crc():
  c = tfrecord.crc32c(b"abc")
  assert tfrecord.masked_crc32c(b"abc") == (((c >> 15) | (c << 17)) + 0xA282EAD8) % 2**32


# ---- TFRecord framing ----------------------------------------------------------------------------

RECORDS = [b"", b"x", "héllo wörld ✓".encode(), bytes(range(256)) * 40, b"\x00" * 5000]


def test_records_round_trip(tmp_path):
  path = tmp_path / "r.tfrecord"
  assert tfrecord.write_records(path, iter(RECORDS)) == len(RECORDS)
  assert list(tfrecord.read_records(path)) == RECORDS
  assert list(tfrecord.read_records(str(path), verify=False)) == RECORDS
  raw = path.read_bytes()  # the framing itself, by hand
  assert len(raw) == sum(16 + len(r) for r in RECORDS)
  assert raw[:8] == struct.pack("<Q", 0)
  assert raw[8:12] == struct.pack("<I", tfrecord.masked_crc32c(raw[:8]))
  assert raw[12:16] == struct.pack("<I", tfrecord.masked_crc32c(b""))
  tfrecord.write_records(tmp_path / "empty", [])
  assert list(tfrecord.read_records(tmp_path / "empty")) == []


def _offsets():
  out, pos = [], 0
  for r in RECORDS:
    out.append(pos)
    pos += 16 + len(r)
  return out


@pytest.mark.parametrize("cut", [5, 12 + 100, 15])
def test_truncated_file(tmp_path, cut):
  path = tmp_path / "t.tfrecord"
  tfrecord.write_records(path, RECORDS)
  raw = path.read_bytes()
  offset = _offsets()[3]  # cut inside record 3: its header, its data, or its data CRC
  path.write_bytes(raw[:offset + cut] if cut != 15 else raw[:offset + 16 + len(RECORDS[3]) - 1])
  got = []
  with pytest.raises(TFRecordError, match=rf"t\.tfrecord: record 3 at byte offset {offset}: "
                     "truncated") as e:
    for r in tfrecord.read_records(path, verify=False):
      got.append(r)
  assert got == RECORDS[:3] and isinstance(e.value, ValueError) and str(path) in str(e.value)


@pytest.mark.parametrize("where, problem", [(3, "length CRC"), (9, "length CRC"),
                                            (12 + 7, "data CRC"), (12 + len(RECORDS[3]) + 2,
                                                                   "data CRC")])
def test_flipped_byte(tmp_path, where, problem):
  path = tmp_path / "f.tfrecord"
  tfrecord.write_records(path, RECORDS)
  raw = bytearray(path.read_bytes())
  offset = _offsets()[3]
  raw[offset + where] ^= 0x10
  path.write_bytes(bytes(raw))
  with pytest.raises(TFRecordError, match=rf"record 3 at byte offset {offset}: {problem}"):
    list(tfrecord.read_records(path))
  if problem == "data CRC":  # verify=False skips exactly this check
    assert len(list(tfrecord.read_records(path, verify=False))) == len(RECORDS)
  else:
    with pytest.raises(TFRecordError, match="length CRC"):
      list(tfrecord.read_records(path, verify=False))


# ---- tf.train.Example ----------------------------------------------------------------------------

FEATURES_ALL = {
    "bytes": [b"a", b"", "ünï ✓".encode(), bytes(range(256))],
    "str": "caption, with ünïcode ✓",
    "one_bytes": b"\x00\xff",
    "floats": [0.5, -1.25, 3e38, float("inf"), 1e-45],
    "one_float": 0.1,
    "ints": [0, 1, -1, 127, 128, -(2**63), 2**63 - 1, 300, -300],
    "one_int": 7,
    "array_f": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
    "array_i": np.array([[1, -2], [3, 2**30]], np.int32),
    "array_u8": np.array([0, 255], np.uint8),
    "empty": [],
    "empty_f": np.zeros(0, np.float32),
    "empty_i": np.zeros(0, np.int64),
    "ключ ✓": [1, 2],
    "": [b"empty key"],
}


def _expected(value):
  kind, values = tfrecord._as_list("", value)
  return (list(values) if kind == 1 else
          np.asarray(values, np.float32) if kind == 2 else np.asarray(values, np.int64))


def _assert_features_equal(got, want):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    if isinstance(v, np.ndarray):
      assert isinstance(got[k], np.ndarray) and got[k].dtype == v.dtype, k
      np.testing.assert_array_equal(got[k], v)
    else:
      assert got[k] == v, k


def test_example_round_trip_every_kind():
  got = tfrecord.decode_example(tfrecord.encode_example(FEATURES_ALL))
  _assert_features_equal(got, {k: _expected(v) for k, v in FEATURES_ALL.items()})
  assert got["str"] == ["caption, with ünïcode ✓".encode()]
  assert got["ints"].tolist() == FEATURES_ALL["ints"]
  assert got["floats"].dtype == np.float32 and got["floats"][4] > 0  # denormal kept
  assert got["array_f"].shape == (6,)
  assert tfrecord.decode_example(tfrecord.encode_example({})) == {}
  assert tfrecord.decode_example(b"") == {}


def test_encode_rejects_bad_values():
  with pytest.raises(TypeError, match="'mixed'"):
    tfrecord.encode_example({"mixed": [b"a", 1]})
  with pytest.raises(ExampleError, match="int64 range"):
    tfrecord.encode_example({"big": [2**63]})
  with pytest.raises(ExampleError, match="int64 range"):
    tfrecord.encode_example({"big": np.array([2**64 - 1], np.uint64)})
  with pytest.raises(TypeError):
    tfrecord.encode_example({"obj": [object()]})


def _v(n):
  return tfrecord._varint(n)


def _f(num, payload):
  return tfrecord._field(num, payload)


def _example(entries):  # hand-built wire bytes: entries [(key, feature bytes)]
  return _f(1, b"".join(_f(1, _f(1, k.encode()) + _f(2, feat)) for k, feat in entries))


def test_decode_unpacked_and_merges():
  unpacked_i = _f(3, b"".join(b"\x08" + _v(x) for x in (5, -1, 2**40)))
  unpacked_f = _f(2, b"".join(b"\x0d" + struct.pack("<f", x) for x in (1.5, -2.0)))
  mixed_i = _f(3, b"\x08" + _v(1) + _f(1, _v(2) + _v(-3)) + b"\x08" + _v(4))  # both styles
  unknown = b"\x98\x06" + _v(12) + b"\x25" + b"abcd"  # fields 99 (varint) and 4 (fixed32)
  got = tfrecord.decode_example(_example([
      ("ui", unpacked_i), ("uf", unpacked_f), ("mix", mixed_i),
      ("unk", unknown + _f(1, _f(1, b"z"))),
      ("dup", _f(1, _f(1, b"first"))), ("dup", _f(1, _f(1, b"second"))),  # last entry wins
      ("oneof", _f(1, _f(1, b"x")) + _f(3, b"\x08\x02")),  # last kind wins
      ("merge", _f(1, _f(1, b"p")) + _f(1, _f(1, b"q"))),  # a repeated message merges
      ("nokind", b"")]) + _f(7, b"ignored"))
  assert got["ui"].tolist() == [5, -1, 2**40] and got["ui"].dtype == np.int64
  assert got["uf"].tolist() == [1.5, -2.0] and got["uf"].dtype == np.float32
  assert got["mix"].tolist() == [1, 2, -3, 4]
  assert got["unk"] == [b"z"] and got["dup"] == [b"second"] and got["merge"] == [b"p", b"q"]
  assert got["oneof"].tolist() == [2] and got["nokind"] == []
  assert len(_v(-1)) == 10


@pytest.mark.parametrize("data, match", [
    (b"\x0a\x05\x0a\x03", "overruns"),  # length past the end
    (b"\x0a", "truncated varint"),
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
    (b"\x08\x01", "Example.features has wire type 0"),
    (b"\x0b", "wire type 3"),
    (b"\x00", "field number 0"),
    (_example([("k", _f(2, _f(1, b"abc")))]), "packed floats of 3 bytes"),
    (_example([("k", _f(1, b"\x08\x01"))]), "wire type 0"),
    (_f(1, _f(1, _f(1, b"\xff\xfe"))), "not UTF-8"),
    (b"\x0a\x02\x0d\x00", "truncated fixed"),
    (b"not a tf.train.Example at all", "malformed"),
])
def test_decode_malformed(data, match):
  with pytest.raises(ExampleError, match=match):
    tfrecord.decode_example(data)


# ---- cross-check against protobuf ----------------------------------------------------------------

def _protobuf_example_class(packed: bool):
  """tf.train.Example (tensorflow/core/example/{example,feature}.proto), built at run time."""
  descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
  from google.protobuf import descriptor_pool, message_factory
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name="tf_example_test.proto", package="tensorflow",
                                           syntax="proto3")

  def message(name, *fields):
    m = fdp.message_type.add(name=name)
    for fname, num, type_, label, type_name in fields:
      f = m.field.add(name=fname, number=num, type=type_, label=label)
      if type_name:
        f.type_name = type_name
    return m

  rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
  for name, type_ in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT),
                      ("Int64List", F.TYPE_INT64)):
    m = message(name, ("value", 1, type_, rep, None))
    if type_ != F.TYPE_BYTES:
      m.field[0].options.packed = packed
  feat = message("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                 ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                 ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List"))
  feat.oneof_decl.add(name="kind")
  for f in feat.field:
    f.oneof_index = 0
  feats = message("Features",
                  ("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry"))
  entry = feats.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt,
                  type_name=".tensorflow.Feature")
  message("Example", ("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def _to_protobuf(cls, features):
  ex = cls()
  for k, v in features.items():
    kind, values = tfrecord._as_list(k, v)
    feat = ex.features.feature[k]
    if kind == 1:
      feat.bytes_list.value.extend(values)
      feat.bytes_list.SetInParent()
    elif kind == 2:
      feat.float_list.value.extend(np.asarray(values, np.float32).tolist())
      feat.float_list.SetInParent()
    else:
      feat.int64_list.value.extend(int(x) for x in values)
      feat.int64_list.SetInParent()
  return ex


def _from_protobuf(ex):
  out = {}
  for k, feat in ex.features.feature.items():
    kind = feat.WhichOneof("kind")
    out[k] = (list(feat.bytes_list.value) if kind in ("bytes_list", None) else
              np.array(feat.float_list.value, np.float32) if kind == "float_list" else
              np.array(feat.int64_list.value, np.int64))
  return out


def _entries(example: bytes) -> list[bytes]:
  """The serialized map entries of an Example (a single features field)."""
  (num, _, (a, b), _), = tfrecord._fields(example, 0, len(example), "Example")
  return [example[x:y] for _, _, (x, y), _ in tfrecord._fields(example, a, b, "Features")]


@pytest.mark.parametrize("packed", [True, False])
def test_protobuf_cross_check(packed):
  cls = _protobuf_example_class(packed)
  want = {k: _expected(v) for k, v in FEATURES_ALL.items()}
  theirs = _to_protobuf(cls, FEATURES_ALL).SerializeToString(deterministic=True)
  ours = tfrecord.encode_example(FEATURES_ALL)
  _assert_features_equal(tfrecord.decode_example(theirs), want)  # theirs, parsed by us
  _assert_features_equal(_from_protobuf(cls.FromString(ours)), want)  # ours, parsed by them
  if packed:  # byte for byte, up to map order (protobuf's deterministic order is per runtime)
    assert sorted(_entries(ours)) == sorted(_entries(theirs))
    for k, v in FEATURES_ALL.items():
      one = _to_protobuf(cls, {k: v}).SerializeToString(deterministic=True)
      assert tfrecord.encode_example({k: v}) == one, k
  else:
    assert len(theirs) > len(ours)
  # a RichHF-shaped example, both ways
  rich = {"filename": b"train/x.png", "overall_score": [0.75], "artifact_map": b"\x89PNG..",
          "prompt_misalignment_label": b"1 0 1"}
  assert cls.FromString(tfrecord.encode_example(rich)).features.feature[
      "overall_score"].float_list.value[0] == 0.75


# ---- the mini RichHF-18K fixture -----------------------------------------------------------------

def test_mini_richhf_reads_back(tmp_path):
  m = write_mini_richhf(tmp_path, n_train=24, n_dev=6, n_test=6, seed=0, map_size=64)
  assert [os.path.basename(m["splits"][s]["path"]) for s in ("train", "dev", "test")] == [
      "train.tfrecord", "dev.tfrecord", "test.tfrecord"]
  with open(m["prompts_path"]) as f:
    prompts = json.load(f)
  assert len(prompts) == 36
  assert sorted(b["reason"] for b in m["bad"]) == ["bad_artifact_map", "missing_image"]
  assert {b["split"] for b in m["bad"]} == {"train"}
  for split, n in (("train", 24), ("dev", 6), ("test", 6)):
    entries = m["splits"][split]["records"]
    path = m["splits"][split]["path"]
    examples = [tfrecord.decode_example(r) for r in tfrecord.read_records(path)]
    assert len(examples) == len(entries) == n
    for ex, want in zip(examples, entries):
      assert sorted(ex) == sorted(FEATURES)
      filename = ex["filename"][0].decode()
      assert filename == want["filename"] and filename.startswith(
          "test/" if split == "test" else "train/") and filename.endswith(".png")
      for k in SCORES:
        assert ex[k].shape == (1,) and ex[k].dtype == np.float32 and 0 <= ex[k][0] <= 1
        assert ex[k][0] == want["scores"][k]
      label = ex["prompt_misalignment_label"][0].decode().split(" ")
      assert set(label) <= {"0", "1"} and [int(x) for x in label] == want["label"]
      assert len(label) == len(richhf_tokens(prompts[filename])) == len(want["tokens"])
      image = os.path.join(m["images_dir"], filename)
      assert image == want["image_path"]
      assert os.path.exists(image) == (want["bad"] != "missing_image")
      for k in MAPS:
        if want["bad"] == "bad_artifact_map" and k == "artifact_map":
          with pytest.raises(Exception):
            Image.open(io.BytesIO(ex[k][0])).load()
          continue
        img = np.asarray(Image.open(io.BytesIO(ex[k][0])))
        assert img.shape == (64, 64) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, want[k])
  good = [r for r in m["splits"]["train"]["records"] if r["bad"] is None]
  with Image.open(good[0]["image_path"]) as img:
    assert img.mode == "RGB" and img.size == (64, 64)
  assert richhf_tokens('a "red" cat, on a mat. really?!') == ["a", "red", "cat", "on", "a", "mat",
                                                               "really"]


def test_mini_richhf_is_deterministic(tmp_path):
  a = write_mini_richhf(tmp_path / "a", n_train=4, n_dev=1, n_test=1, seed=3)
  b = write_mini_richhf(tmp_path / "b", n_train=4, n_dev=1, n_test=1, seed=3)
  for s in ("train", "dev", "test"):
    name = f"{s}.tfrecord"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  assert [r["prompt"] for r in a["splits"]["train"]["records"]] == [
      r["prompt"] for r in b["splits"]["train"]["records"]]
