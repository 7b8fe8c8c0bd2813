"""Quantized base weights as data: a frozen description plus plain tensors, and converters from bitsandbytes.

A quantized W0 [out, in] travels through the ops as `QuantWeight(fmt, codes, absmax, nested_absmax, nested_code,
nested_offset)`: a hashable `QuantFormat` (what the bytes mean) and the tensors bitsandbytes stores, unchanged
(no copy):

    "nf4" / "fp4"  codes uint8 [⌈out·in/2⌉] (two 4-bit codes a byte, high nibble first, over the flattened
                   weight: blocks of 64 cross rows when in % 64 ≠ 0); absmax float32 [⌈out·in/64⌉], or with
                   nested (double) quantization uint8 [⌈out·in/64⌉] + nested_absmax float32 [⌈nb/256⌉] +
                   nested_code float32 [256] + nested_offset float32 [1]
    "int8_row"     codes int8 [out, in] (bitsandbytes' Linear8bitLt `CB`); absmax float32 [out] (its `SCB`)

The math of every format is `lora_kernels.reference` (dequantize_4bit / dequantize_absmax / dequantize_int8_row).
The registered ops take the tensors and `QuantFormat.op_args()` (str / int / dtype fields), so nothing but plain
tensors and constants crosses an op boundary or a torch.compile graph. The nested offset is a tensor, not a
field: reading it into a Python float would be a device sync per call (and a graph break).

bitsandbytes objects (`Params4bit` + `QuantState`, `Int8Params`, `Linear4bit`, `Linear8bitLt`) are converted
here, at the edge (`from_bnb`); bitsandbytes is imported only when one is handed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lora_kernels import reference

QUANT_TYPES = ("nf4", "fp4", "int8_row")
BLOCKSIZE = 64           # the 4-bit block size the ops take (bitsandbytes' default, and what QLoRA uses)
NESTED_BLOCKSIZE = 256   # bitsandbytes' block size for the nested absmax
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantFormat:
    """What the bytes of a quantized weight mean (hashable, a compile-time constant).

    quant_type: "nf4", "fp4" or "int8_row"; shape: (out, in); dtype: the dtype bitsandbytes dequantizes to
    (its QuantState.dtype; the op then casts to x's dtype, as bitsandbytes' matmul does); blocksize: 4-bit
    block size (64); nested: absmax is itself quantized; nested_blocksize: its block size (256)."""
    quant_type: str
    shape: tuple
    dtype: torch.dtype = torch.float32
    blocksize: int = BLOCKSIZE
    nested: bool = False
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def is_4bit(self) -> bool:
        return self.quant_type != "int8_row"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def op_args(self) -> tuple:
        """(quant_type, [out, in], dtype, blocksize, nested_blocksize): the registered ops' static arguments
        (nested = whether nested_absmax is given)."""
        return self.quant_type, list(self.shape), self.dtype, self.blocksize, self.nested_blocksize


class QuantWeight(NamedTuple):
    """A quantized W0: its description and its plain tensors (see the module docstring)."""
    fmt: QuantFormat
    codes: Tensor
    absmax: Tensor
    nested_absmax: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    nested_offset: Optional[Tensor] = None

    @property
    def shape(self) -> tuple:
        return self.fmt.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> tuple:
        """(codes, absmax, nested_absmax, nested_code, nested_offset): what the ops take after x."""
        return self.codes, self.absmax, self.nested_absmax, self.nested_code, self.nested_offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """W0 [out, in] in `dtype` (default: fmt.dtype), bit-exact with bitsandbytes (reference math)."""
        return dequantize(self.fmt, *self.tensors(), dtype=dtype)


def _shape_str(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]" if isinstance(t, Tensor) else type(t).__name__


def check_quant_weight(fmt: QuantFormat, codes, absmax, nested_absmax=None, nested_code=None,
                       nested_offset=None, name: str = "qweight") -> None:
    """Raise a clear error, naming the argument, for a quantized weight no kernel can read."""
    if fmt.quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: unknown quant_type {fmt.quant_type!r}; supported: {QUANT_TYPES}")
    if (not isinstance(fmt.shape, tuple) or len(fmt.shape) != 2
            or not all(isinstance(d, int) and d >= 1 for d in fmt.shape)):
        raise ValueError(f"{name}: shape must be (out, in) with positive ints, got {fmt.shape!r}")
    if fmt.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of {FLOAT_DTYPES}, got {fmt.dtype}")
    for what, t in (("codes", codes), ("absmax", absmax)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}.{what} must be a torch.Tensor, got {type(t).__name__}")
    out_f, in_f = fmt.shape
    if not fmt.is_4bit:
        if codes.dtype != torch.int8 or tuple(codes.shape) != (out_f, in_f):
            raise ValueError(f"{name}.codes must be int8 [out={out_f}, in={in_f}] for int8_row, got "
                             f"{codes.dtype} {_shape_str(codes)}")
        if absmax.dtype != torch.float32 or tuple(absmax.shape) != (out_f,):
            raise ValueError(f"{name}.absmax (row scales) must be float32 [out={out_f}], got "
                             f"{absmax.dtype} {_shape_str(absmax)}")
        if nested_absmax is not None or fmt.nested:
            raise ValueError(f"{name}: int8_row has no nested absmax")
    else:
        if fmt.blocksize != BLOCKSIZE:
            raise ValueError(f"{name}: blocksize must be {BLOCKSIZE} for the 4-bit kernels, got {fmt.blocksize} "
                             "(quantize with bitsandbytes' default blocksize=64)")
        n_bytes = -(-fmt.numel // 2)
        if codes.dtype != torch.uint8 or codes.numel() != n_bytes:
            raise ValueError(f"{name}.codes must be uint8 with ⌈out·in/2⌉ = {n_bytes} elements for shape "
                             f"{fmt.shape}, got {codes.dtype} {_shape_str(codes)}")
        nb = fmt.num_blocks
        want = torch.uint8 if fmt.nested else torch.float32
        if absmax.dtype != want or absmax.numel() != nb:
            raise ValueError(f"{name}.absmax must be {want} with ⌈out·in/{fmt.blocksize}⌉ = {nb} elements"
                             f"{' (nested)' if fmt.nested else ''}, got {absmax.dtype} {_shape_str(absmax)}")
        if fmt.nested:
            if fmt.nested_blocksize < 1:
                raise ValueError(f"{name}: nested_blocksize must be positive, got {fmt.nested_blocksize}")
            nb2 = -(-nb // fmt.nested_blocksize)
            if (not isinstance(nested_absmax, Tensor) or nested_absmax.dtype != torch.float32
                    or nested_absmax.numel() != nb2):
                raise ValueError(f"{name}.nested_absmax must be float32 with ⌈{nb}/{fmt.nested_blocksize}⌉ = "
                                 f"{nb2} elements, got {_shape_str(nested_absmax)}")
            if not isinstance(nested_code, Tensor) or nested_code.numel() != 256 or not nested_code.is_floating_point():
                raise ValueError(f"{name}.nested_code must be a float tensor of 256 entries, got "
                                 f"{_shape_str(nested_code)}")
            if not isinstance(nested_offset, Tensor) or nested_offset.numel() != 1:
                raise ValueError(f"{name}.nested_offset must be a one-element tensor, got {_shape_str(nested_offset)}")
        elif nested_absmax is not None or nested_code is not None:
            raise ValueError(f"{name}: nested_absmax / nested_code given but the format is not nested")
    dev = codes.device
    for what, t in (("absmax", absmax), ("nested_absmax", nested_absmax), ("nested_code", nested_code),
                    ("nested_offset", nested_offset)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name}.{what} must be on the codes' device {dev}, got {t.device}")


def resolve_absmax(fmt: QuantFormat, absmax: Tensor, nested_absmax, nested_code, nested_offset) -> Tensor:
    """The float32 absmax [nb] (the nested form dequantized, bit-exact with bitsandbytes)."""
    if not fmt.nested:
        return absmax
    return reference.dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset, fmt.nested_blocksize)


_TABLES: dict = {}


def table(quant_type: str, device: torch.device) -> Tensor:
    """The [16] float32 value table of a 4-bit format on `device` (built once per device)."""
    key = (quant_type, device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = reference.quant_table(quant_type, device)
    return t


def dequantize(fmt: QuantFormat, codes, absmax, nested_absmax=None, nested_code=None, nested_offset=None,
               dtype: Optional[torch.dtype] = None) -> Tensor:
    """W0 [out, in] in `dtype` (default fmt.dtype): dequantized to fmt.dtype, bit-exact with bitsandbytes, then
    cast (as bitsandbytes' matmul casts to the activations' dtype). PyTorch ops only (any device)."""
    if fmt.is_4bit:
        a = resolve_absmax(fmt, absmax, nested_absmax, nested_code, nested_offset)
        n, bs = fmt.numel, fmt.blocksize
        q = codes.reshape(-1)
        vals = table(fmt.quant_type, codes.device)[torch.stack([q >> 4, q & 15], dim=1).reshape(-1).long()]
        full = (n // bs) * bs
        if full == n and vals.numel() == n:
            W = (vals.view(-1, bs) * a.view(-1, 1)).view(fmt.shape)
        else:  # a last partial block, or an odd n (one padding nibble)
            W = torch.empty(n, dtype=torch.float32, device=codes.device)
            W[:full].view(-1, bs).copy_(vals[:full].view(-1, bs) * a[:full // bs].view(-1, 1))
            if full < n:
                torch.mul(vals[full:n], a[full // bs], out=W[full:])
            W = W.view(fmt.shape)
        W = W if W.dtype == fmt.dtype else W.to(fmt.dtype)
    else:
        W = reference.dequantize_int8_row(codes, absmax, fmt.dtype)
    return W if dtype is None or W.dtype == dtype else W.to(dtype)


# ----------------------------------------------------------------------------------------------------
# From bitsandbytes, at the edge
# ----------------------------------------------------------------------------------------------------

def bnb_kind(obj) -> str:
    """"4bit" / "8bit" for a bitsandbytes Linear4bit / Linear8bitLt layer or its weight, "" otherwise. By
    class name: bitsandbytes need not be importable to ask."""
    names = {c.__name__ for c in type(obj).__mro__}
    if names & {"Linear4bit", "Params4bit"}:
        return "4bit"
    if names & {"Linear8bitLt", "Int8Params"}:
        return "8bit"
    return ""


def _require_bnb():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("a bitsandbytes quantized weight was given, and reading it needs the `bitsandbytes` "
                          "package: pip install 'lora_kernels[qlora]'") from e


def from_bnb(obj, state=None, check: bool = True) -> QuantWeight:
    """The `QuantWeight` of a bitsandbytes layer (Linear4bit / Linear8bitLt) or weight (Params4bit with its
    quant_state; Int8Params, with the layer's `state` when the layer moved SCB there). Shares the tensors.

    Raises a clear error for a layer that is not quantized (yet), a non-default block size or code table.
    check=False skips the validation of the tensors and of the code table (a traced call: no data reads)."""
    kind = bnb_kind(obj)
    if not kind:
        raise TypeError(f"expected a bitsandbytes Linear4bit / Linear8bitLt layer or its weight, got "
                        f"{type(obj).__name__}")
    _require_bnb()
    is_layer = isinstance(obj, torch.nn.Module)
    weight = obj.weight if is_layer else obj
    if kind == "4bit":
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("the 4-bit weight is not quantized yet (no quant_state): move the layer to its "
                             "device (e.g. .to('cpu') / .cuda()) first, as bitsandbytes quantizes there")
        if bnb_repacked(weight):
            raise ValueError("bitsandbytes repacked this 4-bit weight for its CPU bfloat16 kernel (the Linear4bit "
                             "ran in eval mode on a CPU with AVX512-BF16): its bytes are no longer the standard "
                             "layout lora_kernels reads; do not run the bitsandbytes layer itself in eval mode")
        fmt = QuantFormat(quant_type=qs.quant_type, shape=tuple(int(d) for d in qs.shape), dtype=qs.dtype,
                          blocksize=int(qs.blocksize), nested=bool(qs.nested),
                          nested_blocksize=int(qs.state2.blocksize) if qs.nested else NESTED_BLOCKSIZE)
        codes = weight.data.reshape(-1)
        if codes.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes
            codes = codes.view(torch.uint8)
        if check and qs.code is not None and fmt.quant_type in ("nf4", "fp4"):
            want = table(fmt.quant_type, qs.code.device)
            if qs.code.numel() != 16 or not torch.equal(qs.code.float(), want):
                raise ValueError(f"quant_state.code is not bitsandbytes' standard {fmt.quant_type} table")
        if qs.nested:
            s2 = qs.state2
            offset = qs.offset if isinstance(qs.offset, Tensor) else torch.tensor(float(qs.offset))
            qw = QuantWeight(fmt, codes, qs.absmax, s2.absmax, s2.code, offset.reshape(1))
        else:
            qw = QuantWeight(fmt, codes, qs.absmax)
    else:
        CB = weight.data
        if CB.dtype != torch.int8:
            raise ValueError("the 8-bit weight is not quantized (has_fp16_weights=True, or not moved to its "
                             "device yet): only Linear8bitLt with has_fp16_weights=False is supported")
        if state is None and is_layer:
            state = getattr(obj, "state", None)
        SCB = getattr(weight, "SCB", None)
        if SCB is None and state is not None:
            SCB = state.SCB
        if SCB is None:
            raise ValueError("the 8-bit weight has no row scales (SCB) on the weight or the layer's state")
        fmt = QuantFormat(quant_type="int8_row", shape=tuple(CB.shape), dtype=torch.float32)
        qw = QuantWeight(fmt, CB, SCB)
    if check:
        check_quant_weight(*qw)
    return qw


def bnb_repacked(obj) -> bool:
    """Whether bitsandbytes has repacked a 4-bit weight (or a layer's) in place for its CPU bf16 kernel: its
    eval-mode forward does so on CPUs with AVX512-BF16 (`packing_format_for_cpu`), leaving another byte layout."""
    weight = obj._parameters["weight"] if isinstance(obj, torch.nn.Module) else obj
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _bnb_key(layer) -> tuple:
    """What identifies a bitsandbytes layer's quantized weight: the weight object, its storage, its quant state
    and row scales (PEFT's merge / unmerge and `.to()` replace one of them)."""
    w = layer._parameters["weight"]
    state = layer.__dict__.get("state")
    return (id(w), w.data_ptr(), id(getattr(w, "quant_state", None)), id(getattr(w, "SCB", None)),
            id(getattr(state, "SCB", None)))


def cached_from_bnb(owner: dict, attr: str, layer) -> QuantWeight:
    """`from_bnb(layer)`, cached in `owner[attr]` (an instance __dict__) until the layer's weight changes
    (`_bnb_key`). While torch.compile traces, converted at every call without the checks (no data reads)."""
    if torch.compiler.is_compiling():
        return from_bnb(layer, check=False)
    key = _bnb_key(layer)
    hit = owner.get(attr)
    if hit is not None and hit[0] == key:
        return hit[1]
    qw = from_bnb(layer)
    owner[attr] = (key, qw)
    return qw


def to_bnb_quant_state(qw: QuantWeight):
    """A bitsandbytes QuantState for a 4-bit `QuantWeight` (the "bnb" backend calls bitsandbytes' own kernels
    with it). Shares the tensors."""
    _require_bnb()
    from bitsandbytes.functional import QuantState
    fmt = qw.fmt
    state2 = None
    offset = None
    if fmt.nested:
        state2 = QuantState(absmax=qw.nested_absmax, code=qw.nested_code, blocksize=fmt.nested_blocksize,
                            dtype=torch.float32)
        offset = qw.nested_offset.reshape(())
    return QuantState(absmax=qw.absmax, shape=torch.Size(fmt.shape), code=table(fmt.quant_type, qw.device),
                      blocksize=fmt.blocksize, quant_type=fmt.quant_type, dtype=fmt.dtype, offset=offset,
                      state2=state2)
