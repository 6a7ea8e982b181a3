"""Round-to-nearest quantizers: INT8 per output channel (symmetric) and group-wise affine INT2..8.

Scales are rounded to float16 at quantization time, so a checkpoint (which stores float16 scales, as the GPTQ and
AWQ formats do) reproduces the in-memory quantized weights bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenloom.quant.records import AffineQuant, Int8Quant


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept in float32); never 0 for a positive input."""
    y = x.float().clamp(max=65504.0).half().float()
    return torch.where(y > 0, y, torch.where(x > 0, torch.full_like(y, 2.0**-24), torch.ones_like(y)))


_ROWS = 4096  # rows per step: bounds the float32 temporaries for big matrices (the LM head)


def quantize_int8(w: torch.Tensor) -> Int8Quant:
    """Symmetric per-output-channel INT8: scale = absmax / 127, q = clamp(round(w / scale), -127, 127)."""
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(n)
    for r in range(0, n, _ROWS):
        wr = w[r : r + _ROWS].float()
        s = _f16(wr.abs().amax(dim=1) / 127)
        q[r : r + _ROWS] = torch.clamp(torch.round(wr / s[:, None]), -127, 127)
        scale[r : r + _ROWS] = s
    return Int8Quant(q, scale)


def affine_params(wg: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each row of wg [..., g] (the GPTQ / AutoGPTQ quantizer): the range always
    contains 0, scale = (max - min) / (2^bits - 1), zero = round(-min / scale); symmetric: zero = 2^(bits-1)."""
    maxq = 2**bits - 1
    xmin = wg.amin(dim=-1).clamp(max=0)
    xmax = wg.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = _f16((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def affine_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, 2^bits - 1), elementwise (scale / zero broadcast against w)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], zero-padded (harmless: every range contains 0)."""
    n, k = w.shape
    g = group_size if group_size > 0 else k
    groups = math.ceil(k / g)
    if groups * g != k:
        w = F.pad(w, (0, groups * g - k))
    return w.reshape(n, groups, g)


def quantize_affine(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> AffineQuant:
    """Group-wise round-to-nearest (INT4 RTN at bits=4). group_size <= 0 means one group per row."""
    n, k = w.shape
    g = group_size if group_size > 0 else k
    qs, scales, zeros = [], [], []
    for r in range(0, n, _ROWS):
        wg = _grouped(w[r : r + _ROWS].float(), g)
        scale, zero = affine_params(wg, bits, sym)
        qs.append(affine_quantize(wg, scale[..., None], zero[..., None], bits).reshape(wg.shape[0], -1)[:, :k]
                  .to(torch.uint8))
        scales.append(scale)
        zeros.append(zero)
    return AffineQuant.from_zero(torch.cat(qs), torch.cat(scales), torch.cat(zeros), bits, g)


def fake_quantize_affine(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """Dequantized RTN weights (what quantize_affine(...).dequantize() returns), float32."""
    n, k = w.shape
    wg = _grouped(w.float(), group_size if group_size > 0 else k)
    scale, zero = affine_params(wg, bits, sym)
    q = affine_quantize(wg, scale[..., None], zero[..., None], bits)
    return ((q - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k]
