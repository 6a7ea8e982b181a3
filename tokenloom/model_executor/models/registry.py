"""Which architectures tokenloom runs: architecture -> model class. Adding one is a model file and a line here.

The architecture is config.json's model_type (GGUF: general.architecture, a llama file with experts being
mixtral), kept as ModelConfig.architecture. Each model class declares its checkpoint names (models/weights.py).
"""
from __future__ import annotations

from tokenloom.config import TokenloomError
from tokenloom.model_executor.models.gemma2 import Gemma2ForCausalLM
from tokenloom.model_executor.models.gemma3 import Gemma3ForCausalLM
from tokenloom.model_executor.models.llama import CausalLM
from tokenloom.model_executor.models.phi3 import Phi3ForCausalLM
from tokenloom.model_executor.models.qwen2 import Qwen2ForCausalLM
from tokenloom.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from tokenloom.model_executor.models.qwen3 import Qwen3ForCausalLM
from tokenloom.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

# architecture: (model class, transformers' class name, written to config.json by quantized checkpoints)
MODELS: dict[str, tuple[type[CausalLM], str]] = {
    "llama": (CausalLM, "LlamaForCausalLM"),
    "mistral": (CausalLM, "MistralForCausalLM"),
    "mixtral": (CausalLM, "MixtralForCausalLM"),
    "qwen2": (Qwen2ForCausalLM, "Qwen2ForCausalLM"),
    "qwen3": (Qwen3ForCausalLM, "Qwen3ForCausalLM"),
    "phi3": (Phi3ForCausalLM, "Phi3ForCausalLM"),
    "qwen2_moe": (Qwen2MoeForCausalLM, "Qwen2MoeForCausalLM"),
    "qwen2moe": (Qwen2MoeForCausalLM, "Qwen2MoeForCausalLM"),  # a GGUF file's name for it
    "qwen3_moe": (Qwen3MoeForCausalLM, "Qwen3MoeForCausalLM"),
    "qwen3moe": (Qwen3MoeForCausalLM, "Qwen3MoeForCausalLM"),  # a GGUF file's name for it
    "gemma2": (Gemma2ForCausalLM, "Gemma2ForCausalLM"),
    "gemma3": (Gemma3ForCausalLM, "Gemma3ForCausalLM"),  # a GGUF file's name for Gemma 3's text model
    "gemma3_text": (Gemma3ForCausalLM, "Gemma3ForCausalLM"),
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(MODELS)


def model_class(architecture: str | None, shown: str | None = None) -> type[CausalLM]:
    """The model class of an architecture; a clear error naming `shown` (default: it) if tokenloom has none."""
    if architecture not in MODELS:
        raise TokenloomError(f"unsupported architecture '{shown or architecture}' "
                             f"(supported: {', '.join(supported_architectures())})")
    return MODELS[architecture][0]


def model_class_for_hf(hf_config: dict) -> type[CausalLM]:
    """The model class of a transformers config.json."""
    model_type = hf_config.get("model_type", "")
    shown = model_type or (hf_config.get("architectures") or ["unknown"])[0]
    return model_class(model_type, shown)


def hf_architecture(architecture: str) -> str:
    """transformers' class name for the architecture (config.json "architectures")."""
    model_class(architecture)
    return MODELS[architecture][1]
