"""The "mp" backend: ranks 1..N-1 as local processes, each a fresh `python -m tokenloom.worker.process_workers`
reading its arguments (pickled) from stdin. A fresh interpreter rather than multiprocessing's spawn: spawn
re-imports the caller's main module, which breaks scripts without an `if __name__ == "__main__"` guard and
notebooks. Each process is watched by its exit code and is killed by the kernel when the engine's process exits,
however it exits (Linux: PR_SET_PDEATHSIG)."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

from tokenloom.distributed import RankInfo

STOP_GRACE_S = 3.0


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the engine stops us


class ProcessWorkers:
    def __init__(self):
        self.procs: dict[int, subprocess.Popen] = {}

    @staticmethod
    def master_addr(addr: str) -> str:
        return addr

    def start(self, config, source, dtype, rank0: RankInfo, host: str, port: int) -> None:
        for r in range(1, rank0.world_size):
            info = RankInfo(r, rank0.tensor_parallel_size, rank0.pipeline_parallel_size)
            proc = subprocess.Popen([sys.executable, "-m", "tokenloom.worker.process_workers"], stdin=subprocess.PIPE,
                                    preexec_fn=_die_with_parent, env=dict(os.environ, TOKENLOOM_RANK=str(r)))
            proc.stdin.write(pickle.dumps((config, source, dtype, info, host, port)))
            proc.stdin.close()
            self.procs[r] = proc

    def dead(self) -> int | None:
        """A rank whose process has exited, if any."""
        return next((r for r, p in self.procs.items() if p.poll() is not None), None)

    def exit_reason(self, rank: int | None) -> str:
        code = self.procs[rank].poll() if rank in self.procs else None
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def pids(self) -> dict[int, int]:
        return {r: p.pid for r, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            try:
                p.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(STOP_GRACE_S)


def main() -> None:
    from tokenloom.worker.parallel_worker import follow

    follow(*pickle.load(sys.stdin.buffer))


if __name__ == "__main__":
    main()
