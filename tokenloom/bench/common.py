"""Shared pieces of the benchmarks: workloads, percentiles, the transformers baseline."""
from __future__ import annotations

import random
import statistics
import time

import torch


def _fused(engine):
    """The engine's compiled decode stack (model_executor.fused_decode.FusedDecoder), or None."""
    return getattr(getattr(engine, "runner", None), "fused", None)


def decode_path(engine) -> str:
    """How the engine's decode steps run: "fused" (the compiled stack) or "layers"."""
    return "layers" if _fused(engine) is None else "fused"


def batch_invariant(engine) -> bool:
    """Whether every step runs batch-invariant (--batch-invariant)."""
    fused = _fused(engine)
    return fused is not None and fused.invariant


def path_note(engine) -> str:
    """What the report header adds to the decode path: the AMX tiles' width, or batch-invariant steps."""
    fused = _fused(engine)
    if batch_invariant(engine):
        return " (batch-invariant" + (", prompt rows on AMX tiles)" if fused.prompt_tiles else ")")
    return f" (AMX tiles from {fused.tile_rows} rows)" if amx_tile_rows(engine) else ""


def amx_tile_rows(engine) -> int:
    """The decode batch width from which the compiled stack meets quantized weights on AMX tiles (0: never)."""
    fused = _fused(engine)
    return fused.tile_rows if fused is not None else 0


def make_lengths(n: int, mean_in: int, mean_out: int, dist: str, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if dist == "fixed":
            out.append((mean_in, mean_out))
        elif dist == "uniform":
            out.append((rng.randint(max(1, mean_in // 2), mean_in * 3 // 2),
                        rng.randint(max(1, mean_out // 2), mean_out * 3 // 2)))
        else:  # ShareGPT-like: long-tailed lognormal prompts and replies around the given means
            li = int(min(max(4, rng.lognormvariate(0, 0.8) * mean_in * 0.73), mean_in * 6))
            lo = int(min(max(4, rng.lognormvariate(0, 0.8) * mean_out * 0.73), mean_out * 6))
            out.append((li, lo))
    return out


def random_prompts(lengths: list[tuple[int, int]], vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids: special tokens live there in most vocabularies.
    return [torch.randint(100, vocab_size, (li,), generator=g).tolist() for li, _ in lengths]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float], scale: float = 1000.0) -> str:
    if not values:
        return "n/a"
    v = [x * scale for x in values]
    return f"mean {statistics.mean(v):8.1f}  p50 {pct(v, 50):8.1f}  p90 {pct(v, 90):8.1f}  p99 {pct(v, 99):8.1f}"


def load_hf_reference(engine, dtype: torch.dtype):
    """transformers' model on the same weights (same GGUF or directory) and dtype, as the baseline."""
    from transformers import AutoModelForCausalLM

    src = engine.model_source
    if src.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype)
    return model.eval()


@torch.inference_mode()
def hf_generate_timed(model, batch: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(batch, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - start
