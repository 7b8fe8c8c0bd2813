"""Multi-adapter LoRA ops: one batch, one adapter slot per token (Punica SGMV/BGMV, S-LoRA), for serving
and for training many adapters at once.

Semantics (PEFT layout per slot; L slots, padded rank R, NS output slices)::

    A_stacks[i]: [L, R, in]      B_stacks[i]: [L, out_i, R]      scalings: [L] float32
    ranks: [L] int32 or None (None: R for every slot). Slot l uses rows/columns [0, r_l) of its A/B, with
        r_l = clamp(ranks[l], 0, R); what lies beyond r_l is never read into the result (padding need not be
        zero). r_l = 0 means "slot l has no adapter in this layer": its tokens get the base output only.
    token_adapter: [T] int, the slot of each token, -1 = no adapter.

    S[t, i·R + j] = x[t] · A_i[l, j]                        for j < r_l, l = token_adapter[t] >= 0; else 0
    y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j]      (c_i = y_offset + Σ_{k<i} out_k)
    multi_lora_linear: y = x W0ᵀ + b + the expand above, with W0 = [Σ out_i, in] and y_offset = 0.
    With a per-slot column scale col_scale [L + 1, Σ out_i] (DoRA's g; row L for the -1 tokens; inference):
        y[t] = col_scale[l_t] ⊙ (x[t] W0ᵀ + the expand's term of t) + b       (l_t = L for a -1 token)
    applied where each backend writes y (no per-token gather, no extra pass over y in the Triton kernels).

`-1` tokens and slots without tokens do no LoRA work in the "triton" backend.

Training (`multi_lora_linear` only; lora_shrink / lora_expand have no gradients). Per-slot LoRA dropout
p_l in [0, 1) (dropout: [L]): x̂[t] = x[t] ⊙ m[t] / (1 - p_l) with m the keep-mask of `lora_kernels.dropout`
for x viewed as [T, in] (element (t, k), the counter lora_linear uses; threshold from p_l of t's slot),
regenerated from one seed per call, never stored; the forward above uses S = x̂ Aᵀ. With G = dy [T, Σ out_i],
for a token t of slot l = token_adapter[t] >= 0, s_l = scalings[l], j < r_l::

    dS[t, i·R + j] = s_l · Σ_n G[t, c_i + n] B_i[l, n, j]                          dS: [T, NS·R]
    dB_i[l, n, j]  = s_l · Σ_{t of l} G[t, c_i + n] S[t, i·R + j]                  dB_i: [L, out_i, R]
    dA_i[l, j, k]  = Σ_{t of l} dS[t, i·R + j] x̂[t, k]                             dA_i: [L, R, in]
    dx[t]          = G[t] W0 + (Σ_i Σ_{j<r_l} dS[t, i·R + j] A_i[l, j]) ⊙ m[t] / (1 - p_l)    dx: [T, in]

Rows past r_l of A_i and columns past r_l of B_i get zero gradient, and so do slots with no tokens; a -1
token contributes nothing to dA / dB and gets dx[t] = G[t] W0. W0 and b are frozen (no gradient). The
backward saves x, S [T, NS·R], the seed and the weights -- never x̂ or the mask.

Every backend implements (IMPLS) the forward and the backward with the registered ops' arguments (the seven
LoRABatch tensors as one tuple `bt`; dropout: [L] float64 or None, active iff seed is given)::

    fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed) -> (y, S)
    bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA, need_dB)
        -> (dx, [dA_i], [dB_i]) each in its tensor's dtype, None when not needed.

The eager path checks the arguments once and calls the implementations directly: bare without autograd
(the inference path), under `plumbing.LoRAFunction` when a gradient is needed. torch.compile and the
profiler go through the registered ops instead (ops/plumbing.py). This file declares the family; its pieces
live beside it: `LoRABatch` and `StepDropout` (per-step metadata) in ops/batch.py, the argument checks in
ops/multi_lora_checks.py, the "torch" backend in ops/multi_lora_torch.py.

Registered ops (schemas exactly as `torch.library.custom_op` infers them; the C++ extension registers
`lora_kernels::native_<op>` with the same arguments minus `backend`, and `backend="native"` calls it).
The seven LoRABatch tensors are passed in this order everywhere (see `LoRABatch` for their meaning)::

    lora_kernels::lora_shrink(Tensor x, Tensor[] A_stacks, Tensor token_adapter, Tensor sorted_token_ids,
        Tensor seg_starts, Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end,
        Tensor? ranks, str backend) -> Tensor
    lora_kernels::lora_expand(Tensor S, Tensor[] B_stacks, Tensor token_adapter, Tensor sorted_token_ids,
        Tensor seg_starts, Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end,
        Tensor(a9!) y, Tensor scalings, Tensor? ranks, SymInt y_offset, str backend) -> ()
    lora_kernels::multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] A_stacks,
        Tensor[] B_stacks, Tensor scalings, Tensor token_adapter, Tensor sorted_token_ids, Tensor seg_starts,
        Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end, Tensor? ranks,
        str backend, Tensor? col_scale=None) -> Tensor                           (inference: no autograd)
    lora_kernels::multi_lora_linear_fwd(<multi_lora_linear's arguments up to ranks>, Tensor? dropout,
        Tensor? seed, str backend) -> (Tensor y, Tensor S)                        (autograd: the bwd op)
    lora_kernels::multi_lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor[] A_stacks,
        Tensor[] B_stacks, Tensor S, Tensor scalings, <the seven LoRABatch tensors>, Tensor? ranks,
        Tensor? dropout, Tensor? seed, bool need_dx, bool need_dA, bool need_dB, str backend)
        -> (Tensor dx, Tensor[] dA_stacks, Tensor[] dB_stacks)   (not needed: an empty tensor / list)

    x: [T, in] (2-D, any strides); weight: [Σ out_i, in]; bias: [Σ out_i] or None; S: [T, NS·R];
    y: [T, >= y_offset + Σ out_i] (any strides, updated in place); lora_shrink returns S [T, NS·R] float32
    (float64 when x or A is float64, "torch" backend only) and zero where the formula above says 0;
    multi_lora_linear returns y [T, Σ out_i] in x's dtype. All LoRABatch tensors and `ranks` are int32,
    `scalings` float32. "triton"/"native": x in fp16/bf16/fp32 and the A/B stacks in x's dtype.
    backend "auto" = measured dispatch at run time ("fwd" and "bwd" keys of lora_kernels.dispatch).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_kernels import dispatch
from lora_kernels.backends import check_backend, default_backend, resolve_backend
from lora_kernels.dropout import new_seed
from lora_kernels.kernels.tiling import num_tiles, tile_block_m  # noqa: F401 (re-exported)
from lora_kernels.ops import plumbing
from lora_kernels.ops.batch import LoRABatch, StepDropout, _ids_tensor, dropout_tensor  # noqa: F401 (re-exported)
from lora_kernels.ops.multi_lora_checks import (_check_batch_obj, _ranks_arg, _scalings_arg, as_list,
                                                check_expand_args, check_linear_args, check_shrink_args)
from lora_kernels.ops.multi_lora_torch import (_compute_dtype, apply_col_scale, dropped_input,  # noqa: F401
                                               torch_bwd, torch_expand, torch_fwd, torch_linear, torch_shrink)
from lora_kernels.ops.plumbing import KERNEL_DTYPES, below_autograd, seed_tensor
from lora_kernels.ops.plumbing import shape_str as _shape
from lora_kernels.quant import QuantWeight, check_quant_weight


# ----------------------------------------------------------------------------------------------------
# "native", "triton", "composite": thin adapters to the same conventions
# ----------------------------------------------------------------------------------------------------

def _native_shrink(x, A_stacks, bt, ranks):
    with below_autograd():
        return torch.ops.lora_kernels.native_lora_shrink.default(x, A_stacks, *bt, ranks)


def _native_expand(S, B_stacks, bt, y, scalings, ranks, y_offset):
    with below_autograd():
        torch.ops.lora_kernels.native_lora_expand.default(S, B_stacks, *bt, y, scalings, ranks, y_offset)


def _native_linear(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, col_scale=None):
    with below_autograd():
        return torch.ops.lora_kernels.native_multi_lora_linear.default(x, weight, bias, A_stacks, B_stacks, scalings,
                                                                       *bt, ranks, col_scale)


def _kernels():
    return plumbing.kernels("multi_lora")


# Every backend's implementation of the three inference ops, with the registered ops' arguments (the seven
# LoRABatch tensors as one tuple `bt`; LINEAR's take an optional col_scale last). "composite" differs from
# "triton" only for the linear (cuBLAS base GEMM).
SHRINK = {"torch": torch_shrink, "native": _native_shrink,
          "triton": lambda *a: _kernels().lora_shrink_triton(*a),
          "composite": lambda *a: _kernels().lora_shrink_triton(*a)}
EXPAND = {"torch": torch_expand, "native": _native_expand,
          "triton": lambda *a: _kernels().lora_expand_triton(*a),
          "composite": lambda *a: _kernels().lora_expand_triton(*a)}
LINEAR = {"torch": torch_linear, "native": _native_linear,
          "triton": lambda *a: _kernels().multi_lora_linear_triton(*a),
          "composite": lambda *a: _kernels().multi_lora_linear_composite(*a)}


def _native_cuda_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    """The "native" training forward on CUDA (no training kernels there): y = x W0ᵀ + b by torch, then the native
    grouped shrink of x̂ (built here: the shrink takes no mask) into S and its expand into y."""
    x_hat = x if seed is None else dropped_input(x, bt, dropout, seed)
    S = _native_shrink(x_hat, A_stacks, bt, ranks)
    y = torch.nn.functional.linear(x, weight, bias)
    if y.shape[0] > 0:
        _native_expand(S, B_stacks, bt, y, scalings, ranks, 0)
    return y, S


def _native_train_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    """"native" training forward: on CPU the extension's (x̂ masked as its rows are gathered, never stored); on
    CUDA the native shrink / expand of _native_cuda_fwd."""
    if not x.is_cpu:
        return _native_cuda_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed)
    with below_autograd():
        return torch.ops.lora_kernels.native_multi_lora_linear_fwd.default(
            x, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks, dropout_tensor(dropout), seed_tensor(seed))


def _native_train_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA,
                      need_dB):
    """"native" backward: the extension's per-segment GEMMs on CPU; the torch backward elsewhere (the native op
    has no CUDA kernel)."""
    if not x.is_cpu:
        return torch_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA,
                         need_dB)
    with below_autograd():
        dx, dA, dB = torch.ops.lora_kernels.native_multi_lora_linear_bwd.default(
            dy, x, weight, A_stacks, B_stacks, S, scalings, *bt, ranks, dropout_tensor(dropout), seed_tensor(seed),
            need_dx, need_dA, need_dB)
    return dx if need_dx else None, dA if need_dA else None, dB if need_dB else None


# fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed) -> (y, S) and
# bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA, need_dB)
# -> (dx, dA_stacks, dB_stacks) of every backend. "triton" / "composite": the Triton kernels (dropout mask
# regenerated in them; the forward's fused GEMM / cuBLAS + expand, one shared backward). "native": the C++
# training ops on CPU; on CUDA its shrink / expand forward and the torch backward. dropout: [L] float64 or a
# StepDropout (host rates, eager path); seed: a [1] int64 CPU tensor or a host int.
IMPLS: dict[str, tuple] = {
    "torch": (torch_fwd, torch_bwd),
    "native": (_native_train_fwd, _native_train_bwd),
    "triton": (lambda *a: _kernels().multi_lora_linear_fwd_triton(*a),
               lambda *a: _kernels().multi_lora_linear_bwd_triton(*a)),
    "composite": (lambda *a: _kernels().multi_lora_linear_fwd_composite(*a),
                  lambda *a: _kernels().multi_lora_linear_bwd_triton(*a)),
}


# ----------------------------------------------------------------------------------------------------
# The family's declaration for measured dispatch (lora_kernels/dispatch.py). One choice for the inference
# and the training forward ("linear" and "fwd": they run the same shrink and expand kernels), timed on the
# inference linear; the backward among the backends with a backward of their own (on CUDA "native" runs the
# torch backward under another name: not a candidate there), verified against "torch".
# ----------------------------------------------------------------------------------------------------

def _kernel_dtypes(phase: str, args: tuple) -> bool:
    """Whether the kernel backends (all but "torch") take these dtypes."""
    x, A_stacks, scalings = (args[0], args[3], args[5]) if phase != "bwd" else (args[1], args[3], args[6])
    return x.dtype in KERNEL_DTYPES and A_stacks[0].dtype == x.dtype and scalings.dtype == torch.float32


def _key_fields(phase: str, args: tuple) -> dict:
    x, weight, A_stacks, B_stacks = (args[0], args[1], args[3], args[4]) if phase != "bwd" else args[1:5]
    fields = dict(x=str(x.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=weight.shape[1],
                  n="+".join(str(b.shape[1]) for b in B_stacks), r=A_stacks[0].shape[1], slots=A_stacks[0].shape[0])
    if phase == "bwd":
        fields.update(drop=int(args[10] is not None), need="".join("1" if n else "0" for n in args[-3:]))
    else:
        fields["bias"] = int(args[2] is not None)
        if phase == "linear" and len(args) > 8 and args[8] is not None:  # col_scale (absent: the keys as before)
            fields["cs"] = 1
    return fields


def _bwd_outputs(out) -> tuple:
    dx, dA, dB = out
    return (dx, *(dA or ()), *(dB or ()))


FAMILY = dispatch.OpFamily(
    name="multi_lora_linear",
    impls={"fwd": plumbing.PhaseTable(IMPLS, 0), "bwd": plumbing.PhaseTable(IMPLS, 1), "linear": LINEAR},
    x_arg={"fwd": 0, "linear": 0, "bwd": 1},
    kernel_dtypes=_kernel_dtypes,
    key_fields=_key_fields,
    outputs={"fwd": lambda y: (y,), "bwd": _bwd_outputs},
    measured_as={"fwd": ("fwd", LINEAR, 8), "linear": ("fwd", LINEAR, 8)},
    reference={"bwd": "torch"},
    not_on_cuda={"bwd": ("native",)},
    stacked=True,
)


def _run_fwd(backend, x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    return plumbing.run(FAMILY, "fwd", backend, (x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout,
                                                 seed))


def _run_bwd(backend, dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed,
             need_dx, need_dA, need_dB):
    return plumbing.run(FAMILY, "bwd", backend, (dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout,
                                                 seed, need_dx, need_dA, need_dB))


def _run_linear(backend, x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, col_scale=None):
    args = (x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks)
    return plumbing.run(FAMILY, "linear", backend, args if col_scale is None else (*args, col_scale))


# ----------------------------------------------------------------------------------------------------
# Registered ops: what torch.compile, opcheck and the profiler see
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=())
def lora_shrink_op(x: Tensor, A_stacks: list[Tensor], token_adapter: Tensor, sorted_token_ids: Tensor,
                   seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_end: Tensor,
                   ranks: Optional[Tensor], backend: str) -> Tensor:
    """S [T, NS·R]: S[t, i·R + j] = x[t] · A_i[l, j] for j < r_l, l = token_adapter[t] >= 0; else 0."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    return SHRINK[backend](x, list(A_stacks), bt, ranks)


@lora_shrink_op.register_fake
def _(x, A_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
      ranks, backend):
    return x.new_empty(x.shape[0], len(A_stacks) * A_stacks[0].shape[1], dtype=plumbing.s_dtype(x, A_stacks[0]))


@torch.library.custom_op("lora_kernels::lora_expand", mutates_args=("y",))
def lora_expand_op(S: Tensor, B_stacks: list[Tensor], token_adapter: Tensor, sorted_token_ids: Tensor,
                   seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_end: Tensor,
                   y: Tensor, scalings: Tensor, ranks: Optional[Tensor], y_offset: int, backend: str) -> None:
    """y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j], in place."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    EXPAND[backend](S, list(B_stacks), bt, y, scalings, ranks, y_offset)


@lora_expand_op.register_fake
def _(S, B_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
      y, scalings, ranks, y_offset, backend):
    return None


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stacks: list[Tensor],
                         B_stacks: list[Tensor], scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                         seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                         tile_end: Tensor, ranks: Optional[Tensor], backend: str,
                         col_scale: Optional[Tensor] = None) -> Tensor:
    """y [T, out] = x W0ᵀ + b + per-token LoRA (see the module docstring), in x's dtype; with col_scale
    [L + 1, out], y[t] = col_scale[l_t] ⊙ (x[t] W0ᵀ + LoRA[t]) + b. Inference (no autograd formula; training
    goes through multi_lora_linear_fwd). backend "auto" = measured dispatch."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    return _run_linear(backend, x, weight, bias, list(A_stacks), list(B_stacks), scalings, bt, ranks, col_scale)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, backend, col_scale=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("lora_kernels::multi_lora_linear_fwd", mutates_args=())
def multi_lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stacks: list[Tensor],
                          B_stacks: list[Tensor], scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                          seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                          tile_end: Tensor, ranks: Optional[Tensor], dropout: Optional[Tensor], seed: Optional[Tensor],
                          backend: str) -> tuple[Tensor, Tensor]:
    """(y [T, out] in x's dtype, S = x̂ Aᵀ [T, NS·R] float32, float64 when x or A is). Dropout is active iff
    `seed` is given. backend "auto" = measured dispatch at run time."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    return _run_fwd(backend, x, weight, bias, list(A_stacks), list(B_stacks), scalings, bt, ranks, dropout, seed)


@multi_lora_linear_fwd.register_fake
def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, dropout, seed, backend):
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], len(A_stacks) * A_stacks[0].shape[1], dtype=plumbing.s_dtype(x, A_stacks[0])))


@torch.library.custom_op("lora_kernels::multi_lora_linear_bwd", mutates_args=())
def multi_lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, A_stacks: list[Tensor], B_stacks: list[Tensor],
                          S: Tensor, scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                          seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                          tile_end: Tensor, ranks: Optional[Tensor], dropout: Optional[Tensor], seed: Optional[Tensor],
                          need_dx: bool, need_dA: bool, need_dB: bool, backend: str
                          ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(dx [T, in], [dA_i], [dB_i]); a gradient not needed is an empty tensor (dx) or an empty list."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    dx, dA, dB = _run_bwd(backend, dy, x, weight, list(A_stacks), list(B_stacks), S, scalings, bt, ranks, dropout,
                          seed, need_dx, need_dA, need_dB)
    return dx if dx is not None else x.new_empty(0), dA or [], dB or []


@multi_lora_linear_bwd.register_fake
def _(dy, x, weight, A_stacks, B_stacks, S, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, dropout, seed, need_dx, need_dA, need_dB, backend):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            [a.new_empty(a.shape) for a in A_stacks] if need_dA else [],
            [b.new_empty(b.shape) for b in B_stacks] if need_dB else [])


plumbing.register_lora_autograd(multi_lora_linear_fwd, multi_lora_linear_bwd)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------

def dropout_args(dropout_p, num_slots: int, device, training: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dropout, seed) for one multi_lora_linear call: the per-slot probabilities as a float64 [L] tensor on
    `device` and a fresh seed (`lk.dropout.new_seed`, from torch's CPU generator), or (None, None) when no
    dropout applies (not training, or p = 0 for every slot). Checks dropout_p whatever `training` says.

    dropout_p: None, one float in [0, 1) for every slot, a float tensor [L] of per-slot probabilities in
    [0, 1) (its values are read on the host: free on CPU, one sync for a CUDA tensor; not under torch.compile),
    or the step's `StepDropout` (host rates and device vectors made once per step: nothing is read here, and
    the seed is the step's next one, a host int).
    """
    if dropout_p is None:
        return None, None
    if isinstance(dropout_p, StepDropout):
        if len(dropout_p.p) != num_slots:
            raise ValueError(f"dropout_p must cover L={num_slots} slots, got a StepDropout over {len(dropout_p.p)}")
        return (dropout_p, dropout_p.next_seed()) if training else (None, None)
    if isinstance(dropout_p, Tensor):
        if dropout_p.shape != (num_slots,) or not dropout_p.is_floating_point():
            raise ValueError(f"dropout_p must be None, a float or a float tensor of shape [L={num_slots}], got "
                             f"{_shape(dropout_p)} {dropout_p.dtype}")
        if not torch.compiler.is_compiling():
            ps = dropout_p.tolist()
            bad = [p for p in ps if not 0.0 <= p < 1.0]
            if bad:
                raise ValueError(f"dropout_p must lie in [0, 1) for every slot, got {bad[:8]}")
            if not any(ps):
                return None, None
        if not training:
            return None, None
        return dropout_p.to(device=device, dtype=torch.float64), new_seed()
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be None, a float in [0, 1) or a float tensor of shape [L={num_slots}], "
                         f"got {dropout_p!r}")
    if not training or dropout_p == 0.0:
        return None, None
    return torch.full((num_slots,), float(dropout_p), dtype=torch.float64, device=device), new_seed()


def lora_shrink(x: Tensor, A_stack, batch: LoRABatch, ranks: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Grouped LoRA shrink: ``S[t, i·R + j] = x[t] · A_i[l, j]`` for ``j < ranks[l]``, l = batch slot of t.

    Args:
        x: [T, in] activations (any strides), T = batch.num_tokens.
        A_stack: [L, R, in] slot stack, or a list of NS such stacks (one per output slice).
        batch: the step's LoRABatch (L = batch.num_slots).
        ranks: [L] int or None (R for all). Columns j >= ranks[l] of S are 0; rows of -1 tokens are 0.
        backend: None (fastest for the device), "torch", "triton" or "native".

    Returns S: [T, NS·R] float32. No gradients (an inference building block).
    """
    _check_batch_obj(batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    backend = resolve_backend(backend, x.device)
    A_stacks, ranks, bt = as_list(A_stack), _ranks_arg(ranks), batch.op_args()
    check_shrink_args(x, A_stacks, bt, ranks, backend)
    if plumbing.traced():
        return lora_shrink_op(x, A_stacks, *bt, ranks, backend)
    return SHRINK[backend](x, A_stacks, bt, ranks)


def lora_expand(S: Tensor, B_stack, batch: LoRABatch, y: Tensor, scalings, ranks: Optional[Tensor] = None,
                y_offset: int = 0, backend: Optional[str] = None) -> Tensor:
    """Grouped LoRA expand, added into ``y`` in place; returns ``y``.

    ``y[t, c_i + n] += scalings[l] · Σ_{j<ranks[l]} S[t, i·R + j] · B_i[l, n, j]`` for tokens with slot
    l >= 0, where slice i's columns start at ``c_i = y_offset + Σ_{k<i} out_k``.

    Args:
        S: [T, NS·R] float32 (from lora_shrink).
        B_stack: [L, out, R] slot stack, or a list of NS stacks [L, out_i, R] (e.g. q/k/v of different widths).
        batch: the step's LoRABatch.
        y: [T, >= y_offset + Σ out_i] (any strides), updated in place; -1 tokens are left untouched.
        scalings: [L] float tensor (or one float for all slots); ranks: [L] int or None.
    """
    _check_batch_obj(batch)
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    backend = resolve_backend(backend, y.device)
    B_stacks, ranks, bt = as_list(B_stack), _ranks_arg(ranks), batch.op_args()
    scalings = _scalings_arg(scalings, batch.num_slots, y.device)
    check_expand_args(S, B_stacks, bt, y, scalings, ranks, y_offset, backend)
    if plumbing.traced():
        lora_expand_op(S, B_stacks, *bt, y, scalings, ranks, int(y_offset), backend)
    else:
        EXPAND[backend](S, B_stacks, bt, y, scalings, ranks, int(y_offset))
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stack, B_stack, scalings,
                      batch: LoRABatch, ranks: Optional[Tensor] = None, backend: Optional[str] = None,
                      dropout_p=None, training: bool = False, col_scale: Optional[Tensor] = None) -> Tensor:
    """Fused multi-adapter LoRA linear: ``y[t] = x[t] W0ᵀ + b + s_l · (x̂[t] A_lᵀ) B_lᵀ``, l = slot of t.

    Inference ("triton"): the grouped shrink, then the base GEMM over the tokens in sorted order with the
    expand of the slots present in each tile added in its epilogue, so y is written once. With autograd, the
    forward keeps S = x̂ Aᵀ (not x̂, not the mask) for the backward (see the module docstring).

    Args:
        x: [..., in] activations; the leading dims flatten to T = batch.num_tokens tokens (row-major).
        weight: [out, in] frozen base weight W0 (x's dtype); bias: [out] or None. Neither may require grad
            while autograd is on (no gradient is computed for them: freeze them, as PEFT does).
        A_stack: [L, R, in] or a list of NS stacks; B_stack: [L, out, R] or a list of NS stacks
            [L, out_i, R] with Σ out_i = out (the fused layer's output slices, in column order).
        scalings: [L] float tensor (or a float); ranks: [L] int or None (R for every slot).
        batch: the step's LoRABatch; backend: None, "torch", "triton", "composite" or "native".
        dropout_p: LoRA dropout, applied to the LoRA path only when `training`: None, a float in [0, 1) for
            every slot, or a float tensor [L] of per-slot probabilities. The mask is regenerated from one seed
            per call (drawn from torch's CPU generator): `lk.dropout_mask(seed, (T, in), p_l)` row t.
        col_scale: None, or a per-slot column scale [L + 1, out] (DoRA's g = m / ‖W0 + s B A‖ of each slot,
            1 for plain slots; row L for the tokens with no adapter) in float32 (or the LoRA compute dtype,
            "torch" backend): ``y[t] = col_scale[l_t] ⊙ (x[t] W0ᵀ + s_l · (x[t] A_lᵀ) B_lᵀ) + b``, the bias
            added after the scale. Every backend applies it where y is written (the fused GEMM's / the
            expand's epilogue; the C++ kernel's last pass over its rows), without a per-token gather; rounded
            once into x's dtype. With autograd or dropout (or a quantized W0) it is applied after the op
            instead, differentiably (y rounded twice there).

    Returns y: [..., out] in x's dtype. Gradients flow to x and to the A/B stacks (each in its own dtype);
    not to scalings.

    `weight` may also be a quantized W0, a `lora_kernels.quant.QuantWeight` (nf4 / fp4, nested or not;
    int8_row; `quant.from_bnb(layer)` converts a bitsandbytes layer): y then uses deq(W0) in x's dtype (see
    `run_quant_linear`).
    """
    _check_batch_obj(batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_backend(backend, x.device)
    A_stacks, B_stacks, ranks, bt = as_list(A_stack), as_list(B_stack), _ranks_arg(ranks), batch.op_args()
    scalings = _scalings_arg(scalings, batch.num_slots, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x
    qweight = weight if isinstance(weight, QuantWeight) else None
    if qweight is not None:
        check_quant_weight(*qweight, name="weight")
        if qweight.device != x.device:
            raise ValueError(f"weight (a QuantWeight) must be on x's device {x.device}, got {qweight.device}")
        # The checks read only the weight's shape, dtype and device: a stride-0 stand-in of x's dtype.
        weight = x2.new_zeros(()).expand(*qweight.shape) if x2.dim() == 2 else weight
    check_linear_args(x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, backend, col_scale)
    dropout, seed = dropout_args(dropout_p, batch.num_slots, x.device, training)
    if qweight is not None:
        y = run_quant_linear(x2, qweight, bias, A_stacks, B_stacks, scalings, bt, ranks, backend, dropout, seed,
                             col_scale)
    else:
        y = run_linear(x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, backend, dropout, seed, col_scale)
    return y.view(*lead, weight.shape[0])


def run_linear(x2: Tensor, weight: Tensor, bias, A_stacks: list, B_stacks: list, scalings: Tensor, bt: tuple,
               ranks, backend: Optional[str], dropout=None, seed=None, col_scale=None) -> Tensor:
    """multi_lora_linear on checked arguments (x2 is [T, in]; dropout and seed from `dropout_args`): the
    registered ops when traced, else the implementations directly -- under plumbing.LoRAFunction when a
    gradient is needed, bare otherwise (the inference path: no autograd machinery at all). col_scale: in the
    inference op's epilogue; with a gradient or dropout, applied to the bias-free result instead."""
    grad = torch.is_grad_enabled()
    if grad:
        plumbing.check_frozen_base("multi_lora_linear", weight, bias)
        grad = (x2.requires_grad or any(t.requires_grad for t in A_stacks) or any(t.requires_grad for t in B_stacks)
                or (col_scale is not None and col_scale.requires_grad))
    if col_scale is not None and (grad or seed is not None):
        y = run_linear(x2, weight, None, A_stacks, B_stacks, scalings, bt, ranks, backend, dropout, seed)
        return apply_col_scale(y.to(col_scale.dtype), col_scale, bt[0], bias).to(x2.dtype)
    if plumbing.traced():
        if grad or seed is not None:
            return multi_lora_linear_fwd(x2, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks,
                                         dropout_tensor(dropout), seed_tensor(seed), backend or "auto")[0]
        return multi_lora_linear_op(x2, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks, backend or "auto",
                                    col_scale)
    if grad:
        return plumbing.eager_grad(FAMILY, backend, x2, weight, bias, A_stacks, B_stacks,
                                   (scalings, bt, ranks, dropout, seed))
    if seed is not None:
        return _run_fwd(backend, x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed)[0]
    return _run_linear(backend, x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, col_scale)


# ----------------------------------------------------------------------------------------------------
# Over a quantized base (QLoRA): W0 as a QuantWeight, its base product by ops/qlora.py's dequantize / fused
# base, the grouped LoRA as above
# ----------------------------------------------------------------------------------------------------

class _QuantLinearFunction(torch.autograd.Function):
    """run_linear's autograd over a quantized W0: the forward dequantizes W0 for the family's forward and drops
    the dense copy; the backward dequantizes it again only for dx (as qlora_linear's dense backends do), so no
    [out, in] copy lives from the forward to the backward.
    apply(x2, opts, *A_stacks, *B_stacks), opts = (backend, base_backend, qweight, bias, scalings, bt, ranks,
    dropout, seed)."""

    @staticmethod
    def forward(ctx, x, opts, *ab):
        from lora_kernels.ops import qlora
        backend, base, qweight, bias, scalings, bt, ranks, dropout, seed = opts
        ns = len(ab) // 2
        W = qlora.dequantize_base(qweight, x.dtype, base)
        y, S = _run_fwd(backend, x, W, bias, list(ab[:ns]), list(ab[ns:]), scalings, bt, ranks, dropout, seed)
        ctx.save_for_backward(x, S, *ab)
        ctx.opts = opts
        return y

    @staticmethod
    def backward(ctx, dy):
        from lora_kernels.ops import qlora
        x, S, *ab = ctx.saved_tensors
        backend, base, qweight, _, scalings, bt, ranks, dropout, seed = ctx.opts
        needs = ctx.needs_input_grad
        ns = len(ab) // 2
        need_A, need_B = needs[2:2 + ns], needs[2 + ns:]
        if needs[0]:
            W = qlora.dequantize_base(qweight, x.dtype, base)
        else:  # not read: an [out, in] view of one element
            W = x.new_zeros(()).expand(*qweight.shape)
        dx, dA, dB = _run_bwd(backend, dy.contiguous(), x, W, ab[:ns], ab[ns:], S, scalings, bt, ranks, dropout, seed,
                              needs[0], any(need_A), any(need_B))
        return (dx if needs[0] else None, None, *plumbing._grads(dA, need_A), *plumbing._grads(dB, need_B))


class _QuantBaseFunction(torch.autograd.Function):
    """y = x deq(W0)ᵀ + b with dx = G deq(W0), W0 dequantized again in the backward (not kept from the
    forward). apply(x2, qweight, bias, base_backend)."""

    @staticmethod
    def forward(ctx, x, qweight, bias, base):
        from lora_kernels.ops import qlora
        ctx.qweight, ctx.base = qweight, base
        return torch.nn.functional.linear(x, qlora.dequantize_base(qweight, x.dtype, base), bias)

    @staticmethod
    def backward(ctx, dy):
        from lora_kernels.ops import qlora
        return dy @ qlora.dequantize_base(ctx.qweight, dy.dtype, ctx.base), None, None, None


def quant_base_linear(x2: Tensor, qweight: QuantWeight, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """The base alone over a quantized W0: ``y = x deq(W0)ᵀ + b`` [T, out] in x's dtype (x2 [T, in]; bias in x's
    dtype or None, frozen), by run_quant_linear's base product: qlora's fused base where it has one (no
    autograd), else the bit-exact dequantize and a dense GEMM; with autograd dx = G deq(W0), W0 dequantized again
    in the backward. For a layer none of whose adapters is in the batch."""
    from lora_kernels.ops import qlora
    base = backend if backend is not None else default_backend(x2.device)
    if torch.is_grad_enabled() and x2.requires_grad:
        plumbing.check_frozen_base("multi_lora_linear", qweight.codes, bias)
        return _QuantBaseFunction.apply(x2, qweight, bias, base)
    y = qlora.fused_base_linear(x2, qweight, bias, base)
    return y if y is not None else torch.nn.functional.linear(x2, qlora.dequantize_base(qweight, x2.dtype, base), bias)


def run_quant_linear(x2: Tensor, qweight: QuantWeight, bias, A_stacks: list, B_stacks: list, scalings: Tensor,
                     bt: tuple, ranks, backend: Optional[str], dropout=None, seed=None, col_scale=None) -> Tensor:
    """run_linear with a quantized base: ``y = x deq(W0)ᵀ + b + the grouped LoRA`` (module docstring), x2
    [T, in], arguments checked (multi_lora_linear with a QuantWeight). W0 and b get no gradient.

    The base product is ops/qlora.py's for the qlora backend of the same name (backend None: the device's
    default one, "native" on CPU with the extension): without autograd or dropout and where that backend
    decodes W0 on the fly (`qlora.fused_base_linear`: "native", float32: the fused GEMV up to qlora.gemv_max_m()
    rows, W0 dequantized a block of rows at a time above), y is that product plus the grouped shrink / expand
    added in place; otherwise W0 is dequantized (`qlora.dequantize_base`, bit-exact) and the dense
    multi_lora_linear runs on it -- exactly dequantize-then-dense. With autograd the dense copy is not kept for
    the backward (`_QuantLinearFunction`). col_scale [L + 1, out] (DoRA's g per slot): y[t] = g[l_t] ⊙ (x[t]
    deq(W0)ᵀ + LoRA[t]) + b, applied after the sum."""
    if col_scale is not None:  # applied after the base + LoRA sum (differentiable, y rounded twice in 16 bits)
        y = run_quant_linear(x2, qweight, None, A_stacks, B_stacks, scalings, bt, ranks, backend, dropout, seed)
        return apply_col_scale(y.to(col_scale.dtype), col_scale, bt[0], bias).to(x2.dtype)
    from lora_kernels.ops import qlora
    base = backend if backend is not None else default_backend(x2.device)
    grad = torch.is_grad_enabled()
    if grad:
        plumbing.check_frozen_base("multi_lora_linear", qweight.codes, bias)
        grad = x2.requires_grad or any(t.requires_grad for t in A_stacks) or any(t.requires_grad for t in B_stacks)
    if plumbing.traced():  # the registered ops on the dequantized weight
        return run_linear(x2, qlora.dequantize_base(qweight, x2.dtype, base), bias, A_stacks, B_stacks, scalings,
                          bt, ranks, backend, dropout, seed)
    if grad:
        return _QuantLinearFunction.apply(x2, (backend, base, qweight, bias, scalings, bt, ranks, dropout, seed),
                                          *A_stacks, *B_stacks)
    if seed is None and A_stacks[0].dtype == x2.dtype and scalings.dtype == torch.float32:
        y = qlora.fused_base_linear(x2, qweight, bias, base)
        if y is not None:
            if y.shape[0]:
                S = SHRINK[base](x2, A_stacks, bt, ranks)
                EXPAND[base](S, B_stacks, bt, y, scalings, ranks, 0)
            return y
    W = qlora.dequantize_base(qweight, x2.dtype, base)
    return run_linear(x2, W, bias, A_stacks, B_stacks, scalings, bt, ranks, backend, dropout, seed)
