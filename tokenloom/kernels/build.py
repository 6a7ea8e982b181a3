"""C++ extensions in tokenloom/csrc/*.cpp (sharing the headers there), compiled on first use (torch.utils.cpp_extension.load), for x86 CPUs
with AVX-512.

Each extension is built with -O3 -march=native into $TOKENLOOM_HOME/kernels/<name>_<hash>, the hash covering
its source file's and the headers' content and flags, the CPU's flags and the torch version, so a different CPU or torch builds
its own copy and later runs load it in well under a second. The source is copied into that directory and built
from there, so a checkout or reinstall that only touches the file's mtime or moves it rebuilds nothing. The first
build says so on stderr when stderr is a terminal, and only logs it (INFO, logger "tokenloom") otherwise, so that
commands whose stderr is read by programs keep it clean. Any failure (no compiler, no ninja, no AVX-512) leaves
`load()` returning None, with the reason in `reason`, and callers keep their plain torch path.
TOKENLOOM_CPP_KERNELS=0 disables every extension; TOKENLOOM_CPP_KERNELS=force builds them even where torch
reports no AVX-512.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from tokenloom.config import tokenloom_home

log = logging.getLogger("tokenloom")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# -fopenmp: at::parallel_for is a header template, serial unless the extension itself is built with OpenMP (its
# calls then go to the runtime torch has already loaded)
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "unknown"


def enabled() -> bool:
    return os.environ.get("TOKENLOOM_CPP_KERNELS", "1") not in ("0", "false", "no")


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1((flags + torch.__version__).encode()).hexdigest()[:10]


def _notify(message: str) -> None:
    """A person waiting at a terminal is told; a program reading stderr (the CLI's error contract) is not."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        tty = False
    if tty:
        print(message, file=sys.stderr, flush=True)
    else:
        log.info(message)


def _write_if_changed(path: Path, content: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)  # atomic: a concurrent build never sees half a file


class CppExtension:
    """tokenloom/csrc/<source_file>, exporting `functions` and `bool has_avx512()`; built once per CPU and torch."""

    def __init__(self, name: str, source_file: str, functions: list[str]):
        self.name, self.source_file, self.functions = name, source_file, functions
        self.state: list = []  # [module or None] once tried
        self.reason: str | None = None  # why load() gave None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return CSRC / self.source_file

    def load(self):
        """The compiled module, or None (disabled, unsupported CPU, or the build failed: see `reason`)."""
        if self.state:
            return self.state[0]
        with self._lock:
            if not self.state:
                mod = None
                forced = os.environ.get("TOKENLOOM_CPP_KERNELS") == "force"
                if not enabled():
                    self.reason = "disabled by TOKENLOOM_CPP_KERNELS=0"
                elif not (cpu_capability().startswith(("AVX512", "AMX")) or forced):
                    self.reason = f"torch reports CPU capability {cpu_capability()}, not AVX-512"
                else:
                    mod = self._build()
                self.state.append(mod)
        return self.state[0]

    def _build(self):
        try:
            from torch.utils.cpp_extension import load

            source = self.path.read_text(encoding="utf-8")
            headers = {h.name: h.read_text(encoding="utf-8") for h in sorted(CSRC.glob("*.h"))}
            text = source + "".join(headers.values()) + " ".join(CFLAGS)
            tag = hashlib.sha1(text.encode()).hexdigest()[:8] + "_" + _cpu_fingerprint()
            build_dir = tokenloom_home() / "kernels" / f"{self.name}_{tag}"
            build_dir.mkdir(parents=True, exist_ok=True)
            for name, content in {**headers, self.source_file: source}.items():
                _write_if_changed(build_dir / name, content)
            copy = build_dir / self.source_file
            if not any(build_dir.glob("*.so")):
                _notify(f"tokenloom: compiling the {self.name} kernels for this CPU (once, about a minute) ...")
            mod = load(name=f"{self.name}_{tag}", sources=[str(copy)], extra_cflags=CFLAGS,
                       build_directory=str(build_dir), verbose=False)
            if not mod.has_avx512():
                self.reason = "built without AVX-512"
                log.info("tokenloom: %s built without AVX-512; using torch's kernels", self.name)
                return None
            missing = [f for f in self.functions if not hasattr(mod, f)]
            if missing:
                raise RuntimeError(f"{self.source_file} does not export {', '.join(missing)}")
            return mod
        except Exception as exc:  # no compiler / ninja / headers: torch's kernels remain
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.reason = f"build failed: {first}"
            log.warning("tokenloom: could not build the %s kernels (%s); using torch's kernels", self.name, first)
            return None
