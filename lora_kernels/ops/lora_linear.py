"""The fused single-adapter LoRA linear: its implementations, registered ops, autograd and public function.

    y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ        x: [..., in], W0: [out, in], A: [r, in], B: [out, r]

Every backend implements two functions with the same arguments as the registered ops:
    fwd(x [M, in], weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y [M, out] in x's dtype,
        S = x̂ Aᵀ [M, r] float32, float64 when x or A is)
    bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
        -> (dx, dA, dB), each in its tensor's dtype, None when not needed.
The backward saves x, S and the dropout seed -- never the mask or x̂.

Two ways in, with the same math:
* eager (the common case): `lora_linear` checks its arguments once, asks `lora_kernels.dispatch` which
  implementation runs (`backend=None`) and calls it directly -- under a plain autograd.Function when a
  gradient is needed, bare otherwise. Going through a `custom_op` costs ~80 µs of Python dispatch per call
  (torch 2.13, measured on CPU), more than the whole LoRA math at decode sizes.
* traced (torch.compile) or profiled: the registered ops `torch.ops.lora_kernels.lora_linear_fwd` /
  `lora_linear_bwd` with their fake and autograd registrations, so a compiled graph holds one opaque op
  per layer and profiler traces name them. `backend="auto"` inside them dispatches at run time.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lora_kernels import dispatch
from lora_kernels.backends import (HAS_TRITON, NATIVE, NATIVE_CUDA, TRITON_INTERPRETED, check_backend,
                                   default_backend)
from lora_kernels.dropout import dropout_mask, new_seed

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_profiler_enabled = torch._C._autograd._profiler_enabled
_any_autocast = torch._C._is_any_autocast_enabled
# The native ops carry a Python autograd registration (lora_kernels/ops/native.py) that costs ~15 µs per
# call even without grad (measured, torch 2.13 CPU). Our callers handle autograd themselves, so they call
# below the autograd keys.
_below_autograd = torch._C._AutoDispatchBelowADInplaceOrView


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


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
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r, in={in_f}] with r >= 1, got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[0] != out_f or lora_B.shape[1] != r:
        raise ValueError(f"lora_B must have shape [out={out_f}, r={r}], got {_shape(lora_B)}")
    dev = x.device
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != out_f:
            raise ValueError(f"bias must be None or have shape [out={out_f}], got "
                             f"{_shape(bias) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.device != dev:
            raise ValueError(f"bias must be on x's device {dev}, got {bias.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
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
        if x.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend={backend!r} supports x of dtype {_KERNEL_DTYPES}, got {x.dtype}")
        if lora_A.dtype != x.dtype and lora_A.dtype != torch.float32:
            raise TypeError(f"backend={backend!r} needs lora_A/lora_B in x's dtype ({x.dtype}) or float32, "
                            f"got {lora_A.dtype}")


# ----------------------------------------------------------------------------------------------------
# "torch": PyTorch ops only. LoRA path in promote(x, A, float32), base GEMM in x's dtype, the LoRA term
# added into the GEMM's output in place (addmm_ with alpha = scaling: no temporaries, no extra pass).
# ----------------------------------------------------------------------------------------------------

_LORA_DTYPE: dict = {}


def _lora_dtype(x: Tensor, lora_A: Tensor) -> torch.dtype:
    key = (x.dtype, lora_A.dtype)
    dt = _LORA_DTYPE.get(key)
    if dt is None:
        dt = _LORA_DTYPE[key] = torch.promote_types(torch.promote_types(*key), torch.float32)
    return dt


def _native_dropout_ok(t: Tensor) -> bool:
    return NATIVE is not None and (t.device.type == "cpu" or (t.device.type == "cuda" and NATIVE_CUDA))


def _x_hat(x: Tensor, ct: torch.dtype, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """x̂ = x ⊙ m / (1 - p) in dtype ct (x itself without dropout when its dtype is ct)."""
    if seed is None:
        return x if x.dtype == ct else x.to(ct)
    if _native_dropout_ok(x):  # the vectorised generator of the extension: same mask, far faster
        with _below_autograd():  # casts to ct in the same pass
            return torch.ops.lora_kernels.native_dropout.default(x, dropout_p, seed, ct)
    keep = dropout_mask(seed, tuple(x.shape), dropout_p, device=x.device)
    return x.to(ct) * keep.to(ct) * (1.0 / (1.0 - dropout_p))


def _add_dropped(out: Tensor, t: Tensor, dropout_p: float, seed: Tensor) -> None:
    """out += t ⊙ m / (1 - p), m the mask of t's [M, K] shape."""
    if _native_dropout_ok(t):
        with _below_autograd():
            torch.ops.lora_kernels.native_dropout_add_.default(out, t, dropout_p, seed)
        return
    keep = dropout_mask(seed, tuple(t.shape), dropout_p, device=t.device)
    out.add_(t * keep.to(t.dtype), alpha=1.0 / (1.0 - dropout_p))


def torch_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    ct = _lora_dtype(x, lora_A)
    A = lora_A if lora_A.dtype == ct else lora_A.to(ct)
    S = torch.mm(_x_hat(x, ct, dropout_p, seed), A.t())
    y = torch.nn.functional.linear(x, weight, bias)
    if y.dtype == ct and lora_B.dtype == ct:
        y.addmm_(S, lora_B.t(), alpha=scaling)
    else:
        y.addmm_(S.to(y.dtype), lora_B.to(y.dtype).t(), alpha=scaling)
    return y, S


def torch_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    ct = _lora_dtype(x, lora_A)
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
    with _below_autograd():
        return torch.ops.lora_kernels.native_lora_linear_fwd.default(x, weight, bias, lora_A, lora_B, scaling,
                                                                     dropout_p, seed)


def native_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    with _below_autograd():
        dx, dA, dB = torch.ops.lora_kernels.native_lora_linear_bwd.default(
            dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
    return dx if need_dx else None, dA if need_dA else None, dB if need_dB else None


@functools.lru_cache(maxsize=None)
def _kernels():
    from lora_kernels.kernels import lora_linear as k  # imports triton: only when a Triton backend runs
    return k


def _seed_int(seed: Optional[Tensor]) -> Optional[int]:
    return None if seed is None else int(seed.item())  # a CPU tensor: no device sync


def triton_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gemm_config=None):
    kw = {} if gemm_config is None else {"gemm_config": gemm_config}
    return _kernels().lora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                             _seed_int(seed), **kw)


def triton_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
               gemm_config=None):
    kw = {} if gemm_config is None else {"gemm_config": gemm_config}
    return _kernels().lora_linear_bwd_triton(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, _seed_int(seed),
                                             need_dx, need_dA, need_dB, **kw)


def composite_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _kernels().lora_linear_fwd_composite(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                _seed_int(seed))


def composite_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return _kernels().lora_linear_bwd_composite(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p,
                                                _seed_int(seed), need_dx, need_dA, need_dB)


IMPLS: dict[str, tuple[Callable, Callable]] = {
    "torch": (torch_fwd, torch_bwd),
    "native": (native_fwd, native_bwd),
    "triton": (triton_fwd, triton_bwd),
    "composite": (composite_fwd, composite_bwd),
}


# ----------------------------------------------------------------------------------------------------
# backend=None: measured dispatch (lora_kernels/dispatch.py)
# ----------------------------------------------------------------------------------------------------

def _kernel_dtypes(x: Tensor, lora_A: Tensor) -> bool:
    """Whether the kernel backends (all but "torch") take these dtypes."""
    return x.dtype in _KERNEL_DTYPES and (lora_A.dtype == x.dtype or lora_A.dtype == torch.float32)


def _candidates(phase: int, device: torch.device, x: Tensor, lora_A: Tensor, dropout: bool):
    """(candidates, reference name, default name) for this call's device and dtypes."""
    if not _kernel_dtypes(x, lora_A):
        c = dispatch.Candidate("torch", IMPLS["torch"][phase])
        return [c], "torch", "torch"
    names = []
    if device.type == "cuda":
        names = ["composite"] if HAS_TRITON else ["torch"]
        if NATIVE_CUDA:
            names.append("native")
    else:
        names = ["torch"] + (["native"] if NATIVE is not None else [])
        if HAS_TRITON and TRITON_INTERPRETED and dispatch.tuning_enabled(device):
            names += ["composite", "triton"]  # interpreted: to exercise the machinery in tests, never the default
    # Native CUDA kernels split K with atomics whatever torch's deterministic flag says.
    cands = [dispatch.Candidate(n, IMPLS[n][phase], deterministic=not (n == "native" and device.type == "cuda"))
             for n in names]
    if device.type == "cuda" and HAS_TRITON:
        M = x.shape[0]
        for cfg in _kernels().gemm_configs(M, x.element_size(), dropout and phase == 1) \
                if hasattr(_kernels(), "gemm_configs") else [None]:
            fn = IMPLS["triton"][phase] if cfg is None else functools.partial(IMPLS["triton"][phase], gemm_config=cfg)
            cands.append(dispatch.Candidate("triton" if cfg is None else "triton" + _cfg_name(cfg), fn))
    ref = "composite" if device.type == "cuda" and HAS_TRITON else "torch"
    return cands, ref, default_backend(device.type)


def _cfg_name(cfg) -> str:
    bm, bn, bk, gm, w, s = cfg
    return f"[{bm}x{bn}x{bk} g{gm} w{w} s{s}]"


_FWD_OUT = lambda out: (out[0], out[1])  # noqa: E731
_BWD_OUT = lambda out: tuple(out)  # noqa: E731


def _dispatched(phase: int, args: tuple, x: Tensor, weight: Tensor, bias, lora_A: Tensor, dropout: bool,
                need: tuple = ()) -> Callable:
    """The implementation backend=None runs for this call (phase 0 = fwd, 1 = bwd)."""
    dev_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type  # x.device costs ~0.5 µs
    if dispatch.is_static(dev_type):  # nothing measured and no tuning here: the fixed default
        name = default_backend(dev_type)
        return IMPLS[name if _kernel_dtypes(x, lora_A) else "torch"][phase]
    device = x.device
    cands, ref, default = _candidates(phase, device, x, lora_A, dropout)
    if len(cands) == 1:
        return cands[0].fn
    fields = dict(x=str(x.dtype)[6:], a=str(lora_A.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=weight.shape[1],
                  n=weight.shape[0], r=lora_A.shape[0], drop=int(dropout), bias=int(bias is not None))
    if phase == 1:
        fields["need"] = "".join("1" if n else "0" for n in need)
    c = dispatch.choose("lora_linear", ("fwd", "bwd")[phase], fields, device, cands, ref, default, args,
                        _FWD_OUT if phase == 0 else _BWD_OUT, x.dtype)
    return c.fn


def _run(phase: int, backend, args: tuple, x: Tensor, weight: Tensor, bias, lora_A: Tensor, dropout: bool,
         need: tuple = ()):
    if _any_autocast() and torch.is_autocast_enabled(x.device.type):
        dev = x.device.type
        # The implementations pick their own dtypes: autocast must not recast their inner ops (a registered
        # op is opaque to autocast; the eager path has to say so).
        with torch.autocast(dev, enabled=False):
            return _run(phase, backend, args, x, weight, bias, lora_A, dropout, need)
    if backend is None or backend == "auto":
        fn = _dispatched(phase, args, x, weight, bias, lora_A, dropout, need)
    else:
        fn = IMPLS[backend][phase]
    return fn(*args)


def _run_fwd(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _run(0, backend, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed), x, weight, bias, lora_A,
                seed is not None)


def _run_bwd(backend, dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    return _run(1, backend, (dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB),
                x, weight, None, lora_A, seed is not None, (need_dx, need_dA, need_dB))


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
    s_dtype = torch.float64 if torch.float64 in (x.dtype, lora_A.dtype) else torch.float32
    return x.new_empty(M, weight.shape[0]), x.new_empty(M, lora_A.shape[0], dtype=s_dtype)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                    scaling: float, dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool,
                    need_dB: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    dx, dA, dB = _run_bwd(backend, dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                          need_dx, need_dA, need_dB)
    # Outputs must not alias inputs (custom_op's rule): a pass-through tensor would be x itself.
    return (dx if dx is not None else _empty(x), dA if dA is not None else _empty(lora_A),
            dB if dB is not None else _empty(lora_B))


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB, backend):
    return (torch.empty_like(x) if need_dx else _empty(x),
            torch.empty_like(lora_A) if need_dA else _empty(lora_A),
            torch.empty_like(lora_B) if need_dB else _empty(lora_B))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


def _registered_backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
    if not (need_dx or need_dA or need_dB):
        return (None,) * 9
    dx, dA, dB = lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, seed,
                                 need_dx, need_dA, need_dB, ctx.backend)
    return (dx if need_dx else None, None, None, dA if need_dA else None, dB if need_dB else None,
            None, None, None, None)


lora_linear_fwd.register_autograd(_registered_backward, setup_context=_setup_context)


class _LoRALinearFunction(torch.autograd.Function):
    """The eager path with autograd: the same implementations, no custom_op dispatch (see the module doc).
    The non-tensor arguments travel as one tuple: every argument of apply() costs time."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, opts):
        scaling, dropout_p, seed, backend = opts
        y, S = _run_fwd(backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)
        ctx.opts = (scaling, dropout_p, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
        need_dx, _, _, need_dA, need_dB, _ = ctx.needs_input_grad
        scaling, dropout_p, backend = ctx.opts
        dx, dA, dB = _run_bwd(backend, dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                              need_dx, need_dA, need_dB)
        return dx, None, None, dA, dB, None


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
            on: this op computes no gradient for it (freeze it, as PEFT does).
        bias: [out] or None; frozen like `weight`.
        lora_A: [r, in]; lora_B: [out, r]. Same dtype: x's, or float32 (PEFT's default for adapters).
        scaling: lora_alpha / r (or / sqrt(r) for rsLoRA), read at every call.
        dropout_p: LoRA dropout probability in [0, 1), applied to the LoRA path only when `training`; the
            mask is regenerated from a seed drawn from torch's CPU generator (`lk.dropout_mask`).
        backend: None = measured dispatch (`lora_kernels.dispatch`; untuned: "composite" on CUDA, the
            measured CPU default on CPU), or "torch", "triton", "composite", "native" to force one.

    Returns y: [..., out] in x's dtype. Gradients flow to x, lora_A and lora_B, each in its own dtype.
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    grad = torch.is_grad_enabled()
    if grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        which = "weight" if weight.requires_grad else "bias"
        raise ValueError(f"{which} requires grad, but lora_linear keeps the base layer frozen and computes no "
                         f"gradient for it: call {which}.requires_grad_(False) (as PEFT does), or run under "
                         "torch.no_grad()")
    seed = new_seed() if (training and dropout_p > 0.0) else None
    scaling, dropout_p = float(scaling), float(dropout_p)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling() or _profiler_enabled():
        y = lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend or "auto")[0]
    elif grad and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        y = _LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, (scaling, dropout_p, seed, backend))
    else:
        y = _run_fwd(backend, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
