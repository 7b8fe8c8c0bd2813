"""`python -m lora_kernels tune`: fill the measured-dispatch cache ahead of time (lora_kernels/dispatch.py).

    python -m lora_kernels tune --config path/to/config.json --ranks 16 --tokens 1,128,8192
    python -m lora_kernels tune --shapes 4096x4096,4096x14336 --ranks 8,64 --dropout 0,0.1
    python -m lora_kernels tune --config config.json --adapters 8 --tokens 1,256   # multi_lora_linear too

Every projection of a Hugging Face decoder config (q/k/v/o from hidden size, heads, KV heads and head
dim; gate/up/down from the intermediate size), or explicit IN x OUT shapes, at each rank and token count:
the forward and the backward of lora_linear (and, with --adapters, multi_lora_linear's forward) run once
on random inputs with tuning on, so each key is verified and timed exactly as a first call in training
would do it. Prints the winner per shape with its speed-up over the reference (the composite on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from lora_kernels import dispatch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Projection:
    name: str
    in_features: int
    out_features: int
    bias: bool


def projections(config: dict) -> list[Projection]:
    """The LoRA-targetable linear layers of a Hugging Face decoder config (Llama, Mistral, Qwen2, ...)."""
    try:
        hidden = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}: not a decoder config this command understands") from e
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    qkv_bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
    mlp_bias = bool(config.get("mlp_bias", False))
    return [Projection("q", hidden, heads * head_dim, qkv_bias), Projection("k", hidden, kv * head_dim, qkv_bias),
            Projection("v", hidden, kv * head_dim, qkv_bias),
            Projection("o", heads * head_dim, hidden, bool(config.get("attention_bias", False))),
            Projection("gate", hidden, inter, mlp_bias), Projection("up", hidden, inter, mlp_bias),
            Projection("down", inter, hidden, mlp_bias)]


def _distinct(projs: list[Projection]) -> list[Projection]:
    seen, out = set(), []
    for p in projs:
        if (p.in_features, p.out_features, p.bias) not in seen:
            seen.add((p.in_features, p.out_features, p.bias))
            out.append(p)
    return out


def _rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _new_entries(device: torch.device, before: dict) -> list[tuple[str, dict]]:
    after = dispatch.entries(device)
    return [(k, e) for k, e in after.items() if before.get(k) != e]


def _row(proj: Projection, r: int, M: int, extra: str, key: str, entry: dict) -> dict:
    ms, ref = entry.get("ms", {}), entry.get("reference")
    win = entry["choice"]
    speedup = ms[ref] / ms[win] if ref in ms and ms.get(win) else None
    return {"shape": f"{proj.name} {proj.in_features}->{proj.out_features}", "r": r, "tokens": M, "case": extra,
            "phase": key.split("/")[0] + " " + key.split("/")[1], "winner": win, "ms": ms.get(win),
            "reference": ref, "speedup": speedup, "rejected": sorted(entry.get("rejected", {})), "key": key}


def pretune(projs: list[Projection], ranks: list[int], tokens: list[int], dtype: torch.dtype,
            adapter_dtype: torch.dtype, dropouts: list[float], device: torch.device, adapters: list[int] = (),
            retune: bool = False, progress: bool = True) -> list[dict]:
    """Tune every (projection, rank, tokens, dropout) case; returns one row per cache entry it wrote."""
    from lora_kernels.ops.lora_linear import lora_linear
    from lora_kernels.ops.multi_lora import LoRABatch, multi_lora_linear

    cases = [(p, r, M, d) for p in _distinct(projs) for r in ranks for M in tokens for d in dropouts]
    multi = [(p, r, M, a) for p in _distinct(projs) for r in ranks for M in tokens for a in adapters]
    bar = _progress(len(cases) + len(multi), progress)
    rows = []
    g = torch.Generator().manual_seed(0)
    with dispatch.forced_tuning(True, retune=retune):
        for p, r, M, drop in cases:
            before = dispatch.entries(device)
            K, N = p.in_features, p.out_features
            x = _rand(M, K, dtype=dtype, device=device).requires_grad_()
            W = _rand(N, K, dtype=dtype, device=device, scale=K ** -0.5)
            b = _rand(N, dtype=dtype, device=device) if p.bias else None
            A = _rand(r, K, dtype=adapter_dtype, device=device, scale=K ** -0.5).requires_grad_()
            B = _rand(N, r, dtype=adapter_dtype, device=device).requires_grad_()
            y = lora_linear(x, W, b, A, B, 2.0, dropout_p=drop, training=drop > 0)
            y.backward(torch.randn(y.shape, generator=g).to(device, dtype))
            rows += [_row(p, r, M, f"dropout={drop:g}", k, e) for k, e in _new_entries(device, before)]
            bar(f"{p.name} r={r} M={M} p={drop:g}")
        for p, r, M, n_adapters in multi:
            before = dispatch.entries(device)
            K, N = p.in_features, p.out_features
            with torch.no_grad():
                x = _rand(M, K, dtype=dtype, device=device)
                W = _rand(N, K, dtype=dtype, device=device, scale=K ** -0.5)
                A = _rand(n_adapters, r, K, dtype=dtype, device=device, scale=K ** -0.5)
                B = _rand(n_adapters, N, r, dtype=dtype, device=device)
                slots = torch.randint(0, n_adapters, (M,), generator=g)
                batch = LoRABatch.from_token_adapters(slots.to(device), n_adapters)
                multi_lora_linear(x, W, None, A, B, 2.0, batch)
            rows += [_row(p, r, M, f"adapters={n_adapters}", k, e) for k, e in _new_entries(device, before)]
            bar(f"multi {p.name} r={r} T={M} d={n_adapters}")
    bar(None)
    return rows


def _progress(total: int, enabled: bool):
    """A tqdm bar when tqdm is installed and enabled, else nothing. Call with None to close."""
    if not enabled or total == 0:
        return lambda desc: None
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def plain(desc):
            if desc is not None:
                done[0] += 1
                print(f"[{done[0]}/{total}] {desc}", flush=True)
        return plain
    bar = tqdm(total=total, unit="case")

    def update(desc):
        if desc is None:
            bar.close()
        else:
            bar.set_description(desc)
            bar.update(1)
    return update


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "nothing new was measured (every key was cached already; --retune measures again)"
    head = ("phase", "shape", "r", "tokens", "case", "winner", "ms", "x ref", "rejected")
    body = [(r["phase"], r["shape"], str(r["r"]), str(r["tokens"]), r["case"], r["winner"],
             f"{r['ms']:.4g}" if r["ms"] else "-", f"{r['speedup']:.2f}x" if r["speedup"] else "-",
             ",".join(r["rejected"]) or "-") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    ref = rows[0]["reference"]
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body),
                      f"x ref = speed-up of the winner over the reference ({ref}) measured in the same run"])


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a Hugging Face config.json (or the folder holding it)")
    p.add_argument("--shapes", default="", help="comma list of INxOUT, e.g. 4096x4096,4096x14336")
    p.add_argument("--ranks", type=_ints, default=[16], help="comma list (default 16)")
    p.add_argument("--tokens", type=_ints, default=[1, 16, 128, 1024, 8192], help="comma list of token counts")
    p.add_argument("--dropout", type=_floats, default=[0.0], help="comma list of lora_dropout values (default 0)")
    p.add_argument("--adapters", type=_ints, default=[], help="also tune multi_lora_linear with these numbers of "
                                                               "adapters (serving)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="x / W0 dtype (default bf16 on CUDA, "
                                                                         "fp32 on CPU)")
    p.add_argument("--adapter-dtype", choices=("fp32", "same"), default="fp32", help="lora_A/B dtype")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--retune", action="store_true", help="measure again keys the cache already holds")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    projs: list[Projection] = []
    if args.config:
        path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
        with open(path, encoding="utf-8") as f:
            projs += projections(json.load(f))
    for spec in filter(None, (s.strip() for s in args.shapes.split(","))):
        try:
            k, n = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes wants INxOUT, e.g. 4096x1024, got {spec!r}")
        projs.append(Projection("shape", k, n, False))
    if not projs:
        raise SystemExit("give --config and/or --shapes")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    adapter_dtype = torch.float32 if args.adapter_dtype == "fp32" else dtype
    rows = pretune(projs, args.ranks, args.tokens, dtype, adapter_dtype, args.dropout, device, args.adapters,
                   retune=args.retune, progress=not args.no_progress)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    print(f"cache: {dispatch.cache_path(device)}")
    return 0
