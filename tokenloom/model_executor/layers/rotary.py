"""Rotary position embedding (rotate-half convention) with linear, Llama-3 and LongRoPE (Phi-3) frequency scaling.

LongRoPE has two sets of frequency factors, and transformers picks one per forward call: the long set when the
call's sequence (its last position + 1) is longer than original_max_position_embeddings, else the short set (the
original Phi-3 code and transformers' dynamic_rope_update do the same), and scales cos/sin by an attention factor
either way. For a prompt run in one call and then one token per call over the cache, that is per token: a token of
a prompt longer than the original context takes the long factors at every position, any other token the long
factors from position original_max_position_embeddings on. tokenloom applies exactly that per token
(RotaryEmbedding.forward), so chunked prefill, batching, speculative decoding and preemption do not change a
token's rotation. Two differences remain. transformers' generate() also drops its cache the first time a sequence
grows past original_max_position_embeddings and prefills it all again with the long factors
(Phi3ForCausalLM.prepare_inputs_for_generation); tokenloom keeps the cached keys of the shorter sequence, as
transformers' forward does. And the prefix cache matches blocks by their tokens alone, so a prompt longer than
original_max_position_embeddings can reuse the short-rotated keys of a shorter one's prefix (and the reverse).
vLLM switches a whole step to the long factors when any of its positions is > original_max_position_embeddings:
batch-wide, and one position later than transformers.
"""
import math

import torch
from torch import nn

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.kernels import cpu_ops
from tokenloom.model_executor.forward_context import get_forward_context


def rope_type(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return "longrope" if kind == "su" else kind  # "su": LongRoPE's name in early Phi-3 configs


def _theta_powers(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    # on the CPU even inside `with torch.device("meta")` (model skeletons): torch's meta path for these ops would
    # import its compiler (seconds of start-up)
    return cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)


def longrope_inv_freq(cfg: ModelConfig, factors: list[float]) -> torch.Tensor:
    """transformers' _compute_longrope_parameters, operation for operation."""
    if len(factors) != cfg.head_dim // 2:
        raise TokenloomError(f"longrope factors: {len(factors)} values, expected head_dim / 2 = {cfg.head_dim // 2}")
    return 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * _theta_powers(cfg))


def longrope_attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are scaled by: config's attention_factor, else sqrt(1 + ln(s) / ln(original)) with s
    the scaling factor (config's, else max_position_embeddings / original), 1 when s <= 1 (as transformers)."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / _theta_powers(cfg)
    scaling = cfg.rope_scaling or {}
    kind = rope_type(cfg)
    if kind == "default":
        return inv_freq
    if kind == "freq_factors":  # llama.cpp stores Llama-3.1 scaling as per-frequency divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise TokenloomError(f"unsupported rope scaling type '{kind}' (supported: default, linear, llama3, longrope)")


def _tables(inv_freq: torch.Tensor, start: int, stop: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [stop - start, head_dim] of positions start..stop-1."""
    freqs = torch.outer(torch.arange(start, stop, dtype=torch.float32, device="cpu"), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


class RotaryEmbedding(nn.Module):
    """cos / sin tables by position (what the compiled decode stack reads too). LongRoPE: row p holds the short
    factors below original_max_position_embeddings, the long ones from there on (any token but a long prompt's);
    long_cos / long_sin hold the long factors below it, for the tokens of prompts longer than that."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.long_from = 0  # LongRoPE: original_max_position_embeddings
        long_cos = long_sin = None
        if rope_type(cfg) == "longrope":
            scaling = cfg.rope_scaling
            self.long_from = int(scaling["original_max_position_embeddings"])
            scale = longrope_attention_factor(cfg)
            short = longrope_inv_freq(cfg, scaling["short_factor"])
            long = longrope_inv_freq(cfg, scaling["long_factor"])
            split = min(self.long_from, max_positions)
            long_cos, long_sin = _tables(long, 0, split, scale)
            rest_cos, rest_sin = _tables(long, split, max_positions, scale)
            short_cos, short_sin = _tables(short, 0, split, scale)
            cos, sin = torch.cat([short_cos, rest_cos]), torch.cat([short_sin, rest_sin])
        else:
            cos, sin = _tables(rope_inv_freq(cfg), 0, max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("long_cos", long_cos, persistent=False)
        self.register_buffer("long_sin", long_sin, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for these positions, shaped [T, 1, head_dim] to broadcast over heads."""
        cos, sin = self.cos[positions], self.sin[positions]
        if self.long_cos is not None:
            cos, sin = self._long_prompts(positions, cos, sin)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def _long_prompts(self, positions, cos, sin):
        """LongRoPE: the tokens of prompts longer than original_max_position_embeddings take the long factors
        below it too (the forward context's prompt_lens; none given: every token is taken as past its prompt)."""
        prompt_lens = get_forward_context().prompt_lens
        if prompt_lens is None:
            return cos, sin
        early = (prompt_lens > self.long_from) & (positions < self.long_from)
        if not bool(early.any()):
            return cos, sin
        rows = positions.clamp(max=self.long_cos.shape[0] - 1)
        return (torch.where(early[:, None], self.long_cos[rows], cos),
                torch.where(early[:, None], self.long_sin[rows], sin))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rotate the first `heads` heads of each row of x [T, >= heads * head_dim] in place."""
    T = x.shape[0]
    if head_dim % 32 == 0 and cos.dtype == x.dtype and x.stride(-1) == 1 and (ops := cpu_ops.ops_for(x)):
        ops.rotary_(x, cos.reshape(T, head_dim), sin.reshape(T, head_dim), heads, head_dim)
        return x
    xh = x[:, : heads * head_dim].view(T, heads, head_dim)
    xh.copy_(apply_rotary(xh, cos, sin))
    return x


def apply_rotary_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int) -> torch.Tensor:
    """Rotate the q and k heads of a fused [T, (H + 2*KVH) * D] qkv output in place (the v heads follow them)."""
    return apply_rotary_(qkv, cos, sin, num_heads + num_kv_heads, head_dim)
