"""`MultiLoRAModel`: a Hugging Face causal LM whose linear layers hold `max_loras` adapter slots, serving and
training many adapters in one batch, one adapter per sequence. Adapter files are read by `adapter_files`,
slots are managed by `adapter_store`; this module only wires them to the layers and runs forwards.

Every forward builds one batch for all MultiLoRALinear layers: in `forward` (`prepare`) or, for each step of
`generate`, in a forward pre-hook on the wrapped model. In eval mode it is a `LoRABatch` over all slots and
the layers run the slot buffers. In training mode it is a `StepBatch` over only the slots the batch uses, and
each layer stacks those adapters' weights per step -- the leaf parameters of trainable adapters (A [r, in],
B [out, r] per layer, so autograd reaches them), the slot buffers of loaded ones -- for `multi_lora_linear`.

Trainable adapters (`add_adapter`) are never evicted. An adapter absent from a step is not in its graph: its
parameters get no gradient (grad stays None), and AdamW (any torch optimizer) skips a parameter whose grad is
None, so neither the step nor momentum nor weight decay moves it -- as long as the gradients are cleared with
``zero_grad(set_to_none=True)`` (the default; zeros instead of None would be stepped). Serving a trained
adapter: its parameters are copied into its slot buffers by `eval()` and, afterwards, before any eval-mode
forward or `generate` in which they changed (parameter version counters, so an optimizer step is seen).

Threads: one thread may load / register / unload adapters while others run forwards. A forward (or a whole
`generate`) holds the model's lock from bringing its adapters into slots to its last layer, and slot writes
take the same lock, so a forward sees each adapter entirely before or entirely after a reload, never a torn
slot, and its adapters cannot be evicted under it. Reading and validating files happens outside the lock
(before it, for the adapters a batch must read from disk); loads wait for running forwards; forwards from
several threads run one at a time, since they share the per-step batch.
"""
from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels import quant
from lora_kernels.layers.multi_lora import BatchContext, MultiLoRALinear, StepBatch
from lora_kernels.ops.multi_lora import LoRABatch
from lora_kernels.serving import adapter_files as files
from lora_kernels.serving.adapter_files import AdapterWeights
from lora_kernels.serving.adapter_store import AdapterStore

IGNORE_INDEX = -100  # transformers' label for "no loss on this token"
# Every live MultiLoRAModel, for `lora_kernels.diagnostics.info()` (its serving counters).
LIVE: "weakref.WeakSet[MultiLoRAModel]" = weakref.WeakSet()


def _init_lora(init, r: int, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) float32 on the CPU, drawn from torch's default generator as PEFT draws them
    (see adapter_files.INITS)."""
    A, B = torch.empty(r, in_features), torch.zeros(out_features, r)
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return A, B


def per_adapter_loss(logits: Tensor, labels: Tensor, row_group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """transformers' causal-LM loss per group of rows: ``(Σ_g loss_g, loss [num_groups])``.

    loss_g = Σ_{tokens t of rows in g} CE(logits_t, label_{t+1}) / (number of those tokens with a label), with
    labels shifted left by one and IGNORE_INDEX tokens left out, in float32 -- what the wrapped model's own
    loss (ForCausalLMLoss) gives for g's rows alone, so the gradient of Σ_g loss_g with respect to an adapter
    used only by group g is exactly the gradient of training it alone. A group without rows or labelled
    tokens has loss 0. logits: [B, S, V]; labels: [B, S]; row_group: [B] int64 in [0, num_groups).
    """
    lab = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(lab.shape)
    zeros = torch.zeros(num_groups, dtype=torch.float32, device=logits.device)
    sums = zeros.index_add(0, row_group, tok.sum(1))
    counts = zeros.index_add(0, row_group, (lab != IGNORE_INDEX).sum(1).to(torch.float32))
    losses = sums / counts.clamp(min=1)
    return losses.sum(), losses


@dataclass
class _TrainedAdapter:
    """An adapter made by add_adapter: its LoRA config (what save_adapter writes), its LoRA dropout, the modules
    it targets with their (r, scaling), and its parameters' version counters when last copied into its slot."""
    config: dict
    dropout: float
    modules: dict[str, tuple[int, float]]
    synced: tuple = ()


def _names(adapter_names) -> list[str]:
    # First-appearance order (not a set's): the recency order among one batch's adapters is deterministic.
    return [n for n in dict.fromkeys(adapter_names or []) if n is not None]


class MultiLoRAModel(nn.Module):
    """Wraps `model` (a transformers causal LM) in place: its targeted nn.Linear layers become
    `MultiLoRALinear` with `max_loras` slots of rank <= `max_rank`. A model loaded with a
    `BitsAndBytesConfig` (or quantized in place) works the same: its bitsandbytes Linear4bit / Linear8bitLt
    layers are linear layers here, and their MultiLoRALinear runs the base from the quantized weight (QLoRA
    serving and training; the slots default to the dtype the weights were quantized from).

    target_modules: None (every nn.Linear except the output embedding), a list of module-name suffixes
    ("q_proj") or a regex matched against the full module name, as in PEFT's LoraConfig.
    backend: None (fastest for the device), "torch", "triton" or "native", for every layer.
    max_cpu_loras: how many adapters' validated tensors to keep in host memory (pinned on CUDA) besides the
    slots, most recently used first; default 0: an adapter evicted from its slot is read from its directory
    again when next used. Worth setting above max_loras when more adapters are in use than fit in the slots.

    Adapters are loaded (`load_adapter`) or registered (`register_adapter`, or ``load_adapter(...,
    lazy=True)``) by name; a forward that names one not in a slot brings it in (see `adapter_store`), so a
    server may register far more adapters than max_loras. `stats()` counts how each was found.

    The wrapper starts in the wrapped model's mode (``model.training``); `train()` / `eval()` switch both.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int,
                 target_modules: Optional[Union[str, Sequence[str]]] = None, backend: Optional[str] = None,
                 max_cpu_loras: int = 0):
        super().__init__()
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self._store = AdapterStore(max_loras, max_cpu_loras)
        self.context = BatchContext()
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # What PEFT matches an adapter's target_modules against: every module of the unwrapped model.
        self._module_names = tuple(n for n, _ in model.named_modules())
        linear = [n for n, m in model.named_modules()
                  if (type(m) is nn.Linear or quant.bnb_kind(m)) and m is not out_emb]
        targets = [n for n in linear if target_modules is None or files.matches_target(n, target_modules)]
        if not targets:
            raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear (or bitsandbytes Linear4bit / "
                             f"Linear8bitLt) in the model")
        wrapped = set(targets)
        self._other_linear = tuple(n for n in linear if n not in wrapped)
        self.layers: dict[str, MultiLoRALinear] = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MultiLoRALinear(getattr(parent, child), max_loras, max_rank, backend=backend,
                                    context=self.context)
            setattr(parent, child, layer)
            self.layers[name] = layer
        self._seq_slots: Optional[Tensor] = None
        self._seq_slot_set: Optional[frozenset] = None  # _seq_slots on the host (the layers' context.slots)
        self._trained: dict[str, _TrainedAdapter] = {}
        self._prepared = False                     # `prepare` built this step's batch: the pre-hook leaves it
        self._row_group: Optional[Tensor] = None   # [B] int64: the slot of each row (max_loras: none), for losses
        # Guards the store and the slot buffers; held by a whole forward (see the module docstring).
        self._lock = threading.RLock()
        self.training = model.training
        model.register_forward_pre_hook(self._build_batch, with_kwargs=True)
        LIVE.add(self)

    def __getstate__(self):  # copy.deepcopy / pickle: a lock cannot be copied; the copy gets its own
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()
        LIVE.add(self)

    def __getattr__(self, name: str):
        # Everything else (config, device, ...) is the wrapped model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -------------------------------------------------------------------------------- adapter files

    @property
    def adapters(self) -> dict[str, int]:
        """The adapters in slots and their slots (registered adapters not in a slot are left out)."""
        with self._lock:
            return dict(self._store.slots)

    def stats(self) -> dict[str, int]:
        """Cache counters since construction: ``hits`` (a batch's adapter was in a slot), ``host_hits`` (copied
        in from the host tier), ``disk_reads`` (read and validated from its directory, by a batch or
        `load_adapter`), ``evictions`` (an adapter left its slot for another), ``host_evictions``; and the
        current number of ``registered`` adapters, ``resident`` ones (in slots) and ``host`` ones."""
        with self._lock:
            return self._store.stats()

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).base_layer.weight.device

    def _read(self, path: Path) -> AdapterWeights:
        """Adapter directory `path`, validated for this model (outside the lock: nothing changes here)."""
        shapes = {m: (l.in_features, l.out_features) for m, l in self.layers.items()}
        dtypes = {m: l.lora_A_0.dtype for m, l in self.layers.items()}
        # Pinned host tensors make the copy into the slots non-blocking; worth it only for the host tier.
        pin = self._device().type == "cuda" and self._store.max_cpu_loras > 0
        return files.read_adapter(path, shapes, self.max_rank, dtypes, modules=self._module_names, pin_memory=pin)

    def _write_slot(self, slot: int, weights: Optional[AdapterWeights]) -> None:
        """Every layer's part of `slot`: the adapter's A, B and scaling, or empty (None, or a layer it does not
        adapt). Under the lock."""
        device = self._device()
        for module, layer in self.layers.items():
            if weights is not None and module in weights.modules:
                A, B, scaling = weights.modules[module]
                m = weights.magnitudes.get(module)  # DoRA's magnitude: the layer computes the slot's scale
                layer.set_slot(slot, A.to(device, non_blocking=True), B.to(device, non_blocking=True), scaling,
                               None if m is None else m.to(device, non_blocking=True))
            else:
                layer.clear_slot(slot)

    def load_adapter(self, name: str, path: Union[str, Path], lazy: bool = False) -> Optional[int]:
        """Load the PEFT LoRA adapter saved in directory `path` under `name`; returns its slot (lazy=True:
        `register_adapter` instead, and None).

        Reloading a name replaces it (in its slot, if it has one). When every slot is taken, the least recently
        used adapter that no running batch uses is evicted; it stays registered and comes back when a batch
        names it. Waits for a forward running in another thread.

        Raises FileNotFoundError (no such directory or files), NotADirectoryError (`path` is a file) or
        AdapterError naming the file and the problem (see `adapter_files.read_adapter`: corrupt files,
        unsupported configs, absurd numbers, a target_modules that matches nothing or disagrees with the
        tensors, shapes or modules that do not fit this model, unsafe pickles, non-finite weights). Everything
        is checked before any slot changes, so after a failed load the model is exactly as before.
        """
        if lazy:
            return self.register_adapter(name, path)
        _check_name(name)
        weights = self._read(Path(path))  # everything is validated before any slot changes
        with self._lock:
            slot = self._store.place(name, source=Path(path), weights=weights)
            self._trained.pop(name, None)  # a trainable adapter of this name is replaced by the loaded one
            self._write_slot(slot, weights)
            return slot

    def register_adapter(self, name: str, path: Union[str, Path]) -> None:
        """Record adapter directory `path` under `name` without reading its weights or taking a slot: the
        first batch that names it reads it (`load_adapter`'s checks, AdapterError then). Its config is checked
        now (FileNotFoundError, NotADirectoryError, AdapterError as `load_adapter`). Re-registering a name
        replaces the adapter (taking it out of its slot)."""
        _check_name(name)
        path = Path(path)
        cfg = files.read_config(path)
        files.check_targets(cfg, self._module_names, self.layers, path / files.CONFIG_NAME)
        files.weights_file(path)
        with self._lock:
            slot = self._store.register(name, path)
            self._trained.pop(name, None)
            if slot is not None:
                self._write_slot(slot, None)

    def unload_adapter(self, name: str) -> None:
        """Forget `name`: free its slot, drop it from the host tier and the registry (a trainable adapter's
        parameters are dropped). Raises KeyError for an unknown name."""
        with self._lock:
            slot = self._store.remove(name)
            self._trained.pop(name, None)
            if slot is not None:
                self._write_slot(slot, None)

    # -------------------------------------------------------------------------------- training

    def add_adapter(self, name: str, config: Any) -> int:
        """A new trainable adapter `name` in a free slot, initialised as PEFT initialises it; returns its slot.

        config: a peft.LoraConfig, or a dict of its fields (peft is not needed then). Used: r (default 8),
        lora_alpha (8), target_modules (required: names / a regex as in PEFT, or "all-linear"; each module it
        matches must be one this model wraps), rank_pattern / alpha_pattern (PEFT's suffix rule), use_rslora,
        lora_dropout (per adapter, in training mode; the mask is the seeded one of `lora_kernels.dropout`,
        not nn.Dropout's), init_lora_weights (True: A Kaiming-uniform(a=sqrt(5)), B = 0; "gaussian": A ~
        N(0, 1/r), B = 0; False: A and B as nn.Linear initialises them), drawn from torch's default generator.
        use_dora (DoRA: each targeted layer also gets a magnitude m [out], initialised as PEFT does to
        ‖W0 + s · B A‖_row of the initial weights, i.e. ‖W0_j‖ when B = 0). Features MultiLoRAModel does not
        implement (biases, layers_to_transform, ...) raise AdapterError.

        Each targeted layer gets leaf parameters A [r, in] and B [out, r] (and m) in the slots' dtype
        (`parameters_of`); the whole wrapped model is frozen, as PEFT freezes it. The adapter is never
        evicted (`unload_adapter` drops it). Raises ValueError when `name` exists, RuntimeError when no slot
        can be freed.
        """
        _check_name(name)
        where = f"LoRA config of adapter {name!r}"
        cfg = files.training_config(config, where)
        modules = files.config_modules(cfg, self.layers, self._other_linear, self.max_rank, where)
        # Draw the initial weights (torch's default generator) before taking the lock.
        weights = {m: _init_lora(cfg["init_lora_weights"], r, self.layers[m].in_features,
                                 self.layers[m].out_features) for m, (r, _) in modules.items()}
        with self._lock:
            if self._store.known(name):
                raise ValueError(f"adapter {name!r} exists; unload_adapter({name!r}) first to replace it")
            slot = self._store.place(name)
            for module, layer in self.layers.items():
                if module in modules:
                    A, B = weights[module]
                    s = modules[module][1]
                    m = layer.dora_weight_norm(A, B, s) if cfg.get("use_dora") else None
                    layer.add_trainable(slot, A, B, s, magnitude=m)
                else:
                    layer.clear_slot(slot)
            self._trained[name] = _TrainedAdapter(cfg, cfg["lora_dropout"], modules)
            self._trained[name].synced = self._versions(name)
            adapters = {id(q) for layer in self.layers.values() for d in (layer.train_A, layer.train_B, layer.train_m)
                        for q in d.values()}
            for q in self.parameters():  # freeze the base model, as PEFT does
                if id(q) not in adapters:
                    q.requires_grad_(False)
        return slot

    def _trained_info(self, name: str) -> _TrainedAdapter:
        info = self._trained.get(name)
        if info is None:
            what = "was loaded from files" if self._store.known(name) else "does not exist"
            raise KeyError(f"adapter {name!r} {what}: only adapters made by add_adapter are trainable (trainable: "
                           f"{sorted(self._trained)})")
        return info

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """The trainable adapter `name`'s parameters: A [r, in] and B [out, r] (then m [out] for DoRA) of each
        layer it targets, in layer order, PEFT's order (KeyError for an adapter not made by add_adapter)."""
        with self._lock:
            info, slot = self._trained_info(name), self._store.slots.get(name)
            return [q for m in info.modules for q in self.layers[m].trainable_parameters(slot)]

    def param_groups(self, **options) -> list[dict]:
        """One optimizer param group per trainable adapter, ``{"params": parameters_of(name), "adapter": name,
        **options}``: torch optimizers keep their state per parameter, so each adapter is updated as if it
        were trained alone (clip gradients per group, not over all groups, to keep it so)."""
        with self._lock:
            return [{"params": self.parameters_of(n), "adapter": n, **options} for n in self._trained]

    @property
    def trainable_adapters(self) -> list[str]:
        """Names of the adapters made by add_adapter."""
        with self._lock:
            return list(self._trained)

    def _versions(self, name: str) -> tuple:
        return tuple(q._version for q in self.parameters_of(name))

    def _sync_trained(self, force: bool = False) -> None:
        """Copy each trainable adapter's parameters into its slot buffers if they changed since the last copy
        (an in-place update, as by an optimizer, bumps a tensor's version counter)."""
        for name, info in self._trained.items():
            v = self._versions(name)
            if force or v != info.synced:
                slot = self._store.slots[name]
                for module in info.modules:
                    self.layers[module].sync_trainable(slot)
                info.synced = v

    def train(self, mode: bool = True) -> "MultiLoRAModel":
        """Training mode (mode=True): forwards build a StepBatch, gradients reach the trainable adapters and
        their LoRA dropout applies. eval() also copies the trainable adapters into their slots for serving."""
        super().train(mode)
        if not mode:
            with self._lock:
                self._sync_trained(force=True)
        return self

    def save_adapter(self, name: str, path: Union[str, Path]) -> Path:
        """Write the trainable adapter `name` as a PEFT adapter directory `path`: adapter_config.json (its
        LoraConfig, inference_mode=true) and adapter_model.safetensors with PEFT's tensor names (a DoRA
        adapter's magnitudes too), loadable by ``PeftModel.from_pretrained`` and `load_adapter`. Atomic: `path`
        is never a half-written adapter."""
        with self._lock:
            info, slot = self._trained_info(name), self._store.slots[name]
            tensors, magnitudes = {}, {}
            for module in info.modules:
                layer = self.layers[module]
                (A,), (B,) = layer.trainable_weights(slot)
                tensors[module] = (A.detach().to("cpu", copy=True), B.detach().to("cpu", copy=True))
                m = layer.trainable_magnitude(slot)
                if m is not None:
                    magnitudes[module] = m.detach().to("cpu", copy=True)
            cfg = dict(info.config, inference_mode=True)
        if not cfg.get("base_model_name_or_path"):
            cfg["base_model_name_or_path"] = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        return files.write_adapter(path, cfg, tensors, magnitudes)

    # -------------------------------------------------------------------------------- running

    def _fetch(self, names: list[str]) -> dict:
        """Read from disk, outside the lock, the adapters of a batch that are neither in a slot nor in the host
        tier: {name: (source, weights)}. Unknown names and batches that cannot fit raise first, reading
        nothing."""
        with self._lock:
            self._store.check_batch(names)
            todo = self._store.to_read(names)
        return {n: (src, self._read(src.path)) for n, src in todo.items()}

    @contextmanager
    def _pinned(self, names: list[str], fetched: dict):
        """Bring `names` into slots (with what `_fetch` read) and pin them for the block. Holds the lock while
        admitting; the caller holds it for the block when the block must not interleave with other threads."""
        with self._lock:
            # Another thread may have pushed an adapter out of its slot and the host tier since `_fetch`.
            for n, src in self._store.to_read(self._store.check_batch(names)).items():
                if fetched.get(n, (None,))[0] != src:
                    fetched[n] = (src, self._read(src.path))
            for slot, _, weights in self._store.admit(names, fetched):
                self._write_slot(slot, weights)
            self._store.pin(names)
        try:
            yield
        finally:
            with self._lock:
                self._store.unpin(names)

    @contextmanager
    def running(self, adapter_names: Sequence[Optional[str]]):
        """Bring these adapters into slots and pin them (a running batch uses them): they are not evicted or
        unloaded meanwhile. Raises before changing anything for an unknown name (KeyError), more distinct
        adapters than max_loras (ValueError), slots all pinned (RuntimeError) or files that fail the checks
        of `load_adapter` (AdapterError, FileNotFoundError)."""
        names = _names(adapter_names)
        with self._pinned(names, self._fetch(names)):
            yield

    @staticmethod
    def _per_sequence(adapter_names, batch_size: int) -> list[Optional[str]]:
        if adapter_names is None:
            return [None] * batch_size
        if isinstance(adapter_names, str) or len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names must be a list of {batch_size} names (None = base model), one per "
                             f"sequence, got {adapter_names!r}")
        return list(adapter_names)

    def _build_batch(self, module, args, kwargs):
        """Forward pre-hook on the wrapped model: one LoRABatch per call (each step of `generate`), for every
        layer; nothing when `prepare` has built the step's batch."""
        if self._prepared:
            return None
        if self._seq_slots is None:
            self.context.batch, self.context.slots = None, None
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
        self.context.slots = self._seq_slot_set
        return None

    @contextmanager
    def _batch_for(self, adapter_names, batch_size: int):
        """The lock, the batch's adapters in slots and pinned, and its slot ids [B] int64 on the device: the
        common start of `prepare` and `generate`. Everything that can fail does so before any forward."""
        per_seq = self._per_sequence(adapter_names, batch_size)
        names = _names(per_seq)
        fetched = self._fetch(names)
        with self._lock, self._pinned(names, fetched):
            ids = [-1 if n is None else self._store.slots[n] for n in per_seq]
            yield ids, torch.tensor(ids, dtype=torch.int64, device=self._device())

    @contextmanager
    def prepare(self, adapter_names: Optional[Sequence[Optional[str]]], inputs: Tensor):
        """Build one forward's batch for `forward_prepared` calls inside the block; `forward` is this plus
        `forward_prepared`. inputs: the step's input_ids [B, S] (or inputs_embeds [B, S, H]); sequence b uses
        adapter_names[b] (None: the base model); adapters not in a slot are brought in first.

        Holds the model's lock and pins the adapters for the block. Everything that reads the host happens
        here, so a compiled step runs inside it with no graph break::

            step = torch.compile(mm.forward_prepared, fullgraph=True)
            with mm.prepare(names, input_ids):
                loss = step(input_ids, labels=labels).loss
            loss.backward()

        Training mode: a StepBatch over the slots the batch uses (a compiled step is specialised on that set
        of slots: one graph per set that occurs). Eval mode: a LoRABatch over all slots, after copying changed
        trainable adapters into their slots.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() < 2:
            raise ValueError(f"inputs must be input_ids [B, S] or inputs_embeds [B, S, H], got "
                             f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
        b, s = inputs.shape[0], inputs.shape[1]
        with self._batch_for(adapter_names, b) as (ids, seq):
            if self.training:
                dropout = [self._trained[n].dropout if n in self._trained else 0.0 for n in self._store.slot_names]
                batch = StepBatch.from_sequences(ids, s, dropout, seq.device)
            else:
                self._sync_trained()
                batch = LoRABatch.from_sequences(seq, s, self.max_loras, check=False)
            self._row_group = torch.where(seq >= 0, seq, self.max_loras)
            self.context.batch, self.context.slots, self._prepared = batch, frozenset(ids), True
            try:
                yield
            finally:
                self.context.batch, self.context.slots, self._prepared, self._row_group = None, None, False, None

    def forward_prepared(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                         labels: Optional[Tensor] = None, loss_reduction: str = "per_adapter", **kwargs):
        """The wrapped model's forward (and loss) on the batch `prepare` built: traceable, for torch.compile.

        labels [B, S] with loss_reduction "per_adapter": the output's ``loss`` is Σ over the slots in the batch
        of each slot's own causal-LM loss (`per_adapter_loss`: what training that adapter alone on its rows
        gives, so each adapter's gradient is its solo one; rows without an adapter add their own mean loss as
        one more group, which reaches no adapter), and ``slot_losses`` [max_loras + 1] holds them by slot (the
        last entry: rows without an adapter; 0 where a slot has no rows). "mean": the labels go to
        the wrapped model, whose loss is one mean over every labelled token of the batch (an adapter's
        gradient then depends on how many tokens the other adapters have).
        """
        if loss_reduction not in ("per_adapter", "mean"):
            raise ValueError(f"loss_reduction must be 'per_adapter' or 'mean', got {loss_reduction!r}")
        if self._row_group is None:
            raise RuntimeError("forward_prepared runs inside `with model.prepare(adapter_names, input_ids):`")
        if labels is None or loss_reduction == "mean":
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss, per_slot = per_adapter_loss(out.logits, labels, self._row_group, self.max_loras + 1)
        out = type(out)(loss=loss, **out) if "loss" in getattr(type(out), "__dataclass_fields__", {}) else out
        out["slot_losses"] = per_slot
        if "loss" not in out:  # not a transformers output with a loss field
            out["loss"] = loss
        return out

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                adapter_names: Optional[Sequence[Optional[str]]] = None, labels: Optional[Tensor] = None,
                loss_reduction: str = "per_adapter", **kwargs):
        """The wrapped model's forward; sequence b uses adapter_names[b] (None: the base model). Adapters not
        in a slot are brought in first (from the host tier or their directory); a batch naming more distinct
        adapters than max_loras raises ValueError before any forward.

        With labels, ``loss`` is one loss for the whole batch (see `forward_prepared` for loss_reduction; the
        default sums each adapter's own mean loss) and ``adapter_losses`` maps each name in the batch (None:
        rows without an adapter) to its own loss. In training mode gradients reach the trainable adapters in
        the batch, with each one's LoRA dropout.
        """
        inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        with self.prepare(adapter_names, inputs):
            out = self.forward_prepared(input_ids, attention_mask, labels=labels, loss_reduction=loss_reduction,
                                        **kwargs)
            if "slot_losses" in out:
                per_slot = out["slot_losses"]
                out["adapter_losses"] = {n: per_slot[self.max_loras if n is None else self._store.slots[n]]
                                         for n in dict.fromkeys(adapter_names or [None] * inputs.shape[0])}
        return out

    @staticmethod
    def _batch_size(input_ids, kwargs) -> int:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        return ref.shape[0]

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """`model.generate` with sequence b on adapter_names[b]; the adapters are brought into slots first and
        stay pinned throughout (loads from other threads wait until it returns). A batch naming more distinct
        adapters than max_loras raises ValueError before generating anything (it is not split: the caller
        decides how to group requests). Runs the slot buffers (trainable adapters are copied into their slots
        first when they changed), in either mode."""
        with self._batch_for(adapter_names, self._batch_size(input_ids, kwargs)) as (ids, seq):
            self._sync_trained()
            self._seq_slots, self._seq_slot_set = seq, frozenset(ids)
            try:
                return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            finally:
                self._seq_slots, self._seq_slot_set = None, None
                self.context.batch, self.context.slots = None, None


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
