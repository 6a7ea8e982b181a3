"""LoRA adapters served on one copy of the base weights (vLLM's multi-LoRA, on tokenloom's layers).

An adapter wraps the model's linear layers the way quantization swaps them (gpt-fast style module swaps):
y = base(x) + scale * (x @ A^T) @ B^T for the rows whose request chose that adapter (lora/layers.py). A
LoRARequest names an adapter; the LoRAManager (lora/manager.py) reads PEFT directories and llama.cpp GGUF
adapters (lora/adapter.py), checks them against the model (LoRAError), keeps them by name, and puts the ones a
step needs into its max_loras slots.
"""
from tokenloom.lora.adapter import LoRAAdapter, LoRAError, read_adapter
from tokenloom.lora.manager import LoRAInfo, LoRAManager
from tokenloom.lora.request import LoRARequest

__all__ = ["LoRAAdapter", "LoRAError", "LoRAInfo", "LoRAManager", "LoRARequest", "read_adapter"]
