"""C++ extensions compiled on first use (torch.utils.cpp_extension.load_inline), for x86 CPUs with AVX-512.

Each extension is built with -O3 -march=native into $TOKENLOOM_HOME/kernels/<name>_<hash>, the hash covering
its source, the CPU's flags and the torch version, so a different CPU or torch builds its own copy and later
runs load it in well under a second. Any failure (no compiler, no ninja, no AVX-512) leaves `load()` returning
None, and callers keep their plain torch path. TOKENLOOM_CPP_KERNELS=0 disables every extension;
TOKENLOOM_CPP_KERNELS=force builds them even where torch reports no AVX-512.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading

import torch

from tokenloom.config import tokenloom_home

log = logging.getLogger("tokenloom")


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


class InlineExtension:
    """One C++ source exporting `functions`; it must also export `bool has_avx512()`."""

    def __init__(self, name: str, source: str, functions: list[str]):
        self.name, self.source, self.functions = name, source, functions
        self.state: list = []  # [module or None] once tried
        self._lock = threading.Lock()

    def load(self):
        """The compiled module, or None (disabled, unsupported CPU, or the build failed)."""
        if self.state:
            return self.state[0]
        with self._lock:
            if not self.state:
                mod = None
                forced = os.environ.get("TOKENLOOM_CPP_KERNELS") == "force"
                if enabled() and (cpu_capability().startswith(("AVX512", "AMX")) or forced):
                    mod = self._build()
                self.state.append(mod)
        return self.state[0]

    def _build(self):
        try:
            from torch.utils.cpp_extension import load_inline

            # -fopenmp: at::parallel_for is a header template, serial unless the extension itself is built
            # with OpenMP (its calls then go to the runtime torch has already loaded)
            cflags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
            tag = hashlib.sha1((self.source + " ".join(cflags)).encode()).hexdigest()[:8] + "_" + _cpu_fingerprint()
            build_dir = tokenloom_home() / "kernels" / f"{self.name}_{tag}"
            build_dir.mkdir(parents=True, exist_ok=True)
            if not any(build_dir.glob("*.so")):
                print(f"tokenloom: compiling the {self.name} kernels for this CPU (once, about a minute) ...",
                      file=sys.stderr, flush=True)
            mod = load_inline(name=f"{self.name}_{tag}", cpp_sources=[self.source],
                              functions=self.functions + ["has_avx512"], extra_cflags=cflags,
                              build_directory=str(build_dir), verbose=False)
            if not mod.has_avx512():
                log.info("tokenloom: %s built without AVX-512; using torch's kernels", self.name)
                return None
            return mod
        except Exception as exc:  # no compiler / ninja / headers: torch's kernels remain
            log.warning("tokenloom: could not build the %s kernels (%s); using torch's kernels", self.name,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
