"""Run PEFT models on the fused op, in place: `patch_peft(model)` / `unpatch_peft(model)`.

Every eligible PEFT ``lora.Linear`` keeps its parameters, buffers, hooks and attributes; only its class is
swapped to `FusedLoraLinear`, a subclass that overrides ``forward``. So ``state_dict``, ``save_pretrained``,
``merge_and_unload``, ``set_adapter``, ``disable_adapter()`` and the rest of PEFT's API work unchanged, and
``unpatch_peft`` restores the original class exactly.

With one active adapter ``a`` a patched layer computes, in one registered op
(``torch.ops.lora_kernels.lora_linear_fwd`` / ``_bwd``):

    y = x W0ᵀ + b + scaling[a] · (dropout(x) A[a]ᵀ) B[a]ᵀ
    x: [..., in], W0: [out, in], b: [out] | None, A[a]: [r, in], B[a]: [out, r], y: [..., out]

A DoRA adapter (``use_dora=True``) runs `lora_kernels.dora_linear` (PEFT's DoRA math, its dropout term
included); its row norm n = ‖W0 + s·B A‖ is cached per layer and adapter, keyed on the data pointers and
version counters of W0, A, B and lora_B's bias (so an optimizer step, ``load_state_dict`` or an in-place
write under ``no_grad`` invalidates it; writes through ``.data`` bypass version counters, and ``merge`` /
``unmerge`` clear it). ``lora_bias=True`` adds s·c to the fused op's output (c: lora_B's bias).

PEFT's state is read at every call: disabled adapters and merged adapters give ``base_layer(x)`` (exactly as
PEFT does); ``set_adapter`` and ``scaling`` changes take effect at once. A call the fused op does not cover
(several active adapters, a variant adapter other than DoRA added after patching, a base weight that
requires grad, extra forward arguments, DoRA over a quantized base under autocast) runs PEFT's own forward and
is logged once per reason.

Mixed batches (``model(..., adapter_names=[...])``, one adapter per sample, inference) run one
``torch.ops.lora_kernels.multi_lora_linear`` call per layer (grouped shrink/expand over all adapters of the
batch, same math as PEFT's per-adapter loop) when autograd is off (``torch.no_grad()``, as ``generate``
runs); otherwise, or with training-mode dropout, they run PEFT's ``_mixed_batch_forward`` (logged).

Dropout: with ``p > 0`` in training the op draws a seed from torch's CPU generator and regenerates the mask
from it (`lora_kernels.dropout_mask`), so the mask differs from the one ``nn.Dropout`` would draw.

Autocast: the base GEMM runs in the autocast dtype, as PEFT's would; the LoRA path keeps the adapters' dtype
(float32 by PEFT's default) with float32 accumulation; DoRA's norm, magnitude and lora_B's bias stay float32.

Patch before wrapping: DDP, FSDP2 ``fully_shard`` (on decoder blocks or the whole model) and
``torch.compile`` all work on a patched model; a layer wrapped before patching (``fully_shard`` on the
``lora.Linear`` itself, accelerate hooks) is reported as skipped.

PEFT is imported lazily, so ``import lora_kernels`` stays fast and works without PEFT installed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lora_kernels.backends import resolve_backend
from lora_kernels.derived_cache import cache_get, cache_put, contents_key
from lora_kernels.ops.dora import cached_norm_args, cached_weight_norm, dora_linear
from lora_kernels.ops.lora_linear import lora_linear
from lora_kernels import quant
from lora_kernels.ops.plumbing import any_autocast as _any_autocast
from lora_kernels.ops.qlora import qlora_linear

logger = logging.getLogger("lora_kernels.peft")

_BACKEND_ATTR = "_lora_kernels_backend"  # per-layer backend (None = fastest for the device)
_DORA_CACHE_ATTR = "_lora_kernels_dora"  # {adapter: (key, n), None: (key, ‖W0_j‖²)} of a DoRA layer
_LOGGED_FALLBACKS: set[str] = set()     # runtime fallback reasons already logged (log once per reason)


_LORA = None  # peft.tuners.lora, imported on first use


def _peft_lora():
    global _LORA
    if _LORA is None:
        try:
            from peft.tuners import lora
        except ImportError as e:
            raise ImportError("patch_peft needs the `peft` package: pip install 'lora_kernels[peft]'") from e
        _LORA = lora
    return _LORA


@dataclass
class PatchReport:
    """What `patch_peft` did.

    patched: qualified names of the LoRA layers that now run the fused op.
    skipped: qualified module name -> why the layer keeps PEFT's forward.
    num_patched / num_skipped: their counts.
    """
    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def num_patched(self) -> int:
        return len(self.patched)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        lines = [f"lora_kernels: {self.num_patched} LoRA layer(s) fused, {self.num_skipped} kept on PEFT's forward"]
        for reason, names in _group_by_reason(self.skipped).items():
            lines.append(f"  {len(names)} x {reason}: {_abbrev(names)}")
        return "\n".join(lines)


def _group_by_reason(skipped: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        groups.setdefault(reason, []).append(name)
    return groups


def _abbrev(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k})" if len(names) > k else "")


# ----------------------------------------------------------------------------------------------------
# Eligibility. Static reasons depend on the layer (checked at patch time and by the custom-module factory);
# adapter reasons depend on one adapter's configuration (checked at patch time and at every call).
# ----------------------------------------------------------------------------------------------------

# Both run on every call of a patched layer: they read submodules, parameters and hooks through the module
# dicts (nn.Module.__getattr__ costs ~1 µs a lookup, and a missing attribute a raised exception).

def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or "_hf_hook" in m.__dict__)


_CONV1D = None  # transformers' Conv1D (GPT-2-style bases), imported on first use


def _conv1d_cls():
    global _CONV1D
    if _CONV1D is None:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:
            Conv1D = ()  # matches no type
        _CONV1D = Conv1D
    return _CONV1D


def _base_weight(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W0 [out, in] of a plain nn.Linear, or of a Conv1D base (stored [in, out]: a transposed view, no copy)."""
    return weight if type(base) is nn.Linear else weight.t()


def _static_reason(layer: nn.Module) -> str:
    base = layer._modules["base_layer"]
    fan_in_fan_out = layer.__dict__.get("fan_in_fan_out", False)
    if type(base) is _conv1d_cls():  # x W + b with W [in, out]: W0 = Wᵀ, which PEFT's fan_in_fan_out says
        if not fan_in_fan_out:
            return "Conv1D base layer with fan_in_fan_out=False (PEFT's layer would compute the wrong shape)"
    elif type(base) is not nn.Linear:  # quantised / custom linears subclass nn.Linear: exact type on purpose
        return f"base layer is {type(base).__name__}, not a plain nn.Linear"
    elif fan_in_fan_out:
        return "fan_in_fan_out=True on an nn.Linear base is not supported"
    if _hooked(base):
        return "base layer has forward hooks (e.g. accelerate offload, fully_shard on the nn.Linear), " \
               "which the fused op would bypass"
    return ""


def _adapter_reason(layer: nn.Module, name: str) -> str:
    d = layer.__dict__
    dora = d.get("use_dora", {}).get(name, False)
    variants = d.get("lora_variant", {})
    if name in variants and not (dora and type(variants[name]).__name__ == "DoraLinearVariant"):
        return f"LoRA variant {type(variants[name]).__name__} is not supported"
    mods = d["_modules"]
    if dora and name not in mods["lora_magnitude_vector"]._modules:
        return f"DoRA adapter {name!r} has no magnitude vector"
    drop = mods["lora_dropout"]._modules[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"lora_dropout is {type(drop).__name__}"
    lora_bias = d.get("lora_bias", {}).get(name, False)
    for sub, bias_ok in ((mods["lora_A"]._modules[name], False), (mods["lora_B"]._modules[name], lora_bias)):
        if type(sub) is not nn.Linear or (sub._parameters.get("bias") is not None and not bias_ok):
            return f"lora_A/lora_B of adapter {name!r} are not bias-free nn.Linear"
        if _hooked(sub):
            return f"lora_A/lora_B of adapter {name!r} have forward hooks, which the fused op would bypass"
    return ""


def _patch_reason(layer: nn.Module) -> str:
    """Why `patch_peft` leaves this PEFT LoRA layer on PEFT's forward ("" = patch it)."""
    lora = _peft_lora()
    if not isinstance(layer, lora.Linear):
        return f"{type(layer).__name__} LoRA layers are not fused (only lora.Linear)"
    if type(layer) not in (lora.Linear, _fused_class()):
        return f"{type(layer).__name__} (a subclass of lora.Linear, e.g. wrapped by fully_shard before " \
               "patching) is not fused"
    return _layer_reason(layer, _static_reason, _adapter_reason)


def _layer_reason(layer: nn.Module, static_reason, adapter_reason) -> str:
    """The checks every patched class makes: no instance-level forward, then its static and adapter reasons."""
    for m, what in ((layer, "the layer"), (layer.base_layer, "its base layer")):
        if "forward" in m.__dict__:  # e.g. accelerate's add_hook_to_module: our class forward would not run
            return f"{what} has an instance-level forward override (e.g. accelerate hooks)"
    reason = static_reason(layer)
    if reason:
        return reason
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) > 1:
        return f"several active adapters at once ({active}) are not supported"
    return adapter_reason(layer, active[0]) if active else ""


# ----------------------------------------------------------------------------------------------------
# The fused forward. Everything on the common path is a cheap attribute / dict read, so torch.compile
# traces it into guards and the op call, with no graph break.
# ----------------------------------------------------------------------------------------------------

def _fallback_forward(layer: nn.Module, reason: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if reason not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(reason)
        logger.warning("lora_kernels: running PEFT's own lora.Linear forward because %s "
                       "(logged once per reason)", reason)
    return _LORA.Linear.forward(layer, x, *args, **kwargs)


def _single_active(d: dict) -> Optional[str]:
    """The one active adapter of a LoRA layer (its instance __dict__ `d`), or None: adapters disabled or
    merged, or several active. Raises KeyError for a PEFT whose attribute names differ."""
    if d["_disable_adapters"] or d["merged_adapters"]:
        return None
    name = d["_active_adapter"]
    if type(name) is not str:
        if len(name) != 1:
            return None
        name = name[0]
    return name


def _fast_call(self, x: torch.Tensor):
    """The common call -- one active plain LoRA adapter, no hooks, no autocast, x in the weight's dtype -- or
    None for everything else, which `_general_forward` sorts out (with the reason it logs). Every check of
    `_general_forward` is made here too, reading PEFT's state at every call but through the instance and
    module dicts: each `nn.Module.__getattr__` costs ~1 µs, ~10 of them more than the op itself at decode
    sizes. PEFT attribute names that change in a future release only send calls down the general path."""
    d = self.__dict__
    try:
        name = _single_active(d)
        if name is None:
            return None
        mods = d["_modules"]
        A_mod = mods["lora_A"]._modules.get(name)
        base = mods["base_layer"]
        if A_mod is None or _hooked(base):
            return None
        if type(base) is not nn.Linear:
            if type(base) is not _conv1d_cls() or not d.get("fan_in_fan_out"):
                return None
        elif d.get("fan_in_fan_out"):
            return None
        dora, lora_bias = d["use_dora"].get(name), d["lora_bias"].get(name)
        if name in d["lora_variant"] and not dora:
            return None
        B_mod = mods["lora_B"]._modules[name]
        drop = mods["lora_dropout"]._modules[name]
        if type(A_mod) is not nn.Linear or type(B_mod) is not nn.Linear or _hooked(A_mod) or _hooked(B_mod):
            return None
        bp, Ap, Bp = base._parameters, A_mod._parameters, B_mod._parameters
        weight, bias, A, B = _base_weight(base, bp["weight"]), bp["bias"], Ap["weight"], Bp["weight"]
        if Ap["bias"] is not None or (Bp["bias"] is not None and not lora_bias):
            return None
        magnitude = mods["lora_magnitude_vector"]._modules[name]._parameters["weight"] if dora else None
    except (KeyError, AttributeError, TypeError):
        return None
    if type(drop) is nn.Dropout:
        p = drop.p
    elif type(drop) is nn.Identity:
        p = 0.0
    else:
        return None
    if x.dtype != weight.dtype or (_any_autocast() and torch.is_autocast_enabled(x.device.type)):
        return None
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    backend = d.get(_BACKEND_ATTR)
    if backend not in (None, "torch") and A.dtype != x.dtype and A.dtype != torch.float32:
        return None
    if dora or lora_bias:
        return _dora_call(self, name, x, weight, bias, A, B, Bp["bias"], magnitude, p, drop.training, backend)
    return lora_linear(x, weight, bias, A, B, self.scaling[name], p, drop.training, backend=backend)


def _dora_call(self, name: str, x, weight, bias, A, B, lora_bias, magnitude, p: float, drop_training: bool,
               backend, norm=None):
    """A DoRA adapter (magnitude given) or a plain one with lora_bias, as PEFT computes them:
    DoRA's dropout term runs when the layer is in training mode (PEFT's test), plain LoRA's when the
    dropout module is; lora_bias alone adds s·c to the fused op's output (in y's dtype: PEFT returns the
    base's dtype). `weight`: the dense W0 or a quantized base's QuantWeight (both ops take either). `norm`: DoRA's
    row norm when the caller has it (else the layer's cached one)."""
    s = self.scaling[name]
    if magnitude is None:
        y = lora_linear(x, weight, bias, A, B, s, p, drop_training, backend=backend)
        return torch.add(y, lora_bias, alpha=s) if lora_bias.dtype == y.dtype else (y + s * lora_bias).to(y.dtype)
    norm_args = _dora_norm_args(self, name, weight, A, B, s, lora_bias) if norm is None else {"weight_norm": norm}
    return dora_linear(x, weight, bias, A, B, magnitude, s, p, self.training and drop_training, backend=backend,
                       lora_bias=lora_bias, **norm_args)


def _dora_norm(self, name: str, weight, A, B, s: float, lora_bias):
    """The detached row norm n of adapter `name` (dense or quantized `weight`), cached on the layer until W0, A,
    B, lora_bias or s change (`ops.dora.cached_weight_norm`); None while torch.compile traces (the op computes
    n itself: the cache's keys are data pointers and version counters, which a graph cannot hold)."""
    if torch.compiler.is_compiling():
        return None
    cache = self.__dict__.get(_DORA_CACHE_ATTR)
    if cache is None:
        cache = self.__dict__[_DORA_CACHE_ATTR] = {}
    return cached_weight_norm(cache, name, weight, A, B, s, lora_bias)


def _dora_norm_args(self, name: str, weight, A, B, s: float, lora_bias) -> dict:
    """`dora_linear`'s norm keywords (`ops.dora.cached_norm_args`: the cached n in eval; in training the cached
    ‖W0_j‖², the op computing n); none while torch.compile traces (the op computes n)."""
    if torch.compiler.is_compiling():
        return {}
    cache = self.__dict__.get(_DORA_CACHE_ATTR)
    if cache is None:
        cache = self.__dict__[_DORA_CACHE_ATTR] = {}
    return cached_norm_args(cache, name, weight, A, B, s, lora_bias)


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not args and not kwargs:
        y = _fast_call(self, x)
        if y is not None:
            return y
    return _general_forward(self, x, *args, **kwargs)


def _general_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    lora = _LORA  # imported by _fused_class before any instance exists
    if args or kwargs:
        if args or any(k != "adapter_names" for k in kwargs):
            return _fallback_forward(self, "the call passes extra forward arguments "
                                     f"({len(args)} positional, keywords {sorted(kwargs)})", x, *args, **kwargs)
        adapter_names = kwargs["adapter_names"]
    else:
        adapter_names = None
    if self.disable_adapters or (self.merged and adapter_names is None):
        # PEFT's own branch: base_layer(x) (unmerging first when disabled); no LoRA math to fuse.
        return lora.Linear.forward(self, x, **kwargs)
    if adapter_names is not None:
        return _mixed_batch_forward(self, x, adapter_names)
    mods = self._modules
    base = mods["base_layer"]
    reason = _static_reason(self)
    if reason:
        return _fallback_forward(self, reason, x)
    adapters_A = mods["lora_A"]._modules
    active = [a for a in self.active_adapters if a in adapters_A]
    if not active:
        return base(x)  # PEFT skips active adapters this layer does not have
    if len(active) > 1:
        return _fallback_forward(self, "several active adapters at once are not supported", x)
    name = active[0]
    reason = _adapter_reason(self, name)
    if reason:
        return _fallback_forward(self, reason, x)
    try:  # through the module dicts: see _static_reason
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        A = adapters_A[name]._parameters["weight"]
        B = mods["lora_B"]._modules[name]._parameters["weight"]
    except KeyError:  # e.g. parametrized weights
        weight, bias = base.weight, base.bias
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
    weight = _base_weight(base, weight)
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _fallback_forward(self, "the base layer's weight/bias requires grad (the fused op computes no "
                                 "gradient for them)", x)
    drop = mods["lora_dropout"]._modules[name]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    backend = self.__dict__.get(_BACKEND_ATTR)
    dev = x.device.type
    dora, lora_bias = self.use_dora.get(name, False), self.lora_bias.get(name, False)
    if torch.is_autocast_enabled(dev):
        # What autocast does to PEFT's layer: base GEMM in the autocast dtype. The LoRA path stays in the
        # adapter's dtype (float32 by PEFT's default), which the op accumulates in float32 anyway. DoRA's norm
        # is taken on the layer's own W0 (as PEFT's, which casts W0 to the float32 adapters' dtype; and the
        # cache stays valid: the cast copy is new at every call); the magnitude and lora_B's bias stay float32.
        dt = torch.get_autocast_dtype(dev)
        c = self.lora_B[name].bias if lora_bias else None
        norm = _dora_norm(self, name, weight, A, B, self.scaling[name], c) if dora else None
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        if A.dtype not in (dt, torch.float32):
            A, B = A.to(dt), B.to(dt)
        with torch.autocast(dev, enabled=False):
            if dora or lora_bias:
                return _dora_call(self, name, x, weight, bias, A, B, c,
                                  self.lora_magnitude_vector[name].weight if dora else None, p, drop.training,
                                  backend, norm)
            return lora_linear(x, weight, bias, A, B, self.scaling[name], p, drop.training, backend=backend)
    if x.dtype != weight.dtype:
        return _fallback_forward(self, f"input dtype {x.dtype} differs from the base weight dtype "
                                 f"{weight.dtype} outside autocast", x)
    if backend not in (None, "torch") and A.dtype not in (x.dtype, torch.float32):
        return _fallback_forward(self, f"backend={backend!r} needs adapter weights in the input dtype "
                                 f"({x.dtype}) or float32, got {A.dtype}", x)
    if dora or lora_bias:
        return _dora_call(self, name, x, weight, bias, A, B, self.lora_B[name].bias,
                          self.lora_magnitude_vector[name].weight if dora else None, p, drop.training, backend)
    return lora_linear(x, weight, bias, A, B, self.scaling[name], p, drop.training, backend=backend)


def _multi_lora_ops():
    """`lora_kernels.ops.multi_lora` if it is present with the ops we call, else None."""
    try:
        from lora_kernels.ops import multi_lora
    except ImportError:
        return None
    ok = all(hasattr(multi_lora, n) for n in ("LoRABatch", "multi_lora_linear"))
    return multi_lora if ok else None


_STACK_CACHE_ATTR = "_lora_kernels_stacks"  # {None: (A_stack, B_stack, scalings, ranks)} of the last mixed batch


def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """PEFT's mixed batch (sample b uses adapter ``adapter_names[b]``; "__base__" or an adapter this layer
    lacks = no LoRA) as one `multi_lora_linear` call over slots = this layer's adapters in the batch:

        y[t] = x[t] W0ᵀ + b + scaling[l] · (x[t] A[l]ᵀ) B[l]ᵀ,   l = slot of t's sample

    Adapters of different ranks are zero-padded to the largest rank R and masked with ``ranks``.
    """
    self._check_forward_args(x, adapter_names=adapter_names)  # PEFT's own argument checks and errors
    ops = _multi_lora_ops()
    if ops is None:
        return _fallback_forward(self, "mixed-batch adapter_names needs lora_kernels.ops.multi_lora, "
                                 "which is not available", x, adapter_names=adapter_names)
    reason = _static_reason(self)
    slots: list[str] = []
    for a in adapter_names:
        if a in self.lora_A and a not in slots:
            slots.append(a)
    for a in slots:
        if reason:
            break
        reason = _adapter_reason(self, a)
        if not reason and (self.use_dora.get(a, False) or self.lora_bias.get(a, False)):
            reason = "mixed-batch adapter_names with a DoRA or lora_bias adapter"
        drop = self.lora_dropout[a]
        if not reason and isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            reason = "mixed-batch adapter_names in training mode with lora_dropout > 0"
    A_params = [self.lora_A[a].weight for a in slots]
    B_params = [self.lora_B[a].weight for a in slots]
    if not reason and torch.is_grad_enabled() and any(p.requires_grad for p in A_params + B_params):
        reason = ("mixed-batch adapter_names with autograd enabled (the multi-adapter ops are inference-only; "
                  "run under torch.no_grad() / torch.inference_mode(), as generate() does)")
    weight, bias = _base_weight(self.base_layer, self.base_layer.weight), self.base_layer.bias
    if not reason and x.dtype != weight.dtype:
        reason = f"input dtype {x.dtype} differs from the base weight dtype {weight.dtype}"
    if not reason and torch.is_autocast_enabled(x.device.type):
        reason = "mixed-batch adapter_names under autocast"
    if reason:
        return _fallback_forward(self, reason, x, adapter_names=adapter_names)
    if not slots:
        return self.base_layer(x)

    backend = resolve_backend(getattr(self, _BACKEND_ATTR, None), x.device)
    # "triton"/"native" take stacks in x's dtype; "torch" keeps the adapters' dtype, as PEFT computes.
    dtype = x.dtype if backend != "torch" else A_params[0].dtype
    A_stack, B_stack, scalings, ranks = _stacks(self, slots, A_params, B_params, dtype)
    index = {a: i for i, a in enumerate(slots)}
    seq_slots = [index.get(a, -1) for a in adapter_names]
    tokens_per_sample = x[0].numel() // x.shape[-1] if x.dim() > 1 and x.shape[0] > 0 else 1
    batch = ops.LoRABatch.from_sequences(_slot_ids(tuple(seq_slots), x.device), tokens_per_sample, len(slots),
                                         check=False)  # ids from `index`: valid by construction
    return ops.multi_lora_linear(x, weight, bias, A_stack, B_stack, scalings, batch, ranks=ranks,
                                 backend=backend)


_SLOT_IDS: dict = {}  # (slot ids, device) -> int32 tensor on the device: built once, shared by every layer


def _slot_ids(seq_slots: tuple, device: torch.device) -> torch.Tensor:
    """The per-sample slot ids as a device tensor. Every layer of a forward (and every decode step of
    `generate`) asks for the same ids: one host-to-device copy in all instead of a blocking one per layer."""
    key = (seq_slots, device)
    t = _SLOT_IDS.get(key)
    if t is None:
        if len(_SLOT_IDS) >= 64:  # a handful of batch compositions are live at a time
            _SLOT_IDS.clear()
        t = torch.tensor(seq_slots, dtype=torch.int32)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        _SLOT_IDS[key] = t
    return t


@torch.no_grad()
def _stacks(self, slots, A_params, B_params, dtype):
    """Zero-padded [L, R, in] / [L, out, R] stacks of the slot adapters, cached until a weight changes."""
    scal = tuple(float(self.scaling[a]) for a in slots)
    key = (tuple(slots), dtype, scal, contents_key(*A_params, *B_params))
    cached = cache_get(self.__dict__.setdefault(_STACK_CACHE_ATTR, {}), None, key)
    if cached is not None:
        return cached
    L, R = len(slots), max(p.shape[0] for p in A_params)
    A0 = A_params[0]
    A_stack = A0.new_zeros(L, R, self.in_features, dtype=dtype)
    B_stack = A0.new_zeros(L, self.out_features, R, dtype=dtype)
    for l, (A, B) in enumerate(zip(A_params, B_params)):
        A_stack[l, :A.shape[0]] = A
        B_stack[l, :, :A.shape[0]] = B
    scalings = torch.tensor(scal, dtype=torch.float32, device=A0.device)
    ranks = torch.tensor([p.shape[0] for p in A_params], dtype=torch.int32, device=A0.device)
    return cache_put(self.__dict__[_STACK_CACHE_ATTR], None, key, (A_stack, B_stack, scalings, ranks), *A_params,
                     *B_params)


def _fused_class():
    """`FusedLoraLinear`, created on first use so that importing lora_kernels does not import PEFT."""
    global _FUSED_CLS
    if _FUSED_CLS is None:
        lora = _peft_lora()

        class FusedLoraLinear(lora.Linear):
            """PEFT's ``lora.Linear`` with a fused forward (see `lora_kernels.peft_patch`).

            Same ``__init__``, parameters and methods as ``lora.Linear``; only ``forward`` differs.
            """
            forward = _fused_forward

            def merge(self, *args, **kwargs):
                self.__dict__.pop(_DORA_CACHE_ATTR, None)  # W0 changes (a new tensor: see the module docstring)
                return lora.Linear.merge(self, *args, **kwargs)

            def unmerge(self, *args, **kwargs):
                self.__dict__.pop(_DORA_CACHE_ATTR, None)
                return lora.Linear.unmerge(self, *args, **kwargs)

            def __repr__(self) -> str:
                return "lora_kernels." + nn.Module.__repr__(self)

        # Picklable as lora_kernels.peft_patch.FusedLoraLinear (resolved by the module __getattr__ below).
        FusedLoraLinear.__module__, FusedLoraLinear.__qualname__ = __name__, "FusedLoraLinear"
        _FUSED_CLS = FusedLoraLinear
    return _FUSED_CLS


_FUSED_CLS = None


def __getattr__(name: str):  # PEP 562: `lora_kernels.peft_patch.FusedLoraLinear` builds the class lazily
    if name == "FusedLoraLinear":
        return _fused_class()
    for peft_cls, cls in list(_FUSED_QUANT.items()):
        if name == cls.__name__:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------
# Quantized bases (PEFT's lora.Linear4bit / lora.Linear8bitLt over bitsandbytes layers): the same class swap,
# to a subclass whose forward runs `qlora_linear` on the base's `QuantWeight` (lora_kernels.quant).
#
# What differs from PEFT's layer: the base is x deq(W0)ᵀ in x's dtype (bitsandbytes' own 4-bit matmul may run
# in bfloat16 on CPUs with AVX512-BF16, and its 8-bit matmul quantizes the activations to int8 as well), and
# the backward's dx reads the quantized weight once. merge / unmerge are PEFT's (dequantize, add, requantize,
# with its warning); the converted weight is cached per layer and rebuilt when the weight object changes.
# DoRA (QDoRA, over 4-bit and int8 bases) and lora_bias run the dense layer's `_dora_call` with the QuantWeight
# in W0's place: `dora_linear` / `lora_linear` take it, and DoRA's norm comes from the dequantized W0.
# ----------------------------------------------------------------------------------------------------

_QUANT_CACHE_ATTR = "_lora_kernels_qweight"  # (key, QuantWeight) of a quantized base
_FUSED_QUANT: dict = {}  # PEFT class -> fused subclass


def _peft_quant_classes() -> tuple:
    """PEFT's LoRA layer classes over bitsandbytes bases (none when bitsandbytes is not installed)."""
    lora = _peft_lora()
    return tuple(c for c in (getattr(lora, "Linear4bit", None), getattr(lora, "Linear8bitLt", None))
                 if c is not None)


def _quant_static_reason(layer: nn.Module) -> str:
    base = layer._modules["base_layer"]
    kind = quant.bnb_kind(base)
    if kind == "8bit" and getattr(base.state, "has_fp16_weights", False):
        return "Linear8bitLt with has_fp16_weights=True (the weight is not quantized)"
    if _hooked(base):
        return "base layer has forward hooks, which the fused op would bypass"
    try:
        quant.from_bnb(base)  # (also refuses a weight bitsandbytes repacked for its CPU bf16 kernel)
    except (ValueError, TypeError, ImportError) as e:
        return f"quantized base not readable: {e}"
    return ""


def _quant_patch_reason(layer: nn.Module) -> str:
    # The adapter reasons are the dense layer's: DoRA (4-bit and int8 bases) and lora_bias are fused as there.
    return _layer_reason(layer, _quant_static_reason, _adapter_reason)


def _qweight(self, base: nn.Module):
    """The base's QuantWeight, cached on the layer until the weight (object, storage or quant state) changes."""
    return quant.cached_from_bnb(self.__dict__, _QUANT_CACHE_ATTR, base)


def _quant_call(self, x: torch.Tensor):
    """The fused call of a quantized-base layer, or None (PEFT's own forward runs; the reason is logged)."""
    d = self.__dict__
    name = _single_active(d)
    if name is None:
        return None
    mods = d["_modules"]
    A_mod = mods["lora_A"]._modules.get(name)
    if A_mod is None:
        return None
    base = mods["base_layer"]
    if _hooked(base) or _adapter_reason(self, name):
        return None
    if _any_autocast() and torch.is_autocast_enabled(x.device.type):
        return None
    bias = base._parameters["bias"]
    compute = base.__dict__.get("compute_dtype") if quant.bnb_kind(base) == "4bit" else None
    if (compute is not None and compute != x.dtype) or (bias is not None and bias.dtype != x.dtype):
        return None
    if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
        return None
    if quant.bnb_repacked(base):  # by a fallback call of bitsandbytes' own eval forward since the patch
        return None
    A = A_mod._parameters["weight"]
    Bp = mods["lora_B"]._modules[name]._parameters
    B, c = Bp["weight"], (Bp.get("bias") if d["lora_bias"].get(name, False) else None)
    drop = mods["lora_dropout"]._modules[name]
    p = drop.p if type(drop) is nn.Dropout else 0.0
    qw = _qweight(self, base)
    dora = d["use_dora"].get(name, False)
    if dora or c is not None:  # QDoRA (4-bit or int8 base) and / or lora_bias: the dense path's call on qw
        magnitude = mods["lora_magnitude_vector"]._modules[name]._parameters["weight"] if dora else None
        return _dora_call(self, name, x, qw, bias, A, B, c, magnitude, p, drop.training, d.get(_BACKEND_ATTR))
    return qlora_linear(x, qw, bias, A, B, self.scaling[name], p, drop.training, backend=d.get(_BACKEND_ATTR))


def _quant_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not args and not kwargs:
        y = _quant_call(self, x)
        if y is not None:
            return y
    peft_cls = type(self).__mro__[1]
    if not (self.disable_adapters or self.merged) and not args and not kwargs:
        reason = _quant_patch_reason(self) or "the input dtype / autocast / bias does not match the fused path"
        if reason not in _LOGGED_FALLBACKS:
            _LOGGED_FALLBACKS.add(reason)
            logger.warning("lora_kernels: running PEFT's own %s forward because %s (logged once per reason)",
                           peft_cls.__name__, reason)
    return peft_cls.forward(self, x, *args, **kwargs)


def _fused_quant_class(peft_cls: type) -> type:
    """The fused subclass of PEFT's `peft_cls` (lora.Linear4bit / lora.Linear8bitLt), made once."""
    cls = _FUSED_QUANT.get(peft_cls)
    if cls is None:
        name = "Fused" + peft_cls.__name__
        cls = type(name, (peft_cls,), {
            "forward": _quant_forward,
            "__doc__": f"PEFT's ``lora.{peft_cls.__name__}`` running `lora_kernels.qlora_linear` (see "
                       "`lora_kernels.peft_patch`); everything but ``forward`` is PEFT's.",
            "__repr__": lambda self: "lora_kernels." + nn.Module.__repr__(self),
        })
        cls.__module__, cls.__qualname__ = __name__, name
        _FUSED_QUANT[peft_cls] = cls
    return cls


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

def _lora_layers(model: nn.Module):
    lora = _peft_lora()
    for name, module in model.named_modules():
        if isinstance(module, lora.LoraLayer):
            yield name, module


def patch_peft(model: nn.Module, backend: Optional[str] = None) -> PatchReport:
    """Make every eligible PEFT ``lora.Linear`` in `model` run the fused op, in place.

    Args:
        model: a ``PeftModel`` or any module with PEFT LoRA layers injected.
        backend: None (fastest for the tensors' device), "torch", "triton" or "native"; stored per layer.

    Returns a `PatchReport`; skipped layers (several active adapters, fan_in_fan_out, variants other than DoRA,
    quantised or hooked base layers, non-Linear LoRA layers) keep PEFT's forward and are logged once.
    Calling it again re-patches (e.g. after adding adapters) and updates the backend. Patch before wrapping
    the model (DDP, ``fully_shard``, ``torch.compile``).
    """
    if backend is not None:
        from lora_kernels.backends import BACKENDS
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    fused = _fused_class()
    lora = _peft_lora()
    quant_classes = _peft_quant_classes()
    report = PatchReport()
    for name, module in _lora_layers(model):
        peft_cls = next((c for c in quant_classes if type(module) in (c, _FUSED_QUANT.get(c))), None)
        if peft_cls is not None:  # a bitsandbytes base
            reason = _quant_patch_reason(module)
            module.__dict__.pop(_QUANT_CACHE_ATTR, None)
            if reason:
                module.__class__ = peft_cls
                module.__dict__.pop(_BACKEND_ATTR, None)
                report.skipped[name] = reason
            else:
                module.__class__ = _fused_quant_class(peft_cls)
                setattr(module, _BACKEND_ATTR, backend)
                report.patched.append(name)
            continue
        reason = _patch_reason(module)
        if reason:
            if type(module) is fused:  # its configuration changed since it was patched
                module.__class__ = lora.Linear
                module.__dict__.pop(_BACKEND_ATTR, None)
                module.__dict__.pop(_STACK_CACHE_ATTR, None)
                module.__dict__.pop(_DORA_CACHE_ATTR, None)
            report.skipped[name] = reason
            continue
        module.__class__ = fused
        setattr(module, _BACKEND_ATTR, backend)
        report.patched.append(name)
    if report.skipped:
        logger.warning("%s", report)
    else:
        logger.info("lora_kernels: %d LoRA layer(s) fused", report.num_patched)
    return report


def unpatch_peft(model: nn.Module) -> int:
    """Give every fused layer in `model` back PEFT's ``lora.Linear`` class. Returns how many were restored."""
    if _FUSED_CLS is None and not _FUSED_QUANT:
        return 0
    lora = _peft_lora()
    n = 0
    for _, module in _lora_layers(model):
        peft_cls = next((c for c, f in _FUSED_QUANT.items() if type(module) is f), None)
        if peft_cls is not None:
            module.__class__ = peft_cls
            module.__dict__.pop(_BACKEND_ATTR, None)
            module.__dict__.pop(_QUANT_CACHE_ATTR, None)
            n += 1
            continue
        if type(module) is _FUSED_CLS:
            module.__class__ = lora.Linear
            module.__dict__.pop(_BACKEND_ATTR, None)
            module.__dict__.pop(_STACK_CACHE_ATTR, None)
            module.__dict__.pop(_DORA_CACHE_ATTR, None)
            n += 1
    return n


class _FusedLoraDispatch:
    """Value for ``LoraConfig._register_custom_module({nn.Linear: ...})``: PEFT calls it as a layer class.

    Builds a `FusedLoraLinear` for a plain ``nn.Linear`` target and returns None otherwise, so PEFT's own
    dispatchers (bitsandbytes, GPTQ, ``fan_in_fan_out`` Conv1D, ...) handle the layers we do not fuse.
    """

    def __init__(self, backend: Optional[str]):
        self.backend = backend

    def __call__(self, target: nn.Module, adapter_name: str, config: Any = None, **kwargs: Any):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if type(base) is not nn.Linear or getattr(config, "fan_in_fan_out", False):
            return None
        module = _fused_class()(target, adapter_name, config=config, **kwargs)
        setattr(module, _BACKEND_ATTR, self.backend)
        return module


def register_fused_lora(config: Any, backend: Optional[str] = None) -> Any:
    """Have ``get_peft_model(model, config)`` create fused layers directly (no `patch_peft` call needed).

    Uses PEFT's experimental ``LoraConfig._register_custom_module`` hook (present in the PEFT versions this
    package is tested with, see the README). The registration lives on the config object only; it is not
    saved with ``save_pretrained``, so an adapter loaded later with ``PeftModel.from_pretrained`` needs
    `patch_peft`. Returns `config`.
    """
    if not hasattr(config, "_register_custom_module"):
        import peft
        raise RuntimeError(f"peft {peft.__version__} has no LoraConfig._register_custom_module; "
                           "use patch_peft(model) after get_peft_model instead")
    config._register_custom_module({nn.Linear: _FusedLoraDispatch(backend)})
    return config


def get_fused_peft_model(model: nn.Module, config: Any, backend: Optional[str] = None, **kwargs: Any):
    """``peft.get_peft_model(model, config, **kwargs)`` with fused layers created directly.

    Layers PEFT creates through its own dispatchers (not plain ``nn.Linear``) keep PEFT's forward; the
    returned model's ``lora_kernels_report`` attribute says which (same `PatchReport` as `patch_peft`).
    """
    from peft import get_peft_model
    peft_model = get_peft_model(model, register_fused_lora(config, backend), **kwargs)
    # Registration covers creation; patch_peft then reports (and fuses anything created another way).
    peft_model.lora_kernels_report = patch_peft(peft_model, backend=backend)
    return peft_model
