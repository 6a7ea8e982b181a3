"""Engine arguments: every knob of the engine in one validated dataclass, shared by the CLI, the server and the
benchmarks (which read them off an argparse namespace but never parse arguments themselves)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tokenloom.loader.sources import DEFAULT_MODEL
from tokenloom.loader.variants import TAGS, split_tag


@dataclass
class EngineArgs:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    quantization: str | None = None
    max_model_len: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    kv_release_interval_s: float = 2.0
    kv_keep_cached_bytes: int = 32 << 20
    threads: int = 0  # CPU threads for PyTorch (0 = torch's default, one per core)
    speculative_config: str | None = None  # JSON, as vLLM's --speculative-config
    enable_lora: bool = False  # serve LoRA adapters (vLLM's --enable-lora, --max-loras, --max-lora-rank, ...)
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    tensor_parallel_size: int = 1  # vLLM's -tp / -pp / --distributed-executor-backend
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    enforce_eager: bool = False  # CUDA: no decode graphs (vLLM's --enforce-eager)
    batch_invariant: bool = False  # outputs independent of the batch (config.EngineConfig.batch_invariant)

    @classmethod
    def from_namespace(cls, ns) -> "EngineArgs":
        """The engine fields of a parsed namespace (an argparse.Namespace or any object with those attributes)."""
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
        if hasattr(ns, "no_prefix_caching"):
            values["enable_prefix_caching"] = not ns.no_prefix_caching
        return cls(**values)

    def create_llm(self):
        import torch

        from tokenloom.entrypoints.llm import LLM

        if self.threads:
            torch.set_num_threads(self.threads)
        kwargs = dataclasses.asdict(self)
        kwargs.pop("threads")
        base, tag = split_tag(self.model)
        if tag is not None and not Path(self.model).expanduser().exists():  # NAME:TAG, a variant (Ollama's tags)
            kwargs.update(model=base, **TAGS[tag])
        return LLM(**kwargs)


def make_llm(ns):
    """An LLM from a namespace holding engine arguments."""
    return EngineArgs.from_namespace(ns).create_llm()
