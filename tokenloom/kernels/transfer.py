"""Host-to-device copies that do not wait for the device.

`tensor.to("cuda")` from ordinary (pageable) host memory synchronises the CUDA stream: the CPU stops until every
kernel queued before it has run. The step's small index tensors (attention and sampling metadata) are built on the
host while the device may still be busy, so on CUDA they go through page-locked memory with non_blocking=True,
which queues the copy behind that work instead (PyTorch's pinned-memory cache keeps the host buffer alive until the
copy has run). On every other device these are exactly `tensor.to(device)` and `dst.copy_(src)`.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t (a host tensor) on `device`; on CUDA without a stream synchronisation."""
    if isinstance(device, str):
        device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for a host tensor src; on CUDA without a stream synchronisation."""
    if dst.device.type != "cuda" or src.device.type != "cpu":
        return dst.copy_(src)
    return dst.copy_(src.pin_memory(), non_blocking=True)
