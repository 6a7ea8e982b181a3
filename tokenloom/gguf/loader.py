"""Load a GGUF checkpoint into (ModelConfig, checkpoint-named state dict, metadata).

The file is memory-mapped (copy-on-write, never written); each tensor is dequantised on its own
with :mod:`tokenloom.gguf.quants` into a fresh tensor of the requested dtype, so at most one
tensor's worth of temporaries exists at any time besides the result.

Which architectures load, and what their llama.cpp tensor names mean, is the model classes' business
(model_executor): each declares a GGUFTensorNames, which the model loader passes down here.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.gguf.reader import GGUFFile, open_gguf, read_metadata
from tokenloom.gguf.quants import Q, check_supported, dequantize

# elements dequantised per step (bounds the float32 temporaries of one big tensor)
_CHUNK_ELEMENTS = 1 << 22

_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+?)(?:_exps|\.(\d+))?\.(weight|bias)$")
_BLK_EXPS_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)_exps\.(weight)$")
# tensors llama.cpp writes that have no checkpoint parameter (recomputed by the model)
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
# convert_hf_to_gguf.py's LlamaModel.permute reorders these rows, per head (q) or per KV head (k)
_PERMUTED = {"attn_q": "num_heads", "attn_k": "num_kv_heads"}


@dataclass(frozen=True)
class GGUFTensorNames:
    """A model's llama.cpp tensor names: GGUF stem -> checkpoint (transformers) module. Declared by the model
    class, passed down to the loader (which sits below model_executor and knows no architecture)."""

    globals: dict[str, str]  # token_embd -> model.embed_tokens
    layers: dict[str, str]  # blk.N.<stem> -> <layer_prefix>N.<module>
    # MoE experts, stacked (blk.N.<stem>_exps [E, out, in]) or one per expert (blk.N.<stem>.J): module with {j}
    experts: dict[str, str] = field(default_factory=dict)
    permuted_qk: bool = True  # llama.cpp permuted the attn_q / attn_k rows (llama, mistral, mixtral)
    layer_prefix: str = "model.layers."
    # added by llama.cpp to every *norm.weight it writes (Gemma: 1, its norms scale by 1 + weight); taken off again
    norm_offset: float = 0.0

    def extended(self, layers: dict[str, str] | None = None, **changes) -> "GGUFTensorNames":
        """These names with more layer tensors (and other fields changed): a subclass's declaration."""
        return dataclasses.replace(self, layers={**self.layers, **(layers or {})}, **changes)

    def checkpoint_name(self, gguf_name: str) -> str | None:
        """Checkpoint name of a (non-stacked) GGUF tensor, or None if unknown."""
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in self.globals:
            return f"{self.globals[stem]}.{suffix}"
        m = _BLK_RE.match(gguf_name)
        if not m or gguf_name.endswith(("_exps.weight", "_exps.bias")):
            return None
        layer, part, expert, suffix = m.groups()
        if expert is not None:
            return self.expert_name(layer, part, int(expert), suffix)
        return f"{self.layer_prefix}{layer}.{self.layers[part]}.{suffix}" if part in self.layers else None

    def expert_name(self, layer: str, stem: str, j: int, suffix: str = "weight") -> str | None:
        if stem not in self.experts:
            return None
        return f"{self.layer_prefix}{layer}.{self.experts[stem].format(j=j)}.{suffix}"

    def gguf_name(self, checkpoint_name: str) -> str | None:
        """GGUF name of a checkpoint tensor (None for MoE experts, which GGUF may stack, and unknown names)."""
        module, _, suffix = checkpoint_name.rpartition(".")
        for stem, theirs in self.globals.items():
            if theirs == module:
                return f"{stem}.{suffix}"
        if not module.startswith(self.layer_prefix):
            return None
        layer, _, rest = module.removeprefix(self.layer_prefix).partition(".")
        for stem, theirs in self.layers.items():
            if theirs == rest:
                return f"blk.{layer}.{stem}.{suffix}"
        return None

    def permuted_heads(self, gguf_name: str, cfg: ModelConfig) -> int:
        """Heads whose rows llama.cpp permuted in this tensor (0: not permuted)."""
        if not self.permuted_qk or not gguf_name.startswith("blk."):
            return 0
        stem = gguf_name.split(".")[2]
        return getattr(cfg, _PERMUTED[stem]) if stem in _PERMUTED else 0


def open_gguf_checked(path: str) -> GGUFFile:
    """Open a GGUF file read-only, checking every tensor's byte range against the file size."""
    return open_gguf(path)


# ---------------------------------------------------------------------------------------------
# metadata -> ModelConfig


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def gguf_architecture(meta: dict[str, Any]) -> str:
    """The architecture (ModelConfig.architecture) of a GGUF file: its general.architecture, except that a
    llama / mistral file with experts is Mixtral."""
    arch = str(meta.get("general.architecture"))
    if arch in ("llama", "mistral") and int(meta.get(f"{arch}.expert_count", 0) or 0) > 0:
        return "mixtral"
    return arch


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str] | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    tensor_names = tensor_names or set()

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        v = get(key)
        if v is None:
            raise TokenloomError(f"GGUF metadata is missing '{arch}.{key}'")
        return v

    n_expert = int(get("expert_count", 0) or 0)

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
        architecture=gguf_architecture(meta),
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
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        num_experts=n_expert,
        num_experts_per_tok=int(get("expert_used_count", 0) or 0),
        moe_intermediate_size=int(get("expert_feed_forward_length") or 0),
        shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length") or 0),
        # llama.cpp renormalises the chosen experts' weights for every MoE but Qwen2-MoE, unless the file says
        norm_topk_prob=bool(get("expert_weights_norm", arch != "qwen2moe")),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        **_gemma_fields(str(arch), get, hidden // n_head, head_dim),
    )


# llama.cpp's fixed Gemma layouts (llama-model.cpp): every n-th layer global, the others in a sliding window; the
# 27B models (46 / 62 layers) scale the attention by (hidden / heads) ** -0.5 instead of head_dim ** -0.5
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_fields(arch: str, get, hidden_per_head: int, head_dim: int) -> dict:
    """ModelConfig's sliding window, per-layer attention kinds, local rope base, attention scale and soft-capping
    of a Gemma 2 / 3 file, as llama.cpp runs it (the metadata holds the window and the soft-capping only)."""
    if arch not in _GEMMA_SWA_PATTERN:
        return dict(sliding_window=None)
    n = int(get("block_count"))
    pattern = get("attention.sliding_window_pattern")  # per layer (newer files), else the fixed one
    if isinstance(pattern, list) and len(pattern) == n:
        swa = [bool(p) for p in pattern]
    else:
        swa = [bool((i + 1) % _GEMMA_SWA_PATTERN[arch]) for i in range(n)]
    caps = {k: _f32(get(k)) if get(k) is not None else None
            for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    return dict(
        sliding_window=int(get("attention.sliding_window") or 4096),
        layer_types=tuple("sliding_attention" if s else "full_attention" for s in swa) if len(set(swa)) > 1 else (),
        local_rope_theta=10000.0 if arch == "gemma3" else None,  # llama.cpp's rope_freq_base_train_swa
        query_pre_attn_scalar=float(hidden_per_head if n == _GEMMA_27B_LAYERS[arch] else head_dim),
        # Gemma 3 never soft-caps the attention scores (neither llama.cpp nor transformers)
        attn_logit_softcapping=caps["attn_logit_softcapping"] if arch == "gemma2" else None,
        final_logit_softcapping=caps["final_logit_softcapping"],
    )


# ---------------------------------------------------------------------------------------------
# tensors


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


def read_tensor(reader: GGUFFile, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tensor of an open GGUF file, dequantized into `dtype`, in torch's dimension order (as stored: no
    un-permuting). Adapter files (lora/adapter.py) are read this way."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = check_supported(t.tensor_type)
    return _dequantize_rows(_raw_bytes(reader, t), qtype, shape[-1] if shape else 1, dtype).reshape(shape)


class GGUFCheckpoint:
    """An open GGUF model file: its metadata now, its tensors (dequantised, checkpoint-named) on state_dict()."""

    def __init__(self, path: str):
        self.path = path
        self.reader = open_gguf_checked(path)
        try:
            self.metadata = read_metadata(self.reader)
        except Exception as exc:
            raise TokenloomError(f"cannot read GGUF file '{path}': corrupt metadata ({exc})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = gguf_architecture(self.metadata)
        self.deferred: set[str] = set()  # checkpoint names left quantized by state_dict(keep_blocks=True)

    def config(self) -> ModelConfig:
        """The model's configuration; Phi-3's LongRoPE factor sets (rope_factors_* tensors) in its rope scaling."""
        cfg = config_from_metadata(self.metadata, set(self.tensors))
        arch = self.metadata.get("general.architecture")
        window = int(self.metadata.get(f"{arch}.attention.sliding_window") or 0)
        if cfg.sliding_window is None and window > 0:  # Phi-3: as transformers runs it (llama.cpp leaves it off)
            cfg.sliding_window = window
        if "rope_factors_long.weight" in self.tensors:
            factors = {k: read_tensor(self.reader, self.tensors[f"rope_factors_{k}.weight"]).reshape(-1).tolist()
                       for k in ("long", "short")}
            original = self.metadata.get(f"{arch}.rope.scaling.original_context_length") or cfg.max_position_embeddings
            cfg.rope_scaling = {"rope_type": "longrope", "long_factor": factors["long"],
                                "short_factor": factors["short"], "original_max_position_embeddings": int(original)}
            if (attn := self.metadata.get(f"{arch}.rope.scaling.attn_factor")) is not None:
                cfg.rope_scaling["attention_factor"] = _f32(attn)
        return cfg

    def state_dict(self, cfg: ModelConfig, names: GGUFTensorNames, expected: set[str],
                   dtype: torch.dtype = torch.float32, keep_blocks: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor in `dtype` under its checkpoint name (names: the model class's declaration), llama.cpp's
        q/k permutation undone where it was applied. `expected`: the checkpoint names the model needs; those
        with a GGUF name of their own are checked before anything is read. A Llama-3.1 rope_freqs tensor
        becomes cfg.rope_scaling (and metadata["tokenloom.rope_freqs"]). keep_blocks: the quantized weights of
        linear layers and of the embedding are not dequantized at all (left out of the result, listed in
        self.deferred): quant.gguf_linear builds their modules straight from the file's blocks."""
        self._check_present(expected, names)
        state: dict[str, torch.Tensor] = {}
        for name, t in self.tensors.items():
            qtype = check_supported(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if name in _IGNORED:
                if name == "rope_freqs.weight":
                    freqs = _dequantize_rows(_raw_bytes(self.reader, t), qtype, shape[-1], torch.float32).reshape(-1)
                    self.metadata["tokenloom.rope_freqs"] = freqs.tolist()
                    cfg.rope_scaling = {"rope_type": "freq_factors", "factors": freqs.tolist()}
                continue
            exps = _BLK_EXPS_RE.match(name)
            target = names.expert_name(exps[1], exps[2], 0) if exps else names.checkpoint_name(name)
            if target is None:
                raise TokenloomError(f"GGUF file '{self.path}' has a tensor tokenloom does not know: '{name}'")
            if keep_blocks and not exps and is_block_weight(target, qtype):
                self.deferred.add(target)
                continue
            heads = names.permuted_heads(name, cfg)
            raw = _raw_bytes(self.reader, t)
            if heads and len(shape) > 1:
                raw = unpermute_rows(raw, heads)  # rows of blocks: copies only the (small) quantised bytes
            if names.norm_offset and name.endswith("norm.weight"):  # in float32, as transformers' GGUF loading
                w = (_dequantize_rows(raw, qtype, shape[-1], torch.float32) - names.norm_offset).to(dtype)
            else:
                w = _dequantize_rows(raw, qtype, shape[-1], dtype)
            w = w.reshape(shape)
            if heads and len(shape) == 1:  # a permuted bias
                w = unpermute_rows(w, heads).contiguous()
            if exps:
                if w.dim() != 3 or w.shape[0] != cfg.num_experts:
                    raise TokenloomError(f"GGUF tensor '{name}' has shape {list(w.shape)}, "
                                         f"expected [{cfg.num_experts}, ...]")
                for j in range(w.shape[0]):
                    state[names.expert_name(exps[1], exps[2], j, exps[3])] = w[j]
            else:
                state[target] = w
            del raw, w
        missing = sorted(expected - set(state) - self.deferred)
        if missing:
            raise TokenloomError(f"GGUF file '{self.path}' is missing the weights for {', '.join(missing[:5])}")
        return state

    def _check_present(self, expected: set[str], names: GGUFTensorNames) -> None:
        required = [g for g in map(names.gguf_name, expected) if g is not None]
        missing = sorted((n for n in required if n not in self.tensors), key=_natural)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise TokenloomError(
                f"GGUF file '{self.path}' is missing required tensor(s): {', '.join(missing[:5])}{more}")


def is_block_weight(checkpoint_name: str, qtype) -> bool:
    """A linear layer's or the embedding's weight in a quantized (non-float) ggml type."""
    float_types = (Q.F32, Q.F16, Q.BF16)
    linear = checkpoint_name.endswith("_proj.weight") or checkpoint_name.endswith(("embed_tokens.weight",
                                                                                   "lm_head.weight"))
    # MoE experts (and Qwen2-MoE's shared expert) stay float: no quantized module is swapped in for them
    return linear and "expert" not in checkpoint_name and qtype not in float_types


def _natural(name: str) -> list:
    """blk.2 before blk.10."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]
