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
    native_dropout(x, dropout_p, seed, dtype=None) -> x̂ = x ⊙ m / (1 - p) as a new contiguous tensor in
                   `dtype` (default x's), m the mask of `lora_kernels.dropout` for x viewed as [numel / K, K],
                   K = x.shape[-1]; x of any strides
    native_dropout_add_(out, t, dropout_p, seed) -> ()   out += t ⊙ m / (1 - p) in one pass, m the mask of t's
                   [numel / K, K] view, computed in promote(out, t) and rounded once (out fp16/bf16/fp32/fp64,
                   t fp32/fp64, one shape, any strides)
    native_dropout_mask(seed, M, K, dropout_p, device=None) -> the bool keep-mask m [M, K] (on `device`, default CPU)
    native_lora_shrink(x [T, in], A_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot,
                       tile_start, tile_end, ranks?) -> S [T, NS·R] float32
    native_lora_expand(S, B_stacks, <the 7 LoRABatch tensors>, y, scalings, ranks?, y_offset) -> ()  (y += ...)
    native_multi_lora_linear(x, weight, bias?, A_stacks, B_stacks, scalings, <the 7 LoRABatch tensors>,
                             ranks?, col_scale [L + 1, out]? = None) -> y [T, out]
        (semantics in lora_kernels/ops/multi_lora.py; inference only, no autograd. The CPU kernels walk the
        segments (sorted_token_ids, seg_starts, seg_lens, checked against token_adapter on the host): GEMMs for
        slots with >= 8 tokens, per-token dot products below; the CUDA kernels index tokens by token_adapter and
        read nothing on the host)
    native_multi_lora_linear_fwd(<native_multi_lora_linear's arguments>, dropout [L]?, seed?)
        -> (y [T, out], S = x̂ Aᵀ [T, NS·R] in promote(x, A, float32))
    native_multi_lora_linear_bwd(dy [T, out], x, weight, A_stacks, B_stacks, S, scalings, <the 7 LoRABatch tensors>,
                                 ranks?, dropout?, seed?, need_dx, need_dA, need_dB) -> (dx, [dA_i], [dB_i])
        (training, CPU only: the CUDA kernels raise; a gradient not needed is an empty tensor / list. Per-slot
        dropout p_l = dropout[l], active iff seed is given, the mask regenerated per gathered row; math and
        conventions of the "bwd" in lora_kernels/ops/multi_lora.py)
    native_quant4_dequantize(codes, absmax [n_blocks] float32, table [16] float32, N, K) -> W0 [N, K] float32:
        a 4-bit (NF4 / FP4) weight packed two codes a byte over the flattened [N, K] weight, 64-element blocks
        (they cross rows when K % 64 != 0); absmax already un-nested (lora_kernels/quant.py)
    native_quant4_linear(x [M, K] float32, codes, absmax, table, bias [N]?, N, gemv_max_m=8) -> x deq(W0)ᵀ + b
        [M, N] float32: dequantized on the fly up to gemv_max_m rows, a row block of W0 at a time into a reused
        L2-sized scratch and the GEMM on that block above (the dense weight is never written)
    native_quant4_linear_dx(dy [M, N] float32, codes, absmax, table, K) -> dy deq(W0) [M, K] float32: the
        same row blocks, dx accumulated block by block
    native_quant4_absmax(q_absmax uint8 [nb], nested_absmax float32, nested_code float32 [256],
                         nested_offset float32 [1], nested_blocksize) -> absmax float32 [nb]: the nested
        absmax dequantized (bit-exact with lora_kernels.reference.dequantize_absmax)
        (quant4 ops: CPU only, the CUDA registrations raise; lora_kernels/ops/qlora.py runs them)
    native_dora_norm(V [out, r], B [out, r], AAt [r, r], w2 [out], extra [out]?, scaling, cancel) -> n [out]:
        the tail of DoRA's row norm (lora_kernels/ops/dora.py, dora_weight_norm) given V = W0 Aᵀ and AAt = A Aᵀ,
        n2 = w2 + extra + rowsum(B ⊙ (2s V + s² B AAt)), n = √max(n2, 0), and −1 where n2 < cancel · w2 (the
        caller recomputes those rows directly); one dtype, float32 or float64. The CPU kernel is one pass over
        the rows; the CUDA one is ATen ops (dora_weight_norm does not call it on CUDA)

The CPU dropout ops generate the mask 8 Philox counters at a time with AVX2 when the CPU has it, chosen at run
time (`lora_kernels._C.CPU_DROPOUT_ISA` says "avx2" or "scalar"; LORA_KERNELS_CPU_ISA=scalar forces the portable
loop, which gives the same bits).

Nothing is registered when the extension is not built (`lora_kernels.backends.NATIVE is None`).
"""
from __future__ import annotations

import torch

from lora_kernels.backends import NATIVE

# Ops this module expects the extension to define (the CUDA build check verifies each has a CUDA kernel).
NATIVE_OPS = ("native_lora_linear_fwd", "native_lora_linear_bwd", "native_dropout", "native_dropout_add_",
              "native_dropout_mask", "native_lora_shrink", "native_lora_expand", "native_multi_lora_linear",
              "native_multi_lora_linear_fwd", "native_multi_lora_linear_bwd", "native_quant4_dequantize",
              "native_quant4_linear", "native_quant4_linear_dx", "native_quant4_absmax",
              "native_dora_norm")


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
    def _(x, dropout_p, seed, dtype=None):
        return x.new_empty(x.shape, dtype=dtype or x.dtype)

    @torch.library.register_fake(lib + "native_dropout_add_")
    def _(out, t, dropout_p, seed):
        torch._check(out.shape == t.shape, lambda: f"dropout_add_: t must have out's shape {tuple(out.shape)}, "
                                                   f"got {tuple(t.shape)}")
        return None

    @torch.library.register_fake(lib + "native_dropout_mask")
    def _(seed, M, K, dropout_p, device=None):
        return torch.empty(M, K, dtype=torch.bool, device=device or "cpu")

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
          tile_slot, tile_start, tile_end, ranks, col_scale=None):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake(lib + "native_multi_lora_linear_fwd")
    def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
          tile_slot, tile_start, tile_end, ranks, dropout, seed):
        return (x.new_empty(x.shape[0], weight.shape[0]),
                x.new_empty(x.shape[0], len(A_stacks) * A_stacks[0].shape[1], dtype=_lora_dtype(x, A_stacks[0])))

    @torch.library.register_fake(lib + "native_multi_lora_linear_bwd")
    def _(dy, x, weight, A_stacks, B_stacks, S, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
          tile_slot, tile_start, tile_end, ranks, dropout, seed, need_dx, need_dA, need_dB):
        return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
                [a.new_empty(a.shape) for a in A_stacks] if need_dA else [],
                [b.new_empty(b.shape) for b in B_stacks] if need_dB else [])

    @torch.library.register_fake(lib + "native_quant4_dequantize")
    def _(codes, absmax, table, N, K):
        return codes.new_empty(N, K, dtype=torch.float32)

    @torch.library.register_fake(lib + "native_quant4_linear")
    def _(x, codes, absmax, table, bias, N, gemv_max_m=8):
        return x.new_empty(x.shape[0], N, dtype=torch.float32)

    @torch.library.register_fake(lib + "native_quant4_linear_dx")
    def _(dy, codes, absmax, table, K):
        return dy.new_empty(dy.shape[0], K, dtype=torch.float32)

    @torch.library.register_fake(lib + "native_quant4_absmax")
    def _(q_absmax, nested_absmax, nested_code, nested_offset, nested_blocksize):
        return nested_absmax.new_empty(q_absmax.numel(), dtype=torch.float32)

    @torch.library.register_fake(lib + "native_dora_norm")
    def _(V, B, AAt, w2, extra, scaling, cancel):
        torch._check(V.dim() == 2 and B.shape == V.shape and w2.shape == V.shape[:1],
                     lambda: f"native_dora_norm: V, B [out, r] and w2 [out] expected, got {tuple(V.shape)}, "
                             f"{tuple(B.shape)}, {tuple(w2.shape)}")
        return V.new_empty(V.shape[0])

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

    # The multi-adapter training forward, differentiable on its own too (the Python op multi_lora_linear_fwd has
    # its own formula): the native backward on the saved x, S and seed.
    def multi_setup_context(ctx, inputs, output):
        x, weight, _, A_stacks, B_stacks, scalings, *rest = inputs
        bt, (ranks, dropout, seed) = rest[:7], rest[7:]
        ctx.save_for_backward(x, weight, output[1], scalings, ranks, dropout, seed, *bt, *A_stacks, *B_stacks)
        ctx.num_slices = len(A_stacks)

    def multi_backward(ctx, dy, _dS):
        x, weight, S, scalings, ranks, dropout, seed, *rest = ctx.saved_tensors
        bt, stacks = rest[:7], rest[7:]
        A_stacks, B_stacks = stacks[:ctx.num_slices], stacks[ctx.num_slices:]
        needs = ctx.needs_input_grad  # lists for the stack arguments
        need_dx, need_dA, need_dB = needs[0], any(needs[3]), any(needs[4])
        dx, dA, dB = torch.ops.lora_kernels.native_multi_lora_linear_bwd(
            dy, x, weight, A_stacks, B_stacks, S, scalings, *bt, ranks, dropout, seed, need_dx, need_dA, need_dB)
        # A list of gradients (None where not needed) for each stack argument.
        pick = lambda grads, need: [g if n else None for g, n in zip(grads or [None] * len(need), need)]  # noqa: E731
        return (dx if need_dx else None, None, None, pick(dA, needs[3]), pick(dB, needs[4]), *(None,) * 11)

    torch.library.register_autograd(lib + "native_multi_lora_linear_fwd", multi_backward,
                                    setup_context=multi_setup_context)

    # d x̂ / dx = m / (1 - p): the gradient goes through the same mask.
    def drop_setup_context(ctx, inputs, output):
        x, ctx.dropout_p, seed, _ = inputs
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(seed)

    def drop_backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return torch.ops.lora_kernels.native_dropout(grad, ctx.dropout_p, seed, ctx.x_dtype), None, None, None

    torch.library.register_autograd(lib + "native_dropout", drop_backward, setup_context=drop_setup_context)


if NATIVE is not None:
    _register()
