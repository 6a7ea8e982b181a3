"""Created models (Ollama's `create` / `copy`): a name for a base model plus defaults of its own: a system
prompt, sampling PARAMETERs, a TEMPLATE (stored and reported, see below), MESSAGEs put before every
conversation, and licenses. Each is a small JSON file under $TOKENLOOM_HOME/created/; no weights are copied.

Names are Ollama's: `[namespace/]model[:tag]`, the tag `latest` when none is given, compared without regard to
case. A created model's `base` is what serves it: a catalogue name or the absolute path of local weights (a model
created FROM a created model takes its parent's base and defaults, then its own on top).

TEMPLATEs are Ollama's Go templates, which tokenloom does not render: they are kept and shown, while prompts are
rendered with the base model's own chat template.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tokenloom.config import TokenloomError, tokenloom_home
from tokenloom.loader.sources import CATALOGUE, ModelSource, catalogue_key, catalogue_path, resolve_model

_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}"
NAME_PATTERN = rf"^(?:{_PART}/){{0,2}}{_PART}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,79}})?$"
_NAME = re.compile(NAME_PATTERN)


class InvalidName(TokenloomError):
    pass


class NotFound(TokenloomError):
    pass


def normalize_name(name: str) -> str:
    """`name` with its tag (':latest' when it has none); InvalidName if it is not an Ollama model name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(f"invalid model name {name!r}: use [namespace/]model[:tag] (letters, digits, '_', '-', "
                          "'.'; starting with a letter or digit)")
    return name if ":" in name else name + ":latest"


def short_name(name: str) -> str:
    """The name without a ':latest' tag."""
    return name.removesuffix(":latest")


def created_dir() -> Path:
    return tokenloom_home() / "created"


def _path(name: str) -> Path:
    stem = quote(normalize_name(name).lower(), safe="")
    if len(stem) > 200:  # file names have a length limit: long names end in a hash of their whole
        stem = stem[:180] + "-" + hashlib.sha256(stem.encode()).hexdigest()[:16]
    return created_dir() / (stem + ".json")


@dataclass
class CreatedModel:
    name: str  # normalized: "mario:latest"
    base: str  # catalogue name, or the absolute path of local weights
    parent: str  # what FROM named: /api/show's details.parent_model
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, sort_keys=True)

    @property
    def digest(self) -> str:
        """sha256 of what the model is (its name and time aside): equal for a copy."""
        d = asdict(self)
        d.pop("name"), d.pop("created_at")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def save(model: CreatedModel) -> None:
    """Write the model's file (atomically: readers see the old file or the new one)."""
    path = _path(model.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(model.to_json())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(name: str) -> CreatedModel | None:
    """The created model of that name (any case, tag optional), or None (also for names that cannot be one)."""
    try:
        path = _path(name)
        return _read(path) if path.is_file() else None
    except InvalidName:
        return None


def _read(path: Path) -> CreatedModel | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CreatedModel(**{k: v for k, v in data.items() if k in CreatedModel.__dataclass_fields__})
    except (OSError, ValueError, TypeError):  # removed meanwhile, or not ours: skipped
        return None


def list_created() -> list[CreatedModel]:
    d = created_dir()
    if not d.is_dir():
        return []
    models = (_read(p) for p in sorted(d.glob("*.json")))
    return sorted((m for m in models if m is not None), key=lambda m: m.name.lower())


def delete(name: str) -> bool:
    """Remove a created model; False if there is none of that name."""
    try:
        _path(name).unlink()
    except (FileNotFoundError, InvalidName):
        return False
    return True


def modified_at(model: CreatedModel) -> float:
    try:
        return _path(model.name).stat().st_mtime
    except OSError:
        return model.created_at


# ---- bases ----------------------------------------------------------------------------------------------------
def identity(src: ModelSource) -> str:
    """What a loaded or named model is, as a created model's `base` records it: its catalogue name, else the
    absolute path of its weights."""
    if src.kind == "gguf" and src.name in CATALOGUE:
        return src.name
    path = Path(src.path).resolve()
    for key in CATALOGUE:
        if catalogue_path(key).resolve() == path:
            return key
    return str(path)


def resolve_from(name: str) -> tuple[str, CreatedModel | None]:
    """(base, the created model it names or None) for a FROM: a created model, a catalogue name (pulled or not)
    or local weights (a .gguf file or a Hugging Face folder). NotFound says what was tried."""
    parent = load(name)
    if parent is not None:
        return parent.base, parent
    key = catalogue_key(name)
    if key is not None:
        return key, None
    try:
        return identity(resolve_model(name, download=False)), None
    except TokenloomError as exc:
        raise NotFound(f"{exc}; nor is it a created model") from None
    except (OSError, ValueError, RuntimeError):  # names no path can have (NUL, ~unknown-user, too long)
        raise NotFound(f"model '{name}' not found") from None


def check_new_name(name: str) -> str:
    """The normalized name a model may be created or copied under: not a catalogue model's."""
    normalized = normalize_name(name)
    if catalogue_key(normalized) is not None:
        raise InvalidName(f"'{name}' is the name of a catalogue model: choose another name")
    return normalized


def create(name: str, from_: str, system: str | None = None, template: str | None = None,
           parameters: dict[str, Any] | None = None, messages: list[dict] | None = None,
           license: list[str] | None = None,
           resolve: Callable[[str], tuple[str, CreatedModel | None]] = resolve_from) -> CreatedModel:
    """Create (or replace) a model FROM another: the parent's defaults (when it is a created model) with these on
    top; parameters merge name by name. resolve maps FROM onto (base, created parent or None)."""
    normalized = check_new_name(name)
    base, parent = resolve(from_)
    inherited = parent or CreatedModel(name=normalized, base=base, parent="")
    model = CreatedModel(
        name=normalized, base=base, parent=from_,
        system=system if system is not None else inherited.system,
        template=template if template is not None else inherited.template,
        parameters={**inherited.parameters, **(parameters or {})},
        messages=list(messages) if messages else list(inherited.messages),
        license=list(license) if license else list(inherited.license),
    )
    save(model)
    return model


def copy(source: CreatedModel, destination: str) -> CreatedModel:
    """A copy of a created model under another name (what it is, and its parent, unchanged)."""
    model = CreatedModel(**{**asdict(source), "name": check_new_name(destination), "created_at": time.time()})
    save(model)
    return model
