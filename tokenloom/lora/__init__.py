"""LoRA adapters served on one copy of the base weights.

An adapter wraps the model's linear layers the way quantization swaps them (gpt-fast style module swaps):
y = base(x) + scale * (x @ A^T) @ B^T for the rows whose request chose that adapter. LoRARequest names an adapter;
a LoRA manager (to come) loads PEFT or GGUF adapters into a fixed number of slots.
"""
from tokenloom.lora.request import LoRARequest

__all__ = ["LoRARequest"]
