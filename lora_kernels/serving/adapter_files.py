"""PEFT LoRA adapter directories: read them into validated host tensors, check LoRA configs, compute scalings,
write them atomically. Nothing here knows about `nn.Module`s: a model is described by plain data (its
layers' names and shapes, the names of all its modules), so every check is testable alone.

A PEFT adapter directory holds ``adapter_config.json`` (a LoraConfig) and ``adapter_model.safetensors`` or
``adapter_model.bin`` with tensors ``base_model.model.<module>.lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r] per adapted module; a DoRA adapter (``use_dora=true``) also ``<module>.lora_magnitude_vector`` [out]
(PEFT's saved name; ``.weight`` / an adapter name after it are read too).

Adapter files are untrusted input. `read_adapter` validates the config and the weights file's header (names,
shapes, dtypes, ranks, sizes against the model) before it reads any tensor data, never unpickles code
(``.bin`` files load with ``weights_only=True``), refuses regex keys that could make Python's backtracking
`re` run for exponential time, and returns only finite tensors in the slots' dtype. A caller that writes
its slots only after `read_adapter` has returned therefore leaves them bit-identical when it raises.

The one scaling rule (`rank_and_scaling`: r, lora_alpha, rank_pattern / alpha_pattern, use_rslora, the
float32 range of the slots) serves both loading files and creating trainable adapters.
"""
from __future__ import annotations

import enum
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

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
# DoRA's magnitude m [out]: PEFT saves "<module>.lora_magnitude_vector" (its parameter is ".<adapter>.weight").
_MAG_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_MAG_NAME = "lora_magnitude_vector"

# Weight dtypes an adapter may be stored in (they are cast to the slots' dtype). Integers, bool and complex
# cannot be cast meaningfully; float8 checkpoints carry scales elsewhere, so their raw values would be wrong.
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_WEIGHT_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())
_FP32_MAX = torch.finfo(torch.float32).max
_MAX_CONFIG_BYTES = 1 << 20

# init_lora_weights values a trainable adapter reproduces (PEFT's LoraLayer.reset_lora_parameters): True = A
# as nn.Linear's default (Kaiming-uniform, a=sqrt(5)), B = 0; "gaussian" = A ~ N(0, 1/r), B = 0; False = A
# and B both as nn.Linear's default (PEFT leaves them as created: an adapter that changes the output at once).
INITS = (True, False, "gaussian")
# LoraConfig fields training does not implement; set, they raise instead of training something else.
_UNSUPPORTED_TRAINING = ("layers_to_transform", "layers_pattern", "exclude_modules")
# LoraConfig features no slot can hold (a slot is A, B, a scaling and DoRA's magnitude per linear layer).
_UNSUPPORTED = {
    "fan_in_fan_out": bool, "lora_bias": bool, "bias": lambda v: v not in (None, "none"),
    "modules_to_save": bool, "layer_replication": bool, "trainable_token_indices": bool, "use_qalora": bool,
    "target_parameters": bool, "alora_invocation_tokens": bool,
}

LayerShapes = Mapping[str, tuple[int, int]]  # {module name: (in_features, out_features)}


class AdapterError(ValueError):
    """An adapter that cannot be loaded into this MultiLoRAModel (the slots are left unchanged)."""


def _some(names: list) -> str:
    """The first few of a list, for a message."""
    return f"{names[:4]}{'...' if len(names) > 4 else ''}"


def _positive_number(v, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if integer:
        return isinstance(v, int) and v > 0
    return math.isfinite(v) and v > 0


# ------------------------------------------------------------------------------------------ regex guard
# rank_pattern / alpha_pattern keys and a string target_modules are regexes from an untrusted file, matched by
# Python's backtracking `re`: "(.*)*x" or "(a|aa)*x" would take exponential time. Patterns must be simple
# enough that one match costs O(len(module)^3 · 2^4) steps (no repetition or alternation inside a
# repetition, no backreferences, at most _MAX_KEY_REPEATS variable repeats and _MAX_KEY_BRANCHES extra
# alternatives), and matching all of them for one load gets PATTERN_BUDGET_S seconds.
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


# ------------------------------------------------------------------------------------------ target modules

def matches_target(name: str, target_modules: Union[str, Iterable[str]]) -> bool:
    """PEFT's rule (check_target_module_exists): a string is a regex the whole module name must match; a list
    holds module names or suffixes after a dot ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def targeted_modules(target_modules, modules: Iterable[str], linear: Iterable[str],
                     deadline: float = math.inf) -> list[str]:
    """The names among `modules` that target_modules selects; "all-linear" selects `linear` (the model's
    linear layers but the output layer, as PEFT expands it)."""
    if target_modules == "all-linear":
        return list(linear)
    out = []
    for name in modules:
        if isinstance(target_modules, str) and time.monotonic() > deadline:
            raise TimeoutError
        if matches_target(name, target_modules):
            out.append(name)
    return out


def _format_targets(target_modules) -> str:
    return repr(target_modules) if isinstance(target_modules, str) else \
        "{" + ", ".join(repr(t) for t in sorted(target_modules)) + "}"


def check_targets(cfg: dict, modules: Iterable[str], linear: Iterable[str], where: Union[str, Path],
                  deadline: float = math.inf) -> Optional[set[str]]:
    """The modules a file's config targets, or None when it names none (older configs: the tensors' names
    decide). Raises like PEFT (NoMatchingPeftModuleError) when target_modules matches no module of the model.
    modules: every module name of the base model (what PEFT matches against); linear: its linear layers."""
    targets = cfg.get("target_modules")
    if targets is None:
        return None
    try:
        matched = set(targeted_modules(targets, modules, linear, deadline))
    except TimeoutError:
        raise AdapterError(f"{where}: matching target_modules against the model's modules took over "
                           f"{PATTERN_BUDGET_S} s") from None
    if not matched:
        raise AdapterError(f"{where}: Target modules {_format_targets(targets)} not found in the base model. Please "
                           "check the target modules and try again.")
    return matched


# ------------------------------------------------------------------------------------------ configs

def lora_config_dict(config) -> dict:
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


def check_config(cfg: dict, where: Union[str, Path]) -> None:
    """A LoRA config a slot can hold, with sane numbers and safe patterns; AdapterError naming `where`."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, bad in _UNSUPPORTED.items():
        if key in cfg and bad(cfg[key]):
            raise AdapterError(f"{where}: {key}={cfg[key]!r} is not supported by MultiLoRAModel")
    # r and lora_alpha (and their per-module patterns): positive; r an int, alpha finite (JSON allows NaN).
    for key, integer in (("r", True), ("lora_alpha", False)):
        v = cfg.get(key)
        if v is not None and not _positive_number(v, integer):
            raise AdapterError(f"corrupt {where}: {key} must be a positive {'int' if integer else 'number'}, "
                               f"got {v!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise AdapterError(f"corrupt {where}: {key} must be an object, got {pattern!r}")
        for k, v in pattern.items():
            if not _positive_number(v, integer):
                raise AdapterError(f"corrupt {where}: {key}[{k!r}] must be a positive "
                                   f"{'int' if integer else 'number'}, got {v!r}")
            why = _unsafe_pattern(k)
            if why:
                raise AdapterError(f"{where}: {key} key {k!r} is refused: {why} (pattern keys from adapter "
                                   "files must be simple regexes, see adapter_files._unsafe_pattern)")
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        why = _unsafe_pattern(targets)
        if why:
            raise AdapterError(f"{where}: target_modules {targets!r} is refused: {why}")
    elif not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"corrupt {where}: target_modules must be a string or a list of strings, got "
                           f"{targets!r}")


def read_config(path: Path) -> dict:
    """The checked config of adapter directory `path` (FileNotFoundError / NotADirectoryError for a path that
    is not one; AdapterError for a bad config). Reads no weights."""
    if path.is_file():
        raise NotADirectoryError(f"adapter path {str(path)!r} is a file, not a PEFT adapter directory (pass the "
                                 f"directory that holds {CONFIG_NAME})")
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
    if cfg_file.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterError(f"corrupt {cfg_file}: {cfg_file.stat().st_size} bytes, not an adapter config")
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"corrupt {cfg_file}: {e}") from e
    check_config(cfg, cfg_file)
    return cfg


def weights_file(path: Path) -> Path:
    """The adapter's weights file: safetensors if present, else .bin (FileNotFoundError for neither)."""
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{str(path)!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def training_config(config: Any, where: str) -> dict:
    """The config of a new trainable adapter: a peft.LoraConfig or a dict, checked and completed with PEFT's
    defaults (r=8, lora_alpha=8, bias "none") and the normalised init_lora_weights and lora_dropout."""
    cfg = lora_config_dict(config)
    check_config(cfg, where)
    for key in _UNSUPPORTED_TRAINING:
        if cfg.get(key) not in (None, [], ()):
            raise AdapterError(f"{where}: {key}={cfg[key]!r} is not supported by MultiLoRAModel.add_adapter")
    init = cfg.get("init_lora_weights", True)
    init = init.lower() if isinstance(init, str) else init
    if init not in INITS:
        raise AdapterError(f"{where}: init_lora_weights={cfg.get('init_lora_weights')!r} is not supported "
                           f"(use one of {list(INITS)})")
    p = cfg.get("lora_dropout", 0.0) or 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise AdapterError(f"{where}: lora_dropout must be a float in [0, 1), got {p!r}")
    targets = cfg.get("target_modules")
    if targets is None or (not isinstance(targets, str) and not targets):
        raise AdapterError(f"{where}: target_modules must name the modules to adapt (e.g. ['q_proj', 'v_proj'] "
                           "or 'all-linear'); MultiLoRAModel does not guess them")
    for key, default in (("peft_type", "LORA"), ("r", 8), ("lora_alpha", 8), ("bias", "none")):
        cfg.setdefault(key, default)
    cfg["init_lora_weights"], cfg["lora_dropout"] = init, float(p)
    return cfg


def rank_and_scaling(cfg: dict, module: str, max_rank: int, where: str, r: Optional[int] = None,
                     deadline: float = math.inf) -> tuple[int, float]:
    """(r, scaling) of `module` under LoRA config `cfg`, by PEFT's rule: r and alpha are rank_pattern's /
    alpha_pattern's value for the module (a key matches a module path ending with it) else ``r`` /
    ``lora_alpha``, and scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``.

    r: the rank the adapter's tensors have (loading files): the config must agree, and a config without
    ``r`` / ``lora_alpha`` defaults to it (scaling 1); None (a new trainable adapter): the config's. Raises
    AdapterError (naming `where`) for a rank above max_rank or a scaling the slots' float32 cannot hold, and
    TimeoutError past `deadline` (time.monotonic()) while matching patterns.
    """
    r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r), deadline)
    rank = r_cfg if r is None else r
    if rank > max_rank:
        raise AdapterError(f"{where}: rank r={rank} of {module!r} exceeds max_rank={max_rank}")
    if r_cfg != rank:
        raise AdapterError(f"corrupt {where}: {module!r} has rank {rank} but the config says {r_cfg}")
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank), deadline)
    scaling = alpha / (math.sqrt(rank) if cfg.get("use_rslora", False) else rank)
    # The slots keep scalings in float32: a larger one would become inf.
    if not (math.isfinite(scaling) and abs(scaling) <= _FP32_MAX):
        raise AdapterError(f"{where}: scaling lora_alpha / r = {scaling!r} for {module!r} is not a finite float32")
    return rank, float(scaling)


def config_modules(cfg: dict, layers: Iterable[str], other_linear: Iterable[str], max_rank: int,
                   where: str) -> dict[str, tuple[int, float]]:
    """{module: (r, scaling)} of the layers a trainable adapter's config targets (`training_config`); every
    linear module it targets must be one of `layers` (those a MultiLoRAModel wraps; other_linear: the rest but
    the output layer)."""
    layers, others = list(layers), list(other_linear)
    targets = cfg["target_modules"]
    matched = set(targeted_modules(targets, layers + others, layers + others))
    missing = [n for n in others if n in matched]
    if missing:
        raise AdapterError(f"{where}: target_modules={targets!r} matches {_some(missing)}, which this "
                           "MultiLoRAModel does not wrap (build it with target_modules covering the adapter's)")
    if not matched:
        raise AdapterError(f"{where}: target_modules={targets!r} matches no layer of this MultiLoRAModel")
    return {m: rank_and_scaling(cfg, m, max_rank, where) for m in layers if m in matched}


# ------------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from `path` and validated: ``modules[name] = (A [r, in], B [out, r], scaling)`` for
    each layer it adapts, and for a DoRA adapter ``magnitudes[name] = m [out]`` for each of them (empty
    otherwise), on the host in the slots' dtype, finite, in memory of their own (pinned when asked: a
    non-blocking copy into the device slots)."""
    path: Path
    modules: dict[str, tuple[Tensor, Tensor, float]]
    magnitudes: dict[str, Tensor] = field(default_factory=dict)


def _max_file_bytes(layers: LayerShapes, max_rank: int) -> int:
    """No adapter the model can hold is larger: float64 A and B at max_rank and a DoRA magnitude for every
    layer (+ slack)."""
    return sum(8 * (max_rank * (i + o) + o) for i, o in layers.values()) + (1 << 20)


def _plan(header: dict[str, tuple[tuple[int, ...], object]], cfg: dict, file: Path, layers: LayerShapes,
          max_rank: int, targeted: Optional[set[str]], deadline: float
          ) -> dict[str, tuple[str, str, float, Optional[str]]]:
    """Validate the weights file's tensor names, shapes and dtypes (its header) against the model and the
    config: {module: (key of A, key of B, scaling, key of the DoRA magnitude or None)}."""
    pairs: dict[str, dict[str, str]] = {}
    dora = bool(cfg.get("use_dora"))
    for key, (shape, dtype) in header.items():
        m = _KEY_RE.match(key)
        which = m["ab"] if m is not None else None
        if m is None and dora:
            m, which = _MAG_RE.match(key), "m"
        if m is None:
            raise AdapterError(f"{file}: unsupported tensor {key!r} (only LoRA A/B weights of linear layers "
                               f"{'and DoRA magnitudes ' if dora else ''}can be served)")
        ab = pairs.setdefault(m["module"], {})
        if which in ab:
            name = _MAG_NAME if which == "m" else f"lora_{which}"
            raise AdapterError(f"{file}: two {name} tensors for module {m['module']!r}: {ab[which]!r} and {key!r}")
        ab[which] = key
    if not pairs:
        raise AdapterError(f"{file}: the weights file holds no LoRA weights")
    missing = sorted(m for m in pairs if m not in layers)
    if missing:
        raise AdapterError(
            f"incompatible target modules: the adapter in {file} targets {_some(missing)}, which this "
            "MultiLoRAModel does not serve; build it with target_modules covering the adapter's (None wraps every "
            "nn.Linear but the LM head)")
    # PEFT adapts only the modules its config targets and ignores other tensors: serving them would differ.
    stray = sorted(m for m in pairs if targeted is not None and m not in targeted)
    if stray:
        raise AdapterError(f"{file}: tensors for {_some(stray)}, which target_modules={cfg.get('target_modules')!r} "
                           f"in {CONFIG_NAME} does not target (PEFT would ignore them)")
    plan = {}
    for module, ab in pairs.items():
        if not {"A", "B"} <= set(ab):
            raise AdapterError(f"{file}: module {module!r} has lora_{sorted(set('AB') - set(ab))[0]} missing "
                               f"(found only {next(iter(ab.values()))!r})")
        if dora and "m" not in ab:
            raise AdapterError(f"{file}: module {module!r} has no {_MAG_NAME} (use_dora=true in {CONFIG_NAME})")
        (a_shape, a_dtype), (b_shape, b_dtype) = header[ab["A"]], header[ab["B"]]
        for key in ab.values():
            dtype = header[key][1]
            if dtype not in _WEIGHT_DTYPES and dtype not in _SAFETENSORS_DTYPES:
                raise AdapterError(f"{file}: tensor {key!r} has dtype {dtype}, which cannot be cast to the slots' "
                                   "dtype; LoRA weights must be float16, bfloat16, float32 or float64")
        n_in, n_out = layers[module]
        if "m" in ab and tuple(header[ab["m"]][0]) != (n_out,):
            raise AdapterError(f"incompatible shapes in {file} for {module!r}: adapter has {_MAG_NAME} "
                               f"{tuple(header[ab['m']][0])}; the base layer needs [{n_out}]")
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != n_in or b_shape[0] != n_out \
                or a_shape[0] != b_shape[1]:
            raise AdapterError(
                f"incompatible shapes in {file} for {module!r}: adapter has A {tuple(a_shape)}, B "
                f"{tuple(b_shape)}; the base layer needs A [r, {n_in}] and B [{n_out}, r] (was the adapter "
                "trained on another base model?)")
        if a_shape[0] < 1:
            raise AdapterError(f"{file}: {module!r} has rank 0 (empty lora_A / lora_B)")
        try:
            _, scaling = rank_and_scaling(cfg, module, max_rank, f"adapter in {file}", r=a_shape[0],
                                          deadline=deadline)
        except TimeoutError:
            raise AdapterError(f"{file.parent / CONFIG_NAME}: matching rank_pattern / alpha_pattern against the "
                               f"adapter's modules took over {PATTERN_BUDGET_S} s") from None
        plan[module] = (ab["A"], ab["B"], scaling, ab.get("m"))
    return plan


def _owned_checked(t: Tensor, dtype: torch.dtype, key: str, file: Path, pin_memory: bool) -> Tensor:
    """t in `dtype`, in memory of its own (never a map of the file, which may change under a cached adapter);
    non-finite values (in the file, or from overflow in the cast) are an error."""
    out = torch.empty(t.shape, dtype=dtype, pin_memory=pin_memory)
    out.copy_(t)
    if not torch.isfinite(out).all():
        how = "has non-finite values" if not torch.isfinite(t).all() else \
            f"overflows when cast to the slots' dtype {out.dtype}"
        raise AdapterError(f"corrupt adapter in {file}: tensor {key!r} {how}")
    return out


def read_adapter(path: Union[str, Path], layers: LayerShapes, max_rank: int,
                 dtype: Union[torch.dtype, Mapping[str, torch.dtype]], *, modules: Optional[Iterable[str]] = None,
                 pin_memory: bool = False) -> AdapterWeights:
    """Read and validate PEFT adapter directory `path` for a model whose adaptable layers are `layers`
    ({module name: (in_features, out_features)}), with slots of rank <= max_rank in `dtype` (one, or one per
    module). modules: every module name of the base model, what PEFT matches target_modules against
    (default: the names in `layers`).

    Raises FileNotFoundError / NotADirectoryError for a path that is not an adapter directory, and
    AdapterError naming the file and the problem: a corrupt or truncated file, an unsupported config, an
    absurd r / lora_alpha, an unsafe pattern, a target_modules that matches no module of the model (as PEFT)
    or does not target a module the tensors adapt, a scaling that does not fit float32, tensors that are not
    LoRA A/B pairs (plus a magnitude [out] per module for ``use_dora``, and none without it), a dtype other
    than float16 / bfloat16 / float32 / float64, a rank above max_rank, modules or shapes that do not fit
    the model, a pickle that is not plain tensors, non-finite weights (also from
    overflow in the cast to the slots' dtype). No tensor data is read before the header has passed.
    """
    path = Path(path)
    cfg = read_config(path)
    deadline = time.monotonic() + PATTERN_BUDGET_S
    targeted = check_targets(cfg, layers if modules is None else modules, layers, path / CONFIG_NAME, deadline)
    file = weights_file(path)
    size, limit = file.stat().st_size, _max_file_bytes(layers, max_rank)
    if size > limit:
        raise AdapterError(f"{file}: {size} bytes, larger than any adapter this model can hold at "
                           f"max_rank={max_rank} ({limit} bytes)")
    try:
        if file.name == SAFETENSORS_NAME:
            from safetensors import safe_open
            # safe_open parses and checks the header (offsets inside the file: a truncated file fails here)
            # and memory-maps the data; get_tensor reads one tensor, after the plan has passed.
            with safe_open(str(file), framework="pt", device="cpu") as f:
                header = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    header[k] = (tuple(sl.get_shape()), sl.get_dtype())
                plan = _plan(header, cfg, file, layers, max_rank, targeted, deadline)
                tensors = {k: f.get_tensor(k) for a, b, _, m in plan.values() for k in (a, b, m) if k is not None}
        else:
            # weights_only: a pickle that would run code is refused. mmap (zip checkpoints, torch >= 2.1)
            # leaves the data on disk until the plan has passed.
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in state.items()):
                raise ValueError("not a dict of tensors")
            plan = _plan({k: (tuple(v.shape), v.dtype) for k, v in state.items()}, cfg, file, layers, max_rank,
                         targeted, deadline)
            tensors = state
    except AdapterError:
        raise
    except Exception as e:  # safetensors / pickle raise many types for a truncated, garbled or unsafe file
        raise AdapterError(f"corrupt adapter weights in {file}: {type(e).__name__}: {e}") from e
    out, magnitudes = {}, {}
    for module, (a, b, scaling, m) in plan.items():
        dt = dtype if isinstance(dtype, torch.dtype) else dtype[module]
        out[module] = (_owned_checked(tensors[a], dt, a, file, pin_memory),
                       _owned_checked(tensors[b], dt, b, file, pin_memory), scaling)
        if m is not None:
            magnitudes[module] = _owned_checked(tensors[m], dt, m, file, pin_memory)
    return AdapterWeights(path, out, magnitudes)


# ------------------------------------------------------------------------------------------ writing

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


def write_adapter(path: Union[str, Path], config: dict, modules: Mapping[str, tuple[Tensor, Tensor]],
                  magnitudes: Optional[Mapping[str, Tensor]] = None) -> Path:
    """Write a PEFT adapter directory, atomically (`write_dir_atomically`): `config` as adapter_config.json and
    ``modules[name] = (A [r, in], B [out, r])`` as adapter_model.safetensors under PEFT's tensor names
    (``base_model.model.<module>.lora_A.weight`` / ``lora_B``), and a DoRA adapter's ``magnitudes[name] = m
    [out]`` as ``base_model.model.<module>.lora_magnitude_vector``; loadable by ``PeftModel.from_pretrained``."""
    from safetensors.torch import save as safetensors_bytes

    tensors = {}
    for module, (A, B) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().to("cpu", copy=True).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().to("cpu", copy=True).contiguous()
    for module, m in (magnitudes or {}).items():
        tensors[f"base_model.model.{module}.{_MAG_NAME}"] = m.detach().to("cpu", copy=True).contiguous()
    files = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(),
             SAFETENSORS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"})}
    return write_dir_atomically(path, files)
