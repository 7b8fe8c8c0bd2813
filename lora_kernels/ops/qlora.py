"""LoRA over a quantized base (QLoRA): its implementations, registered ops, autograd and public function.

    y = x deq(W0)ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ      x: [..., in], W0: [out, in] quantized, A: [r, in], B: [out, r]

deq(W0) is bitsandbytes' dequantization (bit-exact, `lora_kernels.reference`), to the format's dtype and then
to x's dtype, as bitsandbytes' own matmul computes. The quantized weight is data: a `lora_kernels.quant.QuantWeight`
(a frozen `QuantFormat` plus plain tensors), unpacked into tensors and constants at every op boundary.

Every backend implements the LoRA convention of `ops/plumbing.py` with the quantized weight's tensors in
`weight`'s place and after `rest`:
    fwd(x [M, in], codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
        nested_offset, fmt) -> (y [M, out] in x's dtype, S = x̂ Aᵀ [M, r])
    bwd(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
        nested_offset, fmt, need_dx, need_dA, need_dB) -> (dx, dA, dB)
    with dx = G deq(W0) + (s · G B A) ⊙ m / (1 - p),  dA, dB as `lora_linear`'s.

Backends:
    "torch"   dequantize with PyTorch ops, then `lora_linear`'s "torch" implementation on the dense W0.
    "native"  the C++ kernels (csrc/quant_cpu.cpp), for float32 x: with M <= GEMV_MAX_M a GEMV/GEMM that
              decodes W0 on the fly; above, W0 dequantized a row block at a time into a reused L2-sized
              scratch with the machine's GEMM on each block; dx = G deq(W0) the same way. No dense copy of W0
              either way; the LoRA side by `lora_linear`'s ops. Other dtypes: a vectorised dequantize and
              `lora_linear`'s "native" implementation (the machine's BLAS). Other formats and devices: the
              "torch" dequantize, then the same.
    "composite" (CUDA; the untuned default) the PyTorch dequantize, then `lora_linear`'s composite (cuBLAS +
              the Triton LoRA side).
    "triton"  (CUDA) nf4 / fp4: the fused W4A16 GEMM of kernels/qlora.py (W0 decoded tile by tile in the main
              loop, never a dense copy; the LoRA expand in its epilogue); the backward dequantizes with
              kernels/qlora.py's kernel, then `lora_linear`'s Triton backward (dx = G deq(W0) + the LoRA term).
              int8_row: the PyTorch dequantize, then `lora_linear`'s Triton kernels.
    "bnb"     bitsandbytes' own 4-bit matmul for the base (on CPUs with AVX512-BF16 it runs in bfloat16: relative
              error ~3e-3 against the float32 path) plus our LoRA side; dx through bitsandbytes' dequantize.
              Where bitsandbytes imports it is one more candidate of measured dispatch (`FAMILY.extra_candidates`):
              verified against "torch" and timed under LORA_KERNELS_TUNE=1, never the untuned default.
"""
from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Optional

import torch
from torch import Tensor

from lora_kernels import dispatch, quant
from lora_kernels.backends import NATIVE, check_backend
from lora_kernels.derived_cache import cache_get, cache_put, contents_key
from lora_kernels.dropout import new_seed
from lora_kernels.ops import lora_linear as _lora
from lora_kernels.ops import plumbing
from lora_kernels.ops.plumbing import KERNEL_DTYPES, below_autograd, lora_dtype
from lora_kernels.ops.plumbing import shape_str as _shape
from lora_kernels.quant import QuantFormat, QuantWeight

# Up to this many rows of x, the "native" forward always decodes W0 on the fly (GEMV: every decoded value is
# used M times). Above, the GEMV or the blocked dequantize + GEMM, whichever `gemv_max_m()` measured faster on
# this machine (csrc/quant_cpu.cpp has the figures: MKL's non-Intel path makes the GEMV win up to M = 128 and
# beyond on AMD; on the Intel dev CPU the blocked GEMM won from M = 12).
GEMV_MAX_M = 8
GEMV_CAP_STEPS = (16, 64, 256)  # the row counts gemv_max_m() tries, in order, while the GEMV keeps winning

HAS_NATIVE_QUANT = NATIVE is not None and hasattr(torch.ops.lora_kernels, "native_quant4_linear")


def check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, backend) -> None:
    """Raise a clear error, naming the argument, for inputs no backend can run (before any kernel)."""
    if not isinstance(qweight, QuantWeight):
        raise TypeError(f"qweight must be a lora_kernels.quant.QuantWeight (quant.from_bnb(layer) converts a "
                        f"bitsandbytes layer), got {type(qweight).__name__}")
    quant.check_quant_weight(*qweight)
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    out_f, in_f = qweight.fmt.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must have shape [..., in={in_f}] to match qweight of shape {qweight.fmt.shape}, "
                         f"got {_shape(x)}")
    _lora.check_adapter_shapes(lora_A, lora_B, in_f, out_f)
    dev = x.device
    if qweight.device != dev or lora_A.device != dev or lora_B.device != dev:
        raise ValueError(f"x, qweight, lora_A and lora_B must be on one device, got x:{dev} "
                         f"qweight:{qweight.device} lora_A:{lora_A.device} lora_B:{lora_B.device}")
    if bias is not None:
        _lora.check_bias(bias, x, out_f)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have one dtype")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend is not None and backend not in IMPLS:
        raise ValueError(f"backend must be one of {tuple(IMPLS)} or None, got {backend!r}")
    if backend == "bnb" and not _bnb_available():
        raise ImportError("backend='bnb' needs the `bitsandbytes` package: pip install 'lora_kernels[qlora]'")
    if backend not in (None, "torch", "bnb"):
        check_backend(backend, dev)
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend={backend!r} supports x of dtype {KERNEL_DTYPES}, got {x.dtype}")


@functools.lru_cache(maxsize=None)
def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# The base: y = x deq(W0)ᵀ (+ b) and dx = G deq(W0), per backend
# ----------------------------------------------------------------------------------------------------

def _deq_torch(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt) -> Tensor:
    return quant.dequantize(fmt, codes, absmax, nested_absmax, nested_code, nested_offset, dtype=x_dtype)


def _native_ok(codes: Tensor, fmt: QuantFormat) -> bool:
    """The C++ 4-bit kernels run here: CPU, a 4-bit format whose dequantized dtype is float32."""
    return HAS_NATIVE_QUANT and fmt.is_4bit and codes.is_cpu and fmt.dtype == torch.float32


# The resolved float32 absmax of each double-quantized weight the native backend has run, by id of the owner
# of its uint8 absmax (entries of derived_cache: valid while the four tensors are unchanged; dropped when the
# weight is freed). Resolving is a pass of its own over N·K/64 values on every call (27 µs of a 150 µs decode
# call at 4864 x 896, AMD EPYC, 1 thread); keeping it costs 4 bytes per 64 weights, +12.5% over the 4-bit codes
# -- what bitsandbytes' own CPU eval path keeps too (it un-nests the statistics when it repacks the weight).
_RESOLVED_ABSMAX: dict[int, dict] = {}


def _absmax_native(fmt: QuantFormat, absmax, nested_absmax, nested_code, nested_offset) -> Tensor:
    """`quant.resolve_absmax` in one C++ pass (bit-exact; the PyTorch ops took 0.6 ms for 896 x 4864, the loop
    ~0.03 ms), kept per weight (`_RESOLVED_ABSMAX`)."""
    if not fmt.nested:
        return absmax
    sources = (absmax, nested_absmax, nested_code, nested_offset)
    key = (contents_key(*sources), fmt.nested_blocksize)
    owner = absmax if absmax._base is None else absmax._base
    cache = _RESOLVED_ABSMAX.get(id(owner))
    if cache is not None:
        hit = cache_get(cache, None, key)
        if hit is not None:
            return hit
    else:
        cache = _RESOLVED_ABSMAX[id(owner)] = {}
        weakref.finalize(owner, _RESOLVED_ABSMAX.pop, id(owner), None)
    with below_autograd():
        a = torch.ops.lora_kernels.native_quant4_absmax.default(
            absmax.reshape(-1), nested_absmax.float().reshape(-1), nested_code.float().reshape(-1).contiguous(),
            nested_offset.float().reshape(-1), fmt.nested_blocksize)
    return cache_put(cache, None, key, a, *sources)


def _deq_native(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt) -> Tensor:
    if not _native_ok(codes, fmt):
        return _deq_torch(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt)
    a = _absmax_native(fmt, absmax, nested_absmax, nested_code, nested_offset)
    with below_autograd():
        W = torch.ops.lora_kernels.native_quant4_dequantize.default(codes, a, quant.table(fmt.quant_type, codes.device),
                                                                    fmt.shape[0], fmt.shape[1])
    return W if W.dtype == x_dtype else W.to(x_dtype)


def _bnb_ok(codes: Tensor, fmt: QuantFormat) -> bool:
    """bitsandbytes' own 4-bit kernels are right here. Its 0.50 C++ CPU dequantize misplaces the scales of
    blocks that cross rows (in % 64 != 0; e.g. wrong by up to 2.0 at 40x96): those calls take our dequantize."""
    return fmt.is_4bit and (fmt.shape[1] % fmt.blocksize == 0 or not codes.is_cpu)


def _bnb_base(x, codes, bias, absmax, nested_absmax, nested_code, nested_offset, fmt) -> Tensor:
    """bitsandbytes' own matmul_4bit (GEMV kernel at M = 1 without grad; dequantize + GEMM otherwise)."""
    import bitsandbytes as bnb
    qs = quant.to_bnb_quant_state(QuantWeight(fmt, codes, absmax, nested_absmax, nested_code, nested_offset))
    return bnb.matmul_4bit(x, codes.view(-1, 1).t(), bias=bias, quant_state=qs)


def _deq_bnb(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt) -> Tensor:
    if not _bnb_ok(codes, fmt):
        return _deq_torch(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt)
    import bitsandbytes.functional as bf
    qs = quant.to_bnb_quant_state(QuantWeight(fmt, codes, absmax, nested_absmax, nested_code, nested_offset))
    W = bf.dequantize_4bit(codes, qs)
    return W if W.dtype == x_dtype else W.to(x_dtype)


# ----------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------

def _dense_fwd(deq, inner):
    """fwd on the dequantized W0 through `lora_linear`'s implementation `inner`."""
    def fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
            nested_offset, fmt):
        W = deq(x.dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt)
        return inner(x, W, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return fwd


def _dense_bwd(deq, inner):
    """bwd through `lora_linear`'s implementation `inner`; W0 dequantized only when dx is needed."""
    def bwd(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
            nested_offset, fmt, need_dx, need_dA, need_dB):
        if need_dx:
            W = deq(x.dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt)
        else:  # not read: an [out, in] view of one element
            W = x.new_zeros(()).expand(*fmt.shape)
        return inner(dy, x, W, lora_A, lora_B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
    return bwd


_torch_fwd = _dense_fwd(_deq_torch, _lora.torch_fwd)
_torch_bwd = _dense_bwd(_deq_torch, _lora.torch_bwd)
_native_dense_fwd = _dense_fwd(_deq_native, _lora.native_fwd)


def _native_base(x, codes, bias, absmax, nested_absmax, nested_code, nested_offset, fmt) -> Optional[Tensor]:
    """y = x deq(W0)ᵀ + b by the C++ op (csrc/quant_cpu.cpp: the fused GEMV up to GEMV_MAX_M rows, row blocks of
    W0 dequantized into a reused scratch and multiplied above that: never a dense W0), for float32 x [M, in] and
    bias over a 4-bit format the extension reads; None otherwise."""
    if not (x.dtype == torch.float32 and _native_ok(codes, fmt) and (bias is None or bias.dtype == torch.float32)):
        return None
    a = _absmax_native(fmt, absmax, nested_absmax, nested_code, nested_offset)
    cap = GEMV_MAX_M if x.shape[0] <= GEMV_MAX_M else gemv_max_m()
    with below_autograd():
        return torch.ops.lora_kernels.native_quant4_linear.default(x, codes, a, quant.table(fmt.quant_type, x.device),
                                                                   bias, fmt.shape[0], cap)


def gemv_max_m() -> int:
    """The most rows of x for which the native forward runs its GEMV rather than the blocked dequantize + GEMM:
    LORA_KERNELS_QUANT4_GEMV_MAX_M when set, else measured once per process and thread count (`dispatch.
    fastest_once`: both exact float32, only the summation order differs) on a 512 x 1024 NF4 weight at each of
    GEMV_CAP_STEPS rows while the GEMV keeps winning (~20 ms, once)."""
    env = os.environ.get("LORA_KERNELS_QUANT4_GEMV_MAX_M")
    if env:
        return int(env)
    return _measured_gemv_max_m(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _measured_gemv_max_m(threads: int) -> int:
    cap = GEMV_MAX_M
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (512 * 1024 // 2,), dtype=torch.uint8, generator=g)
    absmax, table = torch.rand(512 * 1024 // 64, generator=g), quant.table("nf4", torch.device("cpu"))
    op = torch.ops.lora_kernels.native_quant4_linear.default
    for m in GEMV_CAP_STEPS:
        x = torch.randn(m, 1024, generator=g)
        options = {"gemv": lambda: op(x, codes, absmax, table, None, 512, m),
                   "blocked": lambda: op(x, codes, absmax, table, None, 512, GEMV_MAX_M)}
        if dispatch.fastest_once(("quant4_gemv_max_m", m, threads), options) != "gemv":
            break
        cap = m
    return cap


def native_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
               nested_offset, fmt):
    y = _native_base(x, codes, bias, absmax, nested_absmax, nested_code, nested_offset, fmt)
    if y is not None:
        return y, _lora.add_lora_(y, x, lora_A, lora_B, scaling, dropout_p, seed)
    if NATIVE is None or x.dtype not in KERNEL_DTYPES or not (lora_A.dtype == x.dtype or lora_A.dtype == torch.float32):
        return _torch_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax,
                          nested_code, nested_offset, fmt)
    return _native_dense_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax,
                             nested_code, nested_offset, fmt)


_native_dense_bwd = _dense_bwd(_deq_native, _lora.native_bwd)


def native_bwd(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
               nested_offset, fmt, need_dx, need_dA, need_dB):
    """dx's base term G deq(W0) by the blocked C++ op (no dense W0) for float32; the LoRA terms as
    `lora_linear`'s "torch" backward computes them (its mm calls and the extension's dropout ops)."""
    if not (need_dx and x.dtype == torch.float32 and dy.dtype == torch.float32 and lora_A.dtype == torch.float32
            and _native_ok(codes, fmt)):
        return _native_dense_bwd(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax,
                                 nested_code, nested_offset, fmt, need_dx, need_dA, need_dB)
    a = _absmax_native(fmt, absmax, nested_absmax, nested_code, nested_offset)
    with below_autograd():
        dx = torch.ops.lora_kernels.native_quant4_linear_dx.default(dy.contiguous(), codes, a,
                                                                    quant.table(fmt.quant_type, x.device),
                                                                    fmt.shape[1])
    dB = torch.mm(dy.t(), S).mul_(scaling) if need_dB else None  # float32 throughout (lora_B has lora_A's dtype)
    dS = torch.mm(dy, lora_B).mul_(scaling)  # [M, r]
    dA = torch.mm(dS.t(), _lora._x_hat(x, torch.float32, dropout_p, seed)) if need_dA else None
    if seed is None:
        dx.addmm_(dS, lora_A)
    else:
        _lora._add_dropped(dx, torch.mm(dS, lora_A), dropout_p, seed)
    return dx, dA, dB


def bnb_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
            nested_offset, fmt):
    if not _bnb_ok(codes, fmt):
        return _torch_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax,
                          nested_code, nested_offset, fmt)
    with torch.no_grad():
        y = _bnb_base(x, codes, bias, absmax, nested_absmax, nested_code, nested_offset, fmt)
    return y, _lora.add_lora_(y, x, lora_A, lora_B, scaling, dropout_p, seed)


bnb_bwd = _dense_bwd(_deq_bnb, _lora.torch_bwd)


def _deq_triton(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt) -> Tensor:
    if not fmt.is_4bit:
        return _deq_torch(x_dtype, codes, absmax, nested_absmax, nested_code, nested_offset, fmt)
    W = plumbing.kernels("qlora").dequantize_triton(
        QuantWeight(fmt, codes, absmax, nested_absmax, nested_code, nested_offset))
    return W if W.dtype == x_dtype else W.to(x_dtype)


_triton_dense_fwd = _dense_fwd(_deq_torch, _lora.triton_fwd)


def triton_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
               nested_offset, fmt):
    """The fused W4A16 forward (kernels/qlora.py) for nf4 / fp4; int8_row through the dense Triton path."""
    if not fmt.is_4bit:
        return _triton_dense_fwd(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax,
                                 nested_code, nested_offset, fmt)
    qw = QuantWeight(fmt, codes, absmax, nested_absmax, nested_code, nested_offset)
    return plumbing.kernels("qlora").qlora_linear_fwd_triton(x, qw, bias, lora_A, lora_B, scaling, dropout_p,
                                                             plumbing.seed_int(seed))


_triton_dense_bwd = _dense_bwd(_deq_triton, _lora.triton_bwd)


def triton_bwd(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax, nested_code,
               nested_offset, fmt, need_dx, need_dA, need_dB):
    """nf4 / fp4: dx = G deq(W0) by the W4A16 GEMM reading W0 transposed (kernels/qlora.py: no dense copy);
    int8_row through the dense Triton path. "composite" (dequantize + cuBLAS) is the other candidate: measured
    dispatch picks between them per shape."""
    if not fmt.is_4bit:
        return _triton_dense_bwd(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax,
                                 nested_code, nested_offset, fmt, need_dx, need_dA, need_dB)
    qw = QuantWeight(fmt, codes, absmax, nested_absmax, nested_code, nested_offset)
    return plumbing.kernels("qlora").qlora_linear_bwd_triton(dy, x, qw, lora_A, lora_B, S, scaling, dropout_p,
                                                             plumbing.seed_int(seed), need_dx, need_dA, need_dB)

# backend -> (fwd, bwd). FAMILY's tables are views of this dict: replacing an entry (as tests do) takes effect.
IMPLS: dict[str, tuple] = {
    "torch": (_torch_fwd, _torch_bwd),
    "native": (native_fwd, native_bwd),
    "bnb": (bnb_fwd, bnb_bwd),
    # CUDA (and the Triton interpreter): dequantize with PyTorch ops, then lora_linear's cuBLAS + Triton LoRA side;
    # "triton": the fused W4A16 GEMM (kernels/qlora.py).
    "composite": (_dense_fwd(_deq_torch, _lora.composite_fwd), _dense_bwd(_deq_torch, _lora.composite_bwd)),
    "triton": (triton_fwd, triton_bwd),
}


# ----------------------------------------------------------------------------------------------------
# The family's declaration for measured dispatch
# ----------------------------------------------------------------------------------------------------

def _key_fields(phase: str, args: tuple) -> dict:
    if phase == "fwd":
        x, bias, lora_A, seed, fmt = args[0], args[2], args[3], args[7], args[12]
    else:
        x, bias, lora_A, seed, fmt = args[1], None, args[3], args[8], args[13]
    fields = dict(x=str(x.dtype)[6:], a=str(lora_A.dtype)[6:], q=fmt.quant_type + ("n" if fmt.nested else ""),
                  qd=str(fmt.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=fmt.shape[1], n=fmt.shape[0],
                  r=lora_A.shape[0], drop=int(seed is not None), bias=int(bias is not None))
    if phase == "bwd":
        fields["need"] = _lora.need_bits(args)
    return fields


def _extra_candidates(device: torch.device) -> list[str]:
    return ["bnb"] if _bnb_available() else []


FAMILY = dispatch.OpFamily(
    name="qlora_linear",
    impls={"fwd": plumbing.PhaseTable(IMPLS, 0), "bwd": plumbing.PhaseTable(IMPLS, 1)},
    x_arg={"fwd": 0, "bwd": 1},
    kernel_dtypes=_lora.kernel_dtypes,
    key_fields=_key_fields,
    outputs=_lora.OUTPUTS,
    extra_candidates=_extra_candidates,
)


@functools.lru_cache(maxsize=256)
def _fmt(quant_type: str, shape: tuple, dtype: torch.dtype, blocksize: int, nested: bool,
         nested_blocksize: int) -> QuantFormat:
    return QuantFormat(quant_type, shape, dtype, blocksize, nested, nested_blocksize)


def _fmt_of(quant_type, shape, dtype, blocksize, nested_absmax, nested_blocksize) -> QuantFormat:
    return _fmt(quant_type, tuple(shape), dtype, blocksize, nested_absmax is not None, nested_blocksize)


# ----------------------------------------------------------------------------------------------------
# Registered ops (x is 2-D): what torch.compile, opcheck and the profiler see. The format travels as its
# fields (QuantFormat.op_args), the nested state as optional tensors.
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd(x: Tensor, codes: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float, seed: Optional[Tensor], absmax: Tensor,
                     nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
                     quant_type: str, shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int,
                     backend: str) -> tuple[Tensor, Tensor]:
    """(y [M, out] in x's dtype, S = x̂ Aᵀ [M, r]). Dropout is active iff `seed` is given."""
    fmt = _fmt_of(quant_type, shape, dtype, blocksize, nested_absmax, nested_blocksize)
    return plumbing.run(FAMILY, "fwd", backend, (x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax,
                                                 nested_absmax, nested_code, nested_offset, fmt))


@qlora_linear_fwd.register_fake
def _(x, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax, nested_absmax, nested_code, nested_offset,
      quant_type, shape, dtype, blocksize, nested_blocksize, backend):
    M = x.shape[0]
    return x.new_empty(M, shape[0]), x.new_empty(M, lora_A.shape[0], dtype=lora_dtype(x.dtype, lora_A.dtype))


@torch.library.custom_op("lora_kernels::qlora_linear_bwd", mutates_args=())
def qlora_linear_bwd(dy: Tensor, x: Tensor, codes: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                     scaling: float, dropout_p: float, seed: Optional[Tensor], absmax: Tensor,
                     nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
                     quant_type: str, shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int,
                     need_dx: bool, need_dA: bool, need_dB: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    fmt = _fmt_of(quant_type, shape, dtype, blocksize, nested_absmax, nested_blocksize)
    dx, dA, dB = plumbing.run(FAMILY, "bwd", backend, (dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed,
                                                       absmax, nested_absmax, nested_code, nested_offset, fmt,
                                                       need_dx, need_dA, need_dB))
    empty = plumbing.empty_if_none
    return empty(dx, x), empty(dA, lora_A), empty(dB, lora_B)


@qlora_linear_bwd.register_fake
def _(dy, x, codes, lora_A, lora_B, S, scaling, dropout_p, seed, absmax, nested_absmax, nested_code, nested_offset,
      quant_type, shape, dtype, blocksize, nested_blocksize, need_dx, need_dA, need_dB, backend):
    return _lora.fake_grads(x, lora_A, lora_B, need_dx, need_dA, need_dB)


plumbing.register_lora_autograd(qlora_linear_fwd, qlora_linear_bwd)


# ----------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------

def qlora_linear(x: Tensor, qweight: QuantWeight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float, dropout_p: float = 0.0, training: bool = False,
                 backend: Optional[str] = None) -> Tensor:
    """Fused LoRA linear over a quantized base: ``y = x deq(W0)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: [..., in] activations.
        qweight: the frozen base W0 [out, in] as a `lora_kernels.quant.QuantWeight` ("nf4" / "fp4" 4-bit with
            block size 64, nested absmax or not; "int8_row"): `quant.from_bnb(layer)` for a bitsandbytes layer.
        bias: [out] or None, frozen.
        lora_A: [r, in]; lora_B: [out, r], one dtype (x's, or float32).
        scaling, dropout_p, training: as `lora_linear`.
        backend: None = measured dispatch, or "torch", "native", "bnb" (bitsandbytes' own base matmul).

    Returns y: [..., out] in x's dtype. Gradients flow to x, lora_A and lora_B.
    """
    check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, backend)
    if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
        raise ValueError("bias requires grad, but qlora_linear keeps the base layer frozen and computes no gradient "
                         "for it: call bias.requires_grad_(False) (as PEFT does), or run under torch.no_grad()")
    seed = new_seed() if (training and dropout_p > 0.0) else None
    scaling, dropout_p = float(scaling), float(dropout_p)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    fmt = qweight.fmt
    codes, absmax, n_absmax, n_code, n_offset = qweight.tensors()
    if plumbing.traced():
        y = qlora_linear_fwd(x2, codes, bias, lora_A, lora_B, scaling, dropout_p, plumbing.seed_tensor(seed),
                             absmax, n_absmax, n_code, n_offset, *fmt.op_args(), backend or "auto")[0]
    elif torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        y = plumbing.eager_grad(FAMILY, backend, x2, codes, bias, lora_A, lora_B,
                                (scaling, dropout_p, seed, absmax, n_absmax, n_code, n_offset, fmt))
    else:
        y = plumbing.run(FAMILY, "fwd", backend, (x2, codes, bias, lora_A, lora_B, scaling, dropout_p, seed, absmax,
                                                  n_absmax, n_code, n_offset, fmt))[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], fmt.shape[0])


# ----------------------------------------------------------------------------------------------------
# The base product alone, for ops that add their own LoRA term (the multi-adapter layer over a quantized
# base, ops/multi_lora.py): the same dequantize / fused base each backend above runs, nothing new.
# ----------------------------------------------------------------------------------------------------

# backend -> the dequantize of its dense forward and of its backward's dx (as in IMPLS above).
_BASE_DEQ = {"torch": _deq_torch, "native": _deq_native, "bnb": _deq_bnb, "composite": _deq_torch,
             "triton": _deq_triton}


def dequantize_base(qweight: QuantWeight, dtype: torch.dtype, backend: str) -> Tensor:
    """deq(W0) [out, in] in `dtype` by backend `backend`'s dequantize ("torch", "native", "composite", "triton",
    "bnb"): bitsandbytes' dequantization to fmt.dtype, then cast to `dtype`; bit-exact with
    `quant.dequantize` (the reference math) for every backend. No autograd (W0 is frozen)."""
    if backend not in _BASE_DEQ:
        raise ValueError(f"backend must be one of {tuple(_BASE_DEQ)}, got {backend!r}")
    return _BASE_DEQ[backend](dtype, *qweight.tensors(), qweight.fmt)


def fused_base_linear(x: Tensor, qweight: QuantWeight, bias: Optional[Tensor], backend: str) -> Optional[Tensor]:
    """y = x deq(W0)ᵀ + b [M, out] in x's dtype without a dense copy of W0, where backend `backend`'s forward
    has such a kernel for this call: "native" -- the C++ op decoding W0 on the fly (`_native_base`: float32 x
    [M, in], float32 bias or none, a 4-bit format on CPU). None otherwise: the caller dequantizes
    (`dequantize_base`) and runs a dense GEMM, as the dense paths above do. "bnb"'s matmul_4bit is left out: on
    CPU it may run in bfloat16 (see the module docstring), and measured dispatch only takes it after verifying it
    per shape. No autograd."""
    if backend != "native" or x.dim() != 2:
        return None
    return _native_base(x, qweight.codes, bias, *qweight.tensors()[1:], qweight.fmt)
