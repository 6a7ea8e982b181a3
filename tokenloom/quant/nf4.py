"""NF4 (QLoRA, Dettmers et al. 2023): 4-bit NormalFloat codes with block-wise absmax scaling.

The 16 codes are quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (bitsandbytes' table). Each block of
`block_size` consecutive weights of a row is divided by its absolute maximum and rounded to the nearest code.
Double quantization quantizes the float32 absmax values themselves: minus their mean, symmetric int8 with one
float32 scale per 256 of them.
"""
from __future__ import annotations

import torch

from tokenloom.config import TokenloomError
from tokenloom.quant.linear import NF4Quant

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


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
