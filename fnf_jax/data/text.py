"""Text files read as UTF-8, with an error that points at the first bad byte."""


def decode(data: bytes, path: str) -> str:
  """`data` (the bytes of `path`) as UTF-8; an undecodable byte is reported with its line and
  offset (the TFDS prompt builders say it in the same words)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}: line {line}, byte {e.start} (0x{data[e.start]:02x}) is not UTF-8 "
                     f"({e.reason}); save the file as UTF-8") from None
