"""TFRecord files of tf.train.Example records, read and written without TensorFlow.

RichHF-18K ships as TFRecord files of `tf.train.Example`s; this module is the whole format:

* Framing: each record is `uint64 length | uint32 masked_crc32c(length bytes) | data |
  uint32 masked_crc32c(data)`, all little-endian; mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.
  CRC32C (Castagnoli) comes from `google_crc32c` or `crc32c` when importable; otherwise from a
  table here: bytewise in Python for short inputs, and for long ones 64-byte columns run across
  all lanes at once in numpy, with the lane CRCs combined pairwise by "advance over n zero
  bytes" operators (CRC is linear over GF(2)); a few hundred MB/s either way. The length CRC is
  always checked; `read_records(verify=False)` skips the data CRC.
* tf.train.Example is a small hand-written protobuf wire-format codec, not `protobuf`: no .proto
  or generated module is available without TensorFlow, and four message types do not justify a
  runtime descriptor. The tests check it against protobuf built from a runtime descriptor.
  Example{features=1: Features{feature=1: map<string, Feature>}}; Feature is a oneof of
  bytes_list=1, float_list=2, int64_list=3, each {value=1 repeated}. We write packed scalars and
  keys in UTF-8 byte order (protobuf's own deterministic order varies by runtime). We read
  packed and unpacked scalars, skip unknown fields, and follow protobuf's merge rules (a repeated
  message field merges, the last map entry for a key wins, the last oneof member wins); unlike
  protobuf, a known field with the wrong wire type is an error, not an unknown field.
"""

import os
import struct
from typing import Iterable, Iterator

import numpy as np

_POLY = 0x82F63B78  # CRC32C, reflected
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


class TFRecordError(ValueError):
  """A TFRecord file is truncated or fails a CRC check."""


class ExampleError(ValueError):
  """Bytes that are not a well-formed tf.train.Example, or a value one cannot hold."""


def _table_entry(n: int) -> int:
  for _ in range(8):
    n = (n >> 1) ^ (_POLY if n & 1 else 0)
  return n


_TABLE = [_table_entry(n) for n in range(256)]
_NP_TABLE = np.array(_TABLE, np.uint32)
_LANE = 64  # bytes per numpy lane
_ADVANCE: list[np.ndarray] = []  # [j]: (4, 256) tables of "advance over _LANE * 2**j zero bytes"


def _crc_py(data, crc: int = _U32) -> int:  # raw register in, raw register out
  t = _TABLE
  for b in data:
    crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc


def _apply(op: np.ndarray, x: np.ndarray) -> np.ndarray:  # a GF(2)-linear map, bytewise
  return (np.take(op[0], x & 0xFF) ^ np.take(op[1], (x >> 8) & 0xFF)
          ^ np.take(op[2], (x >> 16) & 0xFF) ^ np.take(op[3], x >> 24))


def _advance(j: int) -> np.ndarray:
  while len(_ADVANCE) <= j:
    basis = np.arange(256, dtype=np.uint32) << (8 * np.arange(4, dtype=np.uint32)[:, None])
    if not _ADVANCE:
      x = basis
      for _ in range(_LANE):
        x = _NP_TABLE[x & 0xFF] ^ (x >> 8)
    else:
      x = _apply(_ADVANCE[-1], _apply(_ADVANCE[-1], basis))
    _ADVANCE.append(x)
  return _ADVANCE[j]


def _crc_np(data, crc: int = _U32) -> int:
  """Blocks of up to 2**14 lanes of _LANE bytes; lane 0 of each starts from the running CRC."""
  n_lanes = len(data) // _LANE
  for first in range(0, n_lanes, 1 << 14):
    m = min(1 << 14, n_lanes - first)
    lanes = np.frombuffer(data, np.uint8, m * _LANE, first * _LANE).reshape(m, _LANE)
    k = 1 << (m - 1).bit_length()  # padded in front to a power of two with zero lanes, which
    reg = np.zeros(k, np.uint32)    # leave a CRC register of 0 unchanged
    reg[k - m] = crc
    cols = np.zeros((_LANE, k), np.uint32)
    cols[:, k - m:] = lanes.T
    for col in cols:
      reg = np.take(_NP_TABLE, (reg ^ col) & 0xFF) ^ (reg >> 8)
    j = 0
    while len(reg) > 1:
      reg = _apply(_advance(j), reg[0::2]) ^ reg[1::2]
      j += 1
    crc = int(reg[0])
  return _crc_py(memoryview(data)[n_lanes * _LANE:], crc)


def _crc32c_fallback(data) -> int:
  return (_crc_np(data) if len(data) >= 4096 else _crc_py(data)) ^ _U32


_fast = None
try:
  import google_crc32c
  _fast = lambda data: google_crc32c.value(bytes(data))  # noqa: E731
except ImportError:
  try:
    import crc32c as _crc32c_module
    _fast = _crc32c_module.crc32c
  except ImportError:
    pass


def crc32c(data) -> int:
  """CRC32C (Castagnoli) of `data`."""
  return _fast(data) if _fast else _crc32c_fallback(data)


def masked_crc32c(data) -> int:
  """The CRC TFRecord stores: crc32c rotated right by 15 bits plus 0xa282ead8."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + _MASK_DELTA) & _U32


def write_records(path, records: Iterable[bytes]) -> int:
  """Writes `records` to a TFRecord file at `path`; returns how many it wrote."""
  n = 0
  with open(path, "wb") as f:
    for rec in records:
      rec = bytes(rec)
      head = struct.pack("<Q", len(rec))
      f.write(head + struct.pack("<I", masked_crc32c(head)))
      f.write(rec)
      f.write(struct.pack("<I", masked_crc32c(rec)))
      n += 1
  return n


def read_records(path, verify: bool = True, on_corrupt=None) -> Iterator[bytes]:
  """Yields the records of the TFRecord file at `path`; `verify=False` skips the data CRCs.

  `on_corrupt(index, message)`: called for a record whose data fails its CRC, which is then
  skipped (its framing is intact, so the records after it still read); None = raise.
  A damaged header always raises: nothing after it can be found.
  """
  with open(path, "rb") as f:
    size, offset, index = os.fstat(f.fileno()).st_size, 0, 0

    def fail(problem):
      return TFRecordError(f"{os.fspath(path)}: record {index} at byte offset {offset}: {problem}")

    while True:
      head = f.read(12)
      if not head:
        return
      if len(head) < 12:
        raise fail(f"truncated header ({len(head)} of 12 bytes)")
      (length,), (crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
      if crc != masked_crc32c(head[:8]):
        raise fail("length CRC mismatch")
      if offset + 16 + length > size:
        raise fail(f"truncated record (length {length}, {size - offset - 12} bytes left)")
      data, (crc,) = f.read(length), struct.unpack("<I", f.read(4))
      if verify and crc != masked_crc32c(data):
        if on_corrupt is None:
          raise fail("data CRC mismatch")
        on_corrupt(index, str(fail("data CRC mismatch")))
      else:
        yield data
      offset += 16 + length
      index += 1


# ---- tf.train.Example -------------------------------------------------------------------------

def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(num: int, payload: bytes) -> bytes:  # a length-delimited field
  return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _as_list(name: str, value) -> tuple[int, list | np.ndarray]:
  """(kind, values): kind 1 bytes_list, 2 float_list, 3 int64_list."""
  if isinstance(value, (bytes, str, bytearray, float, int, np.generic)):
    value = [value]
  if isinstance(value, np.ndarray):
    if value.dtype.kind == "f":
      return 2, value.astype("<f4").ravel()
    if value.dtype.kind in "iub":
      if value.dtype == np.uint64 and value.size and value.max() >= 1 << 63:
        raise ExampleError(f"feature {name!r}: value out of int64 range")
      return 3, value.astype(np.int64).ravel()
    value = value.ravel().tolist()
  value = list(value)
  if all(isinstance(v, (bytes, bytearray, str, np.bytes_, np.str_)) for v in value):
    return 1, [v.encode() if isinstance(v, str) else bytes(v) for v in value]
  if all(isinstance(v, (int, np.integer)) for v in value):
    if any(not -(1 << 63) <= int(v) < 1 << 63 for v in value):
      raise ExampleError(f"feature {name!r}: value out of int64 range")
    return 3, [int(v) for v in value]
  if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
    return 2, np.asarray(value, "<f4")
  raise TypeError(f"feature {name!r}: values must be all bytes/str, all ints or all numbers")


def encode_example(features: dict) -> bytes:
  """A serialized tf.train.Example holding `features` (name -> value(s)).

  bytes/str (str as UTF-8) -> bytes_list; ints -> int64_list; floats (or ints mixed with floats)
  -> float_list (float32); an ndarray goes by dtype and is flattened; an empty list is an empty
  bytes_list. Keys go in UTF-8 byte order, numbers packed; so equal dicts give equal bytes.
  """
  entries = []
  for name in sorted(features, key=lambda k: k.encode()):
    kind, values = _as_list(name, features[name])
    if kind == 1:
      body = b"".join(_field(1, v) for v in values)
    elif kind == 2:
      body = _field(1, np.asarray(values, "<f4").tobytes()) if len(values) else b""
    else:
      body = _field(1, b"".join(_varint(int(v)) for v in values)) if len(values) else b""
    entries.append(_field(1, _field(1, name.encode()) + _field(2, _field(kind, body))))
  return _field(1, b"".join(entries))


def _bad(problem: str, pos: int) -> ExampleError:
  return ExampleError(f"malformed tf.train.Example: {problem} at byte {pos}")


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= end:
      raise _bad("truncated varint", pos)
    if shift >= 70:
      raise _bad("varint longer than 10 bytes", pos)
    b = buf[pos]
    result |= (b & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not b & 0x80:
      return result & ((1 << 64) - 1), pos


def _fields(buf, pos: int, end: int, what: str):
  """Yields (field number, wire type, value, start): value is an int (varint, fixed) or a
  (start, end) pair (length-delimited)."""
  while pos < end:
    start = pos
    key, pos = _read_varint(buf, pos, end)
    num, wire = key >> 3, key & 7
    if num == 0:
      raise _bad(f"field number 0 in {what}", start)
    if wire == 0:
      value, pos = _read_varint(buf, pos, end)
    elif wire in (1, 5):
      width = 8 if wire == 1 else 4
      if pos + width > end:
        raise _bad(f"truncated fixed-width field in {what}", start)
      value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
    elif wire == 2:
      n, pos = _read_varint(buf, pos, end)
      if pos + n > end:
        raise _bad(f"length {n} overruns {what}", start)
      value, pos = (pos, pos + n), pos + n
    else:
      raise _bad(f"wire type {wire} in {what}", start)
    yield num, wire, value, start


def _expect(wire: int, want: int, what: str, start: int):
  if wire != want:
    raise _bad(f"{what} has wire type {wire}", start)


def _decode_list(buf, kind: int, lo: int, hi: int, name: str) -> list:
  what = f"feature {name!r}"
  out = []
  for num, wire, value, start in _fields(buf, lo, hi, what):
    if num != 1:
      continue
    if kind == 1:
      _expect(wire, 2, what + " value", start)
      out.append(bytes(buf[value[0]:value[1]]))
    elif wire == 2:  # packed
      a, b = value
      if kind == 2:
        if (b - a) % 4:
          raise _bad(f"packed floats of {b - a} bytes in {what}", start)
        out.extend(np.frombuffer(buf[a:b], "<f4").tolist())
      else:
        while a < b:
          v, a = _read_varint(buf, a, b)
          out.append(v)
    else:
      _expect(wire, 5 if kind == 2 else 0, what + " value", start)
      out.append(struct.unpack("<f", value.to_bytes(4, "little"))[0] if kind == 2 else value)
  return out


def decode_example(data: bytes) -> dict[str, list | np.ndarray]:
  """The features of a serialized tf.train.Example: a list of bytes for a bytes_list, a float32
  array for a float_list, an int64 array for an int64_list ([] for a Feature with no kind)."""
  buf = memoryview(data)
  raw: dict[str, tuple[int, list]] = {}
  for num, wire, value, start in _fields(buf, 0, len(buf), "Example"):
    if num != 1:
      continue
    _expect(wire, 2, "Example.features", start)
    for num, wire, entry, start in _fields(buf, *value, "Features"):
      if num != 1:
        continue
      _expect(wire, 2, "Features.feature", start)
      name, kind, values = "", 0, []
      for num, wire, v, start in _fields(buf, *entry, "map entry"):
        if num == 1:
          _expect(wire, 2, "map key", start)
          try:
            name = str(buf[v[0]:v[1]], "utf-8")
          except UnicodeDecodeError:
            raise _bad("map key not UTF-8", start) from None
        elif num == 2:
          _expect(wire, 2, "map value", start)
          for k, w, lst, s in _fields(buf, *v, "Feature"):  # repeats merge; last kind wins
            if k in (1, 2, 3):
              _expect(w, 2, "Feature kind", s)
              values = (values if k == kind else []) + _decode_list(buf, k, *lst, name)
              kind = k
      raw[name] = (kind, values)
  out = {}
  for name, (kind, values) in raw.items():
    out[name] = (np.array(values, np.float32) if kind == 2 else
                 np.array(values, np.uint64).astype(np.int64) if kind == 3 else values)
  return out
