"""tokenloom: a small, fast LLM inference engine and server on PyTorch."""
from tokenloom.config import TokenloomError
from tokenloom.sampling_params import SamplingParams, StructuredOutputsParams
from tokenloom.version import __version__

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "TokenloomError", "__version__"]


def __getattr__(name):  # keep `import tokenloom` light: the engine (and torch) load on first use
    if name == "LLM":
        from tokenloom.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
