"""The fused single-adapter LoRA linear: its implementations, registered ops, autograd and public function.

    y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ        x: [..., in], W0: [out, in], A: [r, in], B: [out, r]

Every backend implements two functions with the same arguments as the registered ops:
    fwd(x [M, in], weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y [M, out] in x's dtype,
        S = x̂ Aᵀ [M, r] float32, float64 when x or A is)
    bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
        -> (dx, dA, dB), each in its tensor's dtype, None when not needed.
The backward saves x, S and the dropout seed -- never the mask or x̂.

The family's declaration (`FAMILY`) is all `lora_kernels.dispatch` needs to choose among the backends; the
eager path, the autograd formulas and the registered ops' plumbing are `lora_kernels/ops/plumbing.py`'s. Two
ways in, with the same math: eager (the implementations called directly, under `plumbing.LoRAFunction` when a
gradient is needed) and traced / profiled (the registered ops `torch.ops.lora_kernels.lora_linear_fwd` /
`lora_linear_bwd`; `backend="auto"` inside them dispatches at run time).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from lora_kernels import dispatch
from lora_kernels.backends import check_backend
from lora_kernels.dropout import dropout_mask, new_seed
from lora_kernels.ops import plumbing
from lora_kernels.ops.plumbing import KERNEL_DTYPES, below_autograd, lora_dtype, seed_int
from lora_kernels.ops.plumbing import shape_str as _shape
from lora_kernels.quant import QuantWeight


def check_adapter_shapes(lora_A: Tensor, lora_B: Tensor, in_f: int, out_f: int) -> None:
    """lora_A [r, in] with r >= 1 and lora_B [out, r], for a base layer of in_f -> out_f (every base format)."""
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r, in={in_f}] with r >= 1, got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[0] != out_f or lora_B.shape[1] != r:
        raise ValueError(f"lora_B must have shape [out={out_f}, r={r}], got {_shape(lora_B)}")


def check_bias(bias, x: Tensor, out_f: int) -> None:
    """The base layer's bias: [out] on x's device, in x's dtype (every base format; None is checked by the caller,
    to keep the dense fast path one test shorter)."""
    if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != out_f:
        raise ValueError(f"bias must be None or have shape [out={out_f}], got "
                         f"{_shape(bias) if isinstance(bias, Tensor) else type(bias).__name__}")
    if bias.device != x.device:
        raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")


def check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend) -> None:
    """Raise a clear error for inputs no backend can run, before any kernel launches.

    Written for speed: it runs on every eager call (a few µs for the common, valid case).
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., in], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out, in], got {_shape(weight)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x must have shape [..., in={in_f}] to match weight {_shape(weight)}, got {_shape(x)}")
    check_adapter_shapes(lora_A, lora_B, in_f, out_f)
    dev = x.device
    if bias is not None:
        check_bias(bias, x, out_f)
    if weight.device != dev or lora_A.device != dev or lora_B.device != dev:
        raise ValueError(f"x, weight, bias, lora_A and lora_B must be on one device, got x:{dev} "
                         f"weight:{weight.device} lora_A:{lora_A.device} lora_B:{lora_B.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have one dtype")
    if type(scaling) is not float and (not isinstance(scaling, (int, float)) or isinstance(scaling, bool)):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend is not None and backend != "torch":
        check_backend(backend, dev)
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend={backend!r} supports x of dtype {KERNEL_DTYPES}, got {x.dtype}")
        if lora_A.dtype != x.dtype and lora_A.dtype != torch.float32:
            raise TypeError(f"backend={backend!r} needs lora_A/lora_B in x's dtype ({x.dtype}) or float32, "
                            f"got {lora_A.dtype}")


# ----------------------------------------------------------------------------------------------------
# "torch": PyTorch ops only. LoRA path in promote(x, A, float32), base GEMM in x's dtype, the LoRA term
# added into the GEMM's output in place (addmm_ with alpha = scaling: no temporaries, no extra pass).
# ----------------------------------------------------------------------------------------------------

def _x_hat(x: Tensor, ct: torch.dtype, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """x̂ = x ⊙ m / (1 - p) in dtype ct (x itself without dropout when its dtype is ct)."""
    if seed is None:
        return x if x.dtype == ct else x.to(ct)
    if plumbing.native_dropout_ok(x):  # the vectorised generator of the extension: same mask, far faster
        with below_autograd():  # casts to ct in the same pass
            return torch.ops.lora_kernels.native_dropout.default(x, dropout_p, seed, ct)
    keep = dropout_mask(seed, tuple(x.shape), dropout_p, device=x.device)
    return x.to(ct) * keep.to(ct) * (1.0 / (1.0 - dropout_p))


def _add_dropped(out: Tensor, t: Tensor, dropout_p: float, seed: Tensor) -> None:
    """out += t ⊙ m / (1 - p), m the mask of t's [M, K] shape."""
    if plumbing.native_dropout_ok(t):
        with below_autograd():
            torch.ops.lora_kernels.native_dropout_add_.default(out, t, dropout_p, seed)
        return
    keep = dropout_mask(seed, tuple(t.shape), dropout_p, device=t.device)
    out.add_(t * keep.to(t.dtype), alpha=1.0 / (1.0 - dropout_p))


def add_lora_(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
              seed: Optional[Tensor]) -> Tensor:
    """y += s · (x̂ Aᵀ) Bᵀ in place on a base output y [M, out] computed apart; returns S = x̂ Aᵀ [M, r] in
    promote(x, A, float32). The LoRA side of "torch" and of every base computed by other means (qlora_linear)."""
    ct = lora_dtype(x.dtype, lora_A.dtype)
    A = lora_A if lora_A.dtype == ct else lora_A.to(ct)
    S = torch.mm(_x_hat(x, ct, dropout_p, seed), A.t())
    if y.dtype == ct and lora_B.dtype == ct:
        y.addmm_(S, lora_B.t(), alpha=scaling)
    else:
        y.addmm_(S.to(y.dtype), lora_B.to(y.dtype).t(), alpha=scaling)
    return S


def torch_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = torch.nn.functional.linear(x, weight, bias)
    return y, add_lora_(y, x, lora_A, lora_B, scaling, dropout_p, seed)


def torch_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    ct = lora_dtype(x.dtype, lora_A.dtype)
    G = dy if dy.dtype == ct else dy.to(ct)
    dx = dA = dB = None
    if need_dB:
        dB = torch.mm(G.t(), S if S.dtype == ct else S.to(ct)).mul_(scaling)
        dB = dB if dB.dtype == lora_B.dtype else dB.to(lora_B.dtype)
    if need_dA or need_dx:
        dS = torch.mm(G, lora_B if lora_B.dtype == ct else lora_B.to(ct)).mul_(scaling)  # [M, r]
        A = lora_A if lora_A.dtype == ct else lora_A.to(ct)
        if need_dA:
            dA = torch.mm(dS.t(), _x_hat(x, ct, dropout_p, seed))
            dA = dA if dA.dtype == lora_A.dtype else dA.to(lora_A.dtype)
        if need_dx:
            dx = torch.mm(dy, weight)
            exact = dx.dtype == ct
            if not exact:  # 16-bit x with float32 adapters: add in float32, round once
                dx = dx.to(ct)
            if seed is None:
                dx.addmm_(dS, A)
            else:
                _add_dropped(dx, torch.mm(dS, A), dropout_p, seed)
            if not exact:
                dx = dx.to(x.dtype)
    return dx, dA, dB


# ----------------------------------------------------------------------------------------------------
# "native", "triton", "composite": thin adapters to the same convention
# ----------------------------------------------------------------------------------------------------

def native_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    with below_autograd():
        return torch.ops.lora_kernels.native_lora_linear_fwd.default(x, weight, bias, lora_A, lora_B, scaling,
                                                                     dropout_p, seed)


def native_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    with below_autograd():
        dx, dA, dB = torch.ops.lora_kernels.native_lora_linear_bwd.default(
            dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
    return dx if need_dx else None, dA if need_dA else None, dB if need_dB else None


def _kernels():
    return plumbing.kernels("lora_linear")


def triton_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gemm_config=None):
    kw = {} if gemm_config is None else {"gemm_config": gemm_config}
    return _kernels().lora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                             seed_int(seed), **kw)


def triton_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
               gemm_config=None):
    kw = {} if gemm_config is None else {"gemm_config": gemm_config}
    return _kernels().lora_linear_bwd_triton(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed_int(seed),
                                             need_dx, need_dA, need_dB, **kw)


def composite_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _kernels().lora_linear_fwd_composite(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                seed_int(seed))


def composite_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return _kernels().lora_linear_bwd_composite(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p,
                                                seed_int(seed), need_dx, need_dA, need_dB)


# backend -> (fwd, bwd). FAMILY's tables are views of this dict: replacing an entry (as tests do) takes effect.
IMPLS: dict[str, tuple] = {
    "torch": (torch_fwd, torch_bwd),
    "native": (native_fwd, native_bwd),
    "triton": (triton_fwd, triton_bwd),
    "composite": (composite_fwd, composite_bwd),
}


# ----------------------------------------------------------------------------------------------------
# The family's declaration for measured dispatch (lora_kernels/dispatch.py)
# ----------------------------------------------------------------------------------------------------

def kernel_dtypes(phase: str, args: tuple) -> bool:
    """Whether the kernel backends (all but "torch") take these dtypes: x in KERNEL_DTYPES, A in x's or float32.
    (args: the phase's arguments in this family's order, which the quantized-base family shares up to lora_A.)"""
    x, lora_A = (args[0], args[3]) if phase == "fwd" else (args[1], args[3])
    return x.dtype in KERNEL_DTYPES and (lora_A.dtype == x.dtype or lora_A.dtype == torch.float32)


def _key_fields(phase: str, args: tuple) -> dict:
    if phase == "fwd":
        x, weight, bias, lora_A = args[:4]
        seed = args[7]
    else:
        x, weight, lora_A = args[1], args[2], args[3]
        bias, seed = None, args[8]
    fields = dict(x=str(x.dtype)[6:], a=str(lora_A.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=weight.shape[1],
                  n=weight.shape[0], r=lora_A.shape[0], drop=int(seed is not None), bias=int(bias is not None))
    if phase == "bwd":
        fields["need"] = need_bits(args)
    return fields


def need_bits(bwd_args: tuple) -> str:
    """The backward's (need_dx, need_dA, need_dB) flags, its last three arguments, as a key field ("101")."""
    return "".join("1" if n else "0" for n in bwd_args[-3:])


# Which outputs of each phase measured dispatch verifies: (y, S) forward, every gradient backward.
OUTPUTS = {"fwd": lambda out: (out[0], out[1]), "bwd": lambda out: tuple(out)}


def _cfg_name(cfg) -> str:
    bm, bn, bk, gm, w, s = cfg
    return f"[{bm}x{bn}x{bk} g{gm} w{w} s{s}]"


def _gemm_variants(phase: str, args: tuple) -> list:
    """On CUDA the "triton" candidate is one per GEMM tile config the kernels ship for this M."""
    x = args[0] if phase == "fwd" else args[1]
    dropout = (args[7] if phase == "fwd" else args[8]) is not None
    i = 0 if phase == "fwd" else 1
    return [dispatch.Candidate("triton" + _cfg_name(cfg), functools.partial(IMPLS["triton"][i], gemm_config=cfg))
            for cfg in _kernels().gemm_configs(x.shape[0], x.element_size(), dropout and phase == "bwd")]


FAMILY = dispatch.OpFamily(
    name="lora_linear",
    impls={"fwd": plumbing.PhaseTable(IMPLS, 0), "bwd": plumbing.PhaseTable(IMPLS, 1)},
    x_arg={"fwd": 0, "bwd": 1},
    kernel_dtypes=kernel_dtypes,
    key_fields=_key_fields,
    outputs=OUTPUTS,
    variants=_gemm_variants,
)


def _run_fwd(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return plumbing.run(FAMILY, "fwd", backend, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed))


def _run_bwd(backend, dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return plumbing.run(FAMILY, "bwd", backend, (dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                                                 need_dx, need_dA, need_dB))


# ----------------------------------------------------------------------------------------------------
# Registered ops (x is 2-D): what torch.compile, opcheck and the profiler see
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str
                    ) -> tuple[Tensor, Tensor]:
    """(y [M, out] in x's dtype, S = x̂ Aᵀ [M, r] float32). Dropout is active iff `seed` is given.
    backend "auto" = measured dispatch at run time."""
    return _run_fwd(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    M = x.shape[0]
    return x.new_empty(M, weight.shape[0]), x.new_empty(M, lora_A.shape[0], dtype=plumbing.s_dtype(x, lora_A))


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                    scaling: float, dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool,
                    need_dB: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    dx, dA, dB = _run_bwd(backend, dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                          need_dx, need_dA, need_dB)
    empty = plumbing.empty_if_none
    return empty(dx, x), empty(dA, lora_A), empty(dB, lora_B)


def fake_grads(x: Tensor, lora_A: Tensor, lora_B: Tensor, need_dx: bool, need_dA: bool, need_dB: bool) -> tuple:
    """A LoRA-convention bwd op's fake outputs: (dx, dA, dB) like x, A, B; empty where not needed."""
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(lora_A) if need_dA else lora_A.new_empty(0),
            torch.empty_like(lora_B) if need_dB else lora_B.new_empty(0))


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB, backend):
    return fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)


plumbing.register_lora_autograd(lora_linear_fwd, lora_linear_bwd)


# ----------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------

def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0, training: bool = False,
                backend: Optional[str] = None) -> Tensor:
    """Fused LoRA linear: ``y = x W0ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` (PEFT layout).

    Args:
        x: [..., in] activations (any leading dims, any strides).
        weight: [out, in] frozen base weight W0, same dtype as x. It must not require grad while autograd is
            on: this op computes no gradient for it (freeze it, as PEFT does). Or a quantized W0, a
            `lora_kernels.quant.QuantWeight` (`quant.from_bnb(layer)`): the call is `qlora_linear`'s.
        bias: [out] or None; frozen like `weight`.
        lora_A: [r, in]; lora_B: [out, r]. Same dtype: x's, or float32 (PEFT's default for adapters).
        scaling: lora_alpha / r (or / sqrt(r) for rsLoRA), read at every call.
        dropout_p: LoRA dropout probability in [0, 1), applied to the LoRA path only when `training`; the
            mask is regenerated from a seed drawn from torch's CPU generator (`lk.dropout_mask`).
        backend: None = measured dispatch (`lora_kernels.dispatch`; untuned: "composite" on CUDA, the
            measured CPU default on CPU), or "torch", "triton", "composite", "native" to force one.

    Returns y: [..., out] in x's dtype. Gradients flow to x, lora_A and lora_B, each in its own dtype.
    """
    if type(weight) is QuantWeight:  # the one check the dense path pays (~20 ns, measured)
        from lora_kernels.ops.qlora import qlora_linear
        return qlora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    if torch.is_grad_enabled():
        plumbing.check_frozen_base("lora_linear", weight, bias)
    seed = new_seed() if (training and dropout_p > 0.0) else None
    scaling, dropout_p = float(scaling), float(dropout_p)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if plumbing.traced():
        y = lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend or "auto")[0]
    elif torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        y = plumbing.eager_grad(FAMILY, backend, x2, weight, bias, lora_A, lora_B, (scaling, dropout_p, seed))
    else:
        y = _run_fwd(backend, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
