"""lora_kernels: fused Triton and C++/CUDA kernels for LoRA training and multi-adapter serving."""
from lora_kernels import reference
from lora_kernels.backends import available_backends
from lora_kernels.ops import native as _native  # noqa: F401  (fake/autograd registrations of lora_kernels._C)
from lora_kernels.dropout import dropout_mask
from lora_kernels.layers import LoRALinear
from lora_kernels.layers.multi_lora import MultiLoRALinear
from lora_kernels.ops.multi_lora import LoRABatch, lora_expand, lora_shrink, multi_lora_linear
from lora_kernels.ops.lora_linear import lora_linear
from lora_kernels.ops.dora import dora_linear
from lora_kernels.ops.qlora import qlora_linear
from lora_kernels import quant
from lora_kernels.peft_patch import (PatchReport, get_fused_peft_model, patch_peft, register_fused_lora,
                                     unpatch_peft)

from lora_kernels import serving  # noqa: E402  (MultiLoRAModel; imports nothing heavy)

__version__ = "0.1.0"
__all__ = ["LoRALinear", "PatchReport", "get_fused_peft_model", "patch_peft", "register_fused_lora", "unpatch_peft",
           "available_backends", "dora_linear", "qlora_linear", "quant", "dropout_mask", "lora_linear", "reference",
           "LoRABatch", "MultiLoRALinear", "lora_expand", "lora_shrink", "multi_lora_linear", "serving"]
