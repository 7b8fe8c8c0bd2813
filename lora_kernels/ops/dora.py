"""DoRA (weight-decomposed LoRA) linear: its implementations, registered ops, autograd and public function.

PEFT's semantics exactly (``LoraConfig(use_dora=True)``; `lora_kernels.reference` is the spec):

    n = ‖W0 + s · (B A + c 1ᵀ)‖ per row, detached      g = m / n                      [out]
    y = x W0ᵀ + b + (g − 1) ⊙ (x̂ W0ᵀ) + g ⊙ s · (x̂ Aᵀ Bᵀ + c)
      = (x − x̂) W0ᵀ + b + g ⊙ P,    P = x̂ W0ᵀ + s · (x̂ Aᵀ Bᵀ + c)                    [M, out]
    x: [..., in], W0: [out, in], A: [r, in], B: [out, r], m: [out], c: lora_B's bias [out] | None

Without dropout x̂ = x and the first term vanishes: y = g ⊙ P + b, where P is our fused LoRA forward without
its bias, so every backend here is that backend's `lora_linear` forward plus a per-column scale. With dropout
PEFT runs the base GEMM on x̂ as well; so do we (one more GEMM, on x − x̂), regenerating x̂ from the seed.

The backward, with G = dy and H = (1 − g) ⊙ G, is `lora_linear`'s backward on g ⊙ G plus
    dx += H W0 − dropout(H W0)      (only with dropout: PEFT's base on x̂)
    dm  = Σ_t G ⊙ P / n,   dc = s · Σ_t g ⊙ G
The forward saves S = x̂ Aᵀ and P (dm needs P; PEFT's autograd keeps two [M, out] tensors, we keep one).

The norm never forms the [out, in] matrix (`dora_weight_norm`): ‖W0_j‖² + 2s · B_j · (W0 Aᵀ)_j +
s² · B_j (A Aᵀ) B_jᵀ (+ the lora_bias terms), with a direct fallback for rows that cancel. Its W0 Aᵀ is DoRA's
one unavoidable extra product per training step; in eval the caller caches n (see `peft_patch`).

Implementation convention (plumbing.lora_function, with DoRA's magnitude and lora_bias as extra inputs):
    fwd(x [M, in], weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias)
        -> (y [M, out] in x's dtype, (S [M, r] float32, P [M, out] in x's dtype))
    bwd(dy, x, weight, lora_A, lora_B, (S, P), weight_norm, scaling, dropout_p, seed, magnitude, lora_bias,
        need_dx, need_dA, need_dB, need_dm, need_dc) -> (dx, dA, dB, dm, dc), None where not needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_kernels import dispatch, quant
from lora_kernels.dropout import new_seed
from lora_kernels.ops import lora_linear as _lora
from lora_kernels.ops import plumbing
from lora_kernels.ops.plumbing import lora_dtype
from lora_kernels.ops.plumbing import shape_str as _shape
from lora_kernels.quant import QuantWeight

# A row whose expanded norm² falls below CANCEL_EPS · (‖W0_j‖² + ‖L_j‖²) is recomputed directly (the test is
# 5 · CANCEL_EPS · ‖W0_j‖², a superset: see dora_weight_norm). The expanded form's absolute error is a few ulps of
# that scale times √in, so in float32 the rows kept have a relative error in n of at most ~1e-4 even at
# in = 16k, and typically ~1e-7 (B A ≪ W0: no cancellation).
CANCEL_EPS = 1e-2


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     lora_bias: Optional[Tensor] = None, weight_sq: Optional[Tensor] = None) -> Tensor:
    """n = ‖W0 + s · (B A + c 1ᵀ)‖ per row [out], in promote(W0, A, float32), without forming [out, in]:

        n_j² = ‖W0_j‖² + 2s · (B_j · V_j + c_j Σ W0_j) + s² · (B_j (A Aᵀ) B_jᵀ + 2 c_j B_j · A 1 + c_j² · in)

    with V = W0 Aᵀ [out, r]. Rows where n_j² < 5 · CANCEL_EPS · ‖W0_j‖² are computed directly: every row with
    n_j² < CANCEL_EPS · (‖W0_j‖² + ‖L_j‖²), L = s (B A + c 1ᵀ), is among them (if ‖L_j‖² ≥ 4 ‖W0_j‖², then
    n_j² ≥ (‖L_j‖ − ‖W0_j‖)² ≥ (‖W0_j‖² + ‖L_j‖²) / 5, no cancellation; otherwise the sum is < 5 ‖W0_j‖²). `weight_sq`: ‖W0_j‖² when the caller has it cached (W0 is frozen). No gradient."""
    ct = lora_dtype(weight.dtype, lora_A.dtype)
    with torch.no_grad():
        W = weight if weight.dtype == ct else weight.to(ct)
        A = lora_A if lora_A.dtype == ct else lora_A.to(ct)
        B = lora_B if lora_B.dtype == ct else lora_B.to(ct)
        w2 = weight_sq if weight_sq is not None else torch.linalg.vecdot(W, W)
        # One row reduction: n² − ‖W0_j‖² = B_j · U_j with U = 2s V + s² B (A Aᵀ) (one addmm into V). Two
        # linalg.vecdot calls (cross, quad apart) cost ~0.07 ms more at out = 4864, r = 16 (1 thread: norm 1.59
        # vs 1.66 ms, W0 Aᵀ alone 1.39 ms).
        V = torch.mm(W, A.t())                                    # W0 Aᵀ: one read of W0
        U = torch.addmm(V, B, torch.mm(A, A.t()), beta=2.0 * scaling, alpha=scaling * scaling)
        n2 = torch.linalg.vecdot(U, B).add_(w2)
        if lora_bias is not None:
            c = lora_bias.to(ct)
            n2 += c * ((2.0 * scaling) * W.sum(1) + (scaling * scaling) * (2.0 * torch.mv(B, A.sum(1))
                                                                          + c * W.shape[1]))
        rows = (n2 < (5.0 * CANCEL_EPS) * w2).nonzero().squeeze(1)
        if rows.numel():
            L = torch.mm(B[rows], A)
            if lora_bias is not None:
                L += c[rows, None]
            direct = torch.add(W[rows], L, alpha=scaling)
            n2[rows] = torch.linalg.vecdot(direct, direct)
        return n2.clamp_min_(0).sqrt_()


def weight_sq(weight: Tensor, lora_A: Tensor) -> Tensor:
    """‖W0_j‖² [out] in the dtype `dora_weight_norm` computes in (cache it: W0 is frozen)."""
    ct = lora_dtype(weight.dtype, lora_A.dtype)
    with torch.no_grad():
        W = weight if weight.dtype == ct else weight.to(ct)
        return torch.linalg.vecdot(W, W)


@torch.library.custom_op("lora_kernels::dora_weight_norm", mutates_args=())
def dora_weight_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                        lora_bias: Optional[Tensor], weight_sq: Optional[Tensor]) -> Tensor:
    """`dora_weight_norm` as a registered op: what torch.compile sees (its cancellation fallback gathers a
    data-dependent number of rows, which a graph cannot hold)."""
    return dora_weight_norm(weight, lora_A, lora_B, scaling, lora_bias, weight_sq)


@dora_weight_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling, lora_bias, weight_sq):
    return weight.new_empty(weight.shape[0], dtype=lora_dtype(weight.dtype, lora_A.dtype))


# ----------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------

def check_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend, lora_bias,
                           weight_norm) -> None:
    """`lora_linear`'s checks, plus magnitude / lora_bias / weight_norm: [out] floating tensors on x's device."""
    _lora.check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    out_f = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("lora_bias", lora_bias), ("weight_norm", weight_norm)):
        if t is None and name != "magnitude":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != out_f:
            raise ValueError(f"{name} must have shape [out={out_f}], got {_shape(t)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


# ----------------------------------------------------------------------------------------------------
# Implementations: each backend's fused LoRA (lora_linear.IMPLS, read at every call) plus DoRA's epilogue
# ----------------------------------------------------------------------------------------------------

def _scale(magnitude: Tensor, weight_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """g = m / n in `dtype`."""
    g = magnitude / weight_norm
    return g if g.dtype == dtype else g.to(dtype)


def _fwd(backend: str):
    def fwd(x, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias):
        inner = _lora.IMPLS[backend][0]
        if seed is None:
            P, S = inner(x, weight, None, lora_A, lora_B, scaling, 0.0, None)
            base = bias
        else:  # x̂ regenerated from the seed; P on x̂, and the base's remainder on x − x̂ (PEFT's two GEMMs)
            x_hat = _lora._x_hat(x, x.dtype, dropout_p, seed)
            P, S = inner(x_hat, weight, None, lora_A, lora_B, scaling, 0.0, None)
            base = torch.nn.functional.linear(x - x_hat, weight, bias)
        if lora_bias is not None:
            P.add_(lora_bias.to(P.dtype), alpha=scaling)
        g = _scale(magnitude, weight_norm, P.dtype)
        if base is None:
            y = torch.mul(P, g)
        elif base.dim() == 1:
            y = torch.addcmul(base, P, g)
        else:
            y = base.addcmul_(P, g)
        return y, (S, P)
    return fwd


def _bwd(backend: str):
    def bwd(dy, x, weight, lora_A, lora_B, saved, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias,
            need_dx, need_dA, need_dB, need_dm, need_dc):
        S, P = saved
        g = _scale(magnitude, weight_norm, dy.dtype)
        Gg = dy * g
        dx = dA = dB = dm = dc = None
        if need_dx or need_dA or need_dB:
            dx, dA, dB = _lora.IMPLS[backend][1](Gg, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                                                 need_dx, need_dA, need_dB)
            if need_dx and seed is not None:  # PEFT's base GEMM on x̂: dx += H W0 − dropout(H W0)
                T = torch.mm(dy * (1.0 - g), weight)
                dx.add_(T)
                _lora._add_dropped(dx, T.neg_(), dropout_p, seed)
        if need_dm:
            ct = lora_dtype(dy.dtype, magnitude.dtype)
            dm = torch.linalg.vecdot(dy.to(ct), P.to(ct), dim=0).div_(weight_norm).to(magnitude.dtype)
        if need_dc:
            dc = Gg.sum(0).mul_(scaling).to(lora_bias.dtype)
        return dx, dA, dB, dm, dc
    return bwd


# backend -> (fwd, bwd), as lora_linear.IMPLS. FAMILY's tables are views of this dict.
IMPLS: dict[str, tuple] = {name: (_fwd(name), _bwd(name)) for name in ("torch", "native", "triton", "composite")}


def _key_fields(phase: str, args: tuple) -> dict:
    x, weight, lora_A = (args[0], args[1], args[3]) if phase == "fwd" else (args[1], args[2], args[3])
    seed = args[8] if phase == "fwd" else args[9]
    fields = dict(x=str(x.dtype)[6:], a=str(lora_A.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=weight.shape[1],
                  n=weight.shape[0], r=lora_A.shape[0], drop=int(seed is not None))
    if phase == "bwd":
        fields["need"] = "".join("1" if n else "0" for n in args[-5:])
    return fields


FAMILY = dispatch.OpFamily(
    name="dora_linear",
    impls={"fwd": plumbing.PhaseTable(IMPLS, 0), "bwd": plumbing.PhaseTable(IMPLS, 1)},
    x_arg={"fwd": 0, "bwd": 1},
    kernel_dtypes=_lora.kernel_dtypes,  # x and lora_A sit where lora_linear's do
    key_fields=_key_fields,
    outputs={"fwd": lambda out: (out[0], *out[1]), "bwd": lambda out: tuple(t for t in out if t is not None)},
)


def _run_fwd(backend, x, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude,
             lora_bias):
    return plumbing.run(FAMILY, "fwd", backend, (x, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p,
                                                 seed, magnitude, lora_bias))


# ----------------------------------------------------------------------------------------------------
# Registered ops (x is 2-D): what torch.compile, opcheck and the profiler see
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    weight_norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    magnitude: Tensor, lora_bias: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, out], S = x̂ Aᵀ [M, r], P [M, out]): see the module docstring. Dropout is active iff `seed`."""
    y, (S, P) = _run_fwd(backend, x, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed,
                         magnitude, lora_bias)
    return y, S, P


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias, backend):
    M, out_f = x.shape[0], weight.shape[0]
    return (x.new_empty(M, out_f), x.new_empty(M, lora_A.shape[0], dtype=plumbing.s_dtype(x, lora_A)),
            x.new_empty(M, out_f))


@torch.library.custom_op("lora_kernels::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor, P: Tensor,
                    weight_norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    magnitude: Tensor, lora_bias: Optional[Tensor], need_dx: bool, need_dA: bool, need_dB: bool,
                    need_dm: bool, need_dc: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm, dc); a gradient that is not needed comes back as an empty tensor."""
    out = plumbing.run(FAMILY, "bwd", backend, (dy, x, weight, lora_A, lora_B, (S, P), weight_norm, scaling,
                                                dropout_p, seed, magnitude, lora_bias, need_dx, need_dA, need_dB,
                                                need_dm, need_dc))
    likes = (x, lora_A, lora_B, magnitude, magnitude)
    return tuple(plumbing.empty_if_none(t, like) for t, like in zip(out, likes))


@dora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, S, P, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias, need_dx,
      need_dA, need_dB, need_dm, need_dc, backend):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(lora_A) if need_dA else lora_A.new_empty(0),
            torch.empty_like(lora_B) if need_dB else lora_B.new_empty(0),
            torch.empty_like(magnitude) if need_dm else magnitude.new_empty(0),
            torch.empty_like(lora_bias) if need_dc else magnitude.new_empty(0))


plumbing.register_lora_autograd(dora_linear_fwd, dora_linear_bwd, extra=(9, 10))


# ----------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------

def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                backend: Optional[str] = None, lora_bias: Optional[Tensor] = None,
                weight_norm: Optional[Tensor] = None) -> Tensor:
    """DoRA linear, PEFT's semantics: ``y = x W0ᵀ + b + (g − 1) ⊙ (x̂ W0ᵀ) + g ⊙ s · (x̂ Aᵀ Bᵀ + c)``,
    ``g = m / ‖W0 + s · (B A + c 1ᵀ)‖_row`` (the norm detached); ``y = g ⊙ (x W0ᵀ + s · (x Aᵀ Bᵀ + c)) + b``
    without dropout.

    Args:
        x: [..., in]; weight: [out, in] frozen W0; bias: [out] or None, frozen; lora_A: [r, in];
            lora_B: [out, r]: as `lora_linear`.
        magnitude: [out] DoRA's magnitude vector m (PEFT's ``lora_magnitude_vector[name].weight``).
        scaling: lora_alpha / r (or / sqrt(r) for rsLoRA).
        dropout_p, training: LoRA dropout, active when `training` and p > 0 (mask regenerated from a seed).
        backend: None = measured dispatch, or "torch", "native", "triton", "composite": that backend's fused
            LoRA forward / backward with DoRA's per-column scale around it.
        lora_bias: [out] or None: lora_B's bias (PEFT's ``lora_bias=True``), trainable.
        weight_norm: [out] the detached row norm n when the caller has it cached (`dora_weight_norm`);
            None computes it.

    Returns y: [..., out] in x's dtype. Gradients flow to x, lora_A, lora_B, magnitude and lora_bias.

    QDoRA: `weight` may be a `lora_kernels.quant.QuantWeight` (a 4-bit / int8 base, `quant.from_bnb(layer)`); the
    base + LoRA product then runs on `qlora_linear`'s backends (`backend` names one of those) and the norm on the
    dequantized W0 (`qdora_weight_norm`; pass `weight_norm` to reuse a cached one).
    """
    if isinstance(weight, QuantWeight):
        return _qdora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend,
                             lora_bias, weight_norm)
    check_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend, lora_bias,
                           weight_norm)
    if torch.is_grad_enabled():
        plumbing.check_frozen_base("dora_linear", weight, bias)
    scaling, dropout_p = float(scaling), float(dropout_p)
    traced = plumbing.traced()
    if weight_norm is None:
        norm = dora_weight_norm_op if traced else dora_weight_norm  # detached: no gradient through n
        weight_norm = norm(weight, lora_A.detach(), lora_B.detach(), scaling,
                           None if lora_bias is None else lora_bias.detach(), None)
    seed = new_seed() if (training and dropout_p > 0.0) else None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if traced:
        y = dora_linear_fwd(x2, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude,
                            lora_bias, backend or "auto")[0]
    elif torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                      or magnitude.requires_grad
                                      or (lora_bias is not None and lora_bias.requires_grad)):
        y = plumbing.eager_grad(FAMILY, backend, x2, weight, bias, lora_A, lora_B,
                                (weight_norm, scaling, dropout_p, seed), (magnitude, lora_bias))
    else:
        y = _run_fwd(backend, x2, weight, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude,
                     lora_bias)[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------
# QDoRA: DoRA over a quantized base (issue 20 item 5). The same math with deq(W0) in W0's place: the base + LoRA
# product P and its backward run on `qlora_linear`'s backends (measured dispatch of its family), the norm on the
# dequantized W0 (‖W0_j‖² cacheable: the base is frozen). Eager autograd only for now: no registered op, so
# torch.compile graph-breaks around it.
# ----------------------------------------------------------------------------------------------------

def _deq(qweight: QuantWeight, dtype: torch.dtype) -> Tensor:
    """deq(W0) in `dtype` through qlora's "native" dequantize (C++, bit-identical; PyTorch ops where it does not
    run): 1.65 ms against 51 ms for the PyTorch-ops dequantize at 4864 x 896 nf4, 1 thread."""
    from lora_kernels.ops import qlora as _q
    return _q._deq_native(dtype, *qweight.tensors(), qweight.fmt)


def qdora_weight_sq(qweight: QuantWeight, lora_A: Tensor) -> Tensor:
    """‖deq(W0)_j‖² [out] (cache it per layer: the quantized base is frozen)."""
    return weight_sq(_deq(qweight, lora_dtype(qweight.fmt.dtype, lora_A.dtype)), lora_A)


def qdora_weight_norm(qweight: QuantWeight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                      lora_bias: Optional[Tensor] = None, weight_sq: Optional[Tensor] = None) -> Tensor:
    """`dora_weight_norm` of the dequantized base: n = ‖deq(W0) + s · (B A + c 1ᵀ)‖ per row [out], detached. The
    dequantize is part of DoRA's extra per training step (W0 Aᵀ needs W0 in float)."""
    W = _deq(qweight, lora_dtype(qweight.fmt.dtype, lora_A.dtype))
    return dora_weight_norm(W, lora_A, lora_B, scaling, lora_bias, weight_sq)


def _q_base_args(qweight: QuantWeight) -> tuple:
    return (*qweight.tensors()[1:], qweight.fmt)


class _QDoRAFunction(torch.autograd.Function):
    """y = (x − x̂) deq(W0)ᵀ + b + g ⊙ P, P = x̂ deq(W0)ᵀ + s · (x̂ Aᵀ Bᵀ + c): `_fwd` / `_bwd` with qlora's
    implementations for P and for the backward on g ⊙ G."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, magnitude, lora_bias, qweight, weight_norm, scaling, dropout_p, seed,
                backend):
        from lora_kernels.ops import qlora as _q
        codes, rest = qweight.codes, _q_base_args(qweight)
        if seed is None:
            P, S = plumbing.run(_q.FAMILY, "fwd", backend, (x, codes, None, lora_A, lora_B, scaling, 0.0, None, *rest))
            base = bias
        else:
            x_hat = _lora._x_hat(x, x.dtype, dropout_p, seed)
            P, S = plumbing.run(_q.FAMILY, "fwd", backend, (x_hat, codes, None, lora_A, lora_B, scaling, 0.0, None,
                                                            *rest))
            base = torch.nn.functional.linear(x - x_hat, _deq(qweight, x.dtype), bias)
        if lora_bias is not None:
            P.add_(lora_bias.to(P.dtype), alpha=scaling)
        g = _scale(magnitude, weight_norm, P.dtype)
        y = torch.mul(P, g) if base is None else torch.addcmul(base, P, g)
        ctx.save_for_backward(x, lora_A, lora_B, magnitude, weight_norm, S, P)
        ctx.qweight, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = qweight, scaling, dropout_p, seed, backend
        ctx.has_c = lora_bias is not None
        ctx.c_dtype = None if lora_bias is None else lora_bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from lora_kernels.ops import qlora as _q
        x, lora_A, lora_B, magnitude, weight_norm, S, P = ctx.saved_tensors
        need_dx, _, need_dA, need_dB, need_dm, need_dc = ctx.needs_input_grad[:6]
        qw, s, p, seed = ctx.qweight, ctx.scaling, ctx.dropout_p, ctx.seed
        dy = dy.contiguous()
        g = _scale(magnitude, weight_norm, dy.dtype)
        Gg = dy * g
        dx = dA = dB = dm = dc = None
        if need_dx or need_dA or need_dB:
            dx, dA, dB = plumbing.run(_q.FAMILY, "bwd", ctx.backend, (Gg, x, qw.codes, lora_A, lora_B, S, s, p, seed,
                                                                      *_q_base_args(qw), need_dx, need_dA, need_dB))
            if need_dx and seed is not None:  # PEFT's base GEMM on x̂: dx += H W0 − dropout(H W0)
                T = torch.mm(dy * (1.0 - g), _deq(qw, dy.dtype))
                dx.add_(T)
                _lora._add_dropped(dx, T.neg_(), p, seed)
        if need_dm:
            ct = lora_dtype(dy.dtype, magnitude.dtype)
            dm = torch.linalg.vecdot(dy.to(ct), P.to(ct), dim=0).div_(weight_norm).to(magnitude.dtype)
        if need_dc and ctx.has_c:
            dc = Gg.sum(0).mul_(s).to(ctx.c_dtype)
        return dx, None, dA, dB, dm, dc, None, None, None, None, None, None


def _qdora_linear(x, qweight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend, lora_bias,
                  weight_norm):
    from lora_kernels.ops import qlora as _q
    _q.check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    out_f = qweight.fmt.shape[0]
    for name, t in (("magnitude", magnitude), ("lora_bias", lora_bias), ("weight_norm", weight_norm)):
        if t is None and name != "magnitude":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1 or t.shape[0] != out_f:
            raise ValueError(f"{name} must be a floating-point tensor of shape [out={out_f}], got {_shape(t)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
        raise ValueError("bias requires grad, but dora_linear keeps the quantized base frozen: call "
                         "bias.requires_grad_(False) (as PEFT does), or run under torch.no_grad()")
    scaling, dropout_p = float(scaling), float(dropout_p)
    if weight_norm is None:
        weight_norm = qdora_weight_norm(qweight, lora_A.detach(), lora_B.detach(), scaling,
                                        None if lora_bias is None else lora_bias.detach())
    seed = new_seed() if (training and dropout_p > 0.0) else None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = _QDoRAFunction.apply(x2, bias, lora_A, lora_B, magnitude, lora_bias, qweight, weight_norm, scaling,
                             dropout_p, seed, backend)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_f)
