"""DoRA (weight-decomposed LoRA) linear: its implementations, registered ops, autograd and public function.

PEFT's semantics exactly (``LoraConfig(use_dora=True)``; `lora_kernels.reference` is the spec):

    n = ‖W0 + s · (B A + c 1ᵀ)‖ per row, detached      g = m / n                      [out]
    y = x W0ᵀ + b + (g − 1) ⊙ (x̂ W0ᵀ) + g ⊙ s · (x̂ Aᵀ Bᵀ + c)
      = (x − x̂) W0ᵀ + b + g ⊙ P,    P = x̂ W0ᵀ + s · (x̂ Aᵀ Bᵀ + c)                    [M, out]
    x: [..., in], W0: [out, in], A: [r, in], B: [out, r], m: [out], c: lora_B's bias [out] | None

Without dropout x̂ = x and the first term vanishes: y = g ⊙ P + b. The "torch", "native" and "composite" backends
are that backend's `lora_linear` forward plus a per-column scale (with dropout, PEFT's base GEMM on x̂ as well:
one more GEMM, on x − x̂, x̂ regenerated from the seed). The "triton" backend is one fused kernel
(kernels/dora.py): the norm's W0 pieces in the GEMM's main loop, x̂ W0ᵀ as a second accumulator of the same
loop, g in the epilogue; W0 is read once.

The backward, with G = dy and H = (1 − g) ⊙ G, is `lora_linear`'s backward on g ⊙ G plus
    dx += H W0 − dropout(H W0)      (only with dropout: PEFT's base on x̂; the Triton kernel folds it into its dx
                                     GEMM: one read of W0)
    dm  = Σ_t G ⊙ P / n,   dc = s · Σ_t g ⊙ G
The forward saves S = x̂ Aᵀ, P and n (dm needs P; PEFT's autograd keeps two [M, out] tensors, we keep one).

The norm never forms the [out, in] matrix (`dora_weight_norm`): ‖W0_j‖² + 2s · B_j · (W0 Aᵀ)_j +
s² · B_j (A Aᵀ) B_jᵀ (+ the lora_bias terms), with a direct fallback for rows that cancel. Its W0 Aᵀ is DoRA's
one unavoidable extra product per training step; in eval the caller caches n (see `peft_patch`).

Implementation convention (plumbing.lora_function, with DoRA's magnitude and lora_bias as extra inputs):
    fwd(x [M, in], weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude,
        lora_bias) -> (y [M, out] in x's dtype, (S [M, r] float32, P [M, out] in x's dtype, n [out]))
    bwd(dy, x, weight, lora_A, lora_B, (S, P, n), weight_norm, weight_sq, scaling, dropout_p, seed, magnitude,
        lora_bias, need_dx, need_dA, need_dB, need_dm, need_dc) -> (dx, dA, dB, dm, dc), None where not needed.
weight_norm None: the forward computes n (weight_sq: ‖W0_j‖² when the caller caches it, else None).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from lora_kernels import dispatch, quant
from lora_kernels.backends import NATIVE
from lora_kernels.derived_cache import cache_get, cache_put, contents_key
from lora_kernels.dropout import new_seed
from lora_kernels.ops import lora_linear as _lora
from lora_kernels.ops import plumbing
from lora_kernels.ops.plumbing import lora_dtype, seed_int
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
    n_j² ≥ (‖L_j‖ − ‖W0_j‖)² ≥ (‖W0_j‖² + ‖L_j‖²) / 5, no cancellation; otherwise the sum is < 5 ‖W0_j‖²).
    On CUDA (float32, r ≤ 64) those rows are recomputed by kernels/dora.py's fix-up kernel: no host read.
    `weight_sq`: ‖W0_j‖² when the caller has it cached (W0 is frozen). No gradient. Autocast is off inside: it
    would run these GEMMs in bfloat16 (n off by ~1e-2 relative) instead of the compute dtype."""
    if plumbing.any_autocast() and torch.is_autocast_enabled(weight.device.type):
        with torch.autocast(weight.device.type, enabled=False):
            return dora_weight_norm(weight, lora_A, lora_B, scaling, lora_bias, weight_sq)
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
        AAt = torch.mm(A, A.t())
        if lora_bias is not None:
            c = lora_bias.to(ct)
            extra = c * ((2.0 * scaling) * W.sum(1) + (scaling * scaling) * (2.0 * torch.mv(B, A.sum(1))
                                                                             + c * W.shape[1]))
        fixup = _device_fixup(W, A)
        if not fixup and _native_norm(W):
            # The [out, r] tail in one native pass: n, or −1 on the rows to recompute. The PyTorch tail below is
            # ~6 ops of 15–85 µs; at out = 4864, r = 16, 1 thread, the norm goes 1.74 → 1.61 ms (W0 Aᵀ 1.39 ms).
            with plumbing.below_autograd():
                n = torch.ops.lora_kernels.native_dora_norm(
                    V, B, AAt, w2 if w2.dtype == ct else w2.to(ct), None if lora_bias is None else extra, scaling,
                    5.0 * CANCEL_EPS)
            flagged = n < 0
            if flagged.any():
                rows = flagged.nonzero().squeeze(1)
                n2_rows = _direct_norm2(W, A, B, None if lora_bias is None else c, rows, scaling)
                n[rows] = n2_rows.clamp_min_(0).sqrt_().to(n.dtype)
            return n
        U = torch.addmm(V, B, AAt, beta=2.0 * scaling, alpha=scaling * scaling)
        n2 = torch.linalg.vecdot(U, B).add_(w2)
        if lora_bias is not None:
            n2 += extra
        cancels = n2 < (5.0 * CANCEL_EPS) * w2
        if fixup:  # no host read of `cancels` (a CUDA sync): the fix-up kernel recomputes those rows
            n = torch.where(cancels, -1.0, n2.clamp_min_(0).sqrt_())
            plumbing.kernels("dora").fix_cancelled_norms(W, A, B, None if lora_bias is None else c, n, scaling)
            return n
        rows = cancels.nonzero().squeeze(1)
        if rows.numel():
            n2[rows] = _direct_norm2(W, A, B, None if lora_bias is None else c, rows, scaling).to(n2.dtype)
        return n2.clamp_min_(0).sqrt_()


def _direct_norm2(W: Tensor, A: Tensor, B: Tensor, c: Optional[Tensor], rows: Tensor, scaling: float) -> Tensor:
    """‖W0_j + s · (B_j A + c_j)‖² for the given rows, formed directly (the rows whose expansion cancels), in
    float64: these rows are a difference of O(‖W0_j‖) terms, so float32 rounding of the terms would leave n_j a
    relative error of ~eps32 · ‖W0_j‖ / n_j (1e-5 .. 1e-3, depending on the GEMM's summation order); in float64
    n_j is exact to the float32 inputs. A few rows: [rows, r] x [r, in] costs nothing beside W0 Aᵀ."""
    d = torch.float64
    L = torch.mm(B[rows].to(d), A.to(d))
    if c is not None:
        L += c[rows, None].to(d)
    direct = torch.add(W[rows].to(d), L, alpha=scaling)
    return torch.linalg.vecdot(direct, direct)


# The extension may predate the op (a stale build): the PyTorch tail then.
HAS_NATIVE_NORM = NATIVE is not None and hasattr(torch.ops.lora_kernels, "native_dora_norm")


def _native_norm(W: Tensor) -> bool:
    """Whether `dora_weight_norm` runs its [out, r] tail as the native op (CPU tensors, the extension built)."""
    return HAS_NATIVE_NORM and W.device.type == "cpu"


_FIXUP_ON_CPU = False  # tests set it to run the device fix-up under TRITON_INTERPRET=1


def _device_fixup(W: Tensor, A: Tensor) -> bool:
    """Whether `dora_weight_norm` recomputes cancelling rows with kernels/dora.py's fix-up kernel (CUDA, float32,
    r ≤ MAX_NORM_RANK) instead of gathering them on the host."""
    from lora_kernels.backends import HAS_TRITON
    return ((W.is_cuda or _FIXUP_ON_CPU) and HAS_TRITON and W.dtype == torch.float32
            and A.shape[0] <= plumbing.kernels("dora").MAX_NORM_RANK)


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
                           weight_norm, weight_sq=None) -> None:
    """`lora_linear`'s checks, plus magnitude / lora_bias / weight_norm / weight_sq: [out] floating tensors on x's
    device."""
    _lora.check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    check_dora_vectors(x, weight.shape[0], magnitude, lora_bias, weight_norm, weight_sq)


def check_dora_vectors(x, out_f: int, magnitude, lora_bias, weight_norm, weight_sq) -> None:
    """DoRA's [out] arguments (dense and quantized bases): floating tensors of shape [out] on x's device."""
    for name, t in (("magnitude", magnitude), ("lora_bias", lora_bias), ("weight_norm", weight_norm),
                    ("weight_sq", weight_sq)):
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


def dora_forward(x, bias, lora_fwd, base_weight, magnitude, weight_norm, lora_bias, scaling, dropout_p, seed):
    """y and P of DoRA's forward around a fused LoRA forward `lora_fwd(x) -> (x W0ᵀ + s · x Aᵀ Bᵀ, S)` (no bias):
    P = lora_fwd(x̂) + s · c, y = (x − x̂) W0ᵀ + b + g ⊙ P (without dropout y = g ⊙ P + b). `base_weight(dtype)`:
    W0 for the dropout remainder (PEFT's second base GEMM). Returns (y, S, P)."""
    if seed is None:
        P, S = lora_fwd(x)
        base = bias
    else:  # x̂ regenerated from the seed; P on x̂, and the base's remainder on x − x̂ (PEFT's two GEMMs)
        x_hat = _lora._x_hat(x, x.dtype, dropout_p, seed)
        P, S = lora_fwd(x_hat)
        base = torch.nn.functional.linear(x - x_hat, base_weight(x.dtype), bias)
    if lora_bias is not None:
        P.add_(lora_bias.to(P.dtype), alpha=scaling)
    g = _scale(magnitude, weight_norm, P.dtype)
    if base is None:
        y = torch.mul(P, g)
    elif base.dim() == 1:
        y = torch.addcmul(base, P, g)
    else:
        y = base.addcmul_(P, g)
    return y, S, P


def dora_backward(dy, lora_bwd, base_weight, P, weight_norm, magnitude, lora_bias, scaling, dropout_p, seed,
                  need_lora: bool, need_dm: bool, need_dc: bool):
    """(dx, dA, dB, dm, dc) of DoRA's backward around a LoRA backward `lora_bwd(G, g ⊙ G) -> (dx, dA, dB)` on
    g ⊙ G (called when `need_lora`). `base_weight(dtype)`: W0 for PEFT's base GEMM on x̂ (dx += H W0 −
    dropout(H W0), H = (1 − g) ⊙ G), or None when `lora_bwd` folds it in itself (the Triton kernel)."""
    g = _scale(magnitude, weight_norm, dy.dtype)
    Gg = dy * g
    dx = dA = dB = dm = dc = None
    if need_lora:
        dx, dA, dB = lora_bwd(dy, Gg)
        if dx is not None and seed is not None and base_weight is not None:
            ct = lora_dtype(dy.dtype, torch.float32)  # the dropout add takes float32 / float64
            T = torch.mm((dy * (1.0 - g)).to(ct), base_weight(ct))
            dx.add_(T)
            _lora._add_dropped(dx, T.neg_(), dropout_p, seed)
    if need_dm:
        ct = lora_dtype(dy.dtype, magnitude.dtype)
        dm = torch.linalg.vecdot(dy.to(ct), P.to(ct), dim=0).div_(weight_norm).to(magnitude.dtype)
    if need_dc:
        dc = Gg.sum(0).mul_(scaling).to(lora_bias.dtype)
    return dx, dA, dB, dm, dc


def _as(t: Tensor):
    """t in a given dtype (a copy only when it differs): the `base_weight` of a dense W0."""
    return lambda dtype: t if t.dtype == dtype else t.to(dtype)


def _fwd(backend: str):
    def fwd(x, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude, lora_bias):
        if weight_norm is None:
            weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling, lora_bias, weight_sq)
        inner = _lora.IMPLS[backend][0]
        y, S, P = dora_forward(x, bias, lambda xx: inner(xx, weight, None, lora_A, lora_B, scaling, 0.0, None),
                               _as(weight), magnitude, weight_norm, lora_bias, scaling, dropout_p, seed)
        return y, (S, P, weight_norm)
    return fwd


def _bwd(backend: str):
    def bwd(dy, x, weight, lora_A, lora_B, saved, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude,
            lora_bias, need_dx, need_dA, need_dB, need_dm, need_dc):
        S, P, weight_norm = saved
        if backend == "triton":  # dx in one read of W0, PEFT's base term on x̂ included (kernels/dora.py)
            def lora_bwd(G, Gg):
                return plumbing.kernels("dora").dora_linear_bwd_triton(
                    G.to(x.dtype), Gg.to(x.dtype), x, weight, lora_A, lora_B, S, scaling, dropout_p, seed_int(seed),
                    need_dx, need_dA, need_dB)
            base_weight = None
        else:
            def lora_bwd(G, Gg):
                return _lora.IMPLS[backend][1](Gg, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx,
                                               need_dA, need_dB)
            base_weight = _as(weight)
        return dora_backward(dy, lora_bwd, base_weight, P, weight_norm, magnitude, lora_bias, scaling, dropout_p,
                             seed, need_dx or need_dA or need_dB, need_dm, need_dc)
    return bwd


def _triton_fwd(x, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude,
                lora_bias, gemm_config=None):
    """The fused kernel (kernels/dora.py): the norm's W0 pieces in the GEMM's main loop unless n is given (or
    cannot be fused: r > MAX_NORM_RANK, or no rows to run the GEMM's programs), g in its epilogue."""
    kd = plumbing.kernels("dora")
    if weight_norm is None and (x.shape[0] == 0 or lora_A.shape[0] > kd.MAX_NORM_RANK):
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling, lora_bias, weight_sq)
    n_in = None if weight_norm is None else weight_norm.float()
    y, S, P, n = kd.dora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, magnitude, lora_bias, n_in, scaling,
                                           dropout_p, seed_int(seed), CANCEL_EPS, gemm_config)
    return y, (S, P, n if weight_norm is None else weight_norm)


# backend -> (fwd, bwd), as lora_linear.IMPLS. FAMILY's tables are views of this dict.
IMPLS: dict[str, tuple] = {name: (_fwd(name), _bwd(name)) for name in ("torch", "native", "composite")}
IMPLS["triton"] = (_triton_fwd, _bwd("triton"))


def _key_fields(phase: str, args: tuple) -> dict:
    x, weight, lora_A = (args[0], args[1], args[3]) if phase == "fwd" else (args[1], args[2], args[3])
    seed = args[9] if phase == "fwd" else args[10]
    fields = dict(x=str(x.dtype)[6:], a=str(lora_A.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=weight.shape[1],
                  n=weight.shape[0], r=lora_A.shape[0], drop=int(seed is not None))
    if phase == "fwd":
        fields["norm"] = int(args[5] is None)  # the forward computes n (training) or takes it (eval cache)
    else:
        fields["need"] = "".join("1" if n else "0" for n in args[-5:])
    return fields


def _gemm_variants(phase: str, args: tuple) -> Optional[list]:
    """On CUDA the forward's "triton" candidate is one per fused DoRA GEMM config the kernels ship for this M."""
    if phase != "fwd":
        return None
    x, seed = args[0], args[9]
    kd = plumbing.kernels("dora")
    return [dispatch.Candidate("triton" + _lora._cfg_name(cfg), functools.partial(_triton_fwd, gemm_config=cfg))
            for cfg in kd.gemm_configs(x.shape[0], x.element_size(), seed is not None)]


# What measured dispatch verifies: y and everything the forward saves, every gradient computed.
OUTPUTS = {"fwd": lambda out: (out[0], *out[1]), "bwd": lambda out: tuple(t for t in out if t is not None)}

FAMILY = dispatch.OpFamily(
    name="dora_linear",
    impls={"fwd": plumbing.PhaseTable(IMPLS, 0), "bwd": plumbing.PhaseTable(IMPLS, 1)},
    x_arg={"fwd": 0, "bwd": 1},
    kernel_dtypes=_lora.kernel_dtypes,  # x and lora_A sit where lora_linear's do
    key_fields=_key_fields,
    outputs=OUTPUTS,
    variants=_gemm_variants,
)


def _run_fwd(backend, x, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude,
             lora_bias):
    return plumbing.run(FAMILY, "fwd", backend, (x, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling,
                                                 dropout_p, seed, magnitude, lora_bias))


# ----------------------------------------------------------------------------------------------------
# Registered ops (x is 2-D): what torch.compile, opcheck and the profiler see
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    weight_norm: Optional[Tensor], weight_sq: Optional[Tensor], scaling: float, dropout_p: float,
                    seed: Optional[Tensor], magnitude: Tensor, lora_bias: Optional[Tensor], backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [M, out], S = x̂ Aᵀ [M, r], P [M, out], n [out]): see the module docstring. Dropout is active iff
    `seed`; n is computed iff `weight_norm` is None (else returned as a copy: outputs must not alias inputs)."""
    y, (S, P, n) = _run_fwd(backend, x, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p,
                            seed, magnitude, lora_bias)
    return y, S, P, (n.clone() if n is weight_norm else n)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude, lora_bias,
      backend):
    M, out_f = x.shape[0], weight.shape[0]
    n = (weight.new_empty(out_f, dtype=lora_dtype(weight.dtype, lora_A.dtype)) if weight_norm is None
         else torch.empty_like(weight_norm))
    return (x.new_empty(M, out_f), x.new_empty(M, lora_A.shape[0], dtype=plumbing.s_dtype(x, lora_A)),
            x.new_empty(M, out_f), n)


@torch.library.custom_op("lora_kernels::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor, P: Tensor,
                    n: Tensor, weight_norm: Optional[Tensor], weight_sq: Optional[Tensor], scaling: float,
                    dropout_p: float, seed: Optional[Tensor], magnitude: Tensor, lora_bias: Optional[Tensor],
                    need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool, need_dc: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm, dc); a gradient that is not needed comes back as an empty tensor. n: the forward's norm."""
    out = plumbing.run(FAMILY, "bwd", backend, (dy, x, weight, lora_A, lora_B, (S, P, n), weight_norm, weight_sq,
                                                scaling, dropout_p, seed, magnitude, lora_bias, need_dx, need_dA,
                                                need_dB, need_dm, need_dc))
    likes = (x, lora_A, lora_B, magnitude, magnitude)
    return tuple(plumbing.empty_if_none(t, like) for t, like in zip(out, likes))


@dora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, S, P, n, weight_norm, weight_sq, scaling, dropout_p, seed, magnitude, lora_bias,
      need_dx, need_dA, need_dB, need_dm, need_dc, backend):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(lora_A) if need_dA else lora_A.new_empty(0),
            torch.empty_like(lora_B) if need_dB else lora_B.new_empty(0),
            torch.empty_like(magnitude) if need_dm else magnitude.new_empty(0),
            torch.empty_like(lora_bias) if need_dc else magnitude.new_empty(0))


plumbing.register_lora_autograd(dora_linear_fwd, dora_linear_bwd, extra=(10, 11))


# ----------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------

def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                backend: Optional[str] = None, lora_bias: Optional[Tensor] = None,
                weight_norm: Optional[Tensor] = None, weight_sq: Optional[Tensor] = None) -> Tensor:
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
        weight_norm: [out] the detached row norm n when the caller has it cached (`dora_weight_norm`; eval);
            None: the forward computes it (training: the Triton backend in its GEMM's main loop, the others with
            `dora_weight_norm`).
        weight_sq: [out] ‖W0_j‖² when the caller has it cached (`weight_sq`: W0 is frozen), for the backends that
            compute n apart; None recomputes it when needed.

    Returns y: [..., out] in x's dtype. Gradients flow to x, lora_A, lora_B, magnitude and lora_bias.

    QDoRA: `weight` may be a `lora_kernels.quant.QuantWeight` (a 4-bit / int8 base, `quant.from_bnb(layer)`); the
    base + LoRA product then runs on `qlora_linear`'s backends (`backend` names one of those) and the norm on the
    dequantized W0 (`qdora_weight_norm`; pass `weight_norm` to reuse a cached one).
    """
    if isinstance(weight, QuantWeight):
        return _qdora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend,
                             lora_bias, weight_norm, weight_sq)
    check_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend, lora_bias,
                           weight_norm, weight_sq)
    if torch.is_grad_enabled():
        plumbing.check_frozen_base("dora_linear", weight, bias)
    scaling, dropout_p = float(scaling), float(dropout_p)
    traced = plumbing.traced()
    # weight_norm None: the forward computes n (detached; the Triton kernel in its GEMM's main loop).
    seed = new_seed() if (training and dropout_p > 0.0) else None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if traced:
        y = dora_linear_fwd(x2, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed,
                            magnitude, lora_bias, backend or "auto")[0]
    elif torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                      or magnitude.requires_grad
                                      or (lora_bias is not None and lora_bias.requires_grad)):
        y = plumbing.eager_grad(FAMILY, backend, x2, weight, bias, lora_A, lora_B,
                                (weight_norm, weight_sq, scaling, dropout_p, seed), (magnitude, lora_bias))
    else:
        y = _run_fwd(backend, x2, weight, bias, lora_A, lora_B, weight_norm, weight_sq, scaling, dropout_p, seed,
                     magnitude, lora_bias)[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------
# The eval cache of the norm, shared by the layers (`LoRALinear(use_dora=True)`, the patched PEFT layers)
# ----------------------------------------------------------------------------------------------------

def cached_norm_args(cache: dict, name, weight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     lora_bias: Optional[Tensor] = None) -> dict:
    """`dora_linear`'s weight_norm / weight_sq keyword arguments from a layer's cache (see `cached_weight_norm`).
    Training (autograd on and an adapter tensor requires grad: A and B change every step, so a cached n would miss
    anyway): {"weight_sq": ‖W0_j‖² cached}, and the forward computes n -- the Triton backend inside its GEMM, reading
    W0 once. Otherwise (eval, or a quantized base): {"weight_norm": n cached}."""
    training = torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad
                                            or (lora_bias is not None and lora_bias.requires_grad))
    if training and not isinstance(weight, QuantWeight):
        return {"weight_sq": _cached_weight_sq(cache, weight, lora_A)}
    return {"weight_norm": cached_weight_norm(cache, name, weight, lora_A, lora_B, scaling, lora_bias)}


def _base_tensors(weight) -> tuple:
    return (weight.codes, weight.absmax) if isinstance(weight, QuantWeight) else (weight,)


def _cached_weight_sq(cache: dict, weight, lora_A: Tensor) -> Tensor:
    """‖W0_j‖² [out] (dequantized for a QuantWeight) in the compute dtype, kept in cache[None] while W0 is
    unchanged (`derived_cache`)."""
    base = _base_tensors(weight)
    key = (contents_key(*base), getattr(weight, "fmt", None), lora_A.dtype)
    w2 = cache_get(cache, None, key)
    if w2 is None:
        w2 = (qdora_weight_sq if isinstance(weight, QuantWeight) else weight_sq)(weight, lora_A)
        cache_put(cache, None, key, w2, *base)
    return w2


def cached_weight_norm(cache: dict, name, weight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                       lora_bias: Optional[Tensor] = None) -> Tensor:
    """The detached row norm n [out] of adapter `name` (`dora_weight_norm`, or `qdora_weight_norm` when `weight`
    is a `QuantWeight`), kept in `cache` (a dict the layer owns: {name: n, None: ‖W0_j‖²}, entries of
    `derived_cache`) until W0, A, B, lora_bias or the scaling change (version counters and the tensors' identity:
    writes through ``.data`` bypass them, so a layer clears the cache on merge / unmerge). ‖W0_j‖² is cached
    apart: W0 is frozen, so a training step only recomputes W0 Aᵀ and the r-sized terms."""
    sources = (*_base_tensors(weight), lora_A, lora_B, lora_bias)
    key = (contents_key(*sources), getattr(weight, "fmt", None), scaling)
    n = cache_get(cache, name, key)
    if n is not None:
        return n
    w2 = _cached_weight_sq(cache, weight, lora_A)
    n = (qdora_weight_norm if isinstance(weight, QuantWeight) else dora_weight_norm)(
        weight, lora_A, lora_B, scaling, lora_bias, w2)
    return cache_put(cache, name, key, n, *sources)


@torch.no_grad()
def dora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float) -> Tensor:
    """Merge in place, PEFT's way: W0 ← (m / n) ⊙_row (W0 + s · B A), n = ‖W0 + s · B A‖ per row (computed in
    float32, written in W0's dtype). Returns n [out]: `dora_unmerge_` needs it (PEFT keeps it the same way)."""
    n = dora_weight_norm(weight, lora_A, lora_B, scaling)
    ct = n.dtype
    merged = torch.addmm(weight.to(ct), lora_B.to(ct), lora_A.to(ct), alpha=scaling)
    weight.copy_(merged.mul_((magnitude.to(ct) / n)[:, None]))
    return n


@torch.no_grad()
def dora_unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                  weight_norm: Tensor) -> None:
    """Undo `dora_merge_` in place: W0 ← W' ⊘_row (m / n) − s · B A, with the n it returned."""
    ct = weight_norm.dtype
    orig = torch.div(weight.to(ct), (magnitude.to(ct) / weight_norm)[:, None])
    weight.copy_(orig.addmm_(lora_B.to(ct), lora_A.to(ct), alpha=-scaling))


# ----------------------------------------------------------------------------------------------------
# QDoRA: DoRA over a quantized base (issue 20 item 5). The same math with deq(W0) in W0's place: the base + LoRA
# product P and its backward run on `qlora_linear`'s implementations, the norm on the dequantized W0 (‖W0_j‖²
# cacheable: the base is frozen). Its own small family ("qdora_linear", one entry per qlora backend) so that it
# has registered ops (torch.compile, opcheck, the profiler) and the shared eager autograd (plumbing.lora_function)
# like every other family. The QuantWeight crosses the op boundary as its tensors plus its format's fields.
#
# Implementation convention (plumbing.lora_function: rest = (weight_norm, scaling, dropout_p, seed, absmax,
# nested_absmax, nested_code, nested_offset, fmt), extra = (magnitude, lora_bias)):
#     fwd(x, codes, bias, lora_A, lora_B, *rest, magnitude, lora_bias) -> (y, (S, P))
#     bwd(dy, x, codes, lora_A, lora_B, (S, P), *rest, magnitude, lora_bias, need_dx, need_dA, need_dB, need_dm,
#         need_dc) -> (dx, dA, dB, dm, dc)
# ----------------------------------------------------------------------------------------------------

from lora_kernels.ops import qlora as _q  # noqa: E402  (qlora imports nothing of DoRA's)


def _deq(qweight: QuantWeight, dtype: torch.dtype) -> Tensor:
    """deq(W0) in `dtype` through qlora's "native" dequantize (C++, bit-identical; PyTorch ops where it does not
    run): 1.65 ms against 51 ms for the PyTorch-ops dequantize at 4864 x 896 nf4, 1 thread."""
    return _q._deq_native(dtype, *qweight.tensors(), qweight.fmt)


def qdora_weight_sq(qweight: QuantWeight, lora_A: Tensor) -> Tensor:
    """‖deq(W0)_j‖² [out] (cache it per layer: the quantized base is frozen)."""
    return weight_sq(_deq(qweight, lora_dtype(qweight.fmt.dtype, lora_A.dtype)), lora_A)


def qdora_weight_norm(qweight: QuantWeight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                      lora_bias: Optional[Tensor] = None, weight_sq: Optional[Tensor] = None) -> Tensor:
    """`dora_weight_norm` of the dequantized base: n = ‖deq(W0) + s · (B A + c 1ᵀ)‖ per row [out], detached. The
    dequantize is part of DoRA's extra per training step (W0 Aᵀ needs W0 in float)."""
    with torch.no_grad():
        W = _deq(qweight, lora_dtype(qweight.fmt.dtype, lora_A.dtype))
    return dora_weight_norm(W, lora_A, lora_B, scaling, lora_bias, weight_sq)


@torch.library.custom_op("lora_kernels::qdora_weight_norm", mutates_args=())
def qdora_weight_norm_op(lora_A: Tensor, lora_B: Tensor, scaling: float, lora_bias: Optional[Tensor],
                         weight_sq: Optional[Tensor], codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                         nested_code: Optional[Tensor], nested_offset: Optional[Tensor], quant_type: str,
                         shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int) -> Tensor:
    """`qdora_weight_norm` as a registered op (what torch.compile sees: see `dora_weight_norm_op`)."""
    fmt = _q._fmt_of(quant_type, shape, dtype, blocksize, nested_absmax, nested_blocksize)
    qw = QuantWeight(fmt, codes, absmax, nested_absmax, nested_code, nested_offset)
    return qdora_weight_norm(qw, lora_A, lora_B, scaling, lora_bias, weight_sq)


@qdora_weight_norm_op.register_fake
def _(lora_A, lora_B, scaling, lora_bias, weight_sq, codes, absmax, nested_absmax, nested_code, nested_offset,
      quant_type, shape, dtype, blocksize, nested_blocksize):
    return lora_A.new_empty(shape[0], dtype=lora_dtype(dtype, lora_A.dtype))


def _qfwd(backend: str):
    def fwd(x, codes, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, absmax, nested_absmax,
            nested_code, nested_offset, fmt, magnitude, lora_bias):
        inner, q = _q.IMPLS[backend][0], (absmax, nested_absmax, nested_code, nested_offset, fmt)
        y, S, P = dora_forward(x, bias, lambda xx: inner(xx, codes, None, lora_A, lora_B, scaling, 0.0, None, *q),
                               lambda dtype: _q._deq_native(dtype, codes, *q), magnitude, weight_norm, lora_bias,
                               scaling, dropout_p, seed)
        return y, (S, P)
    return fwd


def _qbwd(backend: str):
    def bwd(dy, x, codes, lora_A, lora_B, saved, weight_norm, scaling, dropout_p, seed, absmax, nested_absmax,
            nested_code, nested_offset, fmt, magnitude, lora_bias, need_dx, need_dA, need_dB, need_dm, need_dc):
        S, P = saved
        q = (absmax, nested_absmax, nested_code, nested_offset, fmt)

        def lora_bwd(G, Gg):
            return _q.IMPLS[backend][1](Gg, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, *q, need_dx,
                                        need_dA, need_dB)
        return dora_backward(dy, lora_bwd, lambda dtype: _q._deq_native(dtype, codes, *q), P, weight_norm,
                             magnitude, lora_bias, scaling, dropout_p, seed, need_dx or need_dA or need_dB, need_dm,
                             need_dc)
    return bwd


# backend -> (fwd, bwd): one per qlora_linear backend, which runs the product (its names are the choices).
QDORA_IMPLS: dict[str, tuple] = {name: (_qfwd(name), _qbwd(name)) for name in _q.IMPLS}


def _q_key_fields(phase: str, args: tuple) -> dict:
    x, lora_A = (args[0], args[3]) if phase == "fwd" else (args[1], args[3])
    seed, fmt = (args[8], args[13]) if phase == "fwd" else (args[9], args[14])
    fields = dict(x=str(x.dtype)[6:], a=str(lora_A.dtype)[6:], q=fmt.quant_type + ("n" if fmt.nested else ""),
                  qd=str(fmt.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=fmt.shape[1], n=fmt.shape[0],
                  r=lora_A.shape[0], drop=int(seed is not None))
    if phase == "bwd":
        fields["need"] = "".join("1" if n else "0" for n in args[-5:])
    return fields


QDORA_FAMILY = dispatch.OpFamily(
    name="qdora_linear",
    impls={"fwd": plumbing.PhaseTable(QDORA_IMPLS, 0), "bwd": plumbing.PhaseTable(QDORA_IMPLS, 1)},
    x_arg={"fwd": 0, "bwd": 1},
    kernel_dtypes=_lora.kernel_dtypes,  # x and lora_A sit where lora_linear's do
    key_fields=_q_key_fields,
    outputs=OUTPUTS,
    extra_candidates=_q.FAMILY.extra_candidates,
)


@torch.library.custom_op("lora_kernels::qdora_linear_fwd", mutates_args=())
def qdora_linear_fwd(x: Tensor, codes: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     weight_norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                     magnitude: Tensor, lora_bias: Optional[Tensor], absmax: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_offset: Optional[Tensor], quant_type: str,
                     shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, out], S = x̂ Aᵀ [M, r], P [M, out]) of DoRA over deq(W0). Dropout is active iff `seed`."""
    fmt = _q._fmt_of(quant_type, shape, dtype, blocksize, nested_absmax, nested_blocksize)
    y, (S, P) = plumbing.run(QDORA_FAMILY, "fwd", backend, (x, codes, bias, lora_A, lora_B, weight_norm, scaling,
                                                            dropout_p, seed, absmax, nested_absmax, nested_code,
                                                            nested_offset, fmt, magnitude, lora_bias))
    return y, S, P


@qdora_linear_fwd.register_fake
def _(x, codes, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias, absmax,
      nested_absmax, nested_code, nested_offset, quant_type, shape, dtype, blocksize, nested_blocksize, backend):
    M, out_f = x.shape[0], shape[0]
    return (x.new_empty(M, out_f), x.new_empty(M, lora_A.shape[0], dtype=lora_dtype(x.dtype, lora_A.dtype)),
            x.new_empty(M, out_f))


@torch.library.custom_op("lora_kernels::qdora_linear_bwd", mutates_args=())
def qdora_linear_bwd(dy: Tensor, x: Tensor, codes: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor, P: Tensor,
                     weight_norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                     magnitude: Tensor, lora_bias: Optional[Tensor], absmax: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], nested_offset: Optional[Tensor], quant_type: str,
                     shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int, need_dx: bool,
                     need_dA: bool, need_dB: bool, need_dm: bool, need_dc: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm, dc); a gradient that is not needed comes back as an empty tensor."""
    fmt = _q._fmt_of(quant_type, shape, dtype, blocksize, nested_absmax, nested_blocksize)
    out = plumbing.run(QDORA_FAMILY, "bwd", backend, (dy, x, codes, lora_A, lora_B, (S, P), weight_norm, scaling,
                                                      dropout_p, seed, absmax, nested_absmax, nested_code,
                                                      nested_offset, fmt, magnitude, lora_bias, need_dx, need_dA,
                                                      need_dB, need_dm, need_dc))
    likes = (x, lora_A, lora_B, magnitude, magnitude)
    return tuple(plumbing.empty_if_none(t, like) for t, like in zip(out, likes))


@qdora_linear_bwd.register_fake
def _(dy, x, codes, lora_A, lora_B, S, P, weight_norm, scaling, dropout_p, seed, magnitude, lora_bias, absmax,
      nested_absmax, nested_code, nested_offset, quant_type, shape, dtype, blocksize, nested_blocksize, need_dx,
      need_dA, need_dB, need_dm, need_dc, backend):
    return (*_lora.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB),
            torch.empty_like(magnitude) if need_dm else magnitude.new_empty(0),
            torch.empty_like(lora_bias) if need_dc else magnitude.new_empty(0))


plumbing.register_lora_autograd(qdora_linear_fwd, qdora_linear_bwd, extra=(9, 10))


def _qdora_linear(x, qweight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend, lora_bias,
                  weight_norm, weight_sq):
    _q.check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    out_f = qweight.fmt.shape[0]
    check_dora_vectors(x, out_f, magnitude, lora_bias, weight_norm, weight_sq)
    if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
        raise ValueError("bias requires grad, but dora_linear keeps the quantized base frozen: call "
                         "bias.requires_grad_(False) (as PEFT does), or run under torch.no_grad()")
    scaling, dropout_p = float(scaling), float(dropout_p)
    traced = plumbing.traced()
    codes, absmax, n_absmax, n_code, n_offset = qweight.tensors()
    fmt = qweight.fmt
    c = None if lora_bias is None else lora_bias.detach()
    if weight_norm is None and traced:  # detached: no gradient through n
        weight_norm = qdora_weight_norm_op(lora_A.detach(), lora_B.detach(), scaling, c, weight_sq, codes, absmax,
                                           n_absmax, n_code, n_offset, *fmt.op_args())
    elif weight_norm is None:
        weight_norm = qdora_weight_norm(qweight, lora_A.detach(), lora_B.detach(), scaling, c, weight_sq)
    seed = new_seed() if (training and dropout_p > 0.0) else None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if traced:
        y = qdora_linear_fwd(x2, codes, bias, lora_A, lora_B, weight_norm, scaling, dropout_p, seed, magnitude,
                             lora_bias, absmax, n_absmax, n_code, n_offset, *fmt.op_args(), backend or "auto")[0]
    elif torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                      or magnitude.requires_grad
                                      or (lora_bias is not None and lora_bias.requires_grad)):
        y = plumbing.eager_grad(QDORA_FAMILY, backend, x2, codes, bias, lora_A, lora_B,
                                (weight_norm, scaling, dropout_p, seed, absmax, n_absmax, n_code, n_offset, fmt),
                                (magnitude, lora_bias))
    else:
        y = plumbing.run(QDORA_FAMILY, "fwd", backend, (x2, codes, bias, lora_A, lora_B, weight_norm, scaling,
                                                        dropout_p, seed, absmax, n_absmax, n_code, n_offset, fmt,
                                                        magnitude, lora_bias))[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_f)
