"""Read a GGUF file's key/value metadata into plain Python values."""
from __future__ import annotations

from typing import Any

import gguf

from tokenloom.config import TokenloomError


def open_gguf(path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors on bad files
        raise TokenloomError(f"cannot read GGUF file '{path}': corrupt or truncated ({exc})") from None


def field_value(f: gguf.ReaderField) -> Any:
    """One metadata field as str / int / float / bool / list."""
    types = f.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    v = f.parts[f.data[0]].tolist()[0]
    return bool(v) if types[0] == gguf.GGUFValueType.BOOL else v


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
