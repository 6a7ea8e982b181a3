"""The LoRA delta of a linear layer in one call (tokenloom/csrc/lora_ops.cpp), compiled on first use by
kernels.build.

    lora_apply_(y, x, a, b, slices, runs)    y[rows of each run] += (x[rows] A_s^T) B_s^T, in place

Each run is a stretch of rows whose requests chose the adapter in slot s; the runs are cut into tiles of 8 rows
spread over the threads (at::parallel_for), each tile reading every factor row once for all its rows, shrink
(x A^T, rank-wide) then expand (B^T, only over each packed slice's own outputs and ranks, so a q/k/v or gate/up
layer's zero blocks cost nothing). float32 arithmetic, y rounded to its dtype once; rows in no run are not
touched. Why: the same work as torch ops is two matmuls and an add per adapter per layer, each one a few
microseconds of dispatch for a few microseconds of arithmetic: at a 32-sequence decode they cost more than the
base layers they sit on. bfloat16 / float32 rows whose widths are multiples of 16 take the kernel; the rest (and
CPUs without AVX-512) take the torch code in lora/layers.py.
"""
from __future__ import annotations

import torch

from tokenloom.kernels.build import CppExtension

EXTENSION = CppExtension("tokenloom_lora_ops", "lora_ops.cpp", ["lora_apply_"])
DTYPES = (torch.bfloat16, torch.float32)


def ops_for(x: torch.Tensor):
    """The compiled module if x can take it (a CPU tensor of a supported dtype), else None."""
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    return EXTENSION.load()
