"""QLoRA rows: LoRA over a bitsandbytes 4-bit NF4 base (nested absmax, as QLoRA quantizes), 896 -> 4864, r = 16.

    y = x deq(W0)ᵀ + s · (dropout(x) Aᵀ) Bᵀ        x: [T, 896], W0: [4864, 896] NF4, A: [16, 896], B: [4864, 16]

Phases: "decode" (T = 1, 4, 16; no grad) and "fwd+bwd" (T = 128, lora_dropout 0.1; gradients for x, A, B).

Contenders, timed together in interleaved rounds (wall time, one thread: torch.set_num_threads(1), restored
after; bitsandbytes' CPU kernels use OpenMP as well, so run with OMP_NUM_THREADS=1 to keep them on one thread):
    bnb base      the bare bitsandbytes Linear4bit, no LoRA at all (fwd+bwd: dx only): the floor of the others
    peft+bnb      PEFT's lora.Linear4bit over that base
    ours          the same PEFT layer after lk.patch_peft (lk.qlora_linear, backend=None)
    ours fp32     lk.lora_linear on a dense float32 nn.Linear holding deq(W0): our plain LoRA on this shape
    dequantize    one dequantization of W0 (fwd+bwd only): with "ours fp32" it makes the floor of "ours"

Every row says which base path ran (`base_path`): for "ours" the backend dispatch chose and whether the forward
decoded W0 on the fly or dequantized it, for the bitsandbytes rows whether its bf16 CPU kernel (AVX512-BF16,
repacked weight) or its dequantize + float32 GEMM ran.

The goals of issue 19 (GOALS) are printed next to the measured values: every row >= 1.0x PEFT + bnb, the LoRA side
(ours - bnb base) <= 0.5x PEFT's, and fwd+bwd >= 1.2x PEFT + bnb. Run through ``python -m lora_kernels.bench
--suite qlora`` (CPU) or ``python -m lora_kernels.bench.bench_qlora``.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable, Optional

import torch
from torch import nn

from lora_kernels.bench.common import Context, make_row, na_row, peft_available, score, short_error
from lora_kernels.bench.timing import benchmark_interleaved

SUITE = "qlora"
K, N, R = 896, 4864, 16          # Qwen2-0.5B's MLP gate
SCALING = 2.0                    # lora_alpha = 2 r
DECODE_T = (1, 4, 16)
TRAIN_T = 128
DROPOUT = 0.1
BASE, PEFT, OURS, FP32, DEQ = "bnb base", "peft+bnb", "ours", "ours fp32", "dequantize"
CONTENDERS = (BASE, PEFT, OURS, FP32)
# (description, phase, kind, bound): "vs_peft" = peft / ours >= bound; "lora_side" = (ours - base) /
# (peft - base) <= bound.
GOALS = [
    ("ours >= 1.0x PEFT + bnb (every row)", None, "vs_peft", 1.0),
    ("LoRA side (ours - bnb base) <= 0.5x PEFT's (every row)", None, "lora_side", 0.5),
    ("T=128 fwd+bwd, dropout 0.1: ours >= 1.2x PEFT + bnb", "fwd+bwd", "vs_peft", 1.2),
]


def unavailable() -> Optional[str]:
    """None when the suite can run here (bitsandbytes and PEFT import), else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes not importable ({short_error(e)}): pip install 'lora_kernels[qlora]'"
    return peft_available()


class _One(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _models(k: int, n: int, r: int, dropout: float, seed: int = 0):
    """(bnb Linear4bit, PEFT lora.Linear4bit, the same patched, dense fp32 nn.Linear holding deq(W0))."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    import lora_kernels as lk
    from lora_kernels import quant
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=gen) * k ** -0.5
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                             compress_statistics=True)
    base.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", compress_statistics=True)
    base = base.to("cpu")  # bitsandbytes quantizes on the move to the device
    model = _One(copy.deepcopy(base))
    model.is_loaded_in_4bit = True  # what PEFT reads to build its bitsandbytes LoRA layer
    cfg = LoraConfig(r=r, lora_alpha=SCALING * r, lora_dropout=dropout, target_modules=["proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_layer = peft_model.base_model.model.proj
    ours = copy.deepcopy(peft_model)
    report = lk.patch_peft(ours)
    if report.num_patched != 1:
        raise RuntimeError(f"patch_peft did not patch the 4-bit layer: {report}")
    ours_layer = ours.base_model.model.proj
    dense = nn.Linear(k, n, bias=False)
    dense.weight = nn.Parameter(quant.from_bnb(base).dequantize(torch.float32), requires_grad=False)
    return base, peft_layer, ours_layer, dense


def _lora_params(layer) -> list[torch.Tensor]:
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _bnb_path(layer, x: torch.Tensor, train: bool) -> str:
    """Which bitsandbytes CPU base path a call on x runs: its eval-mode forward repacks the weight on a CPU with
    AVX512-BF16 at the first call (Linear4bit.forward) and runs its bf16 kernel from then on."""
    from lora_kernels import quant
    if quant.bnb_repacked(layer) or (not train and x.device.type == "cpu"
                                     and getattr(layer, "support_avx512bf16_for_cpu", False)):
        return "bnb bf16 fused kernel (AVX512-BF16, repacked weight)"
    return "bnb gemv_4bit (M=1)" if x.shape[0] == 1 and not train else "bnb dequantize + fp32 GEMM"


def ours_path(x: torch.Tensor, grad: bool) -> str:
    """The backend `qlora_linear` runs for x with backend=None, and its base path."""
    from lora_kernels import backends, dispatch
    from lora_kernels.ops import qlora
    name = backends.default_backend(x.device) if dispatch.is_static(x.device.type) else "measured"
    if name == "native" and qlora.HAS_NATIVE_QUANT and x.dtype == torch.float32:
        gemv = "native: fused dequant-GEMV (no dense W0)"
        fwd = gemv if x.shape[0] <= qlora.gemv_max_m() else "native: row-blocked dequantize + BLAS GEMM (no dense W0)"
        return fwd if not grad else f"{fwd}; dx: row-blocked dequantize + BLAS GEMM"
    if name == "native":
        return "native: dequantize + BLAS GEMM"
    return f"{name}: dequantize + GEMM"


def build(name: str, models, x: torch.Tensor, phase: str) -> tuple[Callable[[], object], str]:
    """(a call of one step of `name` on x, its base path)."""
    base, peft_layer, ours_layer, dense = models
    train = phase == "fwd+bwd"
    for m in (peft_layer, ours_layer):
        m.train(train)  # dropout only in training; eval decode rows as generate() runs them
    base.train(train)
    if name == DEQ:
        from lora_kernels import quant
        qw = quant.from_bnb(base)
        from lora_kernels.ops import qlora
        return (lambda: qlora._deq_native(torch.float32, *qw.tensors(), qw.fmt)), "native dequantize"
    if name == BASE:
        fwd, params, path = (lambda: base(x)), [], _bnb_path(base, x, train)
    elif name == PEFT:
        path = _bnb_path(peft_layer.base_layer, x, train)
        fwd, params = (lambda: peft_layer(x)), _lora_params(peft_layer)
    elif name == OURS:
        fwd, params, path = (lambda: ours_layer(x)), _lora_params(ours_layer), ours_path(x, train)
    elif name == FP32:
        import lora_kernels as lk
        A, B = (p.detach().clone().requires_grad_() for p in _lora_params(ours_layer))
        p = DROPOUT if train else 0.0
        fwd, params = (lambda: lk.lora_linear(x, dense.weight, None, A, B, SCALING, p, train)), [A, B]
        path = "dense fp32 W0: " + ("native" if ours_path(x, train).startswith("native") else "default")
    else:
        raise ValueError(f"unknown contender {name!r}")
    if not train:
        def call():
            with torch.no_grad():
                return fwd()
        return call, path
    g = torch.randn(x.shape[0], dense.out_features, generator=torch.Generator().manual_seed(1))
    return (lambda: torch.autograd.grad(fwd(), [x, *params], g)), path


def cases(tiny: bool = False) -> list[tuple[str, int, int, int, int]]:
    """(phase, T, in, out, r) of every row; `tiny` shrinks the shapes (for the tests)."""
    k, n, r = (128, 192, 4) if tiny else (K, N, R)
    return [("decode", t, k, n, r) for t in DECODE_T] + [("fwd+bwd", TRAIN_T if not tiny else 8, k, n, r)]


def run(ctx: Context, names: Optional[list[str]] = None, tiny: bool = False) -> list[dict]:
    """Rows for every (case, contender); the contenders of a case are timed in the same interleaved rounds.
    Ratios against PEFT + bnb and the bare base are filled in from this run (`vs_peft`, `lora_side`)."""
    names = list(names or CONTENDERS)
    why = unavailable()
    rows: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for phase, T, k, n, r in cases(tiny):
            drop = DROPOUT if phase == "fwd+bwd" else 0.0
            case = {"model": "qwen2-0.5b" if not tiny else "tiny", "proj": "gate", "in": k, "out": n, "bias": False,
                    "r": r, "tokens": T, "dtype": "fp32", "adapter_dtype": "fp32", "dropout": drop, "threads": 1,
                    "quant": "nf4 nested"}
            timed_names = names + ([DEQ] if phase == "fwd+bwd" else [])
            if why:
                rows += [na_row(SUITE, phase, case, c, why) for c in timed_names]
                continue
            models = _models(k, n, r, DROPOUT)
            x = torch.randn(T, k, generator=torch.Generator().manual_seed(2)).requires_grad_(phase == "fwd+bwd")
            calls, out = {}, {}
            for c in timed_names:
                try:
                    call, path = build(c, models, x, phase)
                    calls[c] = [call]
                    out[c] = make_row(SUITE, phase, case, c, base_path=path)
                except Exception as e:  # noqa: BLE001 - reported as a row
                    out[c] = na_row(SUITE, phase, case, c, f"error: {short_error(e)}")
            timed = benchmark_interleaved(calls, budget_ms=ctx.budget_ms)
            for c in timed_names:
                ctx.tick(1, f"{SUITE} {phase} T={T} {c}")
                t = timed.get(c)
                if isinstance(t, Exception):
                    out[c] = na_row(SUITE, phase, case, c, f"error: {short_error(t)}")
                elif t is not None:
                    score(out[c], t, None, {})
            _ratios(out)
            rows += [out[c] for c in timed_names]
    finally:
        torch.set_num_threads(threads)
    return rows


def _ratios(out: dict) -> None:
    ms = {c: r.get("ms") for c, r in out.items()}
    peft, base = ms.get(PEFT), ms.get(BASE)
    for c, row in out.items():
        if row.get("ms") is None or c in (BASE, DEQ):
            continue
        if peft:
            row["vs_peft"] = peft / row["ms"]
        if peft and base and c != PEFT and peft > base:
            row["lora_side"] = (row["ms"] - base) / (peft - base)
    if ms.get(FP32) and ms.get(DEQ) and OURS in out:
        out[OURS]["floor_ms"] = ms[FP32] + ms[DEQ]


def goal_lines(rows: list[dict]) -> list[str]:
    """Each goal of GOALS with the measured figures of `ours`, met or not."""
    ours = [r for r in rows if r.get("suite") == SUITE and r.get("contender") == OURS and r.get("ms") is not None]
    lines = []
    for desc, phase, kind, bound in GOALS:
        vals = [(f"{r['phase']} T={r['tokens']}", r.get(kind)) for r in ours
                if (phase is None or r["phase"] == phase) and r.get(kind) is not None]
        if not vals:
            lines.append(f"{desc:<58} not measured")
            continue
        met = all(v >= bound if kind == "vs_peft" else v <= bound for _, v in vals)
        lines.append(f"{desc:<58} {'met' if met else 'NOT met'}: " + ", ".join(f"{n} {v:.2f}x" for n, v in vals))
    return lines


def table(rows: list[dict]) -> str:
    lines = [f"{'phase':<8} {'T':>4} {'contender':<11} {'ms':>9} {'vs PEFT':>8} {'LoRA side':>9}  base path"]
    for r in rows:
        if r.get("suite") != SUITE:
            continue
        if r.get("ms") is None:
            lines.append(f"{r['phase']:<8} {r['tokens']:>4} {r['contender']:<11} {'n/a':>9}  {r['reason']}")
            continue
        vs = f"{r['vs_peft']:.2f}x" if "vs_peft" in r else ""
        side = f"{r['lora_side']:.2f}x" if "lora_side" in r else ""
        floor = f"  (floor {r['floor_ms']:.2f} ms)" if "floor_ms" in r else ""
        lines.append(f"{r['phase']:<8} {r['tokens']:>4} {r['contender']:<11} {r['ms']:>9.3f} {vs:>8} {side:>9}  "
                     f"{r.get('base_path', '')}{floor}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lora_kernels.bench.bench_qlora", description=__doc__.split("\n")[0])
    p.add_argument("--budget-ms", type=float, default=300.0, help="timing budget per contender and case")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    args = p.parse_args(argv)
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, adapter_dtype=torch.float32,
                  budget_ms=args.budget_ms)
    rows = run(ctx, tiny=args.tiny)
    print(table(rows))
    for line in goal_lines(rows):
        print("  " + line)


if __name__ == "__main__":
    main()
