"""The nn.Modules swapped in for nn.Linear (gpt-fast style module swaps), built from quantized records
(records.py: Int8Quant, AffineQuant; nf4.py: NF4Quant).

A module is built from a record for a device and activation dtype: it runs the fastest kernel available (see
:mod:`tokenloom.quant.kernels`) and keeps a pure-torch reference path (``dequantize()`` + ``F.linear``), used where
no kernel fits and in tests as the check of the kernel path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.kernels import quant_ops as C
from tokenloom.quant import kernels as K

from tokenloom.quant.nf4 import NF4Quant
from tokenloom.quant.records import AffineQuant, Int8Quant, Record
from tokenloom.model_executor.layers.linear import rows_bucketed

# ---------------------------------------------------------------------------------------------------------
# modules


class QuantLinear(nn.Module):
    """Base of the quantized linear layers: forward = kernel path when available, else the reference path.

    `kernel` names the path: "gemv" (tokenloom's compiled AVX-512 kernels, cpu_kernels.py), "int8pack_mm" /
    "int4pack_mm" (torch's), "nf4-dequant" / "reference" (dequantize + F.linear)."""

    in_features: int
    out_features: int
    kernel: str = "reference"
    # from this many rows on, dequantize the weight once and use F.linear (the kernels are GEMV-tuned)
    dequant_min_tokens: int = 64

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.act_dtype = act_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(act_dtype), requires_grad=False)

    # subclasses implement these
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [N, K]
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:  # [len(rows), K] float32
        return self.dequantize()[rows]

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prefill_forward(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.dequantize(x2.dtype))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference" or K._FORCE_REFERENCE[0] or K._ENV_REFERENCE:
            return self.forward_reference(x)
        if x.dim() == 2 and x.dtype == self.act_dtype and x.shape[0] < self.dequant_min_tokens \
                and x.is_contiguous():  # the decode fast path: as few Python steps as possible
            y = self._kernel_forward(x)
            return y if self.bias is None else y + self.bias
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != self.act_dtype:
            x2 = x2.to(self.act_dtype)
        if x2.shape[0] >= self.dequant_min_tokens:  # prefill: the kernels are tuned for a few rows
            y = rows_bucketed(self._prefill_forward, x2)
        else:
            y = self._kernel_forward(x2.contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
                f"act_dtype={str(self.act_dtype).removeprefix('torch.')}, bias={self.bias is not None}")


_EMPTY = torch.empty(0)


def _gemv(x2: torch.Tensor) -> torch.Tensor:
    """Activations for the compiled kernels: float32 / bfloat16 as they are (the kernels widen bfloat16 and write
    their output in the input's dtype), anything else (float16) through float32."""
    return x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()


def _cast(y: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


class Int8Linear(QuantLinear):
    """W8A16: int8 weights with one scale per output channel. Kernels: tokenloom's gemv (fp32 accumulation) or
    aten._weight_int8pack_mm."""

    def __init__(self, rec: Int8Quant, bias=None, act_dtype=torch.bfloat16, use_kernel: bool = True):
        n, k = rec.shape
        super().__init__(n, k, bias, act_dtype)
        self.register_buffer("weight_int8", rec.q.contiguous())
        self._cpp = C.load() if use_kernel else None
        if self._cpp is not None:
            self.kernel = "gemv"
            self.register_buffer("scales", rec.scale.float().reshape(n, 1).contiguous())
        else:
            self.register_buffer("scales", rec.scale.to(act_dtype).contiguous())
            if use_kernel and k % 16 == 0 and K.int8_kernel_ok(act_dtype):
                self.kernel = "int8pack_mm"

    def _scale_vec(self):
        return self.scales.reshape(-1)

    def dequantize(self, dtype=torch.float32):
        if dtype == torch.float32:
            return self.weight_int8.float() * self._scale_vec().float()[:, None]
        return self.weight_int8.to(dtype) * self._scale_vec().to(dtype)[:, None]

    def dequantize_rows(self, rows):
        return self.weight_int8[rows].float() * self._scale_vec()[rows].float()[:, None]

    def _kernel_forward(self, x2):
        if self._cpp is not None:
            return _cast(self._cpp.gemv_u8(_gemv(x2), self.weight_int8.view(torch.uint8), self.scales, _EMPTY,
                                           self.in_features, True), x2)
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)


class Int4Linear(QuantLinear):
    """Group-wise affine weights of 2 to 8 bits (int4 RTN, GPTQ, AWQ, GGUF blocks): w = q * scale + offset.

    Layouts, by preference:
      * "gemv" (tokenloom's compiled kernels): <= 4 bits split32 nibble-packed, else one byte per weight; float32
        scale / offset per record group (any group that is a multiple of 32 for 4-bit);
      * "int4pack_mm" (torch's kernel): one packed plane for <= 4 bits; for 5 to 8 bits two planes, q = 16 h + l,
        since w = q s + o = [(h - 8) 16 s + 128 s] + [(l - 8) s + o + 8 s]; groups the kernel lacks (or that do not
        divide K) repeat their scale over kernel sub-groups;
      * "reference": q as bytes plus float32 scale / offset, dequantized per call.
    Act-order (g_idx) columns are permuted at build time so groups are contiguous, and the activations are
    permuted the same way at run time.
    """

    def __init__(self, rec: AffineQuant, bias=None, act_dtype=torch.bfloat16, use_kernel: bool = True):
        n, k = rec.shape
        super().__init__(n, k, bias, act_dtype)
        self.bits, self.group_size = rec.bits, rec.group_size
        gi = rec.group_index()
        perm = None
        if rec.g_idx is not None:
            order = torch.argsort(gi, stable=True)
            if not torch.equal(order, torch.arange(k)):
                perm = order
        contiguous = torch.equal(gi[perm] if perm is not None else gi, torch.arange(k) // rec.group_size)
        q = rec.q if perm is None else rec.q[:, perm]
        self._cpp = C.load() if use_kernel and contiguous else None
        if self._cpp is not None and rec.bits <= 4 and (k % 32 or rec.group_size % 32):
            self._cpp = None
        kg = K.int4_kernel_group(rec.group_size, k) if contiguous else None
        if self._cpp is not None:
            self.kernel = "gemv"
            self.layout = "split32" if rec.bits <= 4 else "u8"
            self.register_buffer("qweight", _pack_split32(q) if rec.bits <= 4 else q.contiguous())
            self.register_buffer("scale", rec.scale.float().contiguous())
            self.register_buffer("offset", rec.offset.float().contiguous())
            self.register_buffer("perm", perm)
        elif use_kernel and kg is not None and rec.bits <= 8 and K.int4_shape_ok(n, k) \
                and K.int4_kernel_ok(act_dtype):
            self.kernel = "int4pack_mm"
            self.layout = "int4pack"
            self.kernel_group = kg
            sub = torch.arange(k // kg) * kg // rec.group_size  # record group of each kernel group
            s = rec.scale[:, sub].float()
            o = rec.offset[:, sub].float()
            if rec.bits <= 4:
                self.register_buffer("qplane0", K.pack_int4(q))
                self.register_buffer("sz0", _sz(s, o + 8 * s, act_dtype))
                self.register_buffer("qplane1", None)
                self.register_buffer("sz1", None)
            else:
                self.kernel = "int4pack_mm x2"
                self.register_buffer("qplane0", K.pack_int4(q, lambda c: c >> 4))
                self.register_buffer("sz0", _sz(16 * s, 128 * s, act_dtype))  # (h - 8) 16 s + 128 s = 16 h s
                self.register_buffer("qplane1", K.pack_int4(q, lambda c: c & 15))
                self.register_buffer("sz1", _sz(s, o + 8 * s, act_dtype))  # (l - 8) s + 8 s + o = l s + o
            self.register_buffer("perm", perm)
        else:
            self.kernel = "reference"
            self.layout = "reference"
            self.register_buffer("qweight", _pack_nibbles(rec.q) if rec.bits <= 4 else rec.q.contiguous())
            self.register_buffer("scale", rec.scale.float().contiguous())
            self.register_buffer("offset", rec.offset.float().contiguous())
            self.register_buffer("g_idx", gi.to(torch.int32) if rec.g_idx is not None else None)

    # -- dequantization -----------------------------------------------------------------------------------
    def _unpermute(self, w: torch.Tensor) -> torch.Tensor:
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def _q_rows(self, rows=None) -> torch.Tensor:
        """uint8 [rows, K] (kernel column order) for the gemv / reference layouts."""
        q = self.qweight if rows is None else self.qweight[rows]
        if self.layout == "split32":
            return _unpack_split32(q, self.in_features)
        if self.layout == "reference" and self.bits <= 4:
            return _unpack_nibbles(q, self.in_features)
        return q

    def _affine(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype) -> torch.Tensor:
        n, k = q.shape
        g = self.group_size if self.group_size > 0 else k
        groups = scale.shape[1]
        if groups * g != k:  # partial last group: expand per column
            gi = torch.arange(k) // g
            return (q.to(dtype) * scale[:, gi].to(dtype)).add_(offset[:, gi].to(dtype))
        qg = q.reshape(n, groups, g).to(dtype)
        return torch.addcmul(offset.to(dtype)[..., None], qg, scale.to(dtype)[..., None]).reshape(n, k)

    def _plane_rows(self, rows):
        """float32 [len(rows), K] dequantized rows of the int4pack layout, kernel column order."""
        n, k, kg = self.out_features, self.in_features, self.kernel_group
        w = 0
        for plane, sz in ((self.qplane0, self.sz0), (self.qplane1, self.sz1)):
            if plane is None:
                continue
            q = K.unpack_int4_rows(plane, n, k, rows).float()
            s = sz[:, rows, 0].float().t().repeat_interleave(kg, dim=1)
            z = sz[:, rows, 1].float().t().repeat_interleave(kg, dim=1)
            w = w + (q - 8) * s + z
        return w

    def dequantize_rows(self, rows):
        rows = rows.reshape(-1)
        if self.layout == "reference":
            gi = (self.g_idx.long() if self.g_idx is not None
                  else torch.arange(self.in_features) // self.group_size)
            return self._q_rows(rows).float() * self.scale[rows][:, gi] + self.offset[rows][:, gi]
        if self.layout == "int4pack":
            return self._unpermute(self._plane_rows(rows))
        return self._unpermute(self._affine(self._q_rows(rows), self.scale[rows], self.offset[rows], torch.float32))

    def _fast_layout(self) -> bool:
        return self.out_features % 64 == 0 and K._block_is_split_nibbles(self.in_features)

    def _wt_blocks(self, dtype) -> torch.Tensor:
        """int4pack layout dequantized as [N/64, K, 64] (row block, input column, row in block), read straight
        from the packed planes (the layout where byte k*32 + r of a 64-row block holds rows r and r + 32)."""
        n, k, kg = self.out_features, self.in_features, self.kernel_group
        b, g = n // 64, k // kg
        out = None
        for plane, sz in ((self.qplane0, self.sz0), (self.qplane1, self.sz1)):
            if plane is None:
                continue
            p = plane.view(b, k, 32)
            q = torch.cat((p & 15, p >> 4), dim=2).view(b, g, kg, 64)
            sc = sz[..., 0].float()
            s_t = sc.t().reshape(b, 64, g).transpose(1, 2).unsqueeze(2).to(dtype)  # [B, G, 1, 64]
            z_t = (sz[..., 1].float() - 8 * sc).t().reshape(b, 64, g).transpose(1, 2).unsqueeze(2).to(dtype)
            if out is None:
                out = torch.addcmul(z_t, q, s_t, out=torch.empty((b, g, kg, 64), dtype=dtype))
            else:
                out.add_(torch.addcmul(z_t, q, s_t))
        return out.view(b, k, 64)

    def _dequantize_permuted(self, dtype) -> torch.Tensor:
        """[N, K] in the kernel's column order."""
        n, k = self.out_features, self.in_features
        if self._cpp is not None and dtype in (torch.float32, torch.bfloat16):
            g = self.group_size if self.group_size > 0 else k
            return self._cpp.dequant(self.qweight, self.scale, self.offset, g, _EMPTY, k, self.layout == "split32",
                                     dtype == torch.bfloat16)
        if self.layout != "int4pack":
            return self._affine(self._q_rows(), self.scale, self.offset, dtype)
        if self._fast_layout():
            return self._wt_blocks(dtype).transpose(1, 2).reshape(n, k)
        kg = self.kernel_group
        w = None
        for plane, sz in ((self.qplane0, self.sz0), (self.qplane1, self.sz1)):
            if plane is None:
                continue
            q = K.unpack_int4(plane, n, k).reshape(n, k // kg, kg).to(dtype)
            sc = sz[..., 0].t().to(dtype)[..., None]
            z = sz[..., 1].t().to(dtype)[..., None]
            part = torch.addcmul(z, q.sub_(8), sc)
            w = part if w is None else w.add_(part)
        return w.reshape(n, k)

    def dequantize(self, dtype=torch.float32):
        if self.layout == "reference":
            n, k = self.out_features, self.in_features
            step = max(1, (1 << 22) // k)
            return torch.cat([self.dequantize_rows(torch.arange(i, min(n, i + step))).to(dtype)
                              for i in range(0, n, step)])
        return self._unpermute(self._dequantize_permuted(dtype))

    def _prefill_forward(self, x2):
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.layout == "int4pack" and self._fast_layout():
            n, k = self.out_features, self.in_features
            return x2 @ self._wt_blocks(x2.dtype).permute(1, 0, 2).reshape(k, n)  # W.T, kernel column order
        return F.linear(x2, self._dequantize_permuted(x2.dtype))

    def _kernel_forward(self, x2):
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self._cpp is not None:
            g = self.group_size if self.group_size > 0 else self.in_features
            if self.layout == "split32":
                if x2.dtype == torch.bfloat16 and C.HAS_BF16[0]:
                    return self._cpp.gemv_u4_bf16(x2, self.qweight, self.scale, self.offset, g, _EMPTY)
                return _cast(self._cpp.gemv_u4(_gemv(x2), self.qweight, self.scale, self.offset, g, _EMPTY), x2)
            return _cast(self._cpp.gemv_u8(_gemv(x2), self.qweight, self.scale, self.offset, g, False), x2)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2, self.qplane0, self.kernel_group, self.sz0)
        if self.qplane1 is not None:
            y = y + mm(x2, self.qplane1, self.kernel_group, self.sz1)
        return y

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"


class NF4Linear(QuantLinear):
    """NF4 weights (QLoRA): 4-bit normal-float codes with one absmax per block, optionally double-quantized.
    The codes are not an affine grid, so torch has no kernel for them: tokenloom's gemv looks the codes up in a
    register (AVX-512 permute); without it the weight is dequantized per call (a byte -> two codes table)."""

    def __init__(self, rec: NF4Quant, bias=None, act_dtype=torch.bfloat16, use_kernel: bool = True):
        from tokenloom.quant.nf4 import NF4_CODE

        n, k = rec.shape
        super().__init__(n, k, bias, act_dtype)
        self.block_size = rec.block_size
        self._cpp = C.load() if use_kernel and k % 32 == 0 and rec.block_size % 32 == 0 else None
        self.layout = "split32" if self._cpp is not None else "nibbles"
        self.register_buffer("qweight", _pack_split32(rec.q) if self._cpp is not None else _pack_nibbles(rec.q))
        if rec.absmax_q is not None:
            self.double_quant = True
            self.dq_block = rec.dq_block
            self.register_buffer("absmax_q", rec.absmax_q.contiguous())
            self.register_buffer("absmax_scale", rec.absmax_scale.float().contiguous())
            self.register_buffer("absmax_mean", rec.absmax_mean.float().reshape(()))
        else:
            self.double_quant = False
            self.register_buffer("absmax_f", rec.absmax.float().contiguous())
        code = NF4_CODE
        self.register_buffer("code", code.clone(), persistent=False)
        self.register_buffer("lut", torch.stack([code.repeat(16), code.repeat_interleave(16)], -1), persistent=False)
        self.kernel = "gemv" if self._cpp is not None else "nf4-dequant"

    def absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax_f
        from tokenloom.quant.nf4 import dequantize_absmax

        return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean, self.dq_block).reshape(
            self.out_features, self.in_features // self.block_size)

    def _codes(self, rows=None, dtype=torch.float32) -> torch.Tensor:
        q = self.qweight if rows is None else self.qweight[rows]
        if self.layout == "split32":
            return self.code.to(dtype)[_unpack_split32(q, self.in_features).long()]
        return F.embedding(q.to(torch.int32), self.lut.to(dtype)).reshape(q.shape[0], -1)

    def dequantize(self, dtype=torch.float32):
        n, k = self.out_features, self.in_features
        if self._cpp is not None and dtype in (torch.float32, torch.bfloat16):
            return self._cpp.dequant(self.qweight, self.absmax(), _EMPTY, self.block_size, self.code, k, True,
                                     dtype == torch.bfloat16)
        w = self._codes(dtype=dtype).reshape(n, k // self.block_size, self.block_size)
        w.mul_(self.absmax().to(dtype)[..., None])
        return w.reshape(n, k)

    def dequantize_rows(self, rows):
        k = self.in_features
        w = self._codes(rows).reshape(-1, k // self.block_size, self.block_size)
        return (w * self.absmax()[rows][..., None]).reshape(-1, k)

    def _kernel_forward(self, x2):
        if self._cpp is not None:
            if x2.dtype == torch.bfloat16 and C.HAS_BF16[0]:
                return self._cpp.gemv_u4_bf16(x2, self.qweight, self.absmax(), _EMPTY, self.block_size, self.code)
            return _cast(self._cpp.gemv_u4(_gemv(x2), self.qweight, self.absmax(), _EMPTY, self.block_size, self.code),
                         x2)
        return F.linear(x2, self.dequantize(x2.dtype))


class ConcatLinear(nn.Module):
    """Several quantized layers on the same input whose outputs are concatenated (a fused q/k/v or gate/up
    made of tensors in different formats, e.g. a GGUF Q4_K_M file with a Q6_K v projection)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.kernel = "+".join(getattr(p, "kernel", "?") for p in parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self, dtype=torch.float32):
        return torch.cat([p.dequantize(dtype) for p in self.parts])


class QuantizedEmbedding(nn.Module):
    """Token embedding that reads its rows out of the quantized (tied) lm_head, so the weights exist once."""

    def __init__(self, source: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.source = source
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the embedding's dtype (callers read `embed_tokens.weight.dtype`)."""
        return torch.empty(0, dtype=self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.dequantize_rows(ids.reshape(-1)).to(self.dtype).reshape(*ids.shape, self.embedding_dim)


# int8 weights of at least this many elements run as two int4 planes (measured: 49152 x 576 takes 3.1 ms as
# planes vs 4.2 ms with _weight_int8pack_mm at batch 1; small matrices are faster on the int8 kernel)
INT8_AS_PLANES_MIN = 1 << 23


def build_linear(rec: Record, bias=None, act_dtype=torch.bfloat16, use_kernel: bool = True) -> QuantLinear:
    if isinstance(rec, Int8Quant):
        n, k = rec.shape
        if use_kernel and C.load() is None and n * k >= INT8_AS_PLANES_MIN and K.int4_kernel_ok(act_dtype) \
                and K.int4_shape_ok(n, k) and K.int4_kernel_group(k, k) is not None:
            # big matrices (the LM head): two int4 planes stream faster than the int8 kernel on this CPU
            aff = AffineQuant.from_zero(rec.q.view(torch.uint8) ^ 0x80, rec.scale[:, None],  # q + 128
                                        torch.full((n, 1), 128), 8, k)
            return Int4Linear(aff, bias, act_dtype, use_kernel)
        return Int8Linear(rec, bias, act_dtype, use_kernel)
    if isinstance(rec, AffineQuant):
        return Int4Linear(rec, bias, act_dtype, use_kernel)
    if isinstance(rec, NF4Quant):
        return NF4Linear(rec, bias, act_dtype, use_kernel)
    raise TypeError(type(rec))


# ---------------------------------------------------------------------------------------------------------
# helpers


def _sz(scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """[N, G] scale and zero -> the kernel's [G, N, 2]."""
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in [0, 15] -> [N, ceil(K/2)]: column 2j in the low nibble, 2j+1 in the high nibble."""
    q = q.to(torch.uint8)
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(p: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)[:, :k]


def _pack_split32(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in [0, 15], K a multiple of 32 -> [N, K/2]: in each 32-column chunk, byte j holds column j
    (low nibble) and column j + 16 (high nibble) -- the layout of cpu_kernels.gemv_u4."""
    n, k = q.shape
    c = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def _unpack_split32(p: torch.Tensor, k: int) -> torch.Tensor:
    n = p.shape[0]
    c = p.reshape(n, k // 32, 1, 16)
    return torch.cat((c & 15, c >> 4), dim=2).reshape(n, k)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage once (tied / shared weights), rotary tables excluded,
    plus tensors modules keep as plain attributes (e.g. oneDNN-packed weights, whose storage is opaque)."""
    seen, total = set(), 0
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for mod_name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                tensors.append((f"{mod_name}.{attr}", value))
    for name, t in tensors:
        if t is None or "rotary" in name or name.endswith((".lut", ".code")):
            continue
        if t.is_mkldnn or t.layout != torch.strided:
            key, size = ("opaque", id(t)), t.numel() * t.element_size()
        else:
            key, size = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()), t.untyped_storage().nbytes()
        if key in seen:
            continue
        seen.add(key)
        total += size
    return total
