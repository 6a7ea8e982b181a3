"""The economics of a token: bytes a decode step reads, FLOPs a token costs, the share of the machine's roofs a
measured rate reaches, and what a million tokens cost at a price per hour.

Formulas (a decoder-only transformer, L layers, hidden h, H query heads and KV heads of head_dim d, MLP size I,
vocabulary V):

- weights read per decode step: every linear weight the step touches, in the form it is stored (quantized blocks
  with their scales, int8/int4 records, bf16 / fp32 matrices), plus the LM head (the embedding table when tied);
  of the input embedding only the token's row. Shared by the whole batch: per token it is weights / batch.
- KV read per decode token at context c: sum over layers of min(c, window) x 2 (K and V) x kv_heads x d x bytes.
- FLOPs per token: 2 x (linear parameters the token passes through, LM head included; MoE: the routed top-k
  experts only) + 4 x sum over layers of min(c, window) x H x d (QK^T and PV, a multiply-add = 2 FLOPs).
- cost per 1M tokens = price_per_hour / (3600 x tokens/s) x 1e6.

Achieved shares are the measured rate times bytes (or FLOPs) per token over the machine's roof, which
`tokenloom bench roofline` measures (bench/roofline.py). A model whose weights fit in the last-level cache can
beat the DRAM roof at small batch: the share is then above 1 and the report says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tokenloom.config import ModelConfig, TokenloomError

# bytes per weight of the stored forms a plan (or a bench label) names; ggml block formats from their block
# sizes (gguf.GGML_QUANT_SIZES: bytes per block / weights per block)
BYTES_PER_WEIGHT = {
    "fp32": 4.0, "float32": 4.0, "f32": 4.0,
    "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0, "f16": 2.0,
    "fp8": 1.0, "int8": 1.0,  # per-channel / per-tensor scales: negligible
    "int4": 0.5 + 4 / 128,  # AWQ / GPTQ style: fp16 scale and zero per group of 128
    "nf4": 0.5 + 4 / 64,  # bitsandbytes: one fp32 absmax per 64
    "q4_k_m": 4.85 / 8,  # llama.cpp's mix (Q4_K with Q6_K for some tensors): ~4.85 bits a weight on Llama
    "q5_k_m": 5.69 / 8,
}
_HEAD_IN_BF16 = {"fp8", "int8", "int4", "nf4"}  # vLLM / AWQ / GPTQ keep embeddings and the LM head in bf16


def bytes_per_weight(dtype: str) -> float:
    key = dtype.strip().lower()
    if key in BYTES_PER_WEIGHT:
        return BYTES_PER_WEIGHT[key]
    try:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[key.upper()]]
        return size / block
    except (ImportError, KeyError):
        raise TokenloomError(f"unknown weight dtype '{dtype}' (e.g. bf16, fp8, int8, int4, nf4, q4_0, q4_1, q4_k, "
                             "q8_0, q4_k_m)") from None


def kv_element_bytes(kv_dtype: str, head_dim: int) -> float:
    """Bytes per K (or V) element: the dtype's, or int8 plus its float32 scale per token and head."""
    key = kv_dtype.strip().lower()
    if key == "int8":
        return 1.0 + 4.0 / head_dim
    if key in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        return 1.0
    if key in ("fp32", "float32"):
        return 4.0
    if key in ("bf16", "bfloat16", "fp16", "float16", "auto"):
        return 2.0
    raise TokenloomError(f"unknown KV cache dtype '{kv_dtype}' (bf16, fp16, fp8, int8, fp32)")


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # V x h
    lm_head: int  # V x h (counted once in total when tied)
    attention: int  # all layers: q, k, v, o (+ biases)
    mlp: int  # all layers, every expert
    mlp_active: int  # all layers, what one token passes through (dense MLP, or router + top-k + shared experts)
    norms: int
    tied: bool

    @property
    def total(self) -> int:
        return self.embedding + (0 if self.tied else self.lm_head) + self.attention + self.mlp + self.norms

    @property
    def linear_active(self) -> int:
        """Matmul parameters one token passes through, LM head included: FLOPs per token = 2 x this + attention."""
        return self.attention + self.mlp_active + self.lm_head

    @property
    def decoder_linear(self) -> int:
        return self.attention + self.mlp


def param_counts(cfg: ModelConfig) -> ParamCounts:
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    attn = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2
    if cfg.attention_bias:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    mlp = mlp_active = 0
    for layer in range(L):
        if cfg.is_moe_layer(layer):
            expert = 3 * h * cfg.moe_intermediate_size
            shared = 3 * h * cfg.shared_expert_intermediate_size + (h if cfg.shared_expert_intermediate_size else 0)
            router = h * cfg.num_experts
            mlp += cfg.num_experts * expert + shared + router
            mlp_active += cfg.num_experts_per_tok * expert + shared + router
        else:
            mlp += 3 * h * cfg.intermediate_size
            mlp_active += 3 * h * cfg.intermediate_size
    vh = cfg.vocab_size * h
    arch = cfg.architecture.lower()
    norms = (4 if arch.startswith("gemma") else 2) * h + (2 * d if arch.startswith(("qwen3", "gemma3")) else 0)
    return ParamCounts(embedding=vh, lm_head=vh, attention=L * attn, mlp=mlp, mlp_active=mlp_active,
                       norms=L * norms + h, tied=cfg.tie_word_embeddings)


def _windows(cfg: ModelConfig, ctx: int) -> list[int]:
    return [min(ctx, w) if (w := cfg.layer_window(i)) else ctx for i in range(cfg.num_layers)]


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "bf16") -> float:
    """KV cache bytes one token of context holds (all layers, K and V)."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_element_bytes(kv_dtype, cfg.head_dim)


def kv_bytes_read(cfg: ModelConfig, ctx: int, kv_dtype: str = "bf16") -> float:
    """KV bytes one decode token reads at context length ctx (sliding-window layers read their window only)."""
    per = 2 * cfg.num_kv_heads * cfg.head_dim * kv_element_bytes(kv_dtype, cfg.head_dim)
    return per * sum(_windows(cfg, ctx))


def attention_flops(cfg: ModelConfig, ctx: int) -> float:
    """QK^T and PV of one query token over ctx keys, all layers."""
    return 4.0 * cfg.num_heads * cfg.head_dim * sum(_windows(cfg, ctx))


def decode_flops_per_token(cfg: ModelConfig, ctx: int) -> float:
    return 2.0 * param_counts(cfg).linear_active + attention_flops(cfg, ctx)


def prefill_flops(cfg: ModelConfig, prompt_len: int) -> float:
    """A whole prompt: every position's linear FLOPs plus its causal attention (position t sees t keys)."""
    linear = 2.0 * param_counts(cfg).linear_active * prompt_len
    if not any(cfg.layer_window(i) for i in range(cfg.num_layers)):  # closed form without windows
        return linear + 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers * prompt_len * (prompt_len + 1) / 2
    return linear + sum(attention_flops(cfg, t) for t in range(1, prompt_len + 1))


def weight_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Bytes of all weights stored in `dtype` (embeddings and LM head in bf16 for fp8/int8/int4/nf4)."""
    p = param_counts(cfg)
    head = 2.0 if dtype.lower() in _HEAD_IN_BF16 else bytes_per_weight(dtype)
    tables = p.embedding + (0 if p.tied else p.lm_head)
    return p.decoder_linear * bytes_per_weight(dtype) + tables * head + p.norms * 2.0


def expected_experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a batch of `batch` tokens routes to, in expectation under uniform routing."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def decode_weight_bytes(cfg: ModelConfig, dtype: str, batch: int = 1) -> float:
    """Weight bytes one decode step of `batch` tokens reads (MoE: the experts the batch routes to)."""
    p = param_counts(cfg)
    w = bytes_per_weight(dtype)
    head = 2.0 if dtype.lower() in _HEAD_IN_BF16 else w
    mlp = p.mlp
    if cfg.num_experts:
        per_expert_all = p.mlp - p.mlp_active  # (E - k) experts' worth, plus nothing else
        per_expert = per_expert_all / (cfg.num_experts - cfg.num_experts_per_tok)
        touched = expected_experts_touched(cfg.num_experts, cfg.num_experts_per_tok, batch)
        mlp = p.mlp_active + per_expert * (touched - cfg.num_experts_per_tok)
    return (p.attention + mlp) * w + p.lm_head * head + batch * cfg.hidden_size * head + p.norms * 2.0


def cost_per_million(price_per_hour: float | None, tok_s: float) -> float | None:
    """Dollars per 1M tokens at tok_s tokens/s on a machine of price_per_hour $/h (None without a price)."""
    if price_per_hour is None or tok_s <= 0 or not math.isfinite(tok_s):
        return None
    return price_per_hour / (3600.0 * tok_s) * 1e6


@dataclass(frozen=True)
class Roofs:
    """A machine's roofs: memory read bandwidth (bytes/s) and dense GEMM throughput (FLOP/s) per dtype."""
    bandwidth: float
    gemm_bf16: float
    gemm_fp32: float
    source: str = "measured"
    llc_bytes: int = 0  # last-level cache: weights that fit in it can beat the DRAM roof

    def gemm(self, dtype: str) -> float:
        return self.gemm_fp32 if dtype in ("float32", "fp32") else self.gemm_bf16

    def to_dict(self) -> dict:
        return asdict(self)


def shares(roofs: Roofs, dtype: str, bytes_per_token: float, flops_per_token: float, tok_s: float) -> dict:
    achieved_bw = bytes_per_token * tok_s
    achieved_flops = flops_per_token * tok_s
    return {"bytes_per_token": bytes_per_token, "flops_per_token": flops_per_token, "tok_s": tok_s,
            "achieved_bandwidth_gbs": achieved_bw / 1e9, "bandwidth_share": achieved_bw / roofs.bandwidth,
            "achieved_tflops": achieved_flops / 1e12, "gemm_share": achieved_flops / roofs.gemm(dtype)}
