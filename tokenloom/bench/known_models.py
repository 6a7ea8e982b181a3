"""Architectures of popular open models, so that `tokenloom plan` can size models that are not on this machine.
Numbers from each model's config.json on the Hugging Face Hub (layers, hidden, heads, KV heads, head_dim, MLP size,
vocabulary, tied embeddings, q/k/v bias, experts, sliding windows)."""
from __future__ import annotations

import re

from tokenloom.config import ModelConfig

_GEMMA2_LAYERS = 42


def _cfg(arch, vocab, hidden, inter, layers, heads, kv, head_dim=0, tied=False, bias=False, ctx=131072, **kw):
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
                       attention_bias=bias, max_position_embeddings=ctx, **kw)


KNOWN: dict[str, ModelConfig] = {
    "llama-3.2-1b": _cfg("llama", 128256, 2048, 8192, 16, 32, 8, 64, tied=True),
    "llama-3.2-3b": _cfg("llama", 128256, 3072, 8192, 28, 24, 8, 128, tied=True),
    "llama-3.1-8b": _cfg("llama", 128256, 4096, 14336, 32, 32, 8),
    "llama-3.1-70b": _cfg("llama", 128256, 8192, 28672, 80, 64, 8),
    "llama-3.1-405b": _cfg("llama", 128256, 16384, 53248, 126, 128, 8),
    "llama-3.3-70b": _cfg("llama", 128256, 8192, 28672, 80, 64, 8),
    "qwen2.5-0.5b": _cfg("qwen2", 151936, 896, 4864, 24, 14, 2, tied=True, bias=True, ctx=32768),
    "qwen2.5-7b": _cfg("qwen2", 152064, 3584, 18944, 28, 28, 4, bias=True, ctx=32768),
    "qwen2.5-14b": _cfg("qwen2", 152064, 5120, 13824, 48, 40, 8, bias=True, ctx=32768),
    "qwen2.5-32b": _cfg("qwen2", 152064, 5120, 27648, 64, 40, 8, bias=True, ctx=32768),
    "qwen2.5-72b": _cfg("qwen2", 152064, 8192, 29568, 80, 64, 8, bias=True, ctx=32768),
    "qwen3-8b": _cfg("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, ctx=40960),
    "mistral-7b": _cfg("mistral", 32768, 4096, 14336, 32, 32, 8, ctx=32768),  # v0.3 (v0.1: vocab 32000)
    "mixtral-8x7b": _cfg("mixtral", 32000, 4096, 14336, 32, 32, 8, ctx=32768, num_experts=8, num_experts_per_tok=2),
    "gemma-2-9b": _cfg("gemma2", 256000, 3584, 14336, _GEMMA2_LAYERS, 16, 8, 256, tied=True, ctx=8192,
                       sliding_window=4096,
                       layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(_GEMMA2_LAYERS))),
}


def normalize(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'; 'Qwen/Qwen2.5-7B-Instruct' -> 'qwen2.5-7b'."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    key = re.sub(r"^meta-", "", key)
    key = re.sub(r"-v0\.\d+$", "", key)  # mistral-7b-instruct-v0.3
    key = re.sub(r"-(instruct|chat|it|base)$", "", key)
    return key


def known_config(name: str) -> tuple[str, ModelConfig] | None:
    key = normalize(name)
    return (key, KNOWN[key]) if key in KNOWN else None
