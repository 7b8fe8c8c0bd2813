"""Python-side registrations for the C++/CUDA ops of `lora_kernels._C` (csrc/): fake (meta) kernels, so
the ops work under torch.compile / FakeTensor, and autograd formulas.

The schemas and the CPU/CUDA kernels are defined in C++ (`TORCH_LIBRARY(lora_kernels, ...)`); the C++ side
names this module with `set_python_module`, so torch imports it whenever it needs a fake kernel. Every op
`lora_kernels::native_<name>` is the native backend of the Python op `lora_kernels::<name>`, with the same
arguments minus `backend`:

    native_lora_linear_fwd(x [M, in], weight [out, in], bias [out]?, lora_A [r, in], lora_B [out, r],
                           scaling, dropout_p, seed?) -> (y [M, out] in x's dtype, S = x̂ Aᵀ [M, r] float32)
    native_lora_linear_bwd(dy [M, out], x, weight, lora_A, lora_B, S, scaling, dropout_p, seed?,
                           need_dx, need_dA, need_dB) -> (dx [M, in], dA [r, in], dB [out, r])
        (a gradient not needed is an empty tensor; each gradient in its tensor's dtype)
    native_dropout(x, dropout_p, seed) -> x̂ = x ⊙ m / (1 - p), m the mask of `lora_kernels.dropout` for x
                   viewed as [numel / K, K], K = x.shape[-1]
    native_lora_shrink(x [T, in], A_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot,
                       tile_start, tile_end, ranks?) -> S [T, NS·R] float32
    native_lora_expand(S, B_stacks, <the 7 LoRABatch tensors>, y, scalings, ranks?, y_offset) -> ()  (y += ...)
    native_multi_lora_linear(x, weight, bias?, A_stacks, B_stacks, scalings, <the 7 LoRABatch tensors>,
                             ranks?) -> y [T, out]
        (semantics in lora_kernels/ops/multi_lora.py; the native kernels index tokens by token_adapter and do
        not read the grouped metadata; inference only, no autograd)

Nothing is registered when the extension is not built (`lora_kernels.backends.NATIVE is None`).
"""
from __future__ import annotations

import torch

from lora_kernels.backends import NATIVE

# Ops this module expects the extension to define (the CUDA build check verifies each has a CUDA kernel).
NATIVE_OPS = ("native_lora_linear_fwd", "native_lora_linear_bwd", "native_dropout", "native_lora_shrink",
              "native_lora_expand", "native_multi_lora_linear")


def _lora_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, lora_A.dtype), torch.float32)


def _register() -> None:
    lib = "lora_kernels::"

    @torch.library.register_fake(lib + "native_lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                     lambda: f"x must have shape [M, in={weight.shape[1]}], got {tuple(x.shape)}")
        M = x.shape[0]
        return (x.new_empty(M, weight.shape[0]),
                x.new_empty(M, lora_A.shape[0], dtype=_lora_dtype(x, lora_A)))

    @torch.library.register_fake(lib + "native_lora_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
        return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
                lora_A.new_empty(lora_A.shape) if need_dA else lora_A.new_empty(0),
                lora_B.new_empty(lora_B.shape) if need_dB else lora_B.new_empty(0))

    @torch.library.register_fake(lib + "native_dropout")
    def _(x, dropout_p, seed):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "native_lora_shrink")
    def _(x, A_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
          ranks):
        dt = torch.float64 if torch.float64 in (x.dtype, A_stacks[0].dtype) else torch.float32
        return x.new_empty(x.shape[0], len(A_stacks) * A_stacks[0].shape[1], dtype=dt)

    @torch.library.register_fake(lib + "native_lora_expand")
    def _(S, B_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
          y, scalings, ranks, y_offset):
        return None

    @torch.library.register_fake(lib + "native_multi_lora_linear")
    def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
          tile_slot, tile_start, tile_end, ranks):
        return x.new_empty(x.shape[0], weight.shape[0])

    # Autograd: the native forward is usable on its own (the Python op lora_linear_fwd has its own formula).
    def fwd_setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
        ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p

    def fwd_backward(ctx, dy, _dS):
        x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
        need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        if not (need_dx or need_dA or need_dB):
            return (None,) * 8
        dx, dA, dB = torch.ops.lora_kernels.native_lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, seed, need_dx, need_dA, need_dB)
        # The base weight and bias are frozen: no gradient (as in lora_kernels.lora_linear).
        return (dx if need_dx else None, None, None, dA if need_dA else None, dB if need_dB else None,
                None, None, None)

    torch.library.register_autograd(lib + "native_lora_linear_fwd", fwd_backward, setup_context=fwd_setup_context)

    # d x̂ / dx = m / (1 - p): the gradient goes through the same mask.
    def drop_setup_context(ctx, inputs, output):
        _, ctx.dropout_p, seed = inputs
        ctx.save_for_backward(seed)

    def drop_backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return torch.ops.lora_kernels.native_dropout(grad, ctx.dropout_p, seed), None, None

    torch.library.register_autograd(lib + "native_dropout", drop_backward, setup_context=drop_setup_context)


if NATIVE is not None:
    _register()
