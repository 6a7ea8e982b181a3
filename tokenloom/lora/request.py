"""How a request names the adapter it runs with (vLLM's LoRARequest)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int  # >= 1; 0 means the base model
    lora_path: str  # a PEFT directory (adapter_config.json + adapter_model.safetensors) or a GGUF adapter

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError("lora_int_id must be >= 1 (0 is the base model)")
