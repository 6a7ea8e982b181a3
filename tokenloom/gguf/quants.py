"""Vectorised PyTorch dequantisers for GGUF / ggml block formats.

Every function works on raw block bytes held in a ``torch.uint8`` tensor and uses only plain
tensor ops (no Python loops over blocks), so the same code runs on CPU or on an accelerator
and can later dequantise weights kept quantised in memory at run time.

Block layouts follow ggml (``ggml-common.h`` / ``ggml-quants.c``) and the ``gguf`` package's
numpy reference (``gguf/quants.py``); all multi-byte fields are little-endian.
"""
from __future__ import annotations

import math

import gguf
import torch

from tokenloom.config import TokenloomError

Q = gguf.GGMLQuantizationType
QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little-endian IEEE half) -> [..., 1] float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] uint8: all low nibbles first, then all high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., n, 8] uint8 bits, least significant first."""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
    return (b.unsqueeze(-1) >> shifts) & 1


# ---------------------------------------------------------------------------------------------
# per-type block dequantisers: blocks [n, type_size] uint8 -> [n, block_size] float32


def _deq_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _deq_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _deq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


def _deq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q8_0 { half d; int8 qs[32]; }
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return qs * d


def _deq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_0 { half d; uint8 qs[16]; }  x[j] = lo(qs[j]), x[j+16] = hi(qs[j]); value = d*(q-8)
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _deq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_1 { half d; half m; uint8 qs[16]; }  value = d*q + m
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:]).to(torch.float32)
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """qh [n, 4] (a little-endian uint32) -> [n, 32] bit j of that uint32."""
    return _bits(qh).reshape(qh.shape[0], 32)


def _deq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_0 { half d; uint8 qh[4]; uint8 qs[16]; }  value = d*(q-16)
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 6:]) | (_q5_high(blocks[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def _deq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_1 { half d; half m; uint8 qh[4]; uint8 qs[16]; }  value = d*q + m
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:]) | (_q5_high(blocks[:, 4:8]) << 4)
    return d * q.to(torch.float32) + m


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K / Q5_K -> ([n, 8], [n, 8]) uint8."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _deq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_K { half d; half dmin; uint8 scales[12]; uint8 qs[128]; }
    # 8 sub-blocks of 32; 32-byte chunk c holds sub-block 2c (low nibbles) and 2c+1 (high nibbles)
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_K { half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]; }
    # sub-block i takes its 5th bit from bit i of qh[l]
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    qs = blocks[:, 48:].reshape(n, 4, 1, 32)
    ql = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48]).transpose(1, 2)  # [n, 8 (bit i), 32 (l)]
    q = (ql | (qh << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }  value = d*scale*(q-32)
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(blocks[:, 208:210])
    dl = (d * scales).reshape(n, 16, 1)
    ql = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((qh >> shifts) & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _deq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q2_K { uint8 scales[16]; uint8 qs[64]; half d; half dmin; }
    n = blocks.shape[0]
    scales = blocks[:, :16]
    qs = blocks[:, 16:80].reshape(n, 2, 1, 32)
    d = _f16(blocks[:, 80:82])
    dmin = _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 0x03).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q3_K { uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d; }
    n = blocks.shape[0]
    hmask = blocks[:, :32]
    qs = blocks[:, 32:96]
    sc = blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    lo = sc[:, :8]
    hi = sc[:, 8:].reshape(n, 1, 4)
    lsc = torch.cat((lo & 0x0F, lo >> 4), dim=-1)  # [n, 16]
    hshift = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 4, 1)
    hsc = ((hi >> hshift) & 0x03).reshape(n, 16)
    scales = ((lsc | (hsc << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 16, 16)
    qh = _bits(hmask).permute(0, 2, 1).reshape(n, 16, 16)  # bit i of hmask[l] -> group i
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # offset 4 applies when the mask bit is 0
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


_DEQUANTIZERS = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q8_0: _deq_q8_0,
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q5_0: _deq_q5_0,
    Q.Q5_1: _deq_q5_1,
    Q.Q2_K: _deq_q2_k,
    Q.Q3_K: _deq_q3_k,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
}

SUPPORTED_QTYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(_DEQUANTIZERS)


def _qtype_name(qtype) -> str:
    try:
        return Q(qtype).name
    except ValueError:
        return f"type id {int(qtype)}"


def check_supported(qtype) -> gguf.GGMLQuantizationType:
    """Return the qtype as an enum, or raise a TokenloomError naming the unsupported type."""
    try:
        q = Q(qtype)
    except ValueError:
        q = None
    if q not in _DEQUANTIZERS:
        supported = ", ".join(t.name for t in sorted(SUPPORTED_QTYPES, key=lambda t: t.value))
        raise TokenloomError(
            f"unsupported GGUF tensor type {_qtype_name(qtype)} (supported: {supported})"
        )
    return q


def block_info(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return gguf.GGML_QUANT_SIZES[Q(qtype)]


def row_bytes(qtype, row_len: int) -> int:
    """Bytes taken by one row of ``row_len`` elements."""
    bs, ts = block_info(qtype)
    return row_len // bs * ts


def dequantize(raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantise raw ggml block bytes to a float32 tensor of ``shape``.

    ``raw`` is a uint8 tensor (any shape, typically [..., bytes_per_row]) holding the blocks of a
    tensor whose logical torch shape is ``shape`` (rows along the last dimension). The result is on
    ``raw``'s device.
    """
    q = check_supported(qtype)
    shape = tuple(int(s) for s in shape)
    if raw.dtype != torch.uint8:
        raise TokenloomError(f"dequantize expects uint8 block bytes, got {raw.dtype}")
    bs, ts = gguf.GGML_QUANT_SIZES[q]
    n_el = math.prod(shape)
    if shape and shape[-1] % bs:
        raise TokenloomError(
            f"{q.name} tensor of shape {list(shape)}: row length {shape[-1]} is not a multiple of the block size {bs}"
        )
    n_blocks = n_el // bs
    if raw.numel() != n_blocks * ts:
        raise TokenloomError(
            f"{q.name} tensor of shape {list(shape)} needs {n_blocks * ts} bytes, got {raw.numel()}"
        )
    blocks = raw.reshape(n_blocks, ts)
    return _DEQUANTIZERS[q](blocks).reshape(shape)
