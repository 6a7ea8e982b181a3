"""Quantized weights as *records*: what a quantizer produces and a checkpoint stores, integers plus the float
parameters that map them back to weights (see linear.py for the modules built from them).

  * Int8Quant   w[n, k] = q[n, k] * scale[n]                          (symmetric per output channel)
  * AffineQuant w[n, k] = q[n, k] * scale[n, g(k)] + offset[n, g(k)]  (group-wise, 2..8 bits; int4 RTN, GPTQ, AWQ
    and the GGUF Q4_0 / Q4_1 / Q5_x / Q8_0 / Q4_K / Q5_K blocks are all of this form)
  * NF4Quant    w[n, k] = NF4[q[n, k]] * absmax[n, k // block]        (QLoRA normal-float 4-bit, in nf4.py)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.quant.nf4 import NF4Quant


@dataclass
class Int8Quant:
    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    @staticmethod
    def cat(recs: list[Int8Quant]) -> Int8Quant:
        return Int8Quant(torch.cat([r.q for r in recs]), torch.cat([r.scale for r in recs]))

    def split(self, sizes: list[int]) -> list[Int8Quant]:
        return [Int8Quant(q, s) for q, s in zip(self.q.split(sizes), self.scale.split(sizes))]


@dataclass
class AffineQuant:
    q: torch.Tensor  # uint8 [N, K], values in [0, 2**bits)
    scale: torch.Tensor  # float32 [N, G]
    offset: torch.Tensor  # float32 [N, G]
    bits: int
    group_size: int  # columns per group (the last group may be shorter)
    g_idx: torch.Tensor | None = None  # int64 [K]: group of each column (GPTQ act-order); None = k // group_size
    zero: torch.Tensor | None = None  # integer zero points [N, G] (GPTQ/AWQ): offset == -zero * scale exactly

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(self.q.shape[1]) // self.group_size

    def dequantize(self) -> torch.Tensor:
        gi = self.group_index()
        return self.q.float() * self.scale[:, gi] + self.offset[:, gi]

    @staticmethod
    def from_zero(q, scale, zero, bits, group_size, g_idx=None) -> AffineQuant:
        scale = scale.float()
        zero_f = zero.float()
        return AffineQuant(q.to(torch.uint8), scale, -zero_f * scale, bits, group_size, g_idx, zero.to(torch.int32))

    @staticmethod
    def cat(recs: list[AffineQuant]) -> AffineQuant:
        r0 = recs[0]
        for r in recs[1:]:
            if r.bits != r0.bits or r.group_size != r0.group_size or r.scale.shape[1] != r0.scale.shape[1]:
                raise ValueError("cannot fuse quantized tensors of different formats")
            if (r.g_idx is None) != (r0.g_idx is None) or (r.g_idx is not None and not torch.equal(r.g_idx, r0.g_idx)):
                raise ValueError("cannot fuse quantized tensors with different g_idx")
        zero = None if any(r.zero is None for r in recs) else torch.cat([r.zero for r in recs])
        return AffineQuant(torch.cat([r.q for r in recs]), torch.cat([r.scale for r in recs]),
                           torch.cat([r.offset for r in recs]), r0.bits, r0.group_size, r0.g_idx, zero)

    def split(self, sizes: list[int]) -> list[AffineQuant]:
        zs = self.zero.split(sizes) if self.zero is not None else [None] * len(sizes)
        return [AffineQuant(q, s, o, self.bits, self.group_size, self.g_idx, z)
                for q, s, o, z in zip(self.q.split(sizes), self.scale.split(sizes), self.offset.split(sizes), zs)]


Record = Int8Quant | AffineQuant | NF4Quant


def cat_records(recs: list) -> Record:
    return type(recs[0]).cat(recs)


