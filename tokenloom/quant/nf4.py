"""NF4 (QLoRA, Dettmers et al. 2023): 4-bit NormalFloat codes with block-wise absmax scaling.

The 16 codes are quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (bitsandbytes' table). Each block of
`block_size` consecutive weights of a row is divided by its absolute maximum and rounded to the nearest code.
Double quantization quantizes the float32 absmax values themselves: minus their mean, symmetric int8 with one
float32 scale per 256 of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.config import TokenloomError

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])



@dataclass
class NF4Quant:
    q: torch.Tensor  # uint8 [N, K] code indices in [0, 15]
    absmax: torch.Tensor  # float32 [N, K // block]: the scales used to dequantize (after double quantization)
    block_size: int = 64
    # double quantization of absmax (QLoRA): absmax ~= absmax_q * absmax_scale[i // 256] + absmax_mean
    absmax_q: torch.Tensor | None = None  # int8 [N * K // block]
    absmax_scale: torch.Tensor | None = None  # float32 [ceil(len / 256)]
    absmax_mean: torch.Tensor | None = None  # float32 scalar
    dq_block: int = 256

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = NF4_CODE[self.q.long()].reshape(n, k // self.block_size, self.block_size) * self.absmax[..., None]
        return w.reshape(n, k)

    @staticmethod
    def cat(recs: list[NF4Quant]) -> NF4Quant:
        if any(r.absmax_q is not None for r in recs):  # double-quant blocks do not line up across tensors
            out = NF4Quant(torch.cat([r.q for r in recs]), torch.cat([r.absmax for r in recs]), recs[0].block_size)
            return double_quantize(out)
        return NF4Quant(torch.cat([r.q for r in recs]), torch.cat([r.absmax for r in recs]), recs[0].block_size)



def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Quant:
    w = w.float()
    n, k = w.shape
    if k % block_size:
        raise TokenloomError(f"NF4 needs the input size ({k}) to be a multiple of the block size ({block_size})")
    wb = w.reshape(n, k // block_size, block_size)
    absmax = wb.abs().amax(dim=-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    x = (wb / absmax[..., None]).reshape(n, k)
    # nearest code: compare against the midpoints between consecutive codes
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    q = torch.bucketize(x, mids, right=False).to(torch.uint8)
    rec = NF4Quant(q, absmax, block_size)
    return double_quantize(rec) if double_quant else rec


def double_quantize(rec: NF4Quant, dq_block: int = 256) -> NF4Quant:
    a = rec.absmax.reshape(-1).float()
    mean = a.mean()
    c = a - mean
    pad = (-c.numel()) % dq_block
    cb = torch.nn.functional.pad(c, (0, pad)).reshape(-1, dq_block)
    scale = cb.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(cb / scale[:, None]), -127, 127).to(torch.int8).reshape(-1)[: c.numel()]
    absmax = dequantize_absmax(q, scale, mean, dq_block).reshape(rec.absmax.shape)
    return NF4Quant(rec.q, absmax, rec.block_size, q, scale, mean.reshape(()), dq_block)


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, dq_block: int = 256) -> torch.Tensor:
    idx = torch.arange(q.numel(), device=q.device) // dq_block
    return q.float() * scale[idx] + mean
