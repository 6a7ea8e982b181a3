"""Rotary position embedding (rotate-half convention) with linear and Llama-3 frequency scaling."""
import math

import torch
from torch import nn

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.kernels import cpu_ops


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    # on the CPU even inside `with torch.device("meta")` (model skeletons): torch's meta path for these ops would
    # import its compiler (seconds of start-up)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
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
    raise TokenloomError(f"unsupported rope scaling type '{kind}' (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq = rope_inv_freq(cfg)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for these positions, shaped [T, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


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
