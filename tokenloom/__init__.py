"""tokenloom: a small, fast LLM inference engine and server on PyTorch."""
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
