"""What every op family needs around its math, written once.

An op family (`ops/lora_linear.py`, `ops/multi_lora.py`, ...) is a kernels file plus an ops file that declares
its implementations per backend (a `dispatch.OpFamily`), its registered ops and its public function. Everything
between them lives here:

* `run(family, phase, backend, args)`: the autocast-off runner around one call into `dispatch.select`
  (backend=None / "auto" = measured dispatch; an explicit backend runs as named).
* `lora_function` / `eager_grad`: the eager `torch.autograd.Function` of every LoRA-shaped training op, and
  `register_lora_autograd`: the same backward for the registered (torch.compile / profiler) op. Both rely on
  one argument convention, shared by the families::

      fwd(x, weight, bias, A, B, *rest)                                -> (y, S)
      bwd(dy, x, weight, A, B, S, *rest, need_dx, need_dA, need_dB)    -> (dx, dA, dB)

  A and B are the family's adapter weights (one tensor each, or lists of slice stacks); `rest` is what the
  forward and backward both take (scaling, dropout, seed, ...). The backward saves x, S, the weights and `rest`:
  never x̂ or the dropout mask.
* `traced()`: the switch between the registered ops and the eager path; `check_frozen_base`: the frozen-base error; `kernels`: the
  lazy import of a kernels module (Triton is imported only when a Triton backend runs); `native_dropout_ok`;
  the dtype helpers and the aliases of torch internals the eager paths use.

Why an eager path at all: going through a `torch.library.custom_op` costs ~80 µs of Python dispatch per call
(torch 2.13, CPU), more than the whole LoRA math at decode sizes. The registered ops stay the way in for
torch.compile, opcheck and the profiler (graphs and traces name them).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lora_kernels import dispatch
from lora_kernels.backends import NATIVE, NATIVE_CUDA

# The dtypes the kernel backends (every backend but "torch") take for activations.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The native ops carry a Python autograd registration (ops/native.py) that costs ~15 µs per call even without
# grad (measured, torch 2.13 CPU). Our callers handle autograd themselves, so they call below the autograd keys.
below_autograd = torch._C._AutoDispatchBelowADInplaceOrView
any_autocast = torch._C._is_any_autocast_enabled
profiler_enabled = torch._C._autograd._profiler_enabled

def shape_str(t) -> str:
    """'[2, 3]' for a tensor, the type's name for anything else (for error messages)."""
    if not isinstance(t, Tensor):
        return type(t).__name__
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def traced() -> bool:
    """torch.compile tracing or a profiler run: go through the registered ops."""
    return torch.compiler.is_compiling() or profiler_enabled()


def check_frozen_base(op: str, weight: Tensor, bias: Optional[Tensor]) -> None:
    """The base layer must be frozen while autograd is on: the ops compute no gradient for it."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        which = "weight" if weight.requires_grad else "bias"
        raise ValueError(f"{which} requires grad, but {op} keeps the base layer frozen and computes no gradient "
                         f"for it: call {which}.requires_grad_(False) (as PEFT does), or run under torch.no_grad()")


@functools.lru_cache(maxsize=None)
def kernels(family: str):
    """`lora_kernels.kernels.<family>`, imported on first use (it imports triton)."""
    return importlib.import_module(f"lora_kernels.kernels.{family}")


def native_dropout_ok(t: Tensor) -> bool:
    """Whether the extension's vectorised dropout generator runs on t's device (same mask, far faster)."""
    return NATIVE is not None and (t.device.type == "cpu" or (t.device.type == "cuda" and NATIVE_CUDA))


_LORA_DTYPE: dict = {}


def lora_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The LoRA path's compute dtype: promote(a, b, float32) (a, b: x's and the adapter's dtypes)."""
    key = (a, b)
    dt = _LORA_DTYPE.get(key)
    if dt is None:
        dt = _LORA_DTYPE[key] = torch.promote_types(torch.promote_types(a, b), torch.float32)
    return dt


def s_dtype(x: Tensor, a: Tensor) -> torch.dtype:
    """S's dtype in the registered ops' fake kernels: float32, float64 when x or A is."""
    return torch.float64 if torch.float64 in (x.dtype, a.dtype) else torch.float32


def seed_int(seed) -> Optional[int]:
    """A seed as a host int (a CPU tensor's read is no device sync)."""
    if seed is None or isinstance(seed, int):
        return seed
    return int(seed.item())


class PhaseTable(dict):
    """{backend: fn} of one phase of a family whose implementations are kept as {backend: (fwd, bwd)}: a view
    that reads the table at every lookup, so replacing an entry (as tests do) takes effect."""

    def __init__(self, impls: dict, phase: int):
        super().__init__()
        self.impls, self.phase = impls, phase

    def __getitem__(self, name):
        return self.impls[name][self.phase]

    def __contains__(self, name):
        return name in self.impls


# ----------------------------------------------------------------------------------------------------
# Running one phase
# ----------------------------------------------------------------------------------------------------

def run(family: dispatch.OpFamily, phase: str, backend: Optional[str], args: tuple):
    """`family`'s implementation of `phase` for `backend` (None / "auto": measured dispatch) on `args`.

    Autocast is off inside: the implementations pick their own dtypes, and autocast must not recast their
    inner ops (a registered op is opaque to autocast; the eager path has to say so)."""
    if any_autocast():
        dev = args[family.x_arg[phase]].device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return dispatch.select(family, phase, backend, args)(*args)
    return dispatch.select(family, phase, backend, args)(*args)


# ----------------------------------------------------------------------------------------------------
# Autograd, eager and registered, for the LoRA argument convention (module docstring)
# ----------------------------------------------------------------------------------------------------

def _grads(g, need):
    """A gradient (or list of per-stack gradients) for an input whose needs_input_grad is `need` (a bool, or a
    list of bools for a list input)."""
    if isinstance(need, (list, tuple)):
        return [t if n else None for t, n in zip(g, need)] if g else [None] * len(need)
    return g if need else None


def lora_function(family: dispatch.OpFamily) -> type:
    """The eager path with autograd for `family`: a torch.autograd.Function over its implementations, no
    custom_op dispatch (made once per family, see `eager_grad`).

    apply(x, weight, bias, opts, A..., B...), opts = (backend, *rest): the adapter weights come last as separate
    tensors (autograd.Function differentiates tensors, not lists): one A and one B, or NS A stacks then NS B
    stacks when the family takes lists (`family.stacked`). Every argument of apply() costs time (~0.5 µs), so
    the non-differentiable ones travel as the one tuple `opts`.

    An unstacked family may take further differentiable inputs after B (DoRA's magnitude and lora_B's bias; a
    None entry is allowed): apply(x, weight, bias, opts, A, B, *extra). Its implementations then take them after
    `rest`; its backward also takes their need flags after need_dB and returns their gradients after dB:
        fwd(x, weight, bias, A, B, *rest, *extra) -> (y, S)
        bwd(dy, x, weight, A, B, S, *rest, *extra, need_dx, need_dA, need_dB, *need_extra) -> (dx, dA, dB, *d_extra)
    S may also be a tuple of tensors (all the backward needs of the forward); the backward gets that tuple."""
    stacked = family.stacked

    class LoRAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, opts, *ab):
            if stacked:
                ns = len(ab) // 2
                A, B, extra = list(ab[:ns]), list(ab[ns:]), ()
            else:
                A, B, *extra = ab
            rest = opts[1:]
            y, S = run(family, "fwd", opts[0], (x, weight, bias, A, B, *rest, *extra))
            ctx.num_S = len(S) if type(S) is tuple else 0
            # rest's own tensors (the seed, scalings, ...) go through save_for_backward too, so autograd's
            # saved-tensor hooks see everything the backward keeps; the backward reads them from ctx.opts.
            ctx.save_for_backward(x, weight, *(S if ctx.num_S else (S,)), *ab,
                                  *[v for v in rest if isinstance(v, Tensor)])
            ctx.opts, ctx.num_ab = opts, len(ab)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, weight, *ab = ctx.saved_tensors
            k, opts, needs = ctx.num_S, ctx.opts, ctx.needs_input_grad
            S, ab = (tuple(ab[:k]), ab[k:]) if k else (ab[0], ab[1:])
            if stacked:
                ns = ctx.num_ab // 2
                A, B = ab[:ns], ab[ns:2 * ns]
                need_A, need_B = needs[4:4 + ns], needs[4 + ns:]
                dx, dA, dB = run(family, "bwd", opts[0], (dy, x, weight, A, B, S, *opts[1:], needs[0],
                                                           any(need_A), any(need_B)))
                return (dx, None, None, None, *_grads(dA, need_A), *_grads(dB, need_B))
            A, B, *extra = ab[:ctx.num_ab]
            need_extra = needs[6:]
            dx, dA, dB, *d_extra = run(family, "bwd", opts[0], (dy, x, weight, A, B, S, *opts[1:], *extra, needs[0],
                                                                 needs[4], needs[5], *need_extra))
            return (dx, None, None, None, _grads(dA, needs[4]), _grads(dB, needs[5]),
                    *[g if n else None for g, n in zip(d_extra, need_extra)])

    LoRAFunction.__name__ = LoRAFunction.__qualname__ = "LoRAFunction"
    return LoRAFunction


_FUNCTIONS: dict = {}


def eager_grad(family: dispatch.OpFamily, backend: Optional[str], x: Tensor, weight: Tensor, bias, A, B,
               rest: tuple, extra: tuple = ()) -> Tensor:
    """y of the LoRA-convention op through the family's `lora_function` (A, B: tensors, or lists when
    `family.stacked`; `extra`: an unstacked family's further differentiable inputs, see `lora_function`)."""
    fn = _FUNCTIONS.get(family.name)
    if fn is None:
        fn = _FUNCTIONS[family.name] = lora_function(family)
    if family.stacked:
        return fn.apply(x, weight, bias, (backend, *rest), *A, *B)
    return fn.apply(x, weight, bias, (backend, *rest), A, B, *extra)


def _flatten_saved(values: Sequence) -> tuple[list, list]:
    """(tensors for save_for_backward, the layout that rebuilds `values` from them): tensors and lists of
    tensors are saved, everything else is kept as is."""
    tensors, layout = [], []
    for v in values:
        if isinstance(v, Tensor):
            layout.append((0, len(tensors)))
            tensors.append(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(t, Tensor) for t in v):
            layout.append((1, len(tensors), len(v)))
            tensors.extend(v)
        else:
            layout.append((2, v))
    return tensors, layout


def _unflatten_saved(tensors: Sequence[Tensor], layout: list) -> list:
    out = []
    for entry in layout:
        if entry[0] == 0:
            out.append(tensors[entry[1]])
        elif entry[0] == 1:
            out.append(list(tensors[entry[1]:entry[1] + entry[2]]))
        else:
            out.append(entry[1])
    return out


def register_lora_autograd(fwd_op, bwd_op, extra: tuple[int, ...] = ()) -> None:
    """The autograd formula of a registered LoRA-convention forward op:
    fwd_op(x, weight, bias, A, B, *rest, backend) -> (y, S), differentiated by
    bwd_op(dy, x, weight, A, B, S, *rest, need_dx, need_dA, need_dB, backend) -> (dx, dA, dB), where a gradient
    that is not needed comes back empty (an empty tensor or list: custom ops cannot return None).

    fwd_op may return several tensors after y (y, S1, S2, ...): all are saved and passed to bwd_op where S goes.
    `extra`: the positions in fwd_op's inputs of further differentiable tensors (DoRA's magnitude); bwd_op then
    takes their need flags after need_dB and returns their gradients after dB."""

    def setup_context(ctx, inputs, output):
        x, weight, _bias, A, B, *rest = inputs
        tensors, ctx.layout = _flatten_saved((x, weight, A, B, *output[1:], *rest))
        ctx.save_for_backward(*tensors)
        ctx.num_inputs, ctx.num_S = len(inputs), len(output) - 1

    def backward(ctx, dy, *_dS):
        x, weight, A, B, *rest = _unflatten_saved(ctx.saved_tensors, ctx.layout)
        S, rest = rest[:ctx.num_S], rest[ctx.num_S:]
        needs = ctx.needs_input_grad
        need_dx, need_A, need_B = needs[0], needs[3], needs[4]
        need_extra = [needs[i] for i in extra]
        any_A = any(need_A) if isinstance(need_A, (list, tuple)) else need_A
        any_B = any(need_B) if isinstance(need_B, (list, tuple)) else need_B
        dx = dA = dB = None
        d_extra = [None] * len(extra)
        if need_dx or any_A or any_B or any(need_extra):
            dx, dA, dB, *d_extra = bwd_op(dy, x, weight, A, B, *S, *rest[:-1], need_dx, any_A, any_B, *need_extra,
                                          rest[-1])
        grads = [dx if need_dx else None, None, None, _grads(dA, need_A), _grads(dB, need_B),
                 *(None,) * (ctx.num_inputs - 5)]
        for i, g, n in zip(extra, d_extra, need_extra):
            grads[i] = g if n else None
        return tuple(grads)

    fwd_op.register_autograd(backward, setup_context=setup_context)


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A not-needed gradient as a registered op returns it: an empty tensor (outputs must not alias inputs,
    and custom ops cannot return None)."""
    return t if t is not None else like.new_empty(0)


def seed_tensor(seed) -> Optional[Tensor]:
    """A seed as the registered and C++ ops take it: a [1] int64 CPU tensor (a host int is wrapped)."""
    if seed is None or isinstance(seed, Tensor):
        return seed
    return torch.tensor([seed], dtype=torch.int64)
