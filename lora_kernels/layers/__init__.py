"""Thin nn.Module layers over the ops: no math lives here."""
from lora_kernels.layers.lora_linear import LoRALinear
from lora_kernels.layers.multi_lora import MultiLoRALinear

__all__ = ["LoRALinear", "MultiLoRALinear"]
