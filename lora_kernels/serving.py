"""Serve and train many PEFT LoRA adapters behind one Hugging Face causal LM, one adapter per sequence.

    mm = MultiLoRAModel(model, max_loras=8, max_rank=16)       # swaps the targeted nn.Linear layers
    mm.load_adapter("sql", "path/to/peft_adapter_dir")          # adapter_config.json + adapter_model.*
    out = mm(input_ids, attention_mask=mask, adapter_names=["sql", None, "chat"])
    mm.generate(input_ids, attention_mask=mask, adapter_names=[...], max_new_tokens=16)

Training several adapters in one batch (one concept with serving: an adapter lives in a slot either way):

    mm.add_adapter("de", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))  # or a dict
    mm.add_adapter("fr", {...});  mm.train()
    opt = torch.optim.AdamW(mm.param_groups(), lr=1e-4)        # or parameters_of("de") for one adapter
    out = mm(input_ids, labels=labels, adapter_names=["de", "fr", "de", ...])
    out.loss.backward(); opt.step(); opt.zero_grad()            # set_to_none (the default) matters, see below
    mm.eval(); mm.save_adapter("de", "out/de")                  # a PEFT adapter directory

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

Adapter files are untrusted input. `load_adapter` validates the config and the weights file's header (names,
shapes, dtypes, ranks, sizes against this model) before it reads any tensor data, never unpickles code
(`.bin` files load with ``weights_only=True``), and writes the slots only once everything has passed: a
failed load raises and leaves every slot bit-identical.

Threads: one thread may load / unload adapters while others run forwards. A forward (or a whole `generate`)
holds the model's lock from building its batch to its last layer, and slot writes take the same lock, so a
forward sees each adapter entirely before or entirely after a reload, never a torn slot. Loads wait for
running forwards (reading and validating the files happens before, outside the lock); forwards from several
threads run one at a time, since they share the per-step batch.
"""
from __future__ import annotations

import enum
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels.layers.multi_lora import BatchContext, MultiLoRALinear, StepBatch
from lora_kernels.ops.multi_lora import LoRABatch

try:  # Python >= 3.11
    from re import _constants as _sre, _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# PEFT saves "base_model.model.<module path>.lora_A.weight" (older versions keep ".<adapter name>").
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

# Weight dtypes an adapter may be stored in (they are cast to the slots' dtype). Integers, bool and complex
# cannot be cast meaningfully; float8 checkpoints carry scales elsewhere, so their raw values would be wrong.
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_WEIGHT_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())
_FP32_MAX = torch.finfo(torch.float32).max


class AdapterError(ValueError):
    """An adapter that cannot be loaded into this MultiLoRAModel (the slots are left unchanged)."""


def _positive_number(v, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if integer:
        return isinstance(v, int) and v > 0
    return math.isfinite(v) and v > 0


# rank_pattern / alpha_pattern keys are regexes from an untrusted file, matched by Python's backtracking `re`:
# "(.*)*x" or "(a|aa)*x" would take exponential time. Keys must be simple enough that one match costs
# O(len(module)^3 · 2^4) steps (no repetition or alternation inside a repetition, no backreferences, at most
# _MAX_KEY_REPEATS variable repeats and _MAX_KEY_BRANCHES extra alternatives), and matching all of them for one
# load gets PATTERN_BUDGET_S seconds.
_MAX_KEY_LEN, _MAX_KEY_REPEATS, _MAX_KEY_BRANCHES = 256, 2, 4
PATTERN_BUDGET_S = 2.0
_REPEATS = tuple(getattr(_sre, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, n))


def _unsafe_pattern(key: str) -> Optional[str]:
    """Why a pattern key is refused, or None."""
    if len(key) > _MAX_KEY_LEN:
        return f"longer than {_MAX_KEY_LEN} characters"
    try:
        tree = _sre_parse.parse(key)
        re.compile(rf"(.*\.)?({key})$")  # as _pattern_value uses it (e.g. inline flags fail here)
    except re.error as e:
        return f"not a valid pattern: {e}"
    count = {"repeats": 0, "branches": 0}

    def walk(items, in_repeat: bool) -> Optional[str]:
        for op, av in items:
            subs = []
            if op in _REPEATS:
                lo, hi, sub = av
                if lo != hi:
                    if in_repeat:
                        return "a repetition inside a repetition"
                    count["repeats"] += 1
                subs, in_repeat_sub = [sub], in_repeat or hi > 1  # "(a*){9}" is nine stars in a row
            elif op is _sre.BRANCH:
                if in_repeat:
                    return "an alternation inside a repetition"
                count["branches"] += len(av[1]) - 1
                subs, in_repeat_sub = av[1], in_repeat
            elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
                return "a backreference"
            elif op is _sre.SUBPATTERN:
                subs, in_repeat_sub = [av[-1]], in_repeat
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                subs, in_repeat_sub = [av[1]], in_repeat
            elif op is getattr(_sre, "ATOMIC_GROUP", None):
                subs, in_repeat_sub = [av], in_repeat
            for sub in subs:
                why = walk(sub, in_repeat_sub)
                if why:
                    return why
        return None

    why = walk(tree, False)
    if why is None and count["repeats"] > _MAX_KEY_REPEATS:
        why = f"more than {_MAX_KEY_REPEATS} variable-length repeats"
    if why is None and count["branches"] > _MAX_KEY_BRANCHES:
        why = f"more than {_MAX_KEY_BRANCHES + 1} alternatives"
    return why


def _pattern_value(patterns: dict, module: str, default, deadline: float = math.inf):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module path that ends with it.
    for key, value in (patterns or {}).items():
        if time.monotonic() > deadline:
            raise TimeoutError
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _matches_target(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


# -------------------------------------------------------------------------------- training helpers

# init_lora_weights values add_adapter reproduces (PEFT's LoraLayer.reset_lora_parameters): True = A as
# nn.Linear's default (Kaiming-uniform, a=sqrt(5)), B = 0; "gaussian" = A ~ N(0, 1/r), B = 0; False = A and B
# both as nn.Linear's default (PEFT leaves them as created: an adapter that changes the output from step 0).
_INITS = (True, False, "gaussian")
# LoraConfig fields add_adapter does not implement; set, they raise instead of training something else.
_UNSUPPORTED_TRAINING = ("layers_to_transform", "layers_pattern", "exclude_modules")
IGNORE_INDEX = -100  # transformers' label for "no loss on this token"


def _lora_config_dict(config) -> dict:
    """A JSON-ready dict of a peft.LoraConfig (its to_dict(), sets as sorted lists, enums as values) or of a
    plain dict."""
    if isinstance(config, dict):
        d = dict(config)
    elif hasattr(config, "to_dict"):
        d = config.to_dict()
    else:
        raise TypeError(f"config must be a peft.LoraConfig or a dict, got {type(config).__name__}")

    def plain(v):
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (set, frozenset)):
            return sorted(v)
        return v
    return {k: plain(v) for k, v in d.items()}


def _init_lora(init, r: int, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) float32 on the CPU, drawn from torch's default generator as PEFT draws them."""
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


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dir_atomically(path: Union[str, Path], files: dict[str, bytes]) -> Path:
    """Write `files` ({name: content}) as directory `path`, which is at every moment either as it was (absent,
    or the previous adapter) or complete: the files are written and fsynced into a temporary sibling directory,
    which is then renamed to `path` (an existing adapter directory is first renamed aside, its other files
    carried over, then removed). A failure removes the temporary directory and restores the old one; a crash
    leaves at most a hidden ``.<name>.*.tmp`` sibling, never a partial `path`.

    Refuses (FileExistsError) to replace a non-empty directory that holds no adapter_config.json: it is not
    an adapter this wrote, and its contents would be lost.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file: save_adapter writes a directory")
    carry = []
    if path.is_dir():
        entries = list(path.iterdir())
        if entries and not (path / CONFIG_NAME).is_file():
            raise FileExistsError(f"{str(path)!r} is a non-empty directory without {CONFIG_NAME}; not replacing it")
        # Another weights file would shadow or contradict the new one: the rest (README, ...) is kept.
        carry = [e for e in entries if e.name not in files and e.name not in (SAFETENSORS_NAME, BIN_NAME)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Optional[Path] = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Optional[Path] = None
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        for e in carry:
            (shutil.copytree if e.is_dir() else shutil.copy2)(e, tmp / e.name)
        _fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # onto an empty directory: allowed by rename(2)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
            old = None
        raise
    finally:
        for d in (tmp, old):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    return path


@dataclass
class _TrainedAdapter:
    """An adapter made by add_adapter: its LoRA config (what save_adapter writes), its LoRA dropout, the modules
    it targets with their (r, scaling), and its parameters' version counters when last copied into its slot."""
    config: dict
    dropout: float
    modules: dict[str, tuple[int, float]]
    synced: tuple = ()


class MultiLoRAModel(nn.Module):
    """Wraps `model` (a transformers causal LM) in place: its targeted nn.Linear layers become
    `MultiLoRALinear` with `max_loras` slots of rank <= `max_rank`.

    target_modules: None (every nn.Linear except the output embedding), a list of module-name suffixes
    ("q_proj") or a regex matched against the full module name, as in PEFT's LoraConfig.
    backend: None (fastest for the device), "torch", "triton" or "native", for every layer.

    The wrapper starts in the wrapped model's mode (``model.training``); `train()` / `eval()` switch both.
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
        self._trained: dict[str, _TrainedAdapter] = {}
        self._prepared = False                     # `prepare` built this step's batch: the pre-hook leaves it
        self._row_group: Optional[Tensor] = None   # [B] int64: the slot of each row (max_loras: none), for losses
        # Guards the slot table and slot buffers; held by a whole forward (see the module docstring).
        self._lock = threading.RLock()
        self.training = model.training
        model.register_forward_pre_hook(self._build_batch, with_kwargs=True)

    def __getstate__(self):  # copy.deepcopy / pickle: a lock cannot be copied; the copy gets its own
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

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
        with self._lock:
            return dict(self._slots)

    def load_adapter(self, name: str, path: Union[str, Path]) -> int:
        """Load the PEFT LoRA adapter saved in directory `path` under `name`; returns its slot.

        Reloading a loaded name replaces it in its slot. When every slot is taken, the least recently used
        adapter that no running batch uses is evicted. Waits for a forward running in another thread.

        Raises FileNotFoundError (no such directory or files), NotADirectoryError (`path` is a file) or
        AdapterError, naming the file and the problem: a corrupt or truncated file, an unsupported config, an
        absurd ``r`` / ``lora_alpha``, a scaling that does not fit float32, tensors that are not LoRA A/B pairs,
        a weight dtype other than float16 / bfloat16 / float32 / float64, a rank above max_rank, modules or
        shapes that do not fit this model, a pickle that is not plain tensors. Non-finite weights are
        rejected (AdapterError), including values that overflow when cast to the slots' dtype: a served
        adapter never turns its tokens' outputs into inf / NaN. Everything is checked before any slot
        changes, so after a failed load the slots are exactly as before.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
        weights = self._read_adapter(Path(path))  # everything is validated before any slot changes
        with self._lock:
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
            self._trained.pop(name, None)  # a trainable adapter of this name is replaced by the loaded one
            self._slot_names[slot] = name
            self._slots[name] = slot
            self._last_used[name] = next(self._clock)
            return slot

    def unload_adapter(self, name: str) -> None:
        """Free `name`'s slot (a trainable adapter's parameters are dropped). Raises KeyError for an unknown
        name."""
        with self._lock:
            self._check_known([name])
            if self._pins.get(name):
                raise RuntimeError(f"adapter {name!r} is in use by a running batch and cannot be unloaded now")
            slot = self._slots.pop(name)
            for layer in self.layers.values():
                layer.clear_slot(slot)
            self._slot_names[slot] = None
            self._last_used.pop(name, None)
            self._trained.pop(name, None)

    def _free_slot(self) -> int:
        for s, n in enumerate(self._slot_names):
            if n is None:
                return s
        # Trainable adapters are never evicted: their parameters (and training) would be lost.
        idle = [n for n in self._slots if not self._pins.get(n) and n not in self._trained]
        if not idle:
            raise RuntimeError(f"all {self.max_loras} adapter slots are used by running batches or trainable "
                               "adapters; finish one, unload one or raise max_loras")
        victim = min(idle, key=lambda n: self._last_used[n])
        slot = self._slots[victim]
        self.unload_adapter(victim)
        return slot

    def _read_adapter(self, path: Path) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{module name: (A [r, in], B [out, r] in the slots' dtype, scaling)} for a PEFT adapter dir, fully
        validated. Reads no tensor data before the header has been checked against this model."""
        if path.is_file():
            raise NotADirectoryError(f"adapter path {str(path)!r} is a file, not a PEFT adapter directory (pass the "
                                     f"directory that holds {CONFIG_NAME})")
        if not path.is_dir():
            raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
        if cfg_file.stat().st_size > 1 << 20:
            raise AdapterError(f"corrupt {cfg_file}: {cfg_file.stat().st_size} bytes, not an adapter config")
        try:
            cfg = json.loads(cfg_file.read_text())
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise AdapterError(f"corrupt {cfg_file}: {e}") from e
        self._check_config(cfg, cfg_file)
        return self._read_weights(path, cfg)

    def _plan(self, header: dict[str, tuple[tuple[int, ...], object]], cfg: dict, file: Path
              ) -> dict[str, tuple[str, str, float]]:
        """Validate the weights file's tensor names, shapes and dtypes (its header) against this model and the
        config: {module: (key of A, key of B, scaling)}."""
        pairs: dict[str, dict[str, str]] = {}
        for key, (shape, dtype) in header.items():
            m = _KEY_RE.match(key)
            if m is None:
                raise AdapterError(f"{file}: unsupported tensor {key!r} (only LoRA A/B weights of linear layers "
                                   "can be served)")
            ab = pairs.setdefault(m["module"], {})
            if m["ab"] in ab:
                raise AdapterError(f"{file}: two lora_{m['ab']} tensors for module {m['module']!r}: {ab[m['ab']]!r} "
                                   f"and {key!r}")
            ab[m["ab"]] = key
        if not pairs:
            raise AdapterError(f"{file}: the weights file holds no LoRA weights")
        missing = sorted(m for m in pairs if m not in self.layers)
        if missing:
            raise AdapterError(
                f"incompatible target modules: the adapter in {file} targets {missing[:4]}"
                f"{'...' if len(missing) > 4 else ''}, which this MultiLoRAModel does not serve; build it with "
                "target_modules covering the adapter's (None wraps every nn.Linear but the LM head)")
        plan = {}
        deadline = time.monotonic() + PATTERN_BUDGET_S
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{file}: module {module!r} has lora_{sorted(set('AB') - set(ab))[0]} missing "
                                   f"(found only {next(iter(ab.values()))!r})")
            (a_shape, a_dtype), (b_shape, b_dtype) = header[ab["A"]], header[ab["B"]]
            for key, dtype in ((ab["A"], a_dtype), (ab["B"], b_dtype)):
                if dtype not in _WEIGHT_DTYPES and dtype not in _SAFETENSORS_DTYPES:
                    raise AdapterError(f"{file}: tensor {key!r} has dtype {dtype}, which cannot be cast to the slots' "
                                       "dtype; LoRA weights must be float16, bfloat16, float32 or float64")
            layer = self.layers[module]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != layer.in_features \
                    or b_shape[0] != layer.out_features or a_shape[0] != b_shape[1]:
                raise AdapterError(
                    f"incompatible shapes in {file} for {module!r}: adapter has A {tuple(a_shape)}, B "
                    f"{tuple(b_shape)}; the base layer needs A [r, {layer.in_features}] and B "
                    f"[{layer.out_features}, r] (was the adapter trained on another base model?)")
            r = a_shape[0]
            if r < 1:
                raise AdapterError(f"{file}: {module!r} has rank 0 (empty lora_A / lora_B)")
            if r > self.max_rank:
                raise AdapterError(f"adapter in {file}: rank r={r} of {module!r} exceeds max_rank={self.max_rank}")
            try:
                r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r), deadline)
                alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r), deadline)
            except TimeoutError:
                raise AdapterError(f"{file.parent / CONFIG_NAME}: matching rank_pattern / alpha_pattern against the "
                                   f"adapter's modules took over {PATTERN_BUDGET_S} s") from None
            if r_cfg != r:
                raise AdapterError(f"corrupt adapter in {file}: {module!r} has rank {r} but the config says {r_cfg}")
            scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora", False) else r)
            # The slots keep scalings in float32: a larger one would become inf.
            if not (math.isfinite(scaling) and abs(scaling) <= _FP32_MAX):
                raise AdapterError(f"adapter in {file}: scaling lora_alpha / r = {scaling!r} for {module!r} is not "
                                   "a finite float32")
            plan[module] = (ab["A"], ab["B"], float(scaling))
        return plan

    def _cast_checked(self, t: Tensor, layer: MultiLoRALinear, key: str, file: Path) -> Tensor:
        """t in the slots' dtype; non-finite values (in the file, or from overflow in the cast) are an error."""
        out = t.to(layer.lora_A_0.dtype)
        if not torch.isfinite(out).all():
            how = "has non-finite values" if not torch.isfinite(t).all() else \
                f"overflows when cast to the slots' dtype {out.dtype}"
            raise AdapterError(f"corrupt adapter in {file}: tensor {key!r} {how}")
        return out

    def _max_file_bytes(self) -> int:
        """No adapter this model can hold is larger: float64 A and B at max_rank for every layer (+ slack)."""
        return sum(8 * self.max_rank * (l.in_features + l.out_features) for l in self.layers.values()) + (1 << 20)

    def _read_weights(self, path: Path, cfg: dict) -> dict[str, tuple[Tensor, Tensor, float]]:
        st, bn = path / SAFETENSORS_NAME, path / BIN_NAME
        file = st if st.is_file() else bn if bn.is_file() else None
        if file is None:
            raise FileNotFoundError(f"{str(path)!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")
        size, limit = file.stat().st_size, self._max_file_bytes()
        if size > limit:
            raise AdapterError(f"{file}: {size} bytes, larger than any adapter this model can hold at "
                               f"max_rank={self.max_rank} ({limit} bytes)")
        try:
            if file is st:
                from safetensors import safe_open
                # safe_open parses and checks the header (offsets inside the file: a truncated file fails here)
                # and memory-maps the data; get_tensor reads one tensor, after the plan has passed.
                with safe_open(str(st), framework="pt", device="cpu") as f:
                    header = {}
                    for k in f.keys():
                        sl = f.get_slice(k)
                        header[k] = (tuple(sl.get_shape()), sl.get_dtype())
                    plan = self._plan(header, cfg, file)
                    tensors = {k: f.get_tensor(k) for a, b, _ in plan.values() for k in (a, b)}
            else:
                # weights_only: a pickle that would run code is refused. mmap (zip checkpoints, torch >= 2.1)
                # leaves the data on disk until the plan has passed.
                state = torch.load(str(bn), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(bn))
                if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                          for k, v in state.items()):
                    raise ValueError("not a dict of tensors")
                plan = self._plan({k: (tuple(v.shape), v.dtype) for k, v in state.items()}, cfg, file)
                tensors = state
        except AdapterError:
            raise
        except Exception as e:  # safetensors / pickle raise many types for a truncated, garbled or unsafe file
            raise AdapterError(f"corrupt adapter weights in {file}: {type(e).__name__}: {e}") from e
        return {module: (self._cast_checked(tensors[a], self.layers[module], a, file),
                         self._cast_checked(tensors[b], self.layers[module], b, file), scaling)
                for module, (a, b, scaling) in plan.items()}

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
                raise AdapterError(f"{cfg_file}: {key}={cfg[key]!r} is not supported by MultiLoRAModel")
        # r and lora_alpha (and their per-module patterns): positive; r an int, alpha finite (JSON allows NaN).
        for key, integer in (("r", True), ("lora_alpha", False)):
            v = cfg.get(key)
            if v is not None and not _positive_number(v, integer):
                raise AdapterError(f"corrupt {cfg_file}: {key} must be a positive {'int' if integer else 'number'}, "
                                   f"got {v!r}")
        for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            pattern = cfg.get(key)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise AdapterError(f"corrupt {cfg_file}: {key} must be an object, got {pattern!r}")
            for k, v in pattern.items():
                if not _positive_number(v, integer):
                    raise AdapterError(f"corrupt {cfg_file}: {key}[{k!r}] must be a positive "
                                       f"{'int' if integer else 'number'}, got {v!r}")
                why = _unsafe_pattern(k)
                if why:
                    raise AdapterError(f"{cfg_file}: {key} key {k!r} is refused: {why} (pattern keys from adapter "
                                       "files must be simple regexes, see serving._unsafe_pattern)")

    # -------------------------------------------------------------------------------- training

    def add_adapter(self, name: str, config: Any) -> int:
        """A new trainable adapter `name` in a free slot, initialised as PEFT initialises it; returns its slot.

        config: a peft.LoraConfig, or a dict of its fields (peft is not needed then). Used: r (default 8),
        lora_alpha (8), target_modules (required: names / a regex as in PEFT, or "all-linear"; each module it
        matches must be one this model wraps), rank_pattern / alpha_pattern (PEFT's suffix rule), use_rslora,
        lora_dropout (per adapter, in training mode; the mask is the seeded one of `lora_kernels.dropout`,
        not nn.Dropout's), init_lora_weights (True: A Kaiming-uniform(a=sqrt(5)), B = 0; "gaussian": A ~
        N(0, 1/r), B = 0; False: A and B as nn.Linear initialises them), drawn from torch's default generator.
        Features MultiLoRAModel does not implement (DoRA, biases, layers_to_transform, ...) raise AdapterError.

        Each targeted layer gets leaf parameters A [r, in] and B [out, r] in the slots' dtype
        (`parameters_of`); the whole wrapped model is frozen, as PEFT freezes it. The adapter is never
        evicted (`unload_adapter` drops it). Raises ValueError when `name` exists, RuntimeError when no slot
        can be freed.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
        cfg = _lora_config_dict(config)
        where = f"LoRA config of adapter {name!r}"
        self._check_config(cfg, where)
        for key in _UNSUPPORTED_TRAINING:
            if cfg.get(key) not in (None, [], ()):
                raise AdapterError(f"{where}: {key}={cfg[key]!r} is not supported by MultiLoRAModel.add_adapter")
        init = cfg.get("init_lora_weights", True)
        init = init.lower() if isinstance(init, str) else init
        if init not in _INITS:
            raise AdapterError(f"{where}: init_lora_weights={cfg.get('init_lora_weights')!r} is not supported "
                               f"(use one of {list(_INITS)})")
        p = cfg.get("lora_dropout", 0.0) or 0.0
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise AdapterError(f"{where}: lora_dropout must be a float in [0, 1), got {p!r}")
        cfg.setdefault("peft_type", "LORA")
        cfg.setdefault("r", 8)
        cfg.setdefault("lora_alpha", 8)
        cfg.setdefault("bias", "none")
        cfg["init_lora_weights"], cfg["lora_dropout"] = init, float(p)
        modules = self._adapter_modules(cfg, where)
        # Draw the initial weights (torch's default generator) before taking the lock.
        weights = {m: _init_lora(init, r, self.layers[m].in_features, self.layers[m].out_features)
                   for m, (r, _) in modules.items()}
        with self._lock:
            if name in self._slots:
                raise ValueError(f"adapter {name!r} exists; unload_adapter({name!r}) first to replace it")
            slot = self._free_slot()
            for module, layer in self.layers.items():
                if module in modules:
                    layer.add_trainable(slot, *weights[module], modules[module][1])
                else:
                    layer.clear_slot(slot)
            self._slot_names[slot] = name
            self._slots[name] = slot
            self._last_used[name] = next(self._clock)
            self._trained[name] = _TrainedAdapter(cfg, float(p), modules)
            self._trained[name].synced = self._versions(name)
            adapters = {id(q) for layer in self.layers.values() for d in (layer.train_A, layer.train_B)
                        for q in d.values()}
            for q in self.parameters():  # freeze the base model, as PEFT does
                if id(q) not in adapters:
                    q.requires_grad_(False)
        return slot

    def _adapter_modules(self, cfg: dict, where: str) -> dict[str, tuple[int, float]]:
        """{module: (r, scaling)} of a config's targets; every one must be a layer this model wraps."""
        targets = cfg.get("target_modules")
        if targets is None or (not isinstance(targets, str) and not targets):
            raise AdapterError(f"{where}: target_modules must name the modules to adapt (e.g. ['q_proj', 'v_proj'] "
                               "or 'all-linear'); MultiLoRAModel does not guess them")
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        others = [n for n, m in self.model.named_modules()
                  if type(m) is nn.Linear and m is not out_emb and n.rpartition(".")[0] not in self.layers]
        if targets == "all-linear":
            matched = list(self.layers) + others
        else:
            matched = [n for n in list(self.layers) + others if _matches_target(n, targets)]
        missing = [n for n in matched if n not in self.layers]
        if missing:
            raise AdapterError(f"{where}: target_modules={targets!r} matches {missing[:4]}"
                               f"{'...' if len(missing) > 4 else ''}, which this MultiLoRAModel does not wrap (build "
                               "it with target_modules covering the adapter's)")
        if not matched:
            raise AdapterError(f"{where}: target_modules={targets!r} matches no layer of this MultiLoRAModel")
        modules = {}
        for module in self.layers:
            if module not in matched:
                continue
            r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
            if r > self.max_rank:
                raise AdapterError(f"{where}: rank r={r} of {module!r} exceeds max_rank={self.max_rank}")
            scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora", False) else r)
            if not (math.isfinite(scaling) and abs(scaling) <= _FP32_MAX):
                raise AdapterError(f"{where}: scaling lora_alpha / r = {scaling!r} for {module!r} is not a finite "
                                   "float32")
            modules[module] = (r, float(scaling))
        return modules

    def _trained_info(self, name: str) -> _TrainedAdapter:
        info = self._trained.get(name)
        if info is None:
            what = "was loaded from files" if name in self._slots else "does not exist"
            raise KeyError(f"adapter {name!r} {what}: only adapters made by add_adapter are trainable (trainable: "
                           f"{sorted(self._trained)})")
        return info

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """The trainable adapter `name`'s parameters: A [r, in] and B [out, r] of each layer it targets, in
        layer order (KeyError for an adapter not made by add_adapter)."""
        with self._lock:
            info, slot = self._trained_info(name), self._slots.get(name)
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
                slot = self._slots[name]
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
        LoraConfig, inference_mode=true) and adapter_model.safetensors with PEFT's tensor names
        (``base_model.model.<module>.lora_A.weight`` / ``lora_B``), loadable by ``PeftModel.from_pretrained``
        and `load_adapter`. Atomic (`write_dir_atomically`): `path` is never a half-written adapter."""
        from safetensors.torch import save as safetensors_bytes

        with self._lock:
            info, slot = self._trained_info(name), self._slots[name]
            tensors = {}
            for module in info.modules:
                (A,), (B,) = self.layers[module].trainable_weights(slot)
                tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().to("cpu", copy=True).contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().to("cpu", copy=True).contiguous()
            cfg = dict(info.config, inference_mode=True)
        if not cfg.get("base_model_name_or_path"):
            cfg["base_model_name_or_path"] = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        files = {CONFIG_NAME: json.dumps(cfg, indent=2, sort_keys=True).encode(),
                 SAFETENSORS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"})}
        return write_dir_atomically(path, files)

    # -------------------------------------------------------------------------------- running

    def _check_known(self, names) -> None:
        for n in names:
            if n is not None and n not in self._slots:
                raise KeyError(f"unknown adapter {n!r}; loaded: {sorted(self._slots)}")

    @contextmanager
    def running(self, adapter_names: Sequence[Optional[str]]):
        """Pin these adapters (a running batch uses them): they are not evicted or unloaded meanwhile."""
        # First-appearance order (not a set's): the recency order among one batch's adapters is deterministic.
        names = [n for n in dict.fromkeys(adapter_names) if n is not None]
        with self._lock:
            self._check_known(names)
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
                self._last_used[n] = next(self._clock)
        try:
            yield
        finally:
            with self._lock:
                for n in names:
                    self._pins[n] -= 1
                    if not self._pins[n]:
                        del self._pins[n]  # names come and go: keep the table as small as the loaded set

    def _seq_slot_ids(self, adapter_names, batch_size: int) -> list[int]:
        if adapter_names is None:
            adapter_names = [None] * batch_size
        if isinstance(adapter_names, str) or len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names must be a list of {batch_size} names (None = base model), one per "
                             f"sequence, got {adapter_names!r}")
        self._check_known(adapter_names)
        return [-1 if n is None else self._slots[n] for n in adapter_names]

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).base_layer.weight.device

    def _seq_slot_tensor(self, adapter_names, batch_size: int) -> Tensor:
        return torch.tensor(self._seq_slot_ids(adapter_names, batch_size), dtype=torch.int32, device=self._device())

    def _build_batch(self, module, args, kwargs):
        """Forward pre-hook on the wrapped model: one LoRABatch per call (each step of `generate`), for every
        layer; nothing when `prepare` has built the step's batch."""
        if self._prepared:
            return None
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
        self._sync_trained()
        self._seq_slots = self._seq_slot_tensor(adapter_names, batch_size)
        try:
            with self.running(adapter_names or []):
                yield
        finally:
            self._seq_slots = None
            self.context.batch = None

    @contextmanager
    def prepare(self, adapter_names: Optional[Sequence[Optional[str]]], inputs: Tensor):
        """Build one forward's batch for `forward_prepared` calls inside the block; `forward` is this plus
        `forward_prepared`. inputs: the step's input_ids [B, S] (or inputs_embeds [B, S, H]); sequence b uses
        adapter_names[b] (None: the base model).

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
        with self._lock:
            ids = self._seq_slot_ids(adapter_names, b)
            with self.running(adapter_names or []):
                device = self._device()
                seq = torch.tensor(ids, dtype=torch.int64, device=device)
                if self.training:
                    dropout = [self._trained[n].dropout if n in self._trained else 0.0 for n in self._slot_names]
                    batch = StepBatch.from_sequences(ids, s, dropout, device)
                else:
                    self._sync_trained()
                    batch = LoRABatch.from_sequences(seq, s, self.max_loras, check=False)
                self._row_group = torch.where(seq >= 0, seq, self.max_loras)
                self.context.batch, self._prepared = batch, True
                try:
                    yield
                finally:
                    self.context.batch, self._prepared, self._row_group = None, False, None

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
        """The wrapped model's forward; sequence b uses adapter_names[b] (None: the base model).

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
                out["adapter_losses"] = {n: per_slot[self.max_loras if n is None else self._slots[n]]
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
        """`model.generate` with sequence b on adapter_names[b]; the adapters stay pinned throughout (and
        loads from other threads wait until it returns). Runs the slot buffers (trainable adapters are copied
        into their slots first when they changed), in either mode."""
        with self._lock, self._adapters_for(adapter_names, self._batch_size(input_ids, kwargs)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
