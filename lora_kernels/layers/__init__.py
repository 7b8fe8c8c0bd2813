"""Thin nn.Module layers over the ops: no math lives here."""
from lora_kernels.layers.lora_linear import LoRALinear

__all__ = ["LoRALinear"]
