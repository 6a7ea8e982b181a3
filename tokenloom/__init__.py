"""tokenloom: a small, fast LLM inference engine and server on PyTorch."""
import os

# oneDNN, and ideep (torch's wrapper of it), keep a compiled primitive per matrix shape, 1024 of each by default. A
# server meets many shapes (prompt lengths, batch widths) and kept ~190 MiB of them after 1000 mixed requests;
# 128 each covers a steady load's shapes. Read when torch first builds one, so set before any model runs.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

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
