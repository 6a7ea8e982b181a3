"""Qwen2: the Llama decoder with a bias on q/k/v (never on o_proj)."""
from __future__ import annotations

from tokenloom.model_executor.models.llama import Attention, CausalLM, DecoderLayer


class Qwen2Attention(Attention):
    o_proj_bias = False


class Qwen2DecoderLayer(DecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(CausalLM):
    layer_cls = Qwen2DecoderLayer
    # transformers' Qwen2 always has the q/k/v bias (its config.json does not say), and no sliding window
    # unless use_sliding_window; llama.cpp does not permute its q/k rows.
    hf_config_defaults = {"attention_bias": True, "use_sliding_window": False}
    gguf_tensor_names = CausalLM.gguf_tensor_names.extended(permuted_qk=False)
