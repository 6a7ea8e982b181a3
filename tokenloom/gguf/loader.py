"""Load a GGUF checkpoint into (ModelConfig, HF-named state dict, metadata).

The file is memory-mapped (copy-on-write, never written); each tensor is dequantised on its own
with :mod:`tokenloom.gguf.quants` into a fresh tensor of the requested dtype, so at most one
tensor's worth of temporaries exists at any time besides the result.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from tokenloom.config import SUPPORTED_ARCHITECTURES, ModelConfig, TokenloomError
from tokenloom.gguf.reader import GGUFFile, open_gguf, read_metadata
from tokenloom.gguf.quants import check_supported, dequantize

# GGUF `general.architecture` values we can load, and whether llama.cpp permuted their q/k rows
# (convert_hf_to_gguf.py's LlamaModel.permute, applied to llama / mistral / mixtral checkpoints).
GGUF_ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False}

# elements dequantised per step (bounds the float32 temporaries of one big tensor)
_CHUNK_ELEMENTS = 1 << 22

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
# MoE experts: stacked [n_expert, out, in] tensors or (older files) one tensor per expert
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+?)(?:_exps|\.(\d+))?\.(weight|bias)$")
_BLK_EXPS_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)_exps\.(weight)$")
# tensors llama.cpp writes that have no HF parameter (recomputed by the model)
_IGNORED = {"rope_freqs.weight"}


def open_gguf_checked(path: str) -> GGUFFile:
    """Open a GGUF file read-only, checking every tensor's byte range against the file size."""
    return open_gguf(path)


# ---------------------------------------------------------------------------------------------
# metadata -> ModelConfig


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str] | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise TokenloomError(
            f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensor_names = tensor_names or set()

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        v = get(key)
        if v is None:
            raise TokenloomError(f"GGUF metadata is missing '{arch}.{key}'")
        return v

    n_expert = int(get("expert_count", 0) or 0)
    name = arch
    if arch in ("llama", "mistral") and n_expert > 0:
        name = "mixtral"

    vocab = get("vocab_size")
    if vocab is None and meta.get("tokenizer.ggml.tokens") is not None:
        vocab = len(meta["tokenizer.ggml.tokens"])
    if vocab is None:
        raise TokenloomError(f"GGUF metadata has neither '{arch}.vocab_size' nor tokenizer.ggml.tokens")

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv = int(get("attention.head_count_kv") or n_head)
    ffn = get("feed_forward_length") or get("expert_feed_forward_length")
    if ffn is None:
        raise TokenloomError(f"GGUF metadata is missing '{arch}.feed_forward_length'")
    if isinstance(n_kv, list) or isinstance(ffn, list):
        raise TokenloomError("GGUF files with per-layer head counts / feed-forward sizes are not supported")
    head_dim = int(get("attention.key_length") or 0) or hidden // n_head
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise TokenloomError(
            f"partial rotary embeddings are not supported ({arch}.rope.dimension_count={rope_dim}, head_dim={head_dim})"
        )

    rope_scaling = None
    stype = get("rope.scaling.type")
    if stype and stype != "none":
        rope_scaling = {"rope_type": stype, "type": stype}
        if get("rope.scaling.factor") is not None:
            rope_scaling["factor"] = _f32(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        for k in ("attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_log_multiplier"):
            if get(f"rope.scaling.{k}") is not None:
                rope_scaling[k] = _f32(get(f"rope.scaling.{k}"))

    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    bos = meta.get("tokenizer.ggml.bos_token_id")

    return ModelConfig(
        architecture=name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(ffn),
        num_layers=int(need("block_count")),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=("blk.0.attn_q.bias" in tensor_names) or (arch == "qwen2" and not tensor_names),
        sliding_window=None,
        num_experts=n_expert,
        num_experts_per_tok=int(get("expert_used_count", 0) or 0),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
    )


# ---------------------------------------------------------------------------------------------
# tensors


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a (non-stacked) GGUF tensor, or None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    m = _BLK_RE.match(gguf_name)
    if not m or gguf_name.endswith(("_exps.weight", "_exps.bias")):
        return None
    layer, part, expert, suffix = m.groups()
    if expert is not None:
        if part not in _EXPERT_NAMES:
            return None
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_EXPERT_NAMES[part]}.{suffix}"
    if part not in _BLOCK_NAMES:
        return None
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{suffix}"


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation on dim 0 (works on float weights, biases and on raw
    quantised rows alike, since ggml blocks never span rows)."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise TokenloomError(f"cannot un-permute {rows} rows into {n_head} heads")
    rest = t.shape[1:]
    return t.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(t.shape)


def _raw_bytes(reader: GGUFFile, t) -> torch.Tensor:
    """The tensor's block bytes as a uint8 torch tensor of shape [rows, bytes_per_row] (no copy)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # torch order: [..., out, in]
    row_len = shape[-1] if shape else 1
    n_rows = int(t.n_elements) // max(row_len, 1)
    begin = int(t.data_offset)
    arr = reader.data[begin : begin + int(t.n_bytes)]
    if arr.size != int(t.n_bytes):
        raise TokenloomError(f"GGUF tensor '{t.name}' is truncated")
    raw = torch.from_numpy(np.asarray(arr))  # writable copy-on-write mapping: no warning, no copy
    return raw.view(n_rows, -1)


def _dequantize_rows(raw: torch.Tensor, qtype, row_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, bytes_per_row] -> [rows, row_len] in `dtype`, a chunk of rows at a time."""
    n_rows = raw.shape[0]
    out = torch.empty((n_rows, row_len), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // max(row_len, 1))
    for r in range(0, n_rows, step):
        chunk = raw[r : r + step]
        out[r : r + step] = dequantize(chunk, qtype, (chunk.shape[0], row_len))
    return out


def load_gguf(
    path: str, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a llama / mistral / mixtral / qwen2 GGUF file.

    Returns (config, state dict with transformers parameter names in `dtype`, GGUF metadata as plain
    Python values). llama.cpp's q/k permutation is undone for llama-family files.
    """
    reader = open_gguf_checked(path)
    try:
        meta = read_metadata(reader)
    except Exception as exc:
        raise TokenloomError(f"cannot read GGUF file '{path}': corrupt metadata ({exc})") from None
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, set(tensors))
    permuted = GGUF_ARCHITECTURES[meta["general.architecture"]]

    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(cfg.num_layers):
        required += [f"blk.{i}.{p}.weight" for p in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")]
        if cfg.num_experts:
            required.append(f"blk.{i}.ffn_gate_inp.weight")
        else:
            required += [f"blk.{i}.{p}.weight" for p in ("ffn_gate", "ffn_up", "ffn_down")]
    missing = [n for n in required if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise TokenloomError(f"GGUF file '{path}' is missing required tensor(s): {', '.join(missing[:5])}{more}")

    state: dict[str, torch.Tensor] = {}
    rope_freqs = None
    for name, t in tensors.items():
        qtype = check_supported(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if name in _IGNORED:
            if name == "rope_freqs.weight":
                rope_freqs = _dequantize_rows(_raw_bytes(reader, t), qtype, shape[-1], torch.float32).reshape(-1)
            continue
        exps = _BLK_EXPS_RE.match(name)
        target = None if exps else hf_name(name)
        if target is None and not exps:
            raise TokenloomError(f"GGUF file '{path}' has a tensor tokenloom does not know: '{name}'")

        heads = 0
        if permuted and name.startswith("blk.") and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
        raw = _raw_bytes(reader, t)
        if heads and len(shape) > 1:
            raw = unpermute_rows(raw, heads)  # rows of blocks: copies only the (small) quantised bytes
        w = _dequantize_rows(raw, qtype, shape[-1], dtype).reshape(shape)
        if heads and len(shape) == 1:  # a permuted bias
            w = unpermute_rows(w, heads).contiguous()
        if exps:
            layer, part, suffix = exps.groups()
            if w.dim() != 3 or w.shape[0] != cfg.num_experts:
                raise TokenloomError(f"GGUF tensor '{name}' has shape {list(w.shape)}, expected [{cfg.num_experts}, ...]")
            for j in range(w.shape[0]):
                state[f"model.layers.{layer}.block_sparse_moe.experts.{j}.{_EXPERT_NAMES[part]}.{suffix}"] = w[j]
        else:
            state[target] = w
        del raw, w

    if cfg.num_experts:
        for i in range(cfg.num_layers):
            for j in range(cfg.num_experts):
                for wn in ("w1", "w2", "w3"):
                    key = f"model.layers.{i}.block_sparse_moe.experts.{j}.{wn}.weight"
                    if key not in state:
                        raise TokenloomError(f"GGUF file '{path}' is missing the expert weights for {key}")
    if rope_freqs is not None:
        # Llama 3.1-style rope scaling is stored as per-frequency divisors instead of metadata.
        meta["tokenloom.rope_freqs"] = rope_freqs.tolist()
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": rope_freqs.tolist()}
    return cfg, state, meta
