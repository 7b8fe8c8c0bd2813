"""lora_kernels: fused Triton and C++/CUDA kernels for LoRA training and multi-adapter serving."""
from lora_kernels import reference
from lora_kernels.backends import available_backends
from lora_kernels.dropout import dropout_mask
from lora_kernels.layers import LoRALinear
from lora_kernels.ops.lora_linear import lora_linear

__version__ = "0.1.0"
__all__ = ["LoRALinear", "available_backends", "dropout_mask", "lora_linear", "reference"]
