"""GGUF quantized tensors kept quantized at run time.

Most ggml block formats are affine per group of 32 (w = q * scale + offset with integer q), which is exactly
the form of quant.linear.AffineQuant, so they run on the int4 kernel (<= 4 bits: one packed plane; 5 to 8
bits: two planes) with their own scales, no requantization:

    Q4_0  w = d (q - 8)           Q4_1  w = d q + m            Q8_0  w = d q_s8 = d (q - 128)
    Q5_0  w = d (q - 16)          Q5_1  w = d q + m
    Q4_K  w = (d sc_j) q - dmin m_j over 8 sub-blocks of 32;  Q5_K the same with 5-bit q
    Q6_K  w = (d sc_j) (q - 32) over 16 sub-blocks of 16 (tokenloom's gemv only: torch's kernel needs groups >= 32)

The float16 block scales are exact in a float32 model; with bfloat16 activations the kernel holds them in
bfloat16. Formats without a kernel (Q2_K, Q3_K; Q6_K without tokenloom's gemv) keep their raw bytes (GGUFLinear)
and are dequantized on the fly with gguf.quants -- smaller than float, slower.

Use: quantize_model(model, "gguf", gguf_path=...) (or quantize_model_gguf; the engine passes its model's GGUF
path) replaces every decoder linear and the LM head / embedding with modules built from the raw
bytes, after which the dequantized float copies are freed.
"""
from __future__ import annotations

import sys

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.gguf.quants import (
    QK_K,
    _bits,
    _f16,
    _k_scale_min,
    _nibbles,
    _q5_high,
    block_info,
    dequantize,
)
from tokenloom.quant.linear import (
    AffineQuant,
    ConcatLinear,
    QuantizedEmbedding,
    build_linear,
)

Q = gguf.GGMLQuantizationType


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.uint8)


def _aff_q8_0(b):
    d = _f16(b[:, :2])
    q = b[:, 2:] ^ 128  # the int8 values + 128 as bytes, without int16 temporaries
    return q, d, -128 * d, 8, 32


def _aff_q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, -8 * d, 4, 32


def _aff_q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), 4, 32


def _aff_q5_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)
    return q, d, -16 * d, 5, 32


def _aff_q5_1(b):
    q = _nibbles(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
    return q, _f16(b[:, :2]), _f16(b[:, 2:4]), 5, 32


def _aff_q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, QK_K)
    return q, d * sc.float(), -(dmin * mn.float()), 4, 32


def _aff_q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, 48:].reshape(n, 4, 1, 32)
    ql = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48]).transpose(1, 2)
    q = (ql | (qh << 4)).reshape(n, QK_K)
    return q, d * sc.float(), -(dmin * mn.float()), 5, 32


def _aff_q6_k(b):
    # block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }: 16 sub-blocks of 16, w = d sc (q - 32)
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()
    ql = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((qh >> shifts) & 0x03).reshape(n, 8, 32)
    return (ql | (qh << 4)).reshape(n, QK_K), scale, -32 * scale, 6, 16


_AFFINE = {Q.Q8_0: _aff_q8_0, Q.Q6_K: _aff_q6_k, Q.Q4_0: _aff_q4_0, Q.Q4_1: _aff_q4_1, Q.Q5_0: _aff_q5_0, Q.Q5_1: _aff_q5_1,
           Q.Q4_K: _aff_q4_k, Q.Q5_K: _aff_q5_k}
AFFINE_QTYPES = frozenset(_AFFINE)


def gguf_affine(raw: torch.Tensor, qtype, row_len: int) -> AffineQuant | None:
    """Raw rows [N, bytes_per_row] of an affine ggml type -> the exact AffineQuant (None for other types)."""
    qtype = Q(qtype)
    fn = _AFFINE.get(qtype)
    if fn is None:
        return None
    _, ts = block_info(qtype)
    n = raw.shape[0]
    blocks = raw.reshape(-1, ts)
    q, scale, offset, bits, g = fn(blocks)
    return AffineQuant(_u8(q).reshape(n, row_len), scale.float().reshape(n, row_len // g),
                       offset.float().reshape(n, row_len // g), bits, g)


class GGUFLinear(nn.Module):
    """Raw ggml blocks, dequantized on the fly (formats without a matching kernel)."""

    kernel = "gguf-dequant"

    def __init__(self, raw: torch.Tensor, qtype, in_features: int, bias=None, act_dtype=torch.bfloat16):
        super().__init__()
        self.qtype = Q(qtype)
        self.in_features, self.out_features = in_features, raw.shape[0]
        self.act_dtype = act_dtype
        self.register_buffer("raw", raw.contiguous().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(act_dtype), requires_grad=False)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, (self.out_features, self.in_features)).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize(self.raw[rows], self.qtype, (rows.numel(), self.in_features))

    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), b)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class GGUFEmbedding(nn.Module):
    """Token embedding over raw ggml rows (any supported type): only the looked-up rows are dequantized."""

    def __init__(self, raw: torch.Tensor, qtype, dim: int, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.embedding_dim, self.dtype = Q(qtype), dim, dtype
        self.num_embeddings = raw.shape[0]
        self.register_buffer("raw", raw.contiguous().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype)

    def forward(self, ids):
        flat = ids.reshape(-1)
        w = dequantize(self.raw[flat], self.qtype, (flat.numel(), self.embedding_dim))
        return w.to(self.dtype).reshape(*ids.shape, self.embedding_dim)


def build_gguf_linear(parts: list[tuple[torch.Tensor, object]], in_features: int, bias, act_dtype,
                      use_kernel: bool = True) -> nn.Module | None:
    """One module from the raw rows of one or more GGUF tensors stacked along the output dim (fused q/k/v or
    gate/up). None when a part is a float tensor (then the loaded float module is kept)."""
    qtypes = [Q(qt) for _, qt in parts]
    if any(qt in (Q.F32, Q.F16, Q.BF16) for qt in qtypes):
        return None
    from tokenloom.kernels import quant_ops as cpu_kernels

    recs = [gguf_affine(raw, qt, in_features) for raw, qt in parts]
    if cpu_kernels.load() is None or not use_kernel:  # 16-wide groups only have a fast path in tokenloom's gemv
        recs = [r if r is None or r.group_size >= 32 else None for r in recs]
    if all(r is not None for r in recs):
        try:
            rec = AffineQuant.cat(recs) if len(recs) > 1 else recs[0]
            return build_linear(rec, bias, act_dtype, use_kernel)
        except ValueError:
            pass  # different formats: one module per part
    if len(set(qtypes)) == 1 and all(r is None for r in recs):
        return GGUFLinear(torch.cat([raw for raw, _ in parts]), qtypes[0], in_features, bias, act_dtype)
    mods = []
    start = 0
    for (raw, qt), rec in zip(parts, recs):
        b = None if bias is None else bias[start : start + raw.shape[0]]
        start += raw.shape[0]
        mods.append(build_linear(rec, b, act_dtype, use_kernel) if rec is not None
                    else GGUFLinear(raw, qt, in_features, b, act_dtype))
    return ConcatLinear(mods)


@torch.no_grad()
def quantize_model_gguf(model, gguf_path, act_dtype, use_kernel: bool = True, progress: bool = False,
                        tp_plan=None) -> dict:
    """Swap the model's (dequantized) linears for modules over the GGUF file's own quantized blocks; tp_plan (a
    model_executor.parallel.TensorParallelPlan): only this rank's rows / columns of each matrix are kept."""
    from tokenloom.gguf.loader import _dequantize_rows, _raw_bytes, open_gguf_checked, unpermute_rows
    from tokenloom.quant.modules import get_module, is_moe, model_dtype, set_module
    from tokenloom.quant.options import LINEAR_NAMES

    reader = open_gguf_checked(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    names = model.gguf_tensor_names  # the model class's llama.cpp names
    cfg = model.config
    kinds: dict[str, int] = {}

    def raw_of(checkpoint_name: str):
        name = names.gguf_name(checkpoint_name)
        t = tensors[name]
        raw = _raw_bytes(reader, t)
        if heads := names.permuted_heads(name, cfg):
            raw = unpermute_rows(raw, heads)
        return raw, t.tensor_type

    layers = list(enumerate(model.layers))
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="gguf blocks", unit="layer", file=sys.stderr)
    for i, layer in layers:
        for ours in LINEAR_NAMES:
            if ours.startswith("mlp.") and is_moe(layer):
                continue  # Mixtral experts stay as loaded (float)
            name = f"layers.{i}.{ours}"
            old = get_module(model, name)
            # the checkpoint modules fused into ours (q, k, v / gate, up), each a GGUF tensor
            parts = [raw_of(f"{theirs}.weight") for theirs, _ in model.checkpoint_parts(name)]
            bias = None if old.bias is None else old.bias.detach().float().clone()
            in_features = old.in_features
            if tp_plan is not None:
                parts, bias, in_features = shard_parts(tp_plan, ours.rpartition(".")[2], parts, bias, in_features)
            new = build_gguf_linear(parts, in_features, bias, act_dtype, use_kernel)
            if new is not None:
                set_module(model, name, new)
                kinds[new.kernel] = kinds.get(new.kernel, 0) + 1
            else:  # a float part in the group: the layer stays float, filled from the file (the loader may have
                # left its quantized parts out: load_model(keep_gguf_blocks=True))
                w = torch.cat([_dequantize_rows(raw, qt, old.in_features, torch.float32) for raw, qt in parts])
                old.weight.data.copy_(w.reshape(old.weight.shape))
    # LM head and token embedding
    dtype = model_dtype(model)
    emb_name, head_name = (model.checkpoint_module(m) + ".weight" for m in ("embed_tokens", "lm_head"))
    emb_raw, emb_qt = raw_of(emb_name)
    if names.gguf_name(head_name) not in tensors:  # tied: the embedding is the head
        head_name = emb_name
    head_raw, head_qt = raw_of(head_name)
    if tp_plan is not None:  # vocabulary-parallel: this rank's rows of the embedding and the head
        vocab = slice(tp_plan.vocab.start, tp_plan.vocab.stop)
        emb_raw, head_raw = emb_raw[vocab], head_raw[vocab]
    head = build_gguf_linear([(head_raw, head_qt)], cfg.hidden_size, None, act_dtype, use_kernel)
    if head is not None:
        model.lm_head = head
        head.tp_sliced = tp_plan is not None
        kinds["lm_head:" + head.kernel] = 1
    if Q(emb_qt) not in (Q.F32, Q.F16, Q.BF16):
        if head is not None and head_name == emb_name and hasattr(head, "dequantize_rows"):
            model.embed_tokens = QuantizedEmbedding(head, dtype)  # tied: one copy of the matrix
        else:
            model.embed_tokens = GGUFEmbedding(emb_raw, emb_qt, cfg.hidden_size, dtype)
        model.embed_tokens.tp_sliced = tp_plan is not None
    return {"modules": kinds}


def shard_parts(plan, leaf: str, parts: list, bias, in_features: int):
    """This rank's share of one projection's raw GGUF parts (tensor parallel): rows of each part for a
    column-parallel module, whole blocks of columns for a row-parallel one. Returns (parts, bias, in_features)."""
    if (cols := plan.columns(leaf)) is not None:
        out = []
        for raw, qt in parts:
            elems, size = block_info(Q(qt))
            if cols.start % elems or cols.stop % elems:
                raise ValueError(f"{leaf}: columns {cols.start}..{cols.stop} are not on {Q(qt).name} block "
                                 f"boundaries ({elems})")
            blocks = raw.reshape(raw.shape[0], in_features // elems, size)
            out.append((blocks[:, cols.start // elems : cols.stop // elems].reshape(raw.shape[0], -1), qt))
        return out, bias, len(cols)
    out, keep, first = [], [], 0
    for p, (raw, qt) in enumerate(parts):
        rows = plan.rows(leaf, p)
        out.append((raw[rows.start : rows.stop], qt))
        keep += range(first + rows.start, first + rows.stop)
        first += raw.shape[0]
    return out, None if bias is None else bias[keep], in_features
