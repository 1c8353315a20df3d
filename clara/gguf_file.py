"""A small, fast reader of GGUF files (metadata, tensor directory, dequantized tensors).

`gguf.GGUFReader` builds a numpy view per string of the vocabulary and merges, which is slow for
vocabularies of tens of thousands of strings; this reader parses the header with `struct` and
leaves only the dequantization (`gguf.quants.dequantize`) to the gguf package, imported when a
tensor is read (the header needs only numpy).

Layout (GGUF v2/v3, little endian): magic "GGUF", version u32, tensor count u64, metadata count u64,
metadata key/value pairs, tensor infos (name, n_dims, dims innermost first, type, offset), padding
to `general.alignment`, then the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """Not a GGUF file, or a truncated or unsupported one; the message names the file."""


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first, e.g. (out_features, in_features)
    ggml_type: int
    offset: int  # absolute byte offset in the file


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a writable float32 array in numpy order."""
        import gguf

        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        row_bytes = info.shape[-1] // block * type_size
        raw = np.fromfile(self.path, dtype=np.uint8, count=rows * row_bytes, offset=info.offset)
        if raw.size != rows * row_bytes:
            raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
        if qtype == gguf.GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            values = raw.view(np.float16)
        else:
            values = gguf.quants.dequantize(raw.reshape(rows, row_bytes), qtype)
        return np.asarray(values, dtype=np.float32).reshape(info.shape).copy()


class _Cursor:
    def __init__(self, buf: bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: header ends early at byte {self.pos} (truncated file?)") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFFormatError(f"{self.path}: string at byte {self.pos} runs past the header (truncated file?)")
        s = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
                self.pos += size * count
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: str | Path, header_bytes: int = 64 << 20) -> GGUFFile:
    """Parse the header of a GGUF file; tensors are read on demand with `GGUFFile.tensor`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = f.read(header_bytes)
    except FileNotFoundError:
        raise GGUFFormatError(f"{path}: file not found") from None
    if buf[:4] != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (bad magic {buf[:4]!r})")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    file = GGUFFile(path=path, version=version, metadata=metadata)
    for name, shape, ggml_type, offset in infos:
        file.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, data_start + offset)
    return file
