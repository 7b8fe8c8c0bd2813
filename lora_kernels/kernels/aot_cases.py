"""The launches the GPU-less checks compile, for every Triton kernel family, built from meta tensors.

* `aot_launches(family)`: every distinct config the family's launchers can pick (kernels/aot_check.py
  compiles each one for sm_80 and sm_90 and fails on spills or too much shared memory);
* `report_launches(family)`: (case name, Launch) for every launch of the family's headline cases, with the
  configs the launchers pick (kernels/static_report.py compiles them into the static report).

The cases call the launch planners the kernels run with (`plan_*`), so what is compiled here is what runs.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from lora_kernels.dropout import SEED_LOW
from lora_kernels.kernels import lora_linear as kl
from lora_kernels.kernels import multi_lora as km
from lora_kernels.kernels._launch import Launch
from lora_kernels.kernels.tiling import num_tiles

_SEED = SEED_LOW + 12345  # any valid dropout seed: a runtime argument, it does not change the compile
_META = dict(device="meta")


def _distinct(launches) -> Iterator[Launch]:
    """The launches that compile to different binaries, in first-seen order."""
    seen = set()
    for launch in launches:
        key = (launch.describe(), tuple(sorted(launch.signature().items())))
        if key not in seen:
            seen.add(key)
            yield launch


# --------------------------------------------------------------------------------------------------
# lora_linear (kernels/lora_linear.py)
# --------------------------------------------------------------------------------------------------

def lora_linear_meta(M, K, N, R, x_dtype, lora_dtype):
    """Meta tensors of a lora_linear call: (x, W, b, A, B, S, G)."""
    return (torch.empty(M, K, dtype=x_dtype, **_META), torch.empty(N, K, dtype=x_dtype, **_META),
            torch.empty(N, dtype=x_dtype, **_META), torch.empty(R, K, dtype=lora_dtype, **_META),
            torch.empty(N, R, dtype=lora_dtype, **_META), torch.empty(M, R, dtype=torch.float32, **_META),
            torch.empty(M, N, dtype=x_dtype, **_META))


def lora_linear_case(M, K, N, R, x_dtype, lora_dtype, dropout_p, deterministic=False, gemm_config=None):
    """{(phase, path): launches} of one problem: fused and composite, forward and backward."""
    x, W, b, A, B, S, G = lora_linear_meta(M, K, N, R, x_dtype, lora_dtype)
    seed = _SEED if dropout_p > 0 else None
    return {
        ("fwd", "fused"): kl.plan_fwd(x, W, b, A, B, 2.0, dropout_p, seed, deterministic, gemm_config)[0],
        ("bwd", "fused"): kl.plan_bwd(G, x, W, A, B, S, 2.0, dropout_p, seed, True, True, True, deterministic,
                                      gemm_config)[0],
        ("fwd", "composite"): kl.plan_fwd_composite(x, A, B, G, 2.0, dropout_p, seed, deterministic)[0],
        ("bwd", "composite"): kl.plan_bwd_composite(G, x, A, B, S, torch.empty_like(x), 2.0, dropout_p, seed, True,
                                                    True, deterministic)[0],
    }


def _lora_linear_aot():
    """Every dtype pair, GEMM class (M) and BLOCK_R (R), with and without dropout, atomic or deterministic,
    at the config each launcher picks and at every shipped GEMM config; plus the backward without dB."""
    K, N = 4096, 4096
    for x_dtype in (torch.float16, torch.bfloat16, torch.float32):
        for lora_dtype in sorted({x_dtype, torch.float32}, key=str):
            for M in (1, 64, 4096):          # small / medium / large GEMM and shrink configs
                for R in (16, 64):           # every BLOCK_R
                    for p, det in ((0.0, False), (0.1, False), (0.1, True)):
                        gemm_configs = kl.gemm_configs(M, torch.empty((), dtype=x_dtype).element_size(), p > 0)
                        for cfg in (None, *gemm_configs):
                            for launches in lora_linear_case(M, K, N, R, x_dtype, lora_dtype, p, det, cfg).values():
                                yield from launches
                        x, W, _, A, B, S, G = lora_linear_meta(M, K, N, R, x_dtype, lora_dtype)
                        yield from kl.plan_bwd(G, x, W, A, B, S, 2.0, p, None, True, True, False, det)[0]  # no dB


# The headline problems of the static report: Llama-3-8B's q/o (4096 -> 4096) and down (14336 -> 4096)
# projections, bf16 activations with bf16 or fp32 adapters.
LORA_LINEAR_REPORT_M = (1, 16, 128, 1024, 8192)
LORA_LINEAR_REPORT_SHAPES = ((4096, 4096), (14336, 4096))
LORA_LINEAR_REPORT_RANKS = (16, 64)


def _lora_linear_report():
    for lora_dtype in (torch.bfloat16, torch.float32):
        lname = "bf16" if lora_dtype == torch.bfloat16 else "fp32"
        for p, M, (K, N), R in itertools.product((0.0, 0.1), LORA_LINEAR_REPORT_M, LORA_LINEAR_REPORT_SHAPES,
                                                 LORA_LINEAR_REPORT_RANKS):
            for (phase, path), launches in lora_linear_case(M, K, N, R, torch.bfloat16, lora_dtype, p).items():
                case = f"lora_linear {phase} {path} x=bf16 lora={lname} p={p} M={M} {K}->{N} r={R}"
                for launch in launches:
                    yield case, launch


# --------------------------------------------------------------------------------------------------
# multi_lora (kernels/multi_lora.py)
# --------------------------------------------------------------------------------------------------

def multi_lora_meta(T: int, K: int, widths, R: int, L: int, dtype, has_ranks: bool, has_bias: bool):
    """Meta tensors of a multi_lora_linear call: (x, W, bias, A, B, S, y, bt, scalings, ranks)."""
    i32 = torch.int32
    NT = num_tiles(T, L)
    bt = tuple(torch.empty(n, dtype=i32, **_META) for n in (T, T, L, L, NT, NT, NT))
    N = sum(widths)
    return (torch.empty(T, K, dtype=dtype, **_META), torch.empty(N, K, dtype=dtype, **_META),
            torch.empty(N, dtype=dtype, **_META) if has_bias else None,
            [torch.empty(L, R, K, dtype=dtype, **_META) for _ in widths],
            [torch.empty(L, n, R, dtype=dtype, **_META) for n in widths],
            torch.empty(T, len(widths) * R, dtype=torch.float32, **_META), torch.empty(T, N, dtype=dtype, **_META),
            bt, torch.empty(L, dtype=torch.float32, **_META), torch.empty(L, dtype=i32, **_META) if has_ranks else None)


def multi_lora_meta_col_scale(L: int, N: int):
    """A per-slot column scale [L + 1, N] float32 (DoRA's g) as a meta tensor."""
    return torch.empty(L + 1, N, dtype=torch.float32, **_META)


def multi_lora_meta_dropout(L: int) -> km.SlotDropout:
    """Per-slot dropout of L slots (threshold and keep scale) as meta tensors."""
    return km.SlotDropout(_SEED, torch.empty(L, dtype=torch.int32, **_META),
                          torch.empty(L, dtype=torch.float32, **_META))


def _multi_lora_aot():
    """Configs vary by dtype, by T and out (tile height 16 / 64; the fused GEMM's tile list; the expand's
    BLOCK_N), by one vs several slices, by rank (shrink BLOCK_R 16 / 64), by whether ranks and bias are
    given and by deterministic mode (the shrink's plain store instead of atomics). Training adds the shrink
    with the dropout mask and the backward: with and without dB and dropout, atomic or deterministic."""
    K, L = 4096, 64
    dtypes, layers = (torch.float16, torch.bfloat16, torch.float32), ((4096,), (2048, 512, 512))
    # T = 1 .. 4096 reaches every GEMM tile of _GEMM_TILES at out = 4096 or 3072 (a test checks).
    for dtype, T, R, widths, has_ranks, has_bias, det in itertools.product(
            dtypes, (1, 16, 64, 128, 256, 512, 4096), (16, 64), layers, (False, True), (False, True), (False, True)):
        x, W, bias, A, B, S, y, bt, sc, ranks = multi_lora_meta(T, K, widths, R, L, dtype, has_ranks, has_bias)
        yield from km.plan_fused(x, W, bias, A, B, S, y, bt, sc, ranks, det)
    # Every expand BLOCK_N at both tile heights (which one the launcher takes depends on T and out).
    for dtype, T, widths, has_ranks in itertools.product(dtypes, (16, 4096), layers, (False, True)):
        x, W, bias, A, B, S, y, bt, sc, ranks = multi_lora_meta(T, K, widths, 16, L, dtype, has_ranks, False)
        yield from (km._expand_launch(S, B, 0, y, 0, bt, sc, ranks, bn) for bn in km._EXPAND_BLOCK_N[y.element_size()])
    # The per-slot column scale (multi-adapter DoRA serving) in the fused GEMM's epilogue at every GEMM tile, and
    # in the composite's expand (bias added there) at both tile heights and every BLOCK_N, with and without a bias.
    for dtype, T, widths, has_bias in itertools.product(dtypes, (1, 16, 64, 128, 256, 512, 4096), layers,
                                                        (False, True)):
        x, W, bias, A, B, S, y, bt, sc, ranks = multi_lora_meta(T, K, widths, 16, L, dtype, True, has_bias)
        cs = multi_lora_meta_col_scale(L, sum(widths))
        yield from km.plan_linear(x, W, bias, S, B, y, bt, sc, ranks, cs)
        if T in (16, 4096):  # every BLOCK_N the launcher can take with col_scale
            yield from (km._expand_launch(S, B, 0, y, 0, bt, sc, ranks, bn, col_scale=cs, bias=bias)
                        for bn in sorted({km._expand_block_n(T, n, y.element_size(), col_scale=True)
                                          for n in (16, 1 << 20)}))
    # Training (the backward kernels always read a ranks vector): T = 16 / 4096 give both tile heights, with
    # split (atomic) and deterministic plans.
    drop = multi_lora_meta_dropout(L)
    for dtype, T, R, widths, det in itertools.product(dtypes, (16, 4096), (16, 64), layers, (False, True)):
        x, W, bias, A, B, S, y, bt, sc, ranks = multi_lora_meta(T, K, widths, R, L, dtype, True, False)
        yield from km.plan_shrink(x, A, S, bt, None, det, drop)
        for dropout, need_dB in itertools.product((None, drop), (False, True)):
            yield from km.plan_bwd(y, x, A, B, S, x, bt, sc, ranks, dropout, True, need_dB, det)[0]
    # dx's expand at every BLOCK_N it can take, at both tile heights.
    for dtype, T, widths, dropout in itertools.product(dtypes, (16, 4096), layers, (None, drop)):
        x, W, bias, A, B, S, y, bt, sc, ranks = multi_lora_meta(T, K, widths, 16, L, dtype, True, False)
        yield from (km._expand_launch(S, A, 0, x, 0, bt, sc, ranks, bn, dx=True, drop=dropout)
                    for bn in sorted({km._expand_block_n(T, n, x.element_size(), True) for n in (16, 1 << 20)}))


# The static report's multi-adapter cases: Llama-3-8B q (4096 -> 4096) and a fused qkv (4096 -> 4096 + 1024
# + 1024), rank 16, bf16, 64 slots (heterogeneous ranks), no bias; the backward at a prefill and a decode size.
MULTI_LORA_REPORT_TOKENS = (1, 64, 256, 4096)
MULTI_LORA_REPORT_LAYERS = {"q": (4096, (4096,)), "qkv": (4096, (4096, 1024, 1024))}
MULTI_LORA_REPORT_BWD_TOKENS = (64, 4096)


def _multi_lora_report():
    """The fused path (shrink + fused GEMM), the composite's Triton launches (shrink + expand; its base GEMM is
    cuBLAS), both again with DoRA's per-slot column scale ("[fused,col_scale]", "[composite,col_scale]"), and
    the backward's (dS/dB, dA, dx's expand, the casts to bf16; dx = G W0 is cuBLAS) without and
    with dropout. Case names: "multi_lora_linear[fused|composite] q 4096->4096 T=64 r=16 bf16 L=64",
    "multi_lora_linear[bwd] q 4096->4096 T=64 r=16 bf16 L=64 p=0.1"."""
    R, L = 16, 64
    for name, (K, widths) in MULTI_LORA_REPORT_LAYERS.items():
        for T in MULTI_LORA_REPORT_TOKENS:
            x, W, bias, A, B, S, y, bt, sc, ranks = multi_lora_meta(T, K, widths, R, L, torch.bfloat16, True, False)
            case = f"{name} {K}->{'+'.join(map(str, widths))} T={T} r={R} bf16 L={L}"
            for launch in km.plan_fused(x, W, bias, A, B, S, y, bt, sc, ranks):
                yield f"multi_lora_linear[fused] {case}", launch
            for launch in km.plan_composite(x, A, B, S, y, bt, sc, ranks):
                yield f"multi_lora_linear[composite] {case}", launch
            # Multi-adapter DoRA serving: the same with the per-slot column scale in the epilogues.
            cs = multi_lora_meta_col_scale(L, sum(widths))
            for launch in km.plan_fused(x, W, bias, A, B, S, y, bt, sc, ranks, col_scale=cs):
                yield f"multi_lora_linear[fused,col_scale] {case}", launch
            for launch in km.plan_composite(x, A, B, S, y, bt, sc, ranks, col_scale=cs):
                yield f"multi_lora_linear[composite,col_scale] {case}", launch
            if T not in MULTI_LORA_REPORT_BWD_TOKENS:
                continue
            for p, drop in ((0.0, None), (0.1, multi_lora_meta_dropout(L))):
                for launch in km.plan_bwd(y, x, A, B, S, x, bt, sc, ranks, drop)[0]:  # x stands in for dx
                    yield f"multi_lora_linear[bwd] {case} p={p}", launch


# --------------------------------------------------------------------------------------------------
# qlora (kernels/qlora.py)
# --------------------------------------------------------------------------------------------------

def qlora_meta(M, K, N, R, x_dtype, lora_dtype, quant_type="nf4", nested=True, w_dtype=None):
    """Meta tensors of a qlora_linear call: (x, QuantWeight, b, A, B)."""
    from lora_kernels.quant import QuantFormat, QuantWeight

    fmt = QuantFormat(quant_type, (N, K), w_dtype or x_dtype, nested=nested)
    nb = fmt.num_blocks
    codes = torch.empty(-(-N * K // 2), dtype=torch.uint8, **_META)
    if nested:
        qw = QuantWeight(fmt, codes, torch.empty(nb, dtype=torch.uint8, **_META),
                         torch.empty(-(-nb // fmt.nested_blocksize), dtype=torch.float32, **_META),
                         torch.empty(256, dtype=torch.float32, **_META), torch.empty(1, dtype=torch.float32, **_META))
    else:
        qw = QuantWeight(fmt, codes, torch.empty(nb, dtype=torch.float32, **_META))
    return (torch.empty(M, K, dtype=x_dtype, **_META), qw, torch.empty(N, dtype=x_dtype, **_META),
            torch.empty(R, K, dtype=lora_dtype, **_META), torch.empty(N, R, dtype=lora_dtype, **_META))


def _qlora_aot():
    """The fused W4A16 forward at every dtype pair, GEMM class (M), BLOCK_R, nested or not and weight dtype
    (x's or float32), at the launcher's pick and every shipped config; the dequantize kernel at every
    (nested, weight dtype, output dtype); the backward (dx by the same GEMM reading W0 transposed, with and
    without the dropout epilogue)."""
    from lora_kernels.kernels import qlora as kq

    K, N = 4096, 4096
    for x_dtype in (torch.float16, torch.bfloat16, torch.float32):
        for lora_dtype, w_dtype, nested in itertools.product(sorted({x_dtype, torch.float32}, key=str),
                                                              sorted({x_dtype, torch.float32}, key=str),
                                                              (False, True)):
            for M, R in itertools.product((1, 64, 4096), (16, 64)):
                x, qw, b, A, B = qlora_meta(M, K, N, R, x_dtype, lora_dtype, "nf4", nested, w_dtype)
                S = torch.empty(M, R, dtype=torch.float32, **_META)
                G = torch.empty(M, N, dtype=x_dtype, **_META)
                for cfg in (None, *kq.gemm_configs(M, x.element_size())):
                    yield from kq.plan_fwd(x, qw, b, A, B, 2.0, 0.0, None, False, cfg)[0]
                    for p in (0.0, 0.1):  # dx: the dropout mask in the epilogue or not
                        yield from kq.plan_bwd(G, x, qw, A, B, S, 2.0, p, _SEED if p else None, True, True, True,
                                               False, cfg)[0]
            yield from kq.plan_dequant(qlora_meta(1, K, N, 16, x_dtype, x_dtype, "nf4", nested, w_dtype)[1],
                                       x_dtype)[0]


# The static report's QLoRA cases: Llama-3-8B's q/o (4096 -> 4096) and down (14336 -> 4096) projections over an
# NF4 base with nested absmax (QLoRA's defaults), bf16 activations, weight and adapters, rank 16.
QLORA_REPORT_M = (1, 16, 128)
QLORA_REPORT_SHAPES = ((4096, 4096), (14336, 4096))


def _qlora_report():
    """The fused forward (shrink + W4A16 GEMM [+ split sum]), the fused backward with dropout (dS / dB, the
    W4A16 GEMM for dx, dA) and the composite's dequantize.
    Case names: "qlora_linear fwd fused x=bf16 nf4-nested M=16 4096->4096 r=16"."""
    from lora_kernels.kernels import qlora as kq

    R = 16
    for M, (K, N) in itertools.product(QLORA_REPORT_M, QLORA_REPORT_SHAPES):
        x, qw, b, A, B = qlora_meta(M, K, N, R, torch.bfloat16, torch.bfloat16)
        for launch in kq.plan_fwd(x, qw, None, A, B, 2.0, 0.0, None)[0]:
            yield f"qlora_linear fwd fused x=bf16 nf4-nested M={M} {K}->{N} r={R}", launch
        S, G = torch.empty(M, R, dtype=torch.float32, **_META), torch.empty(M, N, dtype=torch.bfloat16, **_META)
        for launch in kq.plan_bwd(G, x, qw, A, B, S, 2.0, 0.1, _SEED, True, True, True)[0]:
            yield f"qlora_linear bwd fused x=bf16 nf4-nested M={M} {K}->{N} r={R} p=0.1", launch
    for K, N in QLORA_REPORT_SHAPES:
        qw = qlora_meta(1, K, N, R, torch.bfloat16, torch.bfloat16)[1]
        for launch in kq.plan_dequant(qw)[0]:
            yield f"qlora_linear dequant nf4-nested bf16 {K}->{N}", launch


# --------------------------------------------------------------------------------------------------
# dora (kernels/dora.py)
# --------------------------------------------------------------------------------------------------

def dora_case(M, K, N, R, x_dtype, lora_dtype, dropout_p, norm=True, deterministic=False, config=None):
    """{phase: launches} of one DoRA problem: the fused forward (n in the GEMM, or given) and backward."""
    from lora_kernels.kernels import dora as kd

    x, W, b, A, B, S, G = lora_linear_meta(M, K, N, R, x_dtype, lora_dtype)
    m = torch.empty(N, dtype=torch.float32, **_META)
    seed = _SEED if dropout_p > 0 else None
    return {
        "fwd": kd.plan_fwd(x, W, b, A, B, m, None, None if norm else m, 2.0, dropout_p, seed, 0.01, deterministic,
                           config)[0],
        "bwd": kd.plan_bwd(G, G, x, W, A, B, S, 2.0, dropout_p, seed, True, True, True, deterministic, config)[0],
    }


def _dora_aot():
    """Every dtype pair, GEMM class (M) and norm width (R), with and without dropout, the norm computed or given,
    at the launcher's pick and every shipped DoRA config."""
    from lora_kernels.kernels import dora as kd

    K, N = 4096, 4096
    for x_dtype in (torch.float16, torch.bfloat16, torch.float32):
        for lora_dtype in sorted({x_dtype, torch.float32}, key=str):
            for M, R, p, norm in itertools.product((1, 64, 4096), (16, 64), (0.0, 0.1), (True, False)):
                for cfg in (None, *kd.gemm_configs(M, torch.empty((), dtype=x_dtype).element_size(), p > 0)):
                    for launches in dora_case(M, K, N, R, x_dtype, lora_dtype, p, norm, False, cfg).values():
                        yield from launches


# The static report's DoRA cases: the headline layer (4096 -> 4096, bf16, rank 16) in training (the norm in the
# GEMM, dropout 0.1 and none) at a decode-ish and a prefill size.
DORA_REPORT_M = (16, 128, 1024)


def _dora_report():
    """Case names: "dora_linear fwd x=bf16 M=128 4096->4096 r=16 p=0.1"."""
    K, N, R = 4096, 4096, 16
    for M, p in itertools.product(DORA_REPORT_M, (0.0, 0.1)):
        for phase, launches in dora_case(M, K, N, R, torch.bfloat16, torch.bfloat16, p).items():
            for launch in launches:
                yield f"dora_linear {phase} x=bf16 M={M} {K}->{N} r={R} p={p:g}", launch


# --------------------------------------------------------------------------------------------------
# Every family
# --------------------------------------------------------------------------------------------------

_AOT = {"lora_linear": _lora_linear_aot, "multi_lora": _multi_lora_aot, "qlora": _qlora_aot, "dora": _dora_aot}
_REPORT = {"lora_linear": _lora_linear_report, "multi_lora": _multi_lora_report, "qlora": _qlora_report,
           "dora": _dora_report}
FAMILIES = tuple(_AOT)  # the kernel families that ship Triton configs (kernels/<family>.py)


def aot_launches(family: str) -> Iterator[Launch]:
    """Every distinct compiled kernel `family`'s launchers can pick (each shipped config included)."""
    return _distinct(_AOT[family]())


def report_launches(family: str) -> Iterator[tuple[str, Launch]]:
    """(case name, Launch) for every launch of `family`'s headline cases in the static report (none for a
    family without report cases yet: the report lists it as missing)."""
    cases = _REPORT.get(family)
    return iter(()) if cases is None else cases()
