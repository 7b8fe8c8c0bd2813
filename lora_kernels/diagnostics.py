"""What `python -m lora_kernels info` and `... selftest` report; the functions behind the command line.

    info()      -> dict: package, torch / triton / peft / transformers and whether each lies in the range
                   this package declares (its installed metadata), CUDA runtime and driver, devices, the
                   backends that run here and why the others do not, the C++ extension's build, and the
                   measured-dispatch cache.
    selftest()  -> list of check rows: every backend that runs on the device against the float64
                   reference (lora_kernels.reference): lora_linear forward and backward at a few shapes and
                   dtypes, with dropout, multi_lora_linear over mixed slots (ranks, -1 tokens, slices),
                   dora_linear (dropout, lora_B's bias) and qlora_linear over an NF4 base.
    format_info(d), format_selftest(rows) -> the text the command prints.

The selftest is part of the package, so a `pip install` user without the repository's tests can check a
build on their own GPU and paste the output into a bug report.
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Packages whose versions `info` reports, with the extra of lora_kernels that declares the optional ones.
_PACKAGES = (("torch", ""), ("triton", ""), ("packaging", ""), ("peft", "peft"), ("transformers", "peft"),
             ("numpy", "test"))


# ----------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------

def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def declared_requirements() -> Optional[dict]:
    """{package: (specifier, extra)} from lora_kernels' installed metadata; None when it is not installed
    as a distribution (e.g. run from a source tree on sys.path)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        reqs = metadata.requires("lora_kernels") or []
    except metadata.PackageNotFoundError:
        return None
    out = {}
    for line in reqs:
        req = Requirement(line)
        for extra in ("", "peft", "test", "bench"):
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                out.setdefault(req.name.lower(), (req.specifier, extra))
                break
    return out


def package_versions() -> list[dict]:
    """One entry per package of _PACKAGES: installed version, declared range, and whether it is inside."""
    declared = declared_requirements()
    rows = []
    for name, extra in _PACKAGES:
        v = _dist_version(name)
        spec = None if declared is None else declared.get(name, (None, extra))[0]
        ok = None
        if v is not None and spec is not None:
            ok = spec.contains(v, prereleases=True)
        rows.append({"name": name, "version": v, "required": None if spec is None else (str(spec) or "any"),
                     "extra": extra, "in_range": ok})
    return rows


def _cuda_driver() -> dict:
    """The driver's version string (nvidia-smi) and the CUDA version it supports (libcuda), where present."""
    out = {"driver": None, "driver_cuda": None}
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            out["driver_cuda"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10)
            if p.returncode == 0 and p.stdout.strip():
                out["driver"] = p.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gb": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
    return out


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_status(device: torch.device) -> dict:
    """{"available": [...], "unavailable": {backend: why}, "default": what backend=None runs untuned}.

    The reasons are the errors `backend=<b>` itself would raise on this device.
    """
    from lora_kernels import backends

    avail = backends.available_backends(device)
    why = {}
    for b in backends.BACKENDS:
        if b in avail:
            continue
        try:
            backends.resolve_backend(b, device)
            why[b] = "not available on this device"
        except Exception as e:  # noqa: BLE001 - the library's own explanation
            why[b] = str(e)
    notes = {}
    if device.type == "cpu" and backends.TRITON_INTERPRETED:
        for b in avail:
            if b in ("triton", "composite"):
                notes[b] = "Triton's interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    return {"device": str(device), "available": avail, "unavailable": why, "notes": notes,
            "default": backends.resolve_backend(None, device)}


def extension_info() -> dict:
    """The C++/CUDA extension lora_kernels._C: built or not (and why), CPU-only or CUDA, its GPU architectures."""
    from lora_kernels import backends

    if backends.NATIVE is None:
        return {"built": False, "error": backends.NATIVE_ERROR}
    mod = backends.NATIVE
    with_cuda = bool(getattr(mod, "WITH_CUDA", 0))
    d = {"built": True, "path": getattr(mod, "__file__", None), "with_cuda": with_cuda, "arch_list": None}
    if with_cuda:
        d["arch_list"] = getattr(mod, "CUDA_ARCH_LIST", None) or _cubin_archs(d["path"])
    return d


def _cubin_archs(path: Optional[str]) -> Optional[str]:
    """The sm_XY of the cubins in the extension, read with the CUDA toolkit's cuobjdump when it is there."""
    exe = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if not path or not os.path.exists(exe):
        return None
    try:
        p = subprocess.run([exe, "--list-elf", path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    import re

    archs = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", p.stdout)))
    return ";".join(archs) or None


def dispatch_info(device: torch.device) -> Optional[dict]:
    """lora_kernels.dispatch.cache_info(device), or None where measured dispatch does not exist."""
    try:
        from lora_kernels import dispatch
    except ImportError:
        return None
    fn = getattr(dispatch, "cache_info", None)
    if fn is None:
        return None
    try:
        return fn(device)
    except Exception as e:  # noqa: BLE001 - info must print even with a broken cache
        return {"error": f"{type(e).__name__}: {e}"}


def backend_summary(device: torch.device, backend: Optional[str] = None) -> str:
    """One line saying what `backend=<backend>` runs on `device`: the name itself when given; for None the
    untuned default, and the choices measured dispatch has cached for this device (if any)."""
    if backend is not None:
        return backend
    from lora_kernels import backends

    device = torch.device(device)
    line = f"backend=None -> {backends.resolve_backend(None, device)} (the default on {device.type})"
    entries = (dispatch_info(device) or {}).get("entries") or {}
    chosen: dict[str, int] = {}
    for e in entries.values():
        c = e.get("choice") if isinstance(e, dict) else None
        if c:
            chosen[c] = chosen.get(c, 0) + 1
    if chosen:
        line += "; measured dispatch's cached choices: " + ", ".join(f"{c} for {n} shape(s)" for c, n in chosen.items())
    return line


def _vllm_status() -> Optional[dict]:
    """vLLM's presence and whether lora_kernels is its LoRA backend (reads metadata; never imports vLLM)."""
    try:
        from lora_kernels.integrations.vllm import vllm_status

        return vllm_status()
    except Exception as e:  # noqa: BLE001 - info must print whatever the environment holds
        return {"installed": None, "active": False, "reason": f"{type(e).__name__}: {e}"}


def _serving_stats() -> list[dict]:
    """`MultiLoRAModel.stats()` of every live model in this process (none in a fresh `python -m lora_kernels
    info`: call info() from the serving process to see its cache counters)."""
    from lora_kernels.serving.model import LIVE

    return [m.stats() for m in list(LIVE)]


def info(device: Optional[torch.device] = None) -> dict:
    """Everything `python -m lora_kernels info` prints, as a dict (JSON-serialisable)."""
    import lora_kernels

    device = torch.device(device) if device is not None else default_device()
    return {
        "lora_kernels": {"version": lora_kernels.__version__, "path": os.path.dirname(lora_kernels.__file__)},
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(), **_cuda_driver()},
        "devices": _devices(),
        "cpu_threads": torch.get_num_threads(),
        "backends": backend_status(device),
        "extension": extension_info(),
        "dispatch": dispatch_info(device),
        "vllm": _vllm_status(),
        "serving": _serving_stats(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "LORA_KERNELS_TUNE", "LORA_KERNELS_CACHE_DIR",
                                           "CUDA_VISIBLE_DEVICES", "LORA_KERNELS_NO_EXT") if k in os.environ},
    }


def format_info(d: dict) -> str:
    lk = d["lora_kernels"]
    lines = [f"lora_kernels {lk['version']}  ({lk['path']})", f"python       {d['python']}",
             f"platform     {d['platform']}", "", "packages (range = what lora_kernels declares):"]
    for p in d["packages"]:
        rng = "" if p["required"] is None else f"  requires {p['required']}" + (
            f" (extra [{p['extra']}])" if p["extra"] else "")
        verdict = {True: "  ok", False: "  OUTSIDE the declared range", None: ""}[p["in_range"]]
        lines.append(f"  {p['name']:<13}{p['version'] or 'not installed':<22}{rng}{verdict}")
    if all(p["required"] is None for p in d["packages"]):
        lines.append("  (lora_kernels is not installed as a distribution: its declared ranges are unknown)")
    c = d["cuda"]
    lines += ["", f"CUDA         torch built with CUDA {c['torch_cuda'] or '-- (CPU-only torch)'}; "
                  f"device available: {'yes' if c['available'] else 'no'}"]
    if c.get("driver") or c.get("driver_cuda"):
        lines.append(f"             driver {c.get('driver') or '?'} (supports CUDA {c.get('driver_cuda') or '?'})")
    for dev in d["devices"]:
        lines.append(f"  cuda:{dev['index']}  {dev['name']}  sm_{dev['capability'].replace('.', '')}  "
                     f"{dev['memory_gb']} GiB  {dev['sms']} SMs")
    lines.append(f"CPU threads  {d['cpu_threads']}")
    b = d["backends"]
    lines += ["", f"backends on {b['device']}: {', '.join(b['available'])}   (backend=None runs {b['default']} "
                  "unless measured dispatch chose another)"]
    for name, note in b["notes"].items():
        lines.append(f"  {name}: {note}")
    for name, why in b["unavailable"].items():
        lines.append(f"  {name}: not available: {why}")
    e = d["extension"]
    if e["built"]:
        kind = "CUDA" if e["with_cuda"] else "CPU-only"
        archs = f", GPU architectures {e['arch_list']}" if e.get("arch_list") else (
            ", GPU architectures not recorded (see scripts/build_cuda_check.sh)" if e["with_cuda"] else "")
        lines += ["", f"extension    lora_kernels._C built ({kind}{archs})", f"             {e['path']}"]
    else:
        lines += ["", f"extension    lora_kernels._C not built: {e['error']}"]
    disp = d["dispatch"]
    lines.append("")
    if disp is None:
        lines.append("dispatch     measured dispatch: not available in this version")
    elif "error" in disp:
        lines.append(f"dispatch     cache unreadable: {disp['error']}")
    else:
        lines.append(f"dispatch     cache {disp.get('path')} ({'exists' if disp.get('exists') else 'not written yet'}); "
                     f"tuning {'on' if disp.get('tuning') else 'off'}; {len(disp.get('entries') or {})} entries")
        for k, v in list((disp.get("entries") or {}).items())[:20]:
            choice = v.get("choice", v) if isinstance(v, dict) else v
            lines.append(f"  {k}: {choice}")
        for k, v in (disp.get("rejected") or {}).items():
            lines.append(f"  rejected for {k}: {v}")
    v = d.get("vllm")
    if v is not None:  # lora_kernels as vLLM's LoRA backend (lora_kernels/integrations/vllm.py)
        lines += ["", f"vLLM         {v['installed'] or 'not installed'}; lora_kernels backend "
                      + ("active" if v["active"] else f"inactive ({v['reason']})")]
    served = d.get("serving")
    if served is not None:
        lines += ["", f"serving      {len(served)} MultiLoRAModel(s) in this process; cache counters per model: "
                      "MultiLoRAModel.stats()"]
        lines += ["  " + ", ".join(f"{k}={v}" for k, v in st.items()) for st in served]
    if d["env"]:
        lines += ["", "environment  " + "  ".join(f"{k}={v}" for k, v in d["env"].items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# selftest
# ----------------------------------------------------------------------------------------------------

# Relative RMS error allowed against the float64 reference, by activation dtype (the test suite's bounds:
# fp32 is tight; 16-bit inputs are rounded to an 8- or 11-bit mantissa before any kernel sees them).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# (M, in, out, r): a decode row, odd sizes that fit no tile, rank 1 with more tokens than one tile, no tokens.
LORA_SHAPES = ((1, 64, 48, 8), (37, 96, 80, 16), (130, 72, 40, 1), (0, 64, 48, 8))
DROPOUT = 0.1
# multi_lora_linear: 13 tokens over 4 slots of ranks 4, 8, 0 (empty) and 16 (R = 16), -1 tokens, two
# output slices (a fused projection).
MULTI_SLOTS = [2, 0, -1, 3, 3, 1, 0, -1, 2, 3, 1, 0, 3]
MULTI_RANKS = [4, 8, 0, 16]
MULTI_SLICES = (40, 24)
MULTI_IN = 56


@dataclass
class Check:
    op: str
    backend: str
    case: str
    dtype: str
    error: Optional[float] = None     # worst relative RMS error over the outputs checked
    tol: Optional[float] = None
    status: str = "PASS"              # PASS | FAIL
    detail: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64 = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref.shape:
        raise ValueError(f"shape {tuple(out64.shape)}, expected {tuple(ref.shape)}")
    if not torch.isfinite(out64).all():
        return math.inf
    den = ref.norm().item()
    return (out64 - ref).norm().item() / den if den > 0 else (out64 - ref).norm().item()


def _dname(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt).replace("torch.", ""))


def _selftest_dtypes(device: torch.device) -> list[tuple[torch.dtype, torch.dtype]]:
    """(x dtype, adapter dtype): fp32; bf16 x with fp32 adapters (PEFT's default) and bf16 adapters; fp16 on GPU."""
    out = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    if device.type == "cuda":
        out.append((torch.float16, torch.float16))
    return out


def _lora_linear_check(backend: str, device: torch.device, shape, dtype, adtype, dropout_p: float) -> Check:
    from lora_kernels import dropout, reference
    from lora_kernels.ops import lora_linear as single

    M, K, N, r = shape
    g = torch.Generator().manual_seed(M * 1000 + K + N + r)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(M, K).to(device, dtype).requires_grad_()
    W = (rnd(N, K) / math.sqrt(K)).to(device, dtype)
    b = rnd(N).to(device, dtype)
    A = (rnd(r, K) / math.sqrt(K)).to(device, adtype).requires_grad_()
    B = rnd(N, r).to(device, adtype).requires_grad_()  # non-zero, unlike PEFT's init: the LoRA term shows
    dy = rnd(M, N).to(device, dtype)
    scaling = 0.75
    check = Check("lora_linear fwd+bwd", backend, f"M={M} {K}->{N} r={r}" + (f" p={dropout_p:g}" if dropout_p else ""),
                  f"x {_dname(dtype)}, A/B {_dname(adtype)}", tol=TOL[dtype])
    training = dropout_p > 0
    state = torch.random.get_rng_state()
    y = single.lora_linear(x, W, b, A, B, scaling, dropout_p=dropout_p, training=training, backend=backend)
    mask = None
    if training:  # the op drew its dropout seed from the default generator: draw the same one again
        after = torch.random.get_rng_state()
        torch.random.set_rng_state(state)
        mask = dropout.dropout_mask(dropout.new_seed(), (M, K), dropout_p)
        torch.random.set_rng_state(after)
    dx, dA, dB = torch.autograd.grad(y, [x, A, B], dy)
    f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    y_ref, _ = reference.lora_linear_forward(f64(x), f64(W), f64(b), f64(A), f64(B), scaling, mask, dropout_p)
    refs = reference.lora_linear_backward(f64(dy), f64(x), f64(W), f64(A), f64(B), scaling, mask, dropout_p)
    errs = {"y": _rel(y, y_ref), "dx": _rel(dx, refs[0]), "dA": _rel(dA, refs[1]), "dB": _rel(dB, refs[2])}
    for name, t, want in (("y", y, dtype), ("dx", dx, dtype), ("dA", dA, adtype), ("dB", dB, adtype)):
        if t.dtype != want:
            check.status, check.detail = "FAIL", f"{name} has dtype {_dname(t.dtype)}, expected {_dname(want)}"
    worst = max(errs, key=errs.get)
    check.error = errs[worst]
    if not check.error <= check.tol:  # NaN / inf fail too
        check.status = "FAIL"
        check.detail = check.detail or f"{worst}: relative error {check.error:.2e} > {check.tol:.0e}"
    return check


def _multi_lora_check(backend: str, device: torch.device, dtype: torch.dtype) -> Check:
    from lora_kernels import reference
    from lora_kernels.ops import multi_lora as multi

    L, R, T = len(MULTI_RANKS), max(MULTI_RANKS), len(MULTI_SLOTS)
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out_f = sum(MULTI_SLICES)
    x = rnd(T, MULTI_IN).to(device, dtype)
    W = (rnd(out_f, MULTI_IN) / math.sqrt(MULTI_IN)).to(device, dtype)
    b = rnd(out_f).to(device, dtype)
    # Padding past each slot's rank is garbage on purpose: the op must never read it into the result.
    A = [(rnd(L, R, MULTI_IN) / math.sqrt(MULTI_IN)).to(device, dtype) for _ in MULTI_SLICES]
    B = [rnd(L, n, R).to(device, dtype) for n in MULTI_SLICES]
    scalings = torch.tensor([0.5, 2.0, 1.0, 0.25], device=device)
    ranks = torch.tensor(MULTI_RANKS, dtype=torch.int32, device=device)
    batch = multi.LoRABatch.from_token_adapters(torch.tensor(MULTI_SLOTS, device=device), num_slots=L)
    check = Check("multi_lora_linear fwd+bwd", backend, f"T={T} {MULTI_IN}->{out_f} slots={L} ranks={MULTI_RANKS}",
                  _dname(dtype), tol=TOL[dtype])
    x.requires_grad_()
    for t in A + B:
        t.requires_grad_()
    y = multi.multi_lora_linear(x, W, b, A, B, scalings, batch, ranks, backend=backend)
    dy = rnd(T, out_f).to(device, dtype)
    dx, *dAB = torch.autograd.grad(y, [x, *A, *B], dy)
    f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    args = ([f64(a) for a in A], [f64(t) for t in B], scalings.cpu(), MULTI_SLOTS, ranks.cpu())
    y_ref = reference.multi_lora_linear_forward(f64(x), f64(W), f64(b), *args)
    dx_ref, dA_ref, dB_ref = reference.multi_lora_linear_backward(f64(dy), f64(x), f64(W), *args)
    cat = lambda ts: torch.cat([f64(t).flatten() for t in ts])  # noqa: E731
    errs = {"y": _rel(y, y_ref), "dx": _rel(dx, dx_ref), "dA": _rel(cat(dAB[:len(A)]), cat(dA_ref)),
            "dB": _rel(cat(dAB[len(A):]), cat(dB_ref))}
    worst = max(errs, key=lambda k: errs[k] if math.isfinite(errs[k]) else math.inf)
    check.error = errs[worst]
    if y.dtype != dtype:
        check.status, check.detail = "FAIL", f"y has dtype {_dname(y.dtype)}, expected {_dname(dtype)}"
    elif not check.error <= check.tol:
        check.status, check.detail = "FAIL", f"{worst}: relative error {check.error:.2e} > {check.tol:.0e}"
    return check


# dora_linear: the odd-sized case of LORA_SHAPES with bias, lora_B's bias and dropout (the Triton backend's fused
# kernel computes the norm in its GEMM); qlora_linear: an NF4 base with nested absmax and in % 64 != 0 (scale
# blocks cross rows), built from random codes (no bitsandbytes needed).
DORA_SHAPE = (37, 96, 80, 16)
QLORA_SHAPE = (19, 90, 70, 8)


def _finish(check: Check, errs: dict, outs: dict, want_dtypes: dict) -> Check:
    """Fill `check` from the relative errors of its outputs; a wrong output dtype or an error above tol fails."""
    for name, t in outs.items():
        if t.dtype != want_dtypes[name]:
            check.status = "FAIL"
            check.detail = f"{name} has dtype {_dname(t.dtype)}, expected {_dname(want_dtypes[name])}"
    worst = max(errs, key=lambda k: errs[k] if math.isfinite(errs[k]) else math.inf)
    check.error = errs[worst]
    if not check.error <= check.tol:  # NaN / inf fail too
        check.status = "FAIL"
        check.detail = check.detail or f"{worst}: relative error {check.error:.2e} > {check.tol:.0e}"
    return check


def _same_seed_mask(state, shape, dropout_p):
    """The dropout mask an op drew from the default generator since `state`, drawn again."""
    from lora_kernels import dropout
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    mask = dropout.dropout_mask(dropout.new_seed(), shape, dropout_p)
    torch.random.set_rng_state(after)
    return mask


def _dora_check(backend: str, device: torch.device, dtype, adtype) -> Check:
    from lora_kernels import reference
    from lora_kernels.ops import dora

    M, K, N, r = DORA_SHAPE
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W = rnd(N, K) / math.sqrt(K)
    leaves = dict(x=rnd(M, K).to(device, dtype), A=(rnd(r, K) / math.sqrt(K)).to(device, adtype),
                  B=(rnd(N, r) / math.sqrt(r)).to(device, adtype),
                  m=(torch.linalg.vector_norm(W, dim=1) * (1 + 0.3 * rnd(N))).to(device, adtype),
                  c=(0.1 * rnd(N)).to(device, adtype))
    for t in leaves.values():
        t.requires_grad_()
    W, b, dy = W.to(device, dtype), rnd(N).to(device, dtype), rnd(M, N).to(device, dtype)
    check = Check("dora_linear fwd+bwd", backend, f"M={M} {K}->{N} r={r} p={DROPOUT:g} lora_bias",
                  f"x {_dname(dtype)}, A/B {_dname(adtype)}", tol=TOL[dtype])
    state = torch.random.get_rng_state()
    y = dora.dora_linear(leaves["x"], W, b, leaves["A"], leaves["B"], leaves["m"], 0.75, DROPOUT, training=True,
                         backend=backend, lora_bias=leaves["c"])
    mask = _same_seed_mask(state, (M, K), DROPOUT)
    grads = dict(zip(("dx", "dA", "dB", "dm", "dc"), torch.autograd.grad(y, list(leaves.values()), dy)))
    ref_in = {k: v.detach().to(torch.float64).cpu().requires_grad_() for k, v in leaves.items()}
    f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    y_ref = reference.dora_linear_forward(ref_in["x"], f64(W), f64(b), ref_in["A"], ref_in["B"], ref_in["m"], 0.75,
                                          mask, DROPOUT, ref_in["c"])
    refs = dict(zip(("dx", "dA", "dB", "dm", "dc"), torch.autograd.grad(y_ref, list(ref_in.values()), f64(dy))))
    errs = {"y": _rel(y, y_ref), **{k: _rel(grads[k], refs[k]) for k in refs}}
    want = {"y": dtype, "dx": dtype, "dA": adtype, "dB": adtype, "dm": adtype, "dc": adtype}
    return _finish(check, errs, {"y": y, **grads}, want)


def _qlora_check(backend: str, device: torch.device, dtype, adtype) -> Check:
    from lora_kernels import quant, reference
    from lora_kernels.ops import qlora

    M, K, N, r = QLORA_SHAPE
    g = torch.Generator().manual_seed(13)
    fmt = quant.QuantFormat("nf4", (N, K), torch.float32, nested=True)
    nb = fmt.num_blocks
    qw = quant.QuantWeight(fmt, torch.randint(0, 256, (-(-fmt.numel // 2),), generator=g, dtype=torch.uint8),
                           torch.randint(0, 256, (nb,), generator=g, dtype=torch.uint8),
                           torch.rand(-(-nb // fmt.nested_blocksize), generator=g) * 0.05 + 0.02,
                           torch.randn(256, generator=g).sort().values, torch.tensor([0.01]))
    qw = quant.QuantWeight(fmt, *(None if t is None else t.to(device) for t in qw.tensors()))
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(M, K).to(device, dtype).requires_grad_()
    A = (rnd(r, K) / math.sqrt(K)).to(device, adtype).requires_grad_()
    B = rnd(N, r).to(device, adtype).requires_grad_()
    b, dy = rnd(N).to(device, dtype), rnd(M, N).to(device, dtype)
    check = Check("qlora_linear fwd+bwd", backend, f"M={M} {K}->{N} r={r} p={DROPOUT:g} nf4-nested",
                  f"x {_dname(dtype)}, A/B {_dname(adtype)}", tol=TOL[dtype])
    state = torch.random.get_rng_state()
    y = qlora.qlora_linear(x, qw, b, A, B, 0.75, DROPOUT, training=True, backend=backend)
    mask = _same_seed_mask(state, (M, K), DROPOUT)
    dx, dA, dB = torch.autograd.grad(y, [x, A, B], dy)
    f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    W = qw.dequantize(dtype)  # W0 as the op sees it: rounded to x's dtype, as dequantize-then-matmul does
    y_ref, _ = reference.lora_linear_forward(f64(x), f64(W), f64(b), f64(A), f64(B), 0.75, mask, DROPOUT)
    refs = reference.lora_linear_backward(f64(dy), f64(x), f64(W), f64(A), f64(B), 0.75, mask, DROPOUT)
    errs = {"y": _rel(y, y_ref), "dx": _rel(dx, refs[0]), "dA": _rel(dA, refs[1]), "dB": _rel(dB, refs[2])}
    return _finish(check, errs, {"y": y, "dx": dx, "dA": dA, "dB": dB},
                   {"y": dtype, "dx": dtype, "dA": adtype, "dB": adtype})


def _guard(make: Callable[[], Check], op: str, backend: str, case: str, dtype: str) -> Check:
    """Run one check; an exception is a FAIL that names it."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Check(op, backend, case, dtype, status="FAIL", detail=f"raised {type(e).__name__}: {msg[:200]}")


def selftest(device: Optional[torch.device] = None, backends: Optional[list[str]] = None,
             log: Optional[Callable[[str], None]] = None) -> list[Check]:
    """Check every backend that runs on `device` (default: CUDA when present, else CPU) against the float64
    reference; `backends` limits the set. Returns one Check per (op, backend, case, dtype); `log` gets a line
    per finished check (for progress)."""
    from lora_kernels import backends as bk

    device = torch.device(device) if device is not None else default_device()
    avail = bk.available_backends(device)
    names = [b for b in (backends or avail)]
    checks: list[Check] = []
    for backend in names:
        if backend not in avail:
            checks.append(Check("all", backend, "", "", status="FAIL",
                                detail=f"not available on {device}: {backend_status(device)['unavailable'].get(backend, '')}"))
            continue
        for dtype, adtype in _selftest_dtypes(device):
            for i, shape in enumerate(LORA_SHAPES):
                # dropout on the odd-sized case (the second), or on the only one
                for p in ((0.0, DROPOUT) if i == min(1, len(LORA_SHAPES) - 1) else (0.0,)):
                    case = f"M={shape[0]} {shape[1]}->{shape[2]} r={shape[3]}" + (f" p={p:g}" if p else "")
                    c = _guard(lambda: _lora_linear_check(backend, device, shape, dtype, adtype, p),
                               "lora_linear fwd+bwd", backend, case, f"x {_dname(dtype)}, A/B {_dname(adtype)}")
                    checks.append(c)
                    if log:
                        log(format_check(c))
        for dtype in sorted({d for d, _ in _selftest_dtypes(device)}, key=str):
            c = _guard(lambda: _multi_lora_check(backend, device, dtype), "multi_lora_linear fwd+bwd", backend, "",
                       _dname(dtype))
            checks.append(c)
            if log:
                log(format_check(c))
        for op, make in (("dora_linear fwd+bwd", _dora_check), ("qlora_linear fwd+bwd", _qlora_check)):
            for dtype, adtype in _selftest_dtypes(device):
                c = _guard(lambda: make(backend, device, dtype, adtype), op, backend, "",
                           f"x {_dname(dtype)}, A/B {_dname(adtype)}")
                checks.append(c)
                if log:
                    log(format_check(c))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks


def format_check(c: Check) -> str:
    err = "" if c.error is None else ("inf/nan" if not math.isfinite(c.error) else f"{c.error:.1e}")
    tol = "" if c.tol is None else f"{c.tol:.0e}"
    return (f"{c.status:<5} {c.op:<25} {c.backend:<10} {c.dtype:<17} {c.case:<40} {err:>8} {tol:>6}"
            + (f"  {c.detail}" if c.detail else ""))


def format_selftest(checks: list[Check], device: Optional[torch.device] = None, seconds: Optional[float] = None) -> str:
    head = (f"{'':<5} {'op':<25} {'backend':<10} {'dtypes':<17} {'case':<40} {'rel.err':>8} {'tol':>6}")
    lines = [head, "-" * len(head)] + [format_check(c) for c in checks]
    n_fail = sum(c.status != "PASS" for c in checks)
    where = f" on {device}" if device is not None else ""
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines.append("")
    lines.append(f"{'FAILED' if n_fail else 'PASSED'}: {len(checks) - n_fail} of {len(checks)} checks passed{where}{took} "
                 "(relative RMS error of y, dx, dA, dB against the float64 reference)")
    return "\n".join(lines)


def run_selftest(device: Optional[torch.device] = None, backends: Optional[list[str]] = None,
                 verbose: bool = False, out=None) -> int:
    """Print the selftest table; 0 when every check passed, 1 otherwise (the CLI's exit status)."""
    out = out or sys.stdout
    device = torch.device(device) if device is not None else default_device()
    t0 = time.monotonic()
    checks = selftest(device, backends, log=(lambda s: print(s, file=out, flush=True)) if verbose else None)
    print(format_selftest(checks, device, time.monotonic() - t0), file=out)
    return 1 if any(c.status != "PASS" for c in checks) else 0
