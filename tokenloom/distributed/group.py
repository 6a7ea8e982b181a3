"""One model's ranks as a torch.distributed process group, and the collectives the model layers and the executor
use on it. A rank whose peer dies gets a RuntimeError from its next collective (gloo: "Connection closed by
peer"), never a hang: that is how the engine learns a worker is gone."""
from __future__ import annotations

import datetime
import pickle
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankInfo:
    """Where one rank sits: its place in the world and, within it, in the tensor- and pipeline-parallel split."""
    rank: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size


class ParallelGroup:
    """A process group of `size` ranks meeting at a TCP store on (host, port), the store held by rank 0."""

    def __init__(self, info: RankInfo, host: str, port: int, device: torch.device, timeout_s: float = 300.0):
        self.info = info
        self._sends: list = []  # (work, tensor) of sends not yet waited for
        self.rank, self.size = info.rank, info.world_size
        self.device = device
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, self.size, info.rank == 0, timeout=timeout, wait_for_workers=False)
        # the executor's messages always go over gloo (CPU tensors); the layers' collectives over NCCL on CUDA
        self.cpu_pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu", self.store), self.rank, self.size, timeout)
        self.pg = (dist.ProcessGroupNCCL(dist.PrefixStore("dev", self.store), self.rank, self.size)
                   if device.type == "cuda" else self.cpu_pg)

    # ---- collectives on tensors (model layers) ----------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (x must be contiguous)."""
        if self.size > 1:
            self.pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape on every rank), in rank order."""
        out = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([out], [x.contiguous()]).wait()
        return out

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send without waiting (pipeline stages keep working while it goes); wait_sends() before the buffers of
        this step may be reused."""
        x = x.contiguous()
        self._sends.append((self.pg.send([x], dst, 0), x))

    def wait_sends(self) -> None:
        sends, self._sends = self._sends, []
        for work, _ in sends:
            work.wait()

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self.pg.recv([x], src, 0).wait()
        return x

    # ---- Python objects from rank 0 (the executor's per-step messages) ----------------------------------
    def broadcast_object(self, obj=None):
        """Rank 0 sends obj to every rank; the others return what it sent."""
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size = torch.tensor([len(data)], dtype=torch.long)
            self.cpu_pg.broadcast(size, 0).wait()
            self.cpu_pg.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0).wait()
            return obj
        size = torch.zeros(1, dtype=torch.long)
        self.cpu_pg.broadcast(size, 0).wait()
        buf = torch.empty(int(size), dtype=torch.uint8)
        self.cpu_pg.broadcast(buf, 0).wait()
        return pickle.loads(buf.numpy().tobytes())

    def barrier(self) -> None:
        self.cpu_pg.allreduce([torch.zeros(1)]).wait()
