"""Measured dispatch: which implementation `backend=None` runs, decided on the user's own device.

An op family (lora_linear, multi_lora_linear, ...) declares an `OpFamily` -- its implementations per phase
and backend, and how a call is keyed -- and makes one call, `select(family, phase, backend, args)`, for the
function to run. `select` builds the candidates of the call's device (each a name, the function that
implements the phase, and whether it is bitwise reproducible) and asks `choose`. On the first call
with a new key (op, phase, device, dtypes, M rounded up to a power of two, in, out, r, slices, dropout,
bias) and tuning on, every candidate runs on the call's own inputs:

* it is **verified** first: its outputs are compared with the reference candidate's (the composite: cuBLAS
  base GEMM + Triton LoRA kernels on CUDA, the PyTorch composite on CPU) by relative RMS error within the
  dtype's tolerance; a candidate that raises, returns non-finite values or disagrees is dropped and named
  once in a warning, so a user can report it;
* the survivors are **timed** (warm-up, then interleaved rounds over rotated copies of the inputs, median;
  CUDA events on a GPU), and the fastest wins unless it beats the untuned default (`default_backend`) by
  less than `MARGIN`.

The choice is kept in memory and in a JSON file (`cache_path()`: ``$LORA_KERNELS_CACHE_DIR`` or
``~/.cache/lora_kernels``), one file per environment (device name and capability, torch, triton and
lora_kernels versions), written atomically under a file lock so several processes (DDP ranks) can tune at
once; a corrupt or foreign file is ignored with a warning and rebuilt.

Nothing is timed inside CUDA-graph capture, torch.compile tracing or under
``torch.use_deterministic_algorithms(True)``: those use the cached choice (a reproducible one under
deterministic mode) or the reference.

``LORA_KERNELS_TUNE``: unset = tune on CUDA, not on CPU (the CPU default is fixed, measured by
``make bench``: see `lora_kernels.backends`); ``0`` = never tune (cached choices or the reference);
``1`` = tune on every device (on CPU, with TRITON_INTERPRET=1, this exercises the Triton candidates too).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from lora_kernels.backends import HAS_TRITON, NATIVE, NATIVE_CUDA, TRITON_INTERPRETED, default_backend

logger = logging.getLogger("lora_kernels.dispatch")

FORMAT = 1
# A candidate replaces the untuned default only when its median is this much faster: timing noise must not
# trade the safe default for an equal one.
MARGIN = 0.03
# Relative RMS error a candidate may show against the reference (same figures as the bench's check).
RTOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-9}
# Timing budget per candidate and key, and the cap on scratch memory for rotated inputs.
BUDGET_S = {"cuda": 0.05, "cpu": 0.05}
ROUNDS = 7
ROTATE_MAX_BYTES = 256 * 2**20
L2_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Candidate:
    """One implementation of an op's phase. `fn` takes the phase's arguments and returns its outputs."""
    name: str
    fn: Callable[..., Any]
    deterministic: bool = True  # bitwise reproducible under torch.use_deterministic_algorithms(True)


@dataclass(frozen=True, eq=False)
class OpFamily:
    """What an op family declares so that `select` can choose among its implementations (data, no logic).

    name:         the op's name in cache keys ("lora_linear").
    impls:        {phase: {backend: fn}}: every backend's implementation of each phase ("fwd", "bwd", ...).
    x_arg:        {phase: index of x in the phase's arguments}: its device and dtype key the choice.
    kernel_dtypes(phase, args) -> bool: whether the kernel backends (all but "torch") take these dtypes.
    key_fields(phase, args) -> dict: the cache key's fields beyond op and phase (shapes, dtypes, flags).
    outputs:      {phase: result -> the tensors verified against the reference}.
    measured_as:  {phase: (key phase, candidate table, number of leading args)}: a phase whose choice is the one
                  made for another (the multi-adapter training forward shares the inference forward's): its
                  candidates are timed from that table on those args, and the chosen name runs `impls[phase]`.
    reference:    {phase: the trusted candidate on CUDA} (default "composite"; "torch" everywhere else).
    not_on_cuda:  {phase: backends that are no candidate of their own on CUDA}.
    variants(phase, args) -> [Candidate] or None: tuned variants that replace the plain "triton" candidate on
                  CUDA (GEMM tile configs).
    stacked:      the adapter weights are lists of slice stacks (autograd plumbing, ops/plumbing.py).
    extra_candidates(device) -> [backend]: the family's own backends that are candidates on `device` beyond
                  `candidate_names` (qlora_linear's "bnb" where bitsandbytes imports). Measured when tuning,
                  never the untuned default.
    """
    name: str
    impls: Mapping[str, Mapping[str, Callable]]
    x_arg: Mapping[str, int]
    kernel_dtypes: Callable[[str, tuple], bool]
    key_fields: Callable[[str, tuple], dict]
    outputs: Mapping[str, Callable]
    measured_as: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    reference: Mapping[str, str] = dataclasses.field(default_factory=dict)
    not_on_cuda: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    variants: Optional[Callable[[str, tuple], Optional[list]]] = None
    stacked: bool = False
    extra_candidates: Optional[Callable[[torch.device], Sequence[str]]] = None


# ----------------------------------------------------------------------------------------------------
# Policy
# ----------------------------------------------------------------------------------------------------

_tune_env: Optional[str] = None  # LORA_KERNELS_TUNE, read once (reset() reads it again)


_forced: Optional[bool] = None   # set by `forced_tuning` (python -m lora_kernels tune)
_retune = False                  # forced_tuning(retune=True): measure again what the file already holds


def tuning_enabled(device: torch.device) -> bool:
    """LORA_KERNELS_TUNE=1: always; =0: never; unset: on CUDA only."""
    global _tune_env
    if _forced is not None:
        return _forced
    if _tune_env is None:
        _tune_env = os.environ.get("LORA_KERNELS_TUNE", "").strip()
    if _tune_env in ("0", "1"):
        return _tune_env == "1"
    return device.type == "cuda"


def _may_tune_now(device: torch.device) -> bool:
    if torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def bucket(m: int) -> int:
    """M rounded up to a power of two (0 stays 0)."""
    return 0 if m <= 0 else 1 << (m - 1).bit_length()


# ----------------------------------------------------------------------------------------------------
# The persistent cache
# ----------------------------------------------------------------------------------------------------

def cache_dir() -> str:
    d = os.environ.get("LORA_KERNELS_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lora_kernels")


def environment(device: torch.device) -> dict:
    """What a measurement is valid for: the device, and the versions of everything that runs."""
    from lora_kernels import __version__
    from lora_kernels.backends import HAS_TRITON
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"{props.name} sm_{props.major}{props.minor}"
    else:
        import platform
        dev = f"cpu {platform.machine()} {platform.processor() or ''}".strip() + f" x{torch.get_num_threads()}"
    triton_v = None
    if HAS_TRITON:
        import triton
        triton_v = triton.__version__
    return {"device": dev, "torch": torch.__version__, "triton": triton_v, "lora_kernels": __version__,
            "interpreted": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def cache_path(device: torch.device | str = "cpu") -> str:
    env = environment(torch.device(device))
    digest = hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"dispatch-{digest}.json")


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on `path`.lock for read-merge-write (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still leaves a valid file
        yield
        return
    with open(path + ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(path: str, env: dict) -> dict:
    """The entries of the cache file at `path`, or {} (with a warning) when it is corrupt or foreign."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"lora_kernels: ignoring the corrupt dispatch cache {path} ({type(e).__name__}: {e}); "
                      "it will be rebuilt", RuntimeWarning, stacklevel=3)
        return {}
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("environment") == env
            and isinstance(data.get("entries"), dict)):
        warnings.warn(f"lora_kernels: ignoring the dispatch cache {path}: written for another format or "
                      "environment; it will be rebuilt", RuntimeWarning, stacklevel=3)
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Table:
    """The entries of one environment: loaded once, written back (merged with the file) on every new entry."""

    def __init__(self, device: torch.device):
        self.env = environment(device)
        self.path = cache_path(device)
        self.entries = _read(self.path, self.env)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with _locked(self.path):
                merged = _read(self.path, self.env)
                merged[key] = entry
                write_atomic(self.path, json.dumps(
                    {"format": FORMAT, "environment": self.env, "entries": merged}, indent=1, sort_keys=True))
                self.entries.update(merged)
        except OSError as e:  # a read-only home must not break the op
            warnings.warn(f"lora_kernels: cannot write the dispatch cache {self.path}: {e}", RuntimeWarning,
                          stacklevel=3)


_tables: dict[str, _Table] = {}
_chosen: dict[tuple, str] = {}           # (device, key) -> candidate name, this process
_warned: set[tuple] = set()
_static: dict[str, bool] = {}   # device type -> neither tuning nor a cached entry can change the choice
_fastest: dict[Any, Any] = {}   # fastest_once: key -> the option that won, this process


def _table(device: torch.device) -> _Table:
    k = str(device)
    t = _tables.get(k)
    if t is None:
        t = _tables[k] = _Table(device)
    return t


def reset() -> None:
    """Forget everything loaded or chosen in this process (the files stay) and re-read LORA_KERNELS_TUNE."""
    global _tune_env
    _tune_env = None
    _tables.clear()
    _chosen.clear()
    _warned.clear()
    _static.clear()
    _fastest.clear()


def fastest_once(key, options: Mapping[Any, Callable[[], object]], rounds: int = 3):
    """The name in `options` (name -> a call with no arguments) whose call is fastest here, timed once per
    process under `key` (interleaved rounds after one warm-up call each, each option's best round) and then
    remembered. For choices inside one implementation that give the same values either way and depend on the
    machine rather than the shape (a hand-written GEMV against the BLAS GEMM), so they need neither the cache
    file nor a verification; whatever depends on the shape or changes the values is a candidate of `select`."""
    hit = _fastest.get(key)
    if hit is None:
        best = {name: math.inf for name in options}
        for f in options.values():
            f()
        for _ in range(rounds):
            for name, f in options.items():
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
        hit = _fastest[key] = min(best, key=best.__getitem__)
    return hit


@contextlib.contextmanager
def forced_tuning(enabled: bool = True, retune: bool = False):
    """Tune (or not) whatever LORA_KERNELS_TUNE says, inside this block; `retune` measures keys again that
    the cache file already holds (the new entries replace them)."""
    global _forced, _retune
    old = _forced, _retune
    _forced, _retune = enabled, retune
    _static.clear()
    try:
        yield
    finally:
        _forced, _retune = old
        _static.clear()


def entries(device: torch.device | str) -> dict[str, dict]:
    """The cache entries of `device`'s environment known to this process (file + new), by key."""
    return dict(_table(torch.device(device)).entries)


def choices() -> dict[str, str]:
    """{key: candidate name} of every choice made in this process (keys as in the cache file)."""
    return {key: name for (_, key), name in _chosen.items()}


def is_static(device_type: str) -> bool:
    """True when devices of this type run the fixed default: tuning is off and the cache file (of the
    current device) has no entries. The common CPU case; a dict lookup after the first call."""
    s = _static.get(device_type)
    if s is None:  # first call for this device type (or after reset / forced_tuning)
        device = torch.device(device_type)
        s = _static[device_type] = not tuning_enabled(device) and not _table(device).entries
    return s


# ----------------------------------------------------------------------------------------------------
# Choosing
# ----------------------------------------------------------------------------------------------------

def candidate_names(device: torch.device) -> list[str]:
    """The backends that are candidates on `device`, the reference and the untuned default among them."""
    if device.type == "cuda":
        return (["composite", "triton"] if HAS_TRITON else ["torch"]) + (["native"] if NATIVE_CUDA else [])
    names = ["torch"] + (["native"] if NATIVE is not None else [])
    if HAS_TRITON and TRITON_INTERPRETED and tuning_enabled(device):
        names += ["composite", "triton"]  # interpreted: to exercise the machinery in tests, never the default
    return names


def select(family: OpFamily, phase: str, backend: Optional[str], args: tuple) -> Callable:
    """The function that runs `family`'s `phase` on `args`: the named backend's, or for None / "auto" the one
    measured dispatch chose for this call's key (the untuned default when nothing is measured). The one call
    an op makes to choose."""
    impls = family.impls[phase]
    if backend is not None and backend != "auto":
        return impls[backend]
    x = args[family.x_arg[phase]]
    dev_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type  # x.device costs ~0.5 µs
    if is_static(dev_type):  # nothing measured and no tuning here: the fixed default
        name = default_backend(dev_type)
        return impls[name if name == "torch" or family.kernel_dtypes(phase, args) else "torch"]
    if not family.kernel_dtypes(phase, args):
        return impls["torch"]
    key_phase, table, nargs = family.measured_as.get(phase, (phase, impls, len(args)))
    device = x.device
    names = [n for n in candidate_names(device)
             if not (device.type == "cuda" and n in family.not_on_cuda.get(phase, ()))]
    if family.extra_candidates is not None:
        names += [n for n in family.extra_candidates(device) if n not in names]
    # Native CUDA kernels split K with atomics whatever torch's deterministic flag says.
    cands = [Candidate(n, table[n], deterministic=not (n == "native" and device.type == "cuda")) for n in names]
    if device.type == "cuda" and family.variants is not None and "triton" in names:
        extra = family.variants(phase, args)
        if extra is not None:
            cands = [c for c in cands if c.name != "triton"] + extra
    if len(cands) == 1:
        return impls[cands[0].name]
    ref = family.reference.get(phase, "composite") if device.type == "cuda" and HAS_TRITON else "torch"
    c = choose(family.name, key_phase, family.key_fields(phase, args), device, cands, ref,
               default_backend(dev_type), args[:nargs], family.outputs[key_phase], x.dtype)
    return c.fn if table is impls else impls[c.name]


def key_string(op: str, phase: str, fields: dict) -> str:
    return op + "/" + phase + "/" + ",".join(f"{k}={v}" for k, v in fields.items())


def choose(op: str, phase: str, fields: dict, device: torch.device, candidates: Sequence[Candidate],
           reference: str, default: str, args: tuple,
           outputs: Callable[[Any], Sequence[Optional[torch.Tensor]]], dtype: torch.dtype) -> Candidate:
    """The candidate to run for this call (see the module docstring).

    fields: the key (plain values); reference: the trusted candidate that others are verified against;
    default: what runs when nothing is measured (reproducible under deterministic mode; both names are in
    `candidates`); args: the call's arguments, passed to every candidate (never mutated by them); outputs:
    picks the tensors to compare from a candidate's result; dtype: sets the tolerance.
    """
    by_name = {c.name: c for c in candidates}
    ref = by_name[reference]
    dflt = by_name[default]
    key = key_string(op, phase, fields)
    det = torch.are_deterministic_algorithms_enabled()
    name = _chosen.get((str(device), key))
    if name is None and not _retune:
        entry = _table(device).entries.get(key)
        name = entry["choice"] if entry else None
    c = by_name.get(name) if name else None
    if c is not None and (c.deterministic or not det):
        _chosen[(str(device), key)] = c.name
        return c
    if len(candidates) == 1 or not tuning_enabled(device) or not _may_tune_now(device):
        return dflt
    entry = _tune(candidates, ref, dflt, args, outputs, dtype, device, key)
    if entry is None:
        return dflt
    _table(device).put(key, entry)
    _chosen[(str(device), key)] = entry["choice"]
    return by_name[entry["choice"]]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return math.inf
    num = (got - want).norm().item()
    den = want.norm().item()
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def _all_finite(ts) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in ts)


def _verify(c: Candidate, out, want, outputs, dtype) -> str:
    """'' when `out` agrees with the reference outputs `want`, else why not."""
    got = outputs(out)
    if len(got) != len(want):
        return f"returned {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if (g is None) != (w is None):
            return f"output {i} is {'missing' if g is None else 'unexpected'}"
        if w is None:
            continue
        err = _rel_error(g, w)
        if not err <= RTOL.get(dtype, 2e-3):
            return f"output {i} differs from the reference: relative RMS error {err:.3g}"
    return ""


def _rotated(args: tuple, device: torch.device) -> list[tuple]:
    """Copies of `args` with fresh random tensors, so that timing does not run from a warm L2 cache."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    footprint = sum(t.numel() * t.element_size() for t in tensors)
    if device.type != "cuda" or footprint == 0:
        return [args]
    n = min(4, math.ceil(2 * L2_BYTES / footprint), max(1, ROTATE_MAX_BYTES // footprint))
    sets = [args]
    for _ in range(n - 1):
        sets.append(tuple(torch.empty_like(a).normal_(0, 0.05) if isinstance(a, torch.Tensor)
                          and a.is_floating_point() and a.dim() > 0 else a for a in args))
    return sets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_round(fn: Callable, sets: list[tuple], device: torch.device, calls: int) -> float:
    """Seconds per call over `calls` calls cycling through the input sets."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / calls
    t0 = time.perf_counter()
    for i in range(calls):
        fn(*sets[i % len(sets)])
    return (time.perf_counter() - t0) / calls


def _tune(candidates, ref: Candidate, dflt: Candidate, args, outputs, dtype, device, key) -> Optional[dict]:
    """Verify and time every candidate; the cache entry, or None when this call cannot decide."""
    with torch.no_grad():
        want = outputs(ref.fn(*args))  # the reference raising is the op's own error: let it propagate
        if not _all_finite(want):
            return None  # non-finite inputs: nothing to compare against; decide on a later call
        alive, rejected = [], {}
        for c in candidates:
            if c is ref:
                alive.append(c)
                continue
            try:
                why = _verify(c, c.fn(*args), want, outputs, dtype)
            except Exception as e:  # noqa: BLE001 - a candidate that raises is dropped, not fatal
                why = f"raised {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            if why:
                rejected[c.name] = why
                _warn_rejected(c.name, key, why)
            else:
                alive.append(c)
        sets = _rotated(args, device)
        times: dict[str, list[float]] = {c.name: [] for c in alive}
        calls = {}
        for c in alive:  # warm-up and size a round: enough calls to fill the budget over ROUNDS rounds
            _sync(device)
            t = _time_round(c.fn, sets, device, 1)
            calls[c.name] = max(1, min(100, int(BUDGET_S[device.type] / ROUNDS / max(t, 1e-6))))
        for _ in range(ROUNDS):  # interleaved, so drift in clocks or load hits every candidate alike
            for c in alive:
                times[c.name].append(_time_round(c.fn, sets, device, calls[c.name]))
    med = {n: statistics.median(v) for n, v in times.items()}
    best = min(med, key=med.get)
    if best != dflt.name and dflt.name in med and med[best] > med[dflt.name] * (1 - MARGIN):
        best = dflt.name
    logger.info("lora_kernels dispatch %s: %s (%s)", key, best,
                ", ".join(f"{n} {t * 1e3:.4g} ms" for n, t in sorted(med.items(), key=lambda kv: kv[1])))
    return {"choice": best, "ms": {n: round(t * 1e3, 6) for n, t in med.items()}, "rejected": rejected,
            "reference": ref.name, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _warn_rejected(name: str, key: str, why: str) -> None:
    if (name, key) in _warned:
        return
    _warned.add((name, key))
    warnings.warn(f"lora_kernels: dropped candidate {name!r} for {key}: {why}. The reference implementation "
                  "runs instead; please report this (python -m lora_kernels info shows the details).",
                  RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------------
# For `python -m lora_kernels info` / `tune`
# ----------------------------------------------------------------------------------------------------

def cache_info(device: torch.device | str | None = None) -> dict:
    """The cache file of `device` (default: CUDA when present, else CPU), its entries and rejections."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    t = _Table(device)
    return {"path": t.path, "exists": os.path.exists(t.path), "tuning": tuning_enabled(device),
            "environment": t.env, "entries": t.entries,
            "rejected": {k: e["rejected"] for k, e in t.entries.items() if e.get("rejected")}}
