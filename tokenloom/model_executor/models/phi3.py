"""Phi-3: the Llama decoder as its checkpoint stores it, q/k/v and gate/up already fused (qkv_proj, gate_up_proj,
ours as they are), no biases; the long-context versions scale the rotary embedding with LongRoPE
(layers/rotary.py), Phi-3-mini-4k attends over a sliding window."""
from __future__ import annotations

from tokenloom.gguf.loader import GGUFTensorNames
from tokenloom.model_executor.models.llama import CausalLM


class Phi3ForCausalLM(CausalLM):
    packed_modules_mapping: dict[str, list[str]] = {}  # fused in the checkpoint too
    # transformers' Phi3Config default, which its LongRoPE takes over the rope dict's (config.from_hf)
    hf_config_defaults = {"original_max_position_embeddings": 4096}
    # llama.cpp: fused too (attn_qkv, ffn_up = gate over up), rows not permuted; its LongRoPE factors are the
    # rope_factors_long / rope_factors_short tensors (gguf.loader reads them into the config)
    gguf_tensor_names = GGUFTensorNames(
        globals=CausalLM.gguf_tensor_names.globals,
        layers={"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
        permuted_qk=False,
    )
