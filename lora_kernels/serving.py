"""Serve many PEFT LoRA adapters behind one Hugging Face causal LM, one adapter per sequence.

    mm = MultiLoRAModel(model, max_loras=8, max_rank=16)       # swaps the targeted nn.Linear layers
    mm.load_adapter("sql", "path/to/peft_adapter_dir")          # adapter_config.json + adapter_model.*
    out = mm(input_ids, attention_mask=mask, adapter_names=["sql", None, "chat"])
    mm.generate(input_ids, attention_mask=mask, adapter_names=[...], max_new_tokens=16)

Every forward builds one `LoRABatch` (in a forward pre-hook on the wrapped model, so it also runs for
each step of `generate`) and all MultiLoRALinear layers reuse it.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lora_kernels.layers.multi_lora import BatchContext, MultiLoRALinear
from lora_kernels.ops.multi_lora import LoRABatch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# PEFT saves "base_model.model.<module path>.lora_A.weight" (older versions keep ".<adapter name>").
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be loaded into this MultiLoRAModel (the slots are left unchanged)."""


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module path that ends with it.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _matches_target(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


class MultiLoRAModel(nn.Module):
    """Wraps `model` (a transformers causal LM) in place: its targeted nn.Linear layers become
    `MultiLoRALinear` with `max_loras` slots of rank <= `max_rank`.

    target_modules: None (every nn.Linear except the output embedding), a list of module-name suffixes
    ("q_proj") or a regex matched against the full module name, as in PEFT's LoraConfig.
    backend: None (fastest for the device), "torch", "triton" or "native", for every layer.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int,
                 target_modules: Optional[Union[str, Sequence[str]]] = None, backend: Optional[str] = None):
        super().__init__()
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.context = BatchContext()
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = []
        for name, module in model.named_modules():
            if type(module) is not nn.Linear or module is out_emb:
                continue
            if target_modules is None or _matches_target(name, target_modules):
                targets.append(name)
        if not targets:
            raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear in the model")
        self.layers: dict[str, MultiLoRALinear] = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MultiLoRALinear(getattr(parent, child), max_loras, max_rank, backend=backend,
                                    context=self.context)
            setattr(parent, child, layer)
            self.layers[name] = layer
        self._slot_names: list[Optional[str]] = [None] * max_loras
        self._slots: dict[str, int] = {}
        self._last_used: dict[str, int] = {}
        self._clock = itertools.count()
        self._pins: dict[str, int] = {}
        self._seq_slots: Optional[Tensor] = None
        model.register_forward_pre_hook(self._build_batch, with_kwargs=True)

    def __getattr__(self, name: str):
        # Everything else (config, device, ...) is the wrapped model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -------------------------------------------------------------------------------- adapters

    @property
    def adapters(self) -> dict[str, int]:
        """Loaded adapter names and their slots."""
        return dict(self._slots)

    def load_adapter(self, name: str, path: Union[str, Path]) -> int:
        """Load the PEFT LoRA adapter saved in directory `path` under `name`; returns its slot.

        Reloading a loaded name replaces it in its slot. When every slot is taken, the least recently used
        adapter that no running batch uses is evicted. Raises FileNotFoundError (no such directory or
        files) or AdapterError (corrupt files, unsupported config, rank above max_rank, modules or shapes
        that do not fit this model); after a failed load the slots are exactly as before.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
        weights = self._read_adapter(Path(path))  # everything is validated before any slot changes
        if name in self._slots:
            if self._pins.get(name):
                raise RuntimeError(f"adapter {name!r} is in use by a running batch and cannot be reloaded now")
            slot = self._slots[name]
        else:
            slot = self._free_slot()
        for module, layer in self.layers.items():
            if module in weights:
                A, B, scaling = weights[module]
                layer.set_slot(slot, A, B, scaling)
            else:
                layer.clear_slot(slot)
        self._slot_names[slot] = name
        self._slots[name] = slot
        self._last_used[name] = next(self._clock)
        return slot

    def unload_adapter(self, name: str) -> None:
        """Free `name`'s slot. Raises KeyError for an unknown name."""
        self._check_known([name])
        if self._pins.get(name):
            raise RuntimeError(f"adapter {name!r} is in use by a running batch and cannot be unloaded now")
        slot = self._slots.pop(name)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._slot_names[slot] = None
        self._last_used.pop(name, None)

    def _free_slot(self) -> int:
        for s, n in enumerate(self._slot_names):
            if n is None:
                return s
        idle = [n for n in self._slots if not self._pins.get(n)]
        if not idle:
            raise RuntimeError(f"all {self.max_loras} adapter slots are used by running batches; "
                               "finish one or raise max_loras")
        victim = min(idle, key=lambda n: self._last_used[n])
        slot = self._slots[victim]
        self.unload_adapter(victim)
        return slot

    def _read_adapter(self, path: Path) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{module name: (A [r, in], B [out, r], scaling)} for a PEFT adapter dir, fully validated."""
        if not path.is_dir():
            raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
        try:
            cfg = json.loads(cfg_file.read_text())
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise AdapterError(f"corrupt {cfg_file}: {e}") from e
        self._check_config(cfg, cfg_file)
        state = self._read_weights(path)

        pairs: dict[str, dict[str, Tensor]] = {}
        for key, t in state.items():
            m = _KEY_RE.match(key)
            if m is None:
                raise AdapterError(f"{path}: unsupported tensor {key!r} (only LoRA A/B weights of linear layers "
                                   "can be served)")
            pairs.setdefault(m["module"], {})[m["ab"]] = t
        if not pairs:
            raise AdapterError(f"{path}: the weights file holds no LoRA weights")
        missing = sorted(m for m in pairs if m not in self.layers)
        if missing:
            raise AdapterError(
                f"incompatible target modules: the adapter at {path} targets {missing[:4]}"
                f"{'...' if len(missing) > 4 else ''}, which this MultiLoRAModel does not serve; build it with "
                "target_modules covering the adapter's (None wraps every nn.Linear but the LM head)")
        out = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{path}: module {module!r} has lora_{sorted(set('AB') - set(ab))[0]} missing")
            layer = self.layers[module]
            A, B = ab["A"], ab["B"]
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or B.shape[0] != layer.out_features \
                    or A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"incompatible shapes for {module!r}: adapter has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                    f"the base layer needs A [r, {layer.in_features}] and B [{layer.out_features}, r] "
                    "(was the adapter trained on another base model?)")
            if not (A.is_floating_point() and B.is_floating_point()):
                raise AdapterError(f"{path}: {module!r} weights must be floating point, got {A.dtype}, {B.dtype}")
            r = A.shape[0]
            if r > self.max_rank:
                raise AdapterError(f"adapter at {path}: rank r={r} of {module!r} exceeds max_rank={self.max_rank}")
            r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r))
            if r_cfg != r:
                raise AdapterError(f"corrupt adapter at {path}: {module!r} has rank {r} but the config says {r_cfg}")
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
            scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora", False) else r)
            if not math.isfinite(scaling):
                raise AdapterError(f"adapter at {path}: non-finite scaling for {module!r}")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise AdapterError(f"corrupt adapter at {path}: {module!r} has non-finite weights")
            out[module] = (A, B, float(scaling))
        return out

    @staticmethod
    def _check_config(cfg: dict, cfg_file: Path) -> None:
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
        unsupported = {
            "use_dora": lambda v: bool(v), "fan_in_fan_out": lambda v: bool(v), "lora_bias": lambda v: bool(v),
            "bias": lambda v: v not in (None, "none"), "modules_to_save": lambda v: bool(v),
            "layer_replication": lambda v: bool(v), "trainable_token_indices": lambda v: bool(v),
            "use_qalora": lambda v: bool(v), "target_parameters": lambda v: bool(v),
            "alora_invocation_tokens": lambda v: bool(v),
        }
        for key, bad in unsupported.items():
            if key in cfg and bad(cfg[key]):
                raise AdapterError(f"{cfg_file}: {key}={cfg[key]!r} is not supported for multi-adapter serving")
        for key in ("r", "lora_alpha"):
            v = cfg.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                raise AdapterError(f"corrupt {cfg_file}: {key} must be a positive number, got {v!r}")

    @staticmethod
    def _read_weights(path: Path) -> dict[str, Tensor]:
        st, bn = path / SAFETENSORS_NAME, path / BIN_NAME
        try:
            if st.is_file():
                from safetensors.torch import load_file
                return load_file(str(st), device="cpu")
            if bn.is_file():
                state = torch.load(str(bn), map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                    raise ValueError("not a dict of tensors")
                return state
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors / pickle raise many types for a truncated or garbled file
            raise AdapterError(f"corrupt adapter weights in {path}: {type(e).__name__}: {e}") from e
        raise FileNotFoundError(f"{str(path)!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")

    # -------------------------------------------------------------------------------- running

    def _check_known(self, names) -> None:
        for n in names:
            if n is not None and n not in self._slots:
                raise KeyError(f"unknown adapter {n!r}; loaded: {sorted(self._slots)}")

    @contextmanager
    def running(self, adapter_names: Sequence[Optional[str]]):
        """Pin these adapters (a running batch uses them): they are not evicted or unloaded meanwhile."""
        names = [n for n in set(adapter_names) if n is not None]
        self._check_known(names)
        for n in names:
            self._pins[n] = self._pins.get(n, 0) + 1
            self._last_used[n] = next(self._clock)
        try:
            yield
        finally:
            for n in names:
                self._pins[n] -= 1

    def _seq_slot_tensor(self, adapter_names, batch_size: int) -> Tensor:
        if adapter_names is None:
            adapter_names = [None] * batch_size
        if isinstance(adapter_names, str) or len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names must be a list of {batch_size} names (None = base model), one per "
                             f"sequence, got {adapter_names!r}")
        self._check_known(adapter_names)
        device = next(iter(self.layers.values())).base_layer.weight.device
        return torch.tensor([-1 if n is None else self._slots[n] for n in adapter_names], dtype=torch.int32,
                            device=device)

    def _build_batch(self, module, args, kwargs):
        """Forward pre-hook on the wrapped model: one LoRABatch per call, for every layer."""
        if self._seq_slots is None:
            self.context.batch = None
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            raise ValueError("MultiLoRAModel needs input_ids or inputs_embeds to assign adapters to tokens")
        b, s = ids.shape[0], ids.shape[1]
        slots = self._seq_slots
        if b != slots.shape[0]:
            if b % slots.shape[0]:
                raise ValueError(f"batch of {b} sequences does not match {slots.shape[0]} adapter_names")
            slots = slots.repeat_interleave(b // slots.shape[0])  # beams / num_return_sequences
        # Slot ids come from our own slot table: valid by construction, so no host read per step.
        self.context.batch = LoRABatch.from_sequences(slots, s, self.max_loras, check=False)
        return None

    @contextmanager
    def _adapters_for(self, adapter_names, batch_size: int):
        self._seq_slots = self._seq_slot_tensor(adapter_names, batch_size)
        try:
            with self.running(adapter_names or []):
                yield
        finally:
            self._seq_slots = None
            self.context.batch = None

    @staticmethod
    def _batch_size(input_ids, kwargs) -> int:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        return ref.shape[0]

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """The wrapped model's forward; sequence b uses adapter_names[b] (None: the base model)."""
        with self._adapters_for(adapter_names, self._batch_size(input_ids, kwargs)):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """`model.generate` with sequence b on adapter_names[b]; the adapters stay pinned throughout."""
        with self._adapters_for(adapter_names, self._batch_size(input_ids, kwargs)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
