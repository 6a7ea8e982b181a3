"""A fast GGUF reader: key/value metadata as plain Python values, tensor infos, memory-mapped data.

The `gguf` package's GGUFReader builds a numpy view per array element, which takes seconds for a 49k-token
vocabulary; this reader decodes the header in one pass (string arrays in a tight loop, numeric arrays with
one np.frombuffer), and maps the tensor data copy-on-write so torch can wrap it without copying.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from tokenloom.config import TokenloomError

_SCALARS = {  # GGUFValueType -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: np.ndarray  # ggml order (innermost first), as the gguf package reports it
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file


_U64 = struct.Struct("<Q")


class _Header:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise EOFError("header ends early")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise EOFError("header ends early")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: ~50k of them, so one tight loop)."""
        buf, pos, size, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out = [""] * count
        for i in range(count):
            if pos + 8 > size:
                raise EOFError("header ends early")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise EOFError("header ends early")
            out[i] = str(buf[pos : pos + n], "utf-8", "replace")
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, count = self.take("I"), self.take("Q")
            if sub == _STRING:
                return self.strings(count)
            if sub == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dt = np.dtype(_NUMPY[sub]).newbyteorder("<")
            end = self.pos + count * dt.itemsize
            if end > len(self.buf):
                raise EOFError("header ends early")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos = end
            return arr.tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.take(_SCALARS[vtype])


class GGUFFile:
    """Metadata, tensor infos and the memory-mapped bytes of one GGUF file."""

    def __init__(self, path: str, header: "GGUFFile | None" = None):
        """header: this file's header as parsed before (open_gguf checked it is unchanged): only mapped again."""
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="c")
        if header is not None:
            self.version, self.header_bytes, self.tensors = header.version, header.header_bytes, header.tensors
            self.metadata = dict(header.metadata)  # callers may add metadata of their own
            return
        h = _Header(memoryview(self.data))
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError("no 'GGUF' magic")
        h.pos = 4
        self.version = h.take("I")
        if self.version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = h.take("Q"), h.take("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            self.metadata[key] = h.value(h.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = h.string()
            dims = [h.take("Q") for _ in range(h.take("I"))]
            infos.append((name, dims, h.take("I"), h.take("Q")))
        self.header_bytes = h.pos
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-h.pos // align) * align
        size = len(self.data)
        self.tensors: list[TensorInfo] = []
        for name, dims, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise ValueError(f"tensor '{name}' has unknown ggml type id {type_id}") from None
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            n_el = math.prod(dims)
            n_bytes = n_el // block * block_bytes
            begin = data_start + offset
            if begin + n_bytes > size:
                raise EOFError(
                    f"truncated: tensor '{name}' needs bytes {begin}..{begin + n_bytes} "
                    f"but the file has only {size} bytes"
                )
            self.tensors.append(TensorInfo(name, qtype, np.array(dims, dtype=np.uint64), n_el, n_bytes, begin))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenloomError(f"GGUF file not found: '{path}'")
    if os.path.isdir(path):
        raise TokenloomError(f"'{path}' is a directory, not a GGUF file")
    if os.path.getsize(path) == 0:
        raise TokenloomError(f"GGUF file '{path}' is empty")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TokenloomError(f"'{path}' is not a GGUF file (no 'GGUF' magic at the start)")
    stat = os.stat(path)
    key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    cached = _PARSED.get(path)
    # the same file, unchanged: its header's bytes are compared too (a timestamp can miss a quick rewrite)
    if cached is not None and cached[0] == key and cached[1] == _header_digest(path, cached[2].header_bytes):
        return GGUFFile(path, cached[2])
    opened = _parse(path)
    _PARSED.pop(path, None)
    while len(_PARSED) >= 2:
        _PARSED.pop(next(iter(_PARSED)))
    header = copy.copy(opened)
    header.data, header.metadata = None, dict(opened.metadata)  # the header only: no mapping kept alive
    _PARSED[path] = (key, _digest(opened.data[: opened.header_bytes]), header)  # the bytes just parsed
    return opened


# path -> (file identity, header digest, parsed header): a model load opens its file for the weights, the quantized
# layers and the tokenizer, and decoding a vocabulary takes ~0.15 s
_PARSED: dict[str, tuple[tuple, bytes, GGUFFile]] = {}


def _header_digest(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return _digest(f.read(n))


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _parse(path: str) -> GGUFFile:
    try:
        return GGUFFile(path)
    except EOFError as exc:
        msg = str(exc)
        if not msg.startswith("truncated"):
            msg = f"truncated header ({msg})"
        raise TokenloomError(f"GGUF file '{path}' is corrupt or {msg}") from None
    except Exception as exc:
        raise TokenloomError(
            f"cannot read GGUF file '{path}': corrupt or truncated header ({type(exc).__name__}: {exc})"
        ) from None


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    return dict(reader.metadata)
