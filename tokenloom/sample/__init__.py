"""Sampling: SamplingRow per request -> SamplingMetadata per step -> Sampler (logits processors, then the draw)."""
from tokenloom.sample.logits_processors import LogitsProcessor, apply_token_bitmask, default_processors
from tokenloom.sample.metadata import SamplingMetadata, SamplingRow
from tokenloom.sample.sampler import Sampler, SamplerOutput

__all__ = ["LogitsProcessor", "Sampler", "SamplerOutput", "SamplingMetadata", "SamplingRow", "apply_token_bitmask",
           "default_processors"]
