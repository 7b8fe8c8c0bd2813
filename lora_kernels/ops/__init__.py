"""Registered torch ops (`torch.ops.lora_kernels.*`) with their autograd formulas and public functions."""
