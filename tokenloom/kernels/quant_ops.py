"""Batch-1 (few-row) weight-only GEMV kernels for x86 CPUs (tokenloom/csrc/quant_gemv.cpp), compiled on first use.

torch's own weight-only kernels (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu) reach only ~4-5 GB/s
of weights on one core here, about what bfloat16 weights get through oneDNN, so INT8 decode barely beats
bfloat16. These kernels stream the weights once per call with AVX-512 (fp32 accumulation; float32 or bfloat16
activations in and out), which is close to memory bandwidth:

  gemv_u8   y = sum_g s[n,g] * <x_g, q_g> + o[n,g] * sum(x_g)    q uint8 [N, K]  (5..8-bit affine, INT8 as q+128)
  gemv_u4   the same with q packed two per byte, "split32": in every 32-column chunk byte j holds column j in
            its low nibble and column j + 16 in its high nibble (<= 4-bit affine: int4, GPTQ, AWQ, Q4_x, Q4_K)
  gemv_u4 with a code book: y = sum_b absmax[n,b] * <x_b, code[q_b]>  (NF4, the codes looked up in a register)
  gemv_u4_bf16  the same for bfloat16 activations on AVX512-BF16: nibbles become bf16 (affine: bits 0x4300 | q
            are exactly 128 + q; NF4: a register table) and meet x in vdpbf16ps

Built on first use by kernels.build (cached in $TOKENLOOM_HOME/kernels); where that fails, `load()`
returns None and the layers fall back to torch's kernels. Set TOKENLOOM_CPP_KERNELS=0 to disable them.
"""
from __future__ import annotations

from tokenloom.kernels.build import CppExtension

EXTENSION = CppExtension("tokenloom_qgemv", "quant_gemv.cpp",
                         ["gemv_u8", "gemv_u4", "gemv_u4_bf16", "dequant", "has_bf16"])
HAS_BF16 = [False]  # the module has the AVX512-BF16 variant (gemv_u4_bf16 runs natively)


def load():
    """The compiled extension, or None (disabled, unsupported platform, or the build failed)."""
    mod = EXTENSION.load()
    HAS_BF16[0] = bool(mod is not None and mod.has_bf16())
    return mod
