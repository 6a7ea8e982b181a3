"""Fused CPU kernels for the decode step's non-matmul work (tokenloom/csrc/cpu_ops.cpp), compiled on first use
by kernels.build.

At 32 sequences a decode step spends as much time outside the matrix multiplies as in them when every piece is
a separate torch op: gathering each sequence's K/V out of the paged pool into a padded batch, two small batched
matmuls, a masked softmax, and half a dozen elementwise passes per RMSNorm and rotary embedding. These kernels
do each of those in one pass over memory, parallel over rows (at::parallel_for), in float32 arithmetic:

  paged_decode_attention  one query token per sequence attends over its context read straight from the paged
                          cache through its block table: no gather copy, no padding, no mask
  rms_norm                RMSNorm of each row, optionally after adding a residual (the sum is returned too)
  rotary_                 the rotate-half rotary embedding applied in place to the q and k heads of a qkv row
  apply_token_bitmask_    structured output's packed grammar mask applied to float32 logits in place (any CPU)

rms_norm and rotary_ round their intermediate results to the tensor's dtype exactly where the torch code does
(x + r, the normalised row before the weight, x*cos and rotated*sin), so they give the torch path's numbers up
to float32 summation order. Only bfloat16 and float32 rows whose sizes are multiples of 16 (32 for the rotary
head size) take these kernels; everything else, and every CPU without AVX-512, runs the plain torch code.
"""
from __future__ import annotations

import torch

from tokenloom.kernels.build import CppExtension

EXTENSION = CppExtension("tokenloom_cpu_ops", "cpu_ops.cpp",
                         ["paged_decode_attention", "rms_norm", "rotary_", "apply_token_bitmask_"])
DTYPES = (torch.bfloat16, torch.float32)


def ops_for(x: torch.Tensor):
    """The compiled module if x can take these kernels (a CPU tensor of a supported dtype), else None."""
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    return EXTENSION.load()
