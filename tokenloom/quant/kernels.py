"""The fast weight-only matmul kernels torch ships for CPU, and the int4 packing they use.

* ``aten._weight_int8pack_mm(x, w_int8[N, K], scales[N])`` computes ``x @ (w * scales[:, None]).T``
  (W8A16, what gpt-fast uses on CPU). ``x`` and ``scales`` share one dtype; K must be a multiple of 16.
* ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zeros[K/group, N, 2])`` computes
  ``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, ``g = k // group``,
  ``q`` in [0, 15] packed by ``aten._convert_weight_to_int4pack_for_cpu(q_int32[N, K], inner_k_tiles)``.
  The group must be 32, 64, 128 or 256 and divide K; N must be a multiple of 16.

Both are only fast with bfloat16 activations on this CPU generation (the float32 variants are 10-25x slower than
plain float32 F.linear), so quantized layers of a float32 model compute in bfloat16 when the CPU supports it
(see :func:`kernel_act_dtype`). The packed int4 layout is an implementation detail of torch; it is discovered
here by packing probe matrices (:func:`int4_layout`), never hard-coded, so unpacking stays right if it changes.
"""
from __future__ import annotations

import functools
import os

import torch

INT4_GROUPS = (256, 128, 64, 32)
_ROW_BLOCK = 64  # rows of one packed block (checked by int4_layout's probe)


def _reference_forced() -> bool:
    return os.environ.get("TOKENLOOM_QUANT_REFERENCE", "") not in ("", "0")


_FORCE_REFERENCE = [False]


class reference_mode:
    """Context manager (and global switch) that makes every quantized layer use its pure-torch reference path."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.prev = None

    def __enter__(self):
        self.prev = _FORCE_REFERENCE[0]
        _FORCE_REFERENCE[0] = self.enabled
        return self

    def __exit__(self, *exc):
        _FORCE_REFERENCE[0] = self.prev


_ENV_REFERENCE = _reference_forced()  # TOKENLOOM_QUANT_REFERENCE=1: the same, for the whole process


@functools.cache
def int8_kernel_ok(dtype: torch.dtype) -> bool:
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        x = torch.ones(2, 32, dtype=dtype)
        w = torch.ones(16, 32, dtype=torch.int8)
        y = op(x, w, torch.full((16,), 0.5, dtype=dtype))
        return bool(torch.allclose(y.float(), torch.full((2, 16), 16.0)))
    except Exception:
        return False


@functools.cache
def int4_kernel_ok(dtype: torch.dtype) -> bool:
    mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    conv = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if mm is None or conv is None:
        return False
    try:
        q = torch.arange(16 * 64, dtype=torch.int32).reshape(16, 64) % 16
        packed = conv(q, 2)
        sz = torch.zeros(2, 16, 2, dtype=dtype)
        sz[..., 0] = 1.0
        x = torch.eye(64, dtype=dtype)[:3]
        y = mm(x, packed, 32, sz)  # rows of W.T = columns of W: (q - 8)
        return bool(torch.equal(y.float(), (q[:, :3].t() - 8).float()))
    except Exception:
        return False


@functools.cache
def _cpu_bf16() -> bool:
    from tokenloom.config import _cpu_has_bf16

    return _cpu_has_bf16()


def kernel_act_dtype(model_dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """Activation dtype of quantized layers: the model's, except float32 on a CPU with native bfloat16 when
    tokenloom's compiled kernels are unavailable: torch's kernels only run fast in bfloat16 (W8A16 / W4A16)."""
    from tokenloom.kernels import quant_ops as cpu_kernels

    if torch.device(device).type == "cpu" and model_dtype == torch.float32 and _cpu_bf16() \
            and int8_kernel_ok(torch.bfloat16) and cpu_kernels.load() is None:
        return torch.bfloat16  # torch's weight-only kernels are only fast with bfloat16 activations
    return model_dtype


def int4_kernel_group(group_size: int, in_features: int) -> int | None:
    """The kernel group size that can represent `group_size` (same scale repeated over sub-groups), or None."""
    for g in INT4_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


def int4_shape_ok(out_features: int, in_features: int) -> bool:
    return out_features % 16 == 0 and in_features % 32 == 0


# ---------------------------------------------------------------------------------------------------------
# int4 packing


def pack_int4(q: torch.Tensor, fn=None) -> torch.Tensor:
    """q [N, K] integers in [0, 15] (after fn(q), applied a chunk of rows at a time) -> the kernel's packed
    uint8 [N, K/2]. Chunks are whole 64-row blocks, so the int32 temporary stays small for big matrices."""
    conv = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    n = q.shape[0]
    step = _ROW_BLOCK * 64
    parts = []
    for i in range(0, n, step):
        chunk = q[i : i + step]
        if fn is not None:
            chunk = fn(chunk)
        parts.append(conv(chunk.to(torch.int32).contiguous(), 2))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@functools.lru_cache(maxsize=64)
def int4_layout(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each q[n, k] of a packed block of `rows` (<= 64) rows lands: (byte index [rows, K] int64 into the
    block's flat bytes, bit shift [rows, K] uint8, 0 or 4). Found by packing the base-16 digits of every
    element's own flat index and reading them back from each nibble."""
    conv = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    n_el = rows * k
    idx = torch.arange(n_el, dtype=torch.int64)
    digits = max(1, (int(n_el - 1).bit_length() + 3) // 4)
    src_lo = torch.zeros(n_el // 2, dtype=torch.int64)
    src_hi = torch.zeros(n_el // 2, dtype=torch.int64)
    for d in range(digits):
        plane = ((idx >> (4 * d)) & 15).reshape(rows, k).to(torch.int32)
        packed = conv(plane, 2).reshape(-1).to(torch.int64)
        if packed.numel() != n_el // 2:
            raise RuntimeError("unexpected int4 packed size")
        src_lo |= (packed & 15) << (4 * d)
        src_hi |= (packed >> 4) << (4 * d)
    byte = torch.empty(n_el, dtype=torch.int64)
    shift = torch.empty(n_el, dtype=torch.uint8)
    pos = torch.arange(n_el // 2, dtype=torch.int64)
    byte[src_lo] = pos
    shift[src_lo] = 0
    byte[src_hi] = pos
    shift[src_hi] = 4
    return byte.reshape(rows, k), shift.reshape(rows, k)


@functools.lru_cache(maxsize=64)
def _block_is_split_nibbles(k: int) -> bool:
    """True when a 64-row block stores row r < 32 in the low and row r + 32 in the high nibble of byte
    k * 32 + r (the layout of torch 2.6+ on CPU), which :func:`unpack_int4` can undo with a few tensor ops."""
    byte, shift = int4_layout(_ROW_BLOCK, k)
    r = torch.arange(_ROW_BLOCK)[:, None]
    kk = torch.arange(k)[None, :]
    return bool(torch.equal(byte, kk * 32 + r % 32) and torch.equal(shift.long(), (r // 32) * 4 + 0 * kk))


def unpack_int4(packed: torch.Tensor, n_rows: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K] in [0, 15]."""
    full = n_rows - n_rows % _ROW_BLOCK
    if full and _block_is_split_nibbles(k):
        p = packed.reshape(-1)[: full * k // 2].reshape(full // _ROW_BLOCK, k, 32)
        q = torch.cat((p & 15, p >> 4), dim=2).transpose(1, 2).reshape(full, k)
        if full == n_rows:
            return q
        return torch.cat((q, unpack_int4_rows(packed, n_rows, k, torch.arange(full, n_rows))))
    return unpack_int4_rows(packed, n_rows, k)


def unpack_int4_rows(packed: torch.Tensor, n_rows: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4` for the given rows (all when None): uint8 [len(rows), K] in [0, 15]."""
    flat = packed.reshape(-1)
    full = n_rows - n_rows % _ROW_BLOCK
    if rows is None:
        rows = torch.arange(n_rows)
    rows = rows.to(torch.int64).reshape(-1)
    out = torch.empty(rows.numel(), k, dtype=torch.uint8, device=packed.device)
    blk_bytes = _ROW_BLOCK * k // 2
    in_full = rows < full
    for mask, n_blk, base_fn in (
        (in_full, _ROW_BLOCK, lambda r: (r // _ROW_BLOCK) * blk_bytes),
        (~in_full, n_rows - full, lambda r: torch.full_like(r, full * k // 2)),
    ):
        sel = mask.nonzero().reshape(-1)
        if sel.numel() == 0:
            continue
        byte, shift = int4_layout(n_blk, k)
        r = rows[sel]
        local = r - (r // _ROW_BLOCK) * _ROW_BLOCK if n_blk == _ROW_BLOCK else r - full
        step = max(1, (1 << 22) // k)
        for i in range(0, sel.numel(), step):
            rr, ll = r[i : i + step], local[i : i + step]
            index = base_fn(rr)[:, None] + byte[ll]
            vals = flat[index.reshape(-1)].reshape(index.shape)
            out[sel[i : i + step]] = (vals >> shift[ll]) & 15
    return out
