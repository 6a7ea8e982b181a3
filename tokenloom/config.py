"""Small validated configuration dataclasses shared by every layer of the engine."""
from __future__ import annotations

import dataclasses
import os
import re
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
    moe_intermediate_size: int = 0  # each expert's MLP size; 0: intermediate_size (Mixtral)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0: none
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1 (Mixtral; Qwen MoE: config)
    # MoE layers: those i with (i + 1) % decoder_sparse_step == 0 that are not in mlp_only_layers (Qwen MoE)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 2 / 3: "sliding_attention" or "full_attention" per layer when they mix (else empty: sliding_window, if
    # any, applies to every layer), the rope base of the sliding layers (Gemma 3; default rope_theta), the
    # attention scale's denominator (scale = query_pre_attn_scalar ** -0.5; default head_dim) and tanh soft-capping
    # of the attention scores and of the final logits.
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise TokenloomError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        self.layer_types = tuple(self.layer_types)
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise TokenloomError(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
        self.mlp_only_layers = tuple(int(i) for i in self.mlp_only_layers)
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise TokenloomError(f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_experts}")
        if self.decoder_sparse_step < 1 or not all(0 <= i < self.num_layers for i in self.mlp_only_layers):
            raise TokenloomError("decoder_sparse_step must be >= 1 and mlp_only_layers name layers of the model")

    def is_moe_layer(self, layer: int) -> bool:
        """Layer `layer` has sparse experts (else a dense MLP of intermediate_size)."""
        return (bool(self.num_experts) and (layer + 1) % self.decoder_sparse_step == 0
                and layer not in self.mlp_only_layers)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window layer `layer` attends over (None: the whole context)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

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
        local_theta = cfg.get("rope_local_base_freq")
        if isinstance(rope_params, dict) and "full_attention" in rope_params:  # per layer type (Gemma 3)
            local_theta = (rope_params.get("sliding_attention") or {}).get("rope_theta", local_theta)
            rope_params = rope_params["full_attention"]
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        rope_scaling = _checked_rope_scaling(cfg, rope_scaling, rope_params)
        return cls(
            **_layer_kinds(cfg, sliding, local_theta),
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
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", False))),  # qkv_bias: Qwen2-MoE
            sliding_window=sliding,
            num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.num_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2
        mlp = 3 * h * i
        if self.num_experts:
            mlp = (3 * self.moe_intermediate_size + 1) * h * self.num_experts
            mlp += (3 * self.shared_expert_intermediate_size + 1) * h if self.shared_expert_intermediate_size else 0
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h


def _checked_rope_scaling(cfg: dict, rope_scaling: dict | None, rope_params: dict | None) -> dict | None:
    """The rope scaling of a config.json; partial rotary embeddings refused. LongRoPE (Phi-3) gets its
    original_max_position_embeddings as transformers takes it: config.json's top-level one first (Phi-3 keeps it
    there), then the rope dict's, then max_position_embeddings."""
    partial = cfg.get("partial_rotary_factor") or (rope_params or {}).get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise TokenloomError(f"partial rotary embeddings are not supported (partial_rotary_factor={partial})")
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
    if kind not in ("longrope", "su"):  # su: early Phi-3 configs' name for it
        return rope_scaling
    original = (cfg.get("original_max_position_embeddings") or rope_scaling.get("original_max_position_embeddings")
                or cfg.get("max_position_embeddings", 2048))
    return {**rope_scaling, "rope_type": "longrope", "original_max_position_embeddings": int(original)}


def _layer_kinds(cfg: dict, sliding: int | None, local_theta: float | None) -> dict:
    """ModelConfig's per-layer attention fields of a config.json: layer_types only where sliding and global layers
    mix (older Gemma configs give a sliding_window_pattern: every n-th layer global), soft-capping, the scale."""
    n = cfg["num_hidden_layers"]
    kinds = tuple(cfg.get("layer_types") or ())
    if not kinds and cfg.get("sliding_window_pattern"):
        every = int(cfg["sliding_window_pattern"])
        kinds = tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(n))
    if sliding is None or len(set(kinds)) < 2:
        kinds = ()
    return dict(layer_types=kinds, local_rope_theta=None if local_theta is None else float(local_theta),
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
                final_logit_softcapping=cfg.get("final_logit_softcapping"))


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
class LoRAConfig:
    """Multi-LoRA serving, under vLLM's names: up to max_loras adapters run in one step (each in a slot of
    stacked weights beside the base layers), each of rank <= max_lora_rank; the weights of up to max_cpu_loras
    adapters (default: max_loras) stay in host memory, least recently used first out, the others are read again
    from their files when next used."""
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self):
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is None and name == "max_cpu_loras":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TokenloomError(f"LoRA config: {name} must be an integer >= 1, got {value!r}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise TokenloomError(f"LoRA config: max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                                 f"({self.max_loras})")


@dataclass
class ParallelConfig:
    """How the model is spread over processes, under vLLM's names: tensor_parallel_size ranks split every weight
    matrix, pipeline_parallel_size ranks split the layers; distributed_executor_backend "mp" runs the ranks
    beyond the engine's own as local worker processes, "ray" as Ray actors over a Ray cluster's nodes (None: "mp"
    when more than one rank is asked for). master_addr/master_port: where the ranks meet (torch.distributed's
    TCP store, held by the engine's process); port 0 picks a free one. pipeline_microbatches: a step's sequences
    go down the pipeline in up to this many groups, so stages work at once (default: one per stage; 1 keeps each
    step's batch whole, which makes outputs bit-identical to one rank's; groups round as different batches do)."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    pipeline_microbatches: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    worker_start_timeout_s: float = 300.0

    BACKENDS = ("mp", "ray", "uni")

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TokenloomError(f"{name} must be an integer >= 1, got {value!r}")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise TokenloomError("tensor and pipeline parallelism together are not supported yet: "
                                 "use one of --tensor-parallel-size / --pipeline-parallel-size")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in self.BACKENDS:
            raise TokenloomError(f"unknown distributed_executor_backend {backend!r} (mp, ray)")
        if backend == "uni" and self.world_size > 1:
            raise TokenloomError("distributed_executor_backend 'uni' runs one process: tensor/pipeline "
                                 "parallel sizes must be 1")
        if self.world_size > 1 and backend is None:
            self.distributed_executor_backend = "mp"
        if self.pipeline_microbatches is None:
            self.pipeline_microbatches = self.pipeline_parallel_size
        if not isinstance(self.pipeline_microbatches, int) or self.pipeline_microbatches < 1:
            raise TokenloomError(f"pipeline_microbatches must be an integer >= 1, got {self.pipeline_microbatches!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


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
    lora: LoRAConfig | None = None  # None: no adapters (LLM(..., enable_lora=True) sets one)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # CUDA: every step eager, no decode graphs (vLLM's enforce_eager; TOKENLOOM_CUDA_GRAPHS=0 does the same)
    enforce_eager: bool = False
    # every request's output independent of what else is in the step: all token rows through the compiled CPU
    # stack's row-wise kernels (worker/model_runner.py's _split_invariant), at a cost in prefill speed
    batch_invariant: bool = False

    def __post_init__(self):
        if self.batch_invariant and self.parallel.world_size > 1:
            raise TokenloomError("--batch-invariant runs on the compiled stack of one process: drop "
                                 "--tensor-parallel-size / --pipeline-parallel-size")


_DURATION_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
DURATION_PATTERN = r"^(?:-?\d+(?:\.\d+)?(?:ms|s|m|h)?)*$"  # what parse_duration takes as a string ("" = not given)
_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value) -> float | None:
    """Seconds from a number or an Ollama/Go duration ("300", "5m", "1h30m", "-1"); None for None or ""."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TokenloomError("a duration is a number of seconds or a string such as \"5m\"")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    parts = list(_DURATION_PART.finditer(text))
    if not parts or "".join(m.group(0) for m in parts) != text:
        raise TokenloomError(f"{value!r} is not a duration (use seconds, or e.g. \"5m\", \"1h\", \"-1\")")
    return sum(float(m.group(1)) * _DURATION_UNITS[m.group(2)] for m in parts)
