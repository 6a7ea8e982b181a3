"""tokenloom: a small, fast LLM inference engine and server on PyTorch."""
import os

# oneDNN keeps a compiled primitive per matrix shape (~0.5 MiB each for a bf16 matmul), 1024 by default, and ideep
# (torch's wrapper) a second cache of them in front. A server meets many shapes (prompt lengths, batch widths) and kept
# ~190 MiB of them after 1000 mixed requests. 64 in oneDNN hold a steady load's shapes (the same throughput as 128 in
# a mixed-length bf16 batch); ideep's copy adds memory, not speed (a miss there finds oneDNN's primitive). Read when
# torch first builds one, so set before any model runs.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "8")

from tokenloom.config import TokenloomError
from tokenloom.sampling_params import SamplingParams, StructuredOutputsParams
from tokenloom.version import __version__

__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "TokenloomError", "__version__"]


def __getattr__(name):  # keep `import tokenloom` light: the engine (and torch) load on first use
    if name == "LLM":
        from tokenloom.entrypoints.llm import LLM

        return LLM
    if name == "LoRARequest":
        from tokenloom.lora.request import LoRARequest

        return LoRARequest
    raise AttributeError(name)
