"""`LoRALinear`: a drop-in for PEFT's `lora.Linear` (one adapter) that runs the fused op.

The base may be a plain ``nn.Linear`` or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (QLoRA): its weight is
converted to a `lora_kernels.quant.QuantWeight` (`quant.from_bnb`, sharing the tensors), cached on the layer and
rebuilt when the weight object, its storage or its quant state change; the op is then `qlora_linear`'s.

``use_dora=True`` adds DoRA's trainable magnitude m [out] (PEFT's ``lora_magnitude_vector.<adapter>.weight``) and
runs `dora_linear` (QDoRA over a bitsandbytes 4-bit base), its row norm cached on the layer
(`ops.dora.cached_weight_norm`)."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from lora_kernels import quant
from lora_kernels.ops import dora
from lora_kernels.ops.lora_linear import lora_linear

_QWEIGHT_ATTR = "_qweight"  # (key, QuantWeight) of a bitsandbytes base (quant.cached_from_bnb)
_DORA_CACHE_ATTR = "_dora_cache"  # DoRA's row norms (ops.dora.cached_weight_norm), not in the state_dict
_DORA_MERGE_ATTR = "_dora_merge_norm"  # the n of the last merge: unmerge divides by it (PEFT's way)


class DoRAMagnitude(nn.Module):
    """DoRA's magnitude vector m [out] as a module holding ``weight``, so the state_dict key is PEFT's
    (``lora_magnitude_vector.<adapter>.weight``). Its math lives in `dora_linear`."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling[adapter] · lora_B(lora_A(dropout(x)))``, fused into one op.

    Parameters and ``state_dict`` keys match PEFT's ``lora.Linear``: ``base_layer.weight``,
    ``base_layer.bias``, ``lora_A.<adapter>.weight`` [r, in], ``lora_B.<adapter>.weight`` [out, r].
    The base layer is frozen. ``scaling`` is a dict keyed by adapter name and read at every forward.
    ``backend`` (None = fastest available) may be changed at any time.

    ``use_dora=True``: DoRA, ``y = g ⊙ (x W0ᵀ + s · (x Aᵀ) Bᵀ) + b`` with ``g = m / ‖W0 + s B A‖_row`` (the norm
    detached; PEFT's dropout term with dropout), m [out] initialised as PEFT does to that norm at init
    (‖W0_j‖ with B = 0). ``merge`` gives W0 ← (m / n) ⊙_row (W0 + s B A); ``unmerge`` restores W0.

    A bitsandbytes base (``Linear4bit`` / ``Linear8bitLt``, quantized: moved to its device) runs
    `qlora_linear`; the adapters are then float32 (PEFT's default), and ``merge`` / ``unmerge`` are refused
    (requantizing changes W0: use PEFT's merge, which warns about it).
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, adapter_name: str = "default",
                 backend: Optional[str] = None, use_dora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.quant_kind = quant.bnb_kind(base_layer)  # "4bit" / "8bit" / ""
        if self.quant_kind:
            quant.cached_from_bnb(self.__dict__, _QWEIGHT_ATTR, base_layer)  # a clear error now, not at forward
        self.adapter_name = adapter_name
        self.backend = backend
        self.r = {adapter_name: r}
        self.lora_alpha = {adapter_name: lora_alpha}
        self.use_rslora = {adapter_name: use_rslora}
        self.scaling = {adapter_name: lora_alpha / (math.sqrt(r) if use_rslora else r)}
        self.lora_dropout = nn.ModuleDict(
            {adapter_name: nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()})
        w = base_layer.weight
        dt = torch.float32 if self.quant_kind else w.dtype  # a quantized weight's dtype is its storage's
        self.lora_A = nn.ModuleDict({adapter_name: nn.Linear(self.in_features, r, bias=False,
                                                             device=w.device, dtype=dt)})
        self.lora_B = nn.ModuleDict({adapter_name: nn.Linear(r, self.out_features, bias=False,
                                                             device=w.device, dtype=dt)})
        self.merged_adapters: list[str] = []
        self.reset_lora_parameters(init_lora_weights)
        self.use_dora = {adapter_name: bool(use_dora)}
        if use_dora:  # PEFT's init: m = ‖W0 + s · B A‖ per row (= ‖W0_j‖ with B = 0), in the adapters' dtype
            norm = dora.qdora_weight_norm if self.quant_kind else dora.dora_weight_norm
            m = norm(self._base_weight(), self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight,
                     self.scaling[adapter_name])
            self.lora_magnitude_vector = nn.ModuleDict({adapter_name: DoRAMagnitude(m.to(dt))})
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisation: A Kaiming-uniform (or N(0, 1/r) for "gaussian"), B zero; False keeps both."""
        if init_lora_weights is False:
            return
        A, B = self.lora_A[self.adapter_name].weight, self.lora_B[self.adapter_name].weight
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.r[self.adapter_name])
        else:
            raise ValueError(f"Unknown init_lora_weights={init_lora_weights!r}: use True, False or 'gaussian'")
        nn.init.zeros_(B)

    @classmethod
    def from_peft(cls, peft_layer: nn.Module, backend: Optional[str] = None) -> "LoRALinear":
        """Build from a PEFT ``lora.Linear`` with one adapter, sharing (not copying) its parameters.

        The base layer is frozen (``requires_grad_(False)``), as ``get_peft_model`` freezes it: the fused op
        computes no gradient for W0 or its bias."""
        reason = unsupported_peft_reason(peft_layer)
        if reason:
            raise ValueError(f"cannot convert this PEFT layer: {reason}")
        name = peft_layer.active_adapters[0]
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_layer = peft_layer.base_layer
        self.in_features, self.out_features = peft_layer.in_features, peft_layer.out_features
        self.quant_kind = quant.bnb_kind(self.base_layer)
        self.adapter_name, self.backend = name, backend
        self.r = {name: peft_layer.r[name]}
        self.lora_alpha = {name: peft_layer.lora_alpha[name]}
        self.use_rslora = {name: peft_layer.use_rslora.get(name, False)}
        self.scaling = {name: peft_layer.scaling[name]}
        self.lora_dropout = nn.ModuleDict({name: peft_layer.lora_dropout[name]})
        self.lora_A = nn.ModuleDict({name: peft_layer.lora_A[name]})
        self.lora_B = nn.ModuleDict({name: peft_layer.lora_B[name]})
        self.merged_adapters = list(peft_layer.merged_adapters)
        self.use_dora = {name: bool(getattr(peft_layer, "use_dora", {}).get(name, False))}
        if self.use_dora[name]:  # PEFT's DoraLinearLayer holds m as `.weight`: shared, the same state_dict key
            self.lora_magnitude_vector = nn.ModuleDict({name: peft_layer.lora_magnitude_vector[name]})
            if self.merged_adapters:  # PEFT keeps the merge's norm in its DoRA layer's cache
                n = getattr(peft_layer, "_caches", {}).get(f"{name}-weight_norm")
                if n is None:
                    raise ValueError("cannot convert a merged PEFT DoRA layer without its merge norm: unmerge it first")
                self.__dict__[_DORA_MERGE_ATTR] = n
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        return self

    def _base_weight(self):
        """W0 [out, in]: the base's weight, or its `QuantWeight` (cached on the layer) for a bitsandbytes base."""
        base = self.base_layer
        return quant.cached_from_bnb(self.__dict__, _QWEIGHT_ATTR, base) if self.quant_kind else base.weight

    def dora_weight_norm(self) -> Optional[torch.Tensor]:
        """DoRA's detached row norm n = ‖W0 + s · B A‖ [out], cached until W0, A, B or s change
        (`ops.dora.cached_weight_norm`); None while torch.compile traces (the op computes n: a graph cannot hold
        the cache's data-pointer / version-counter keys)."""
        if torch.compiler.is_compiling():
            return None
        name = self.adapter_name
        cache = self.__dict__.setdefault(_DORA_CACHE_ATTR, {})
        return dora.cached_weight_norm(cache, name, self._base_weight(), self.lora_A[name].weight,
                                       self.lora_B[name].weight, self.scaling[name])

    @property
    def dropout_p(self) -> float:
        drop = self.lora_dropout[self.adapter_name]
        return drop.p if isinstance(drop, nn.Dropout) else 0.0

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_delta_weight(self) -> torch.Tensor:
        """s · B A in the base weight's dtype (computed in float32)."""
        A = self.lora_A[self.adapter_name].weight
        B = self.lora_B[self.adapter_name].weight
        delta = (B.float() @ A.float()) * self.scaling[self.adapter_name]
        return delta if self.quant_kind else delta.to(self.base_layer.weight.dtype)

    def _refuse_quantized_merge(self) -> None:
        if self.quant_kind:
            raise NotImplementedError(
                f"merge/unmerge on a bitsandbytes {self.quant_kind} base is not supported by LoRALinear: "
                "requantizing W0 + s·BA changes the base weight; use PEFT's lora layer (its merge dequantizes, "
                "adds and requantizes, with a warning) or keep the adapter unmerged")

    @torch.no_grad()
    def merge(self) -> None:
        self._refuse_quantized_merge()
        if self.merged:
            warnings.warn(f"Already merged: {self.merged_adapters}. Nothing to do.")
            return
        name = self.adapter_name
        if self.use_dora.get(name):
            self.__dict__.pop(_DORA_CACHE_ATTR, None)
            self.__dict__[_DORA_MERGE_ATTR] = dora.dora_merge_(
                self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                self.lora_magnitude_vector[name].weight, self.scaling[name])
        else:
            self.base_layer.weight.add_(self.get_delta_weight())
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        self._refuse_quantized_merge()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        name = self.adapter_name
        if self.use_dora.get(name):
            self.__dict__.pop(_DORA_CACHE_ATTR, None)
            dora.dora_unmerge_(self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                               self.lora_magnitude_vector[name].weight, self.scaling[name],
                               self.__dict__.pop(_DORA_MERGE_ATTR))
        else:
            self.base_layer.weight.sub_(self.get_delta_weight())
        self.merged_adapters.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_adapters:
            return self.base_layer(x)
        # Submodules and parameters through the module dicts, not nn.Module.__getattr__ (~1 µs a lookup).
        mods, name = self._modules, self.adapter_name
        base = mods["base_layer"]
        try:
            weight, bias = base._parameters["weight"], base._parameters["bias"]
            if self.quant_kind:
                weight = quant.cached_from_bnb(self.__dict__, _QWEIGHT_ATTR, base)
            A = mods["lora_A"]._modules[name]._parameters["weight"]
            B = mods["lora_B"]._modules[name]._parameters["weight"]
        except KeyError:  # e.g. a parametrized weight
            weight, bias = base.weight, base.bias
            if self.quant_kind:
                weight = quant.cached_from_bnb(self.__dict__, _QWEIGHT_ATTR, base)
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self.quant_kind and bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # as bitsandbytes' own forward casts it
        drop = mods["lora_dropout"]._modules[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        if self.use_dora.get(name):
            m = mods["lora_magnitude_vector"]._modules[name].weight
            norm_args = {} if torch.compiler.is_compiling() else dora.cached_norm_args(
                self.__dict__.setdefault(_DORA_CACHE_ATTR, {}), name, weight, A, B, self.scaling[name])
            return dora.dora_linear(x, weight, bias, A, B, m, self.scaling[name], p, self.training,
                                    backend=self.backend, **norm_args)
        return lora_linear(x, weight, bias, A, B, self.scaling[name], p, self.training, backend=self.backend)

    def extra_repr(self) -> str:
        q = f", base={self.quant_kind}" if self.quant_kind else ""
        q += ", dora" if self.use_dora.get(self.adapter_name) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r[self.adapter_name]}, adapter={self.adapter_name!r}, backend={self.backend}{q}")


def unsupported_peft_reason(layer: nn.Module) -> str:
    """Why the fused op cannot run this PEFT LoRA layer, or "" when it can."""
    base = getattr(layer, "base_layer", None)
    if type(base) is not nn.Linear and not (isinstance(base, nn.Linear) and quant.bnb_kind(base)):
        return f"base layer is {type(base).__name__}, not a plain nn.Linear or a bitsandbytes Linear4bit / Linear8bitLt"
    active = list(getattr(layer, "active_adapters", []))
    if len(active) != 1:
        return f"needs exactly one active adapter, has {active}"
    name = active[0]
    if name not in getattr(layer, "lora_A", {}):
        return f"active adapter {name!r} has no lora_A/lora_B weights"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True is not supported"
    dora_ = getattr(layer, "use_dora", {}).get(name, False)
    if dora_ and name not in getattr(layer, "lora_magnitude_vector", {}):
        return f"DoRA adapter {name!r} has no magnitude vector"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True is not supported"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and not (dora_ and type(variant).__name__ == "DoraLinearVariant"):
        return f"LoRA variant {type(layer.lora_variant[name]).__name__} is not supported"
    if getattr(layer, "disable_adapters", False):
        return "adapters are disabled"
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"lora_dropout is {type(drop).__name__}"
    return ""
