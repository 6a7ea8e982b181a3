"""Small validated configuration dataclasses shared by every layer of the engine."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def tokenloom_home() -> Path:
    """Where models, corpora and compiled kernels are cached ($TOKENLOOM_HOME, default ~/.cache/tokenloom)."""
    return Path(os.environ.get("TOKENLOOM_HOME") or Path.home() / ".cache" / "tokenloom")


class TokenloomError(Exception):
    """An error whose message is meant for the user as it is (CLI prints it without a traceback)."""


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer, normalised from HF config.json or GGUF metadata. Which
    architectures tokenloom runs is the model registry's business (model_executor/models/registry.py)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None
    num_experts: int = 0  # 0 = dense MLP; Mixtral: 8
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise TokenloomError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)

    @classmethod
    def from_hf(cls, cfg: dict, defaults: dict | None = None) -> "ModelConfig":
        """Map a transformers config.json dict onto ModelConfig; `defaults`: values the architecture's config class
        implies when config.json leaves them out (the model class's hf_config_defaults)."""
        cfg = {**(defaults or {}), **cfg}
        needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if missing := [k for k in needed if k not in cfg]:
            raise TokenloomError(f"config.json (model_type '{cfg.get('model_type', '')}') lacks {', '.join(missing)}")
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=cfg.get("model_type", ""),
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            sliding_window=sliding,
            num_experts=cfg.get("num_local_experts", 0) or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.num_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2
        mlp = 3 * h * i * max(1, self.num_experts) + (h * self.num_experts if self.num_experts else 0)
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device != "cpu" or _cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise TokenloomError(f"unknown dtype '{name}' (choose from: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = a share of free memory
    num_blocks: int | None = None  # overrides kv_cache_memory when set (tests)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto = model dtype; int8 = quantized KV
    # Free blocks unused for this long go back to the OS (0 = never), keeping the most recently used cached
    # prefix blocks up to kv_keep_cached_bytes resident.
    kv_release_interval_s: float = 2.0
    kv_keep_cached_bytes: int = 32 << 20

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise TokenloomError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise TokenloomError("num_blocks must be >= 1")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise TokenloomError(f"unknown kv_cache_dtype '{self.kv_cache_dtype}' (auto, int8)")
        if self.kv_release_interval_s < 0 or self.kv_keep_cached_bytes < 0:
            raise TokenloomError("kv_release_interval_s and kv_keep_cached_bytes must be >= 0")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0  # 0 = the model's context length

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise TokenloomError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise TokenloomError("max_num_batched_tokens must be >= 1")


SPECULATIVE_METHODS = ("ngram", "draft_model", "self", "layer_skip")


@dataclass
class SpeculativeConfig:
    """Speculative decoding, under vLLM's names: {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4}; {"model": PATH_OR_NAME, ...} (a draft model sharing the target's vocabulary);
    {"method": "self", "draft_quantization": "int4"} (the target, quantized, as its own draft);
    {"method": "layer_skip", "draft_layers": 8} (the target's first layers and its head)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None  # the draft model (method draft_model)
    draft_quantization: str | None = None  # method self: default int4; draft_model: the draft's own weights
    draft_layers: int = 0  # method layer_skip: 0 = a quarter of the target's layers
    adaptive: bool = True  # per request, shrink k or pause while drafting does not pay

    def __post_init__(self):
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "draft_layers"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TokenloomError(f"speculative config: {name} must be an integer")
        for name in ("model", "draft_quantization"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TokenloomError(f"speculative config: {name} must be a string")
        if not isinstance(self.adaptive, bool):
            raise TokenloomError("speculative config: adaptive must be true or false")
        if self.method not in SPECULATIVE_METHODS:
            raise TokenloomError(f"unknown speculative method '{self.method}' ({', '.join(SPECULATIVE_METHODS)})")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise TokenloomError("num_speculative_tokens must be in 1..16")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise TokenloomError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.method == "draft_model" and not self.model:
            raise TokenloomError("speculative method draft_model needs a draft \"model\"")
        if self.draft_layers < 0:
            raise TokenloomError("draft_layers must be >= 0")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a dict or a JSON string (the CLI's --speculative-config); a "model" without a method means a
        draft model."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TokenloomError(f"speculative config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise TokenloomError("speculative config must be a JSON object")
        value = dict(value)
        if "method" not in value and value.get("model"):
            value["method"] = "draft_model"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TokenloomError(f"unknown speculative config keys: {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**value)
        except TypeError as exc:
            raise TokenloomError(f"bad speculative config: {exc}") from None


@dataclass
class StructuredOutputConfig:
    """Constrained decoding: the grammar engine, how long a constraint may take to compile (a request whose
    constraint takes longer is refused), and how many compiled constraints are kept for reuse."""
    backend: str = "llguidance"
    compile_timeout_s: float = 10.0
    max_cached_grammars: int = 256

    def __post_init__(self):
        if self.backend != "llguidance":
            raise TokenloomError(f"unknown structured output backend '{self.backend}' (llguidance)")
        if not self.compile_timeout_s > 0:
            raise TokenloomError("structured output compile_timeout_s must be > 0")
        if not isinstance(self.max_cached_grammars, int) or self.max_cached_grammars < 1:
            raise TokenloomError("structured output max_cached_grammars must be an integer >= 1")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    quantization: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None
    structured_output: StructuredOutputConfig = field(default_factory=StructuredOutputConfig)
