"""Model variants named by Ollama-style tags: `NAME:TAG` is the model NAME loaded a given way.

    NAME, NAME:latest   the file's own form (a GGUF file runs on its quantized blocks)
    NAME:bf16, :f16, :f32   dequantized to that float type
    NAME:int8, :int4, :nf4  quantized at load (weight-only)
    NAME:ngram          the file's own form with n-gram speculative decoding

Two variants of one model are two loaded engines with their own weights and KV pool; the server keys its loaded
models by the canonical variant name (`name` for the default tag, `name:tag` otherwise).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

# tag -> the engine settings it overrides
TAGS: dict[str, dict[str, str]] = {
    "latest": {},
    "bf16": {"dtype": "bfloat16", "quantization": "none"},
    "f16": {"dtype": "float16", "quantization": "none"},
    "f32": {"dtype": "float32", "quantization": "none"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "nf4": {"quantization": "nf4"},
    "ngram": {"speculative_config": json.dumps({"method": "ngram", "num_speculative_tokens": 4})},
}
# what /api/tags reports as a variant's quantization_level (the default tag reports the file's own)
QUANT_LEVEL = {"bf16": "BF16", "f16": "F16", "f32": "F32", "int8": "Q8_0", "int4": "Q4_0", "nf4": "NF4"}


@dataclass(frozen=True)
class Variant:
    base: str  # the model's name without its tag, as users call it
    tag: str = "latest"
    overrides: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        """The canonical name: `base` for the default tag, else `base:tag`."""
        return self.base if self.tag == "latest" else f"{self.base}:{self.tag}"


def split_tag(name: str) -> tuple[str, str | None]:
    """(name without a known tag, that tag or None). Unknown tags stay part of the name."""
    base, sep, tag = name.rpartition(":")
    if sep and base and tag.lower() in TAGS:
        return base, tag.lower()
    return name, None


def variant(base: str, tag: str | None) -> Variant:
    tag = (tag or "latest").lower()
    return Variant(base, tag, dict(TAGS[tag]))


def all_variants(base: str) -> list[Variant]:
    return [variant(base, t) for t in TAGS]


# bytes per weight a tag's form holds (int8/int4 carry their group scales)
_BYTES_PER_WEIGHT = {"bf16": 2.0, "f16": 2.0, "f32": 4.0, "int8": 1.07, "int4": 0.57, "nf4": 0.57}


def estimate_weight_bytes(v: Variant, source: str) -> int:
    """Roughly what a variant's weights take once loaded, from its file's metadata (not loading it): the file's
    size in its own form, else its parameter count times the tag's bytes per weight."""
    from tokenloom.loader.inspect import describe_model

    info = describe_model(source)
    file_bytes = int(float(info["file size"].split()[0]) * 1e6)
    if v.tag not in _BYTES_PER_WEIGHT:
        return file_bytes
    count = info["parameters"]
    params = float(count[:-1]) * (1e9 if count.endswith("B") else 1e6)
    return int(params * _BYTES_PER_WEIGHT[v.tag])
