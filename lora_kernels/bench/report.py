"""Machine info, ratios (speed-ups, LoRA tax), and the outputs: terminal tables, JSON, Markdown / text, a PNG.

Each run writes into its own folder `<out>/<UTC time stamp>/` and points `<out>/latest` at it, so earlier
runs are kept.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

# The checkout this package runs from, if any (an editable install); an installed copy has no .git above it.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEFT_NAMES = ("peft", "peft-mixed", "peft-seq")
KEY_FIELDS = ("suite", "phase", "model", "proj", "in", "out", "r", "tokens", "adapters", "dropout")


# ------------------------------------------------------------------------------------------------------
# Machine
# ------------------------------------------------------------------------------------------------------

def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _git(*args: str) -> Optional[str]:
    if not os.path.exists(os.path.join(REPO, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return None


def machine_info(device: torch.device) -> dict:
    from lora_kernels import backends

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        # a copy without .git (a GPU box) gets the commit from the caller, e.g. scripts/gpu_check.sh
        "commit": _git("rev-parse", "--short=12", "HEAD") or os.environ.get("LORA_KERNELS_COMMIT"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "device": str(device),
        "backends": backends.available_backends(device),
        "native": "built" if backends.NATIVE is not None else f"not built ({backends.NATIVE_ERROR[:100]})",
        "default_backend": backends.resolve_backend(None, device),
        "lora_kernels": _version("lora_kernels"),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gb=round(p.total_memory / 1e9, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None)
    return info


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): how busy the machine was when it ran."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def is_busy() -> bool:
    """Other work keeps this machine busier than it has cores."""
    load = load_average()
    return load is not None and load > (os.cpu_count() or 1)


def busy_note(info: dict, auto_threads: bool = False) -> Optional[str]:
    """A warning when other work keeps the CPU busier than it has cores, or None."""
    load, cores, threads = info.get("load_average"), info.get("cpu_cores"), info.get("cpu_threads")
    if load is None or not cores or load <= cores:
        return None
    note = f"note: this machine is busy (load average {load:g} on {cores} cores): timings vary more than usual"
    if auto_threads:
        note += ("; timing with 1 thread, so that no parallel op waits for a worker thread another process "
                 "preempted (--threads N to choose)")
    elif threads and threads > 1:
        note += (f"; with {threads} threads each parallel op waits for its slowest thread, and `--threads 1` "
                 "steadies them")
    return note


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: dict) -> str:
    dev = (f"{info['gpu']} (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs)" if "gpu" in info
           else f"CPU: {info['cpu']} ({info['cpu_threads']} threads"
           + (f", load average {info['load_average']:g} on {info['cpu_cores']} cores)"
              if info.get("load_average") is not None else ")"))
    commit = (info["commit"] or "unknown") + ("+dirty" if info.get("dirty") else "")
    return (f"{dev} | torch {info['torch']} (CUDA {info['cuda_runtime']}) | triton {info['triton']} | "
            f"peft {info['peft']} | backend=None runs {info.get('default_backend')} | commit {commit} | {info['date']}")


# ------------------------------------------------------------------------------------------------------
# Ratios
# ------------------------------------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def add_ratios(rows: list[dict]) -> None:
    """Ratios against the other rows of the same case, phase and dropout (measured in the same run):

    vs_base = t / t_base (>= 1: cost over the floor); vs_peft = t_peft / t (> 1: faster than PEFT);
    lora_linear: tax_ms = t - t_base (the LoRA tax) and tax_vs_peft = tax / PEFT's tax (< 1: a smaller tax);
    multi_lora: vs_loop = t_loop / t (> 1: faster than the torch per-adapter loop).
    Memory rows get peak_vs_peft and saved_vs_peft = ours / PEFT (< 1: less memory).
    """
    groups = defaultdict(dict)
    for r in rows:
        groups[_key(r)][r["contender"]] = r
    for g in groups.values():
        base = g.get("base")
        peft = next((g[n] for n in PEFT_NAMES if n in g), None)
        loop = g.get("torch-loop")
        for r in g.values():
            if r.get("ms") is not None:
                if base and base.get("ms"):
                    r["vs_base"] = r["ms"] / base["ms"]
                    if r["suite"] == "lora_linear" and r is not base:
                        r["tax_ms"] = r["ms"] - base["ms"]
                if peft and peft.get("ms"):
                    r["vs_peft"] = peft["ms"] / r["ms"]
                if loop and loop.get("ms"):
                    r["vs_loop"] = loop["ms"] / r["ms"]
            for k in ("peak_mb", "saved_mb"):
                if r.get(k) is not None and peft and peft.get(k):
                    r[k.replace("_mb", "_vs_peft")] = r[k] / peft[k]
        peft_tax = peft.get("tax_ms") if peft else None
        for r in g.values():
            if r.get("tax_ms") is not None and peft_tax and peft_tax > 0 and r["tax_ms"] > 0:
                r["tax_vs_peft"] = r["tax_ms"] / peft_tax


def geomean(vals: Iterable[float]) -> Optional[float]:
    v = [x for x in vals if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def phase_label(r: dict) -> str:
    """The phase, with the dropout when it is not 0 ("fwd+bwd p=0.1")."""
    p = r.get("dropout")
    return r["phase"] + (f" p={p:g}" if p and r["phase"] != "memory" else "")


def summary(rows: list[dict]) -> list[str]:
    """Geometric means per (suite, phase, contender): speed-up over PEFT, time over the base GEMM, and the
    LoRA tax over PEFT's (lora_linear) or the speed-up over the torch loop (multi_lora); then the goals of
    the overhead suite."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r.get("status") == "ok" and r.get("ms") is not None and r["suite"] != "overhead"
                and r["contender"] not in ("base",) + PEFT_NAMES):
            a = acc[(r["suite"], phase_label(r), r["contender"])]
            for k in ("vs_peft", "vs_base", "tax_vs_peft", "vs_loop"):
                a[k].append(r.get(k))
    lines = []
    w = max((len(c) for _, _, c in acc), default=10)
    for (suite, phase, c), a in acc.items():
        parts = [f"{suite:<12} {phase:<13} {c:<{w}}", "speed-up over PEFT " + _gx(a["vs_peft"]),
                 "time / base " + _gx(a["vs_base"])]
        if suite == "lora_linear":
            n_tax = sum(1 for v in a["tax_vs_peft"] if v)
            parts.append("tax / PEFT's tax " + _gx(a["tax_vs_peft"]) + f" ({n_tax} with a positive tax)")
        else:
            parts.append("speed-up over torch loop " + _gx(a["vs_loop"]))
        lines.append(" | ".join(parts) + f" | {len(a['vs_base'])} cases")
    if any(r["suite"] == "multi_lora_train" for r in rows):
        from lora_kernels.bench.bench_multi_lora_train import goal_line
        lines.append(goal_line(rows))
    if any(r["suite"] == "overhead" for r in rows):
        from lora_kernels.bench.bench_overhead import goal_lines
        lines += ([""] if lines else []) + ["Host overhead goals (overhead suite, per call):"] + [
            "  " + ln for ln in goal_lines(rows)]
    return lines


def _gx(vals) -> str:
    g = geomean(vals)
    return f"{g:5.2f}x" if g else "  n/a"


# ------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------

def fmt_time(ms: Optional[float]) -> str:
    if ms is None:
        return ""
    a = abs(ms)
    return f"{ms * 1e3:.1f} us" if a < 1 else f"{ms:.3f} ms" if a < 1000 else f"{ms / 1e3:.2f} s"


def _f(v, spec: str, suffix: str = "") -> str:
    return "" if v is None else format(v, spec) + suffix


def _rate(v) -> str:
    """Three significant figures without exponents: 0.0123, 4.56, 789, 2345."""
    if v is None:
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}" if v >= 0.001 else f"{v:.1e}"


def _spread(r: dict) -> str:
    """Half the p20-p80 range relative to the median: how much repeated samples of this row disagree."""
    if r.get("ms") is None or r.get("p20_ms") is None or not r["ms"]:
        return ""
    return f"±{50 * (r['p80_ms'] - r['p20_ms']) / r['ms']:.0f}%"


def case_label(r: dict) -> str:
    s = f"{r['model']} {r['proj']} {r['in']}->{r['out']} r={r['r']} T={r['tokens']}"
    if r.get("adapters") is not None:
        s += f" d={r['adapters']}"
    return s


@dataclass
class Table:
    title: str
    cols: tuple
    cells: list
    notes: list = field(default_factory=list)


LORA_COLS = ("case", "contender", "time", "spread", "t/base", "PEFT/t", "tax", "tax/PEFT tax", "TFLOP/s", "GB/s",
             "% peak", "note")
MULTI_COLS = ("case", "contender", "time", "spread", "t/base", "PEFT/t", "loop/t", "TFLOP/s", "GB/s", "% peak",
              "note")
MEM_COLS = ("case", "dropout", "contender", "saved MB", "saved/PEFT", "peak MB", "peak/PEFT", "note")
OVERHEAD_COLS = ("call", "no-grad", "spread", "t/PEFT", "fwd+bwd", "spread", "t/PEFT", "note")
COL_HELP = {
    "t/base": "time over the base layer's (F.linear; dx only in fwd+bwd)",
    "PEFT/t": "speed-up over PEFT",
    "tax": "LoRA tax = time - base time",
    "tax/PEFT tax": "our tax over PEFT's (smaller is better)",
    "loop/t": "speed-up over the torch per-adapter loop",
    "spread": "half the p20-p80 range of the samples, relative to the median",
}


def _footnotes(rows: list[dict]) -> tuple[set, dict, list[str]]:
    """Contenders that never ran in these rows (omitted, named once under the table), the footnote number of
    every other reason a row did not run, and the note lines."""
    by_c = defaultdict(list)
    for r in rows:
        by_c[r["contender"]].append(r)
    omitted: dict[str, list[str]] = defaultdict(list)
    for c, rs in by_c.items():
        reasons = {r.get("reason", "") for r in rs}
        if all(r.get("status") == "n/a" for r in rs) and len(reasons) == 1:
            omitted[reasons.pop()].append(c)
    gone = {c for cs in omitted.values() for c in cs}
    notes = [f"not run: {', '.join(cs)}: {why}" for why, cs in omitted.items()]
    numbers: dict[str, int] = {}
    for r in rows:
        if r["contender"] not in gone and r.get("status") == "n/a":
            numbers.setdefault(r.get("reason", ""), len(numbers) + 1)
    notes += [f"[{n}] {why}" for why, n in numbers.items()]
    return gone, numbers, notes


def table_rows(rows: list[dict], peaks: Optional[dict] = None) -> list[Table]:
    """One Table per (suite, phase) in run order; a case is shown once per group of rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["suite"], r["phase"]), []).append(r)
    out = []
    for (suite, phase), rs in groups.items():
        title = f"{suite} - {phase}"
        if suite == "overhead":
            continue  # both phases in one table, below
        gone, numbers, notes = _footnotes(rs)
        mem = phase == "memory"
        cols = MEM_COLS if mem else LORA_COLS if suite == "lora_linear" else MULTI_COLS
        show_mode = not mem and any(r.get("mode") in ("graph", "eager") for r in rs)
        if show_mode:
            cols = cols[:2] + ("mode",) + cols[2:]
        cells, last = [], None
        for r in rs:
            if r["contender"] in gone:
                continue
            label = case_label(r) + (f" p={r['dropout']:g}" if r.get("dropout") and not mem else "")
            key = label + (f" p={r.get('dropout')}" if mem else "")
            shown = "" if key == last else label
            last = key
            note = r.get("reason", "")
            if r.get("status") == "wrong":
                note = "WRONG: " + note
            elif r.get("status") == "n/a":
                note = f"n/a [{numbers[note]}]"
            if mem:
                cells.append([shown, "" if not shown else f"{r.get('dropout', 0):g}", r["contender"],
                              _f(r.get("saved_mb"), ".2f"), _f(r.get("saved_vs_peft"), ".2f", "x"),
                              _f(r.get("peak_mb"), ".1f"), _f(r.get("peak_vs_peft"), ".2f", "x"), note])
                continue
            cell = [shown, r["contender"]] + ([r.get("mode", "")] if show_mode else []) + [
                fmt_time(r.get("ms")), _spread(r), _f(r.get("vs_base"), ".2f", "x"), _f(r.get("vs_peft"), ".2f", "x")]
            if suite == "lora_linear":
                cell += [fmt_time(r.get("tax_ms")), _f(r.get("tax_vs_peft"), ".2f", "x")]
            else:
                cell += [_f(r.get("vs_loop"), ".2f", "x")]
            cell += [_rate(r.get("tflops")), _rate(r.get("gbps")), _f(r.get("pct_peak"), ".0f", "%"), note]
            cells.append(cell)
        if not mem:
            notes.append("; ".join(f"{c}: {COL_HELP[c]}" for c in cols if c in COL_HELP))
            if peaks and peaks.get("matmul_flops"):
                notes.append(f"% peak: roofline floor / time, floor = max(FLOPs / {peaks['matmul_flops'] / 1e12:.3g} "
                             f"TFLOP/s, bytes / {peaks['copy_bytes_per_s'] / 1e9:.3g} GB/s), peaks measured in this "
                             f"run ({peaks['matmul']}; {peaks['copy']}); formulas in lora_kernels/bench/roofline.py")
        out.append(Table(title, cols, cells, notes))
    ov = [r for r in rows if r["suite"] == "overhead"]
    if ov:
        out.append(overhead_table(ov))
    return out


def overhead_table(rows: list[dict]) -> Table:
    """Calls down, the two phases across: µs per call, spread and time over PEFT's."""
    from lora_kernels.bench.bench_overhead import goal_lines

    by = {(r["phase"], r["contender"]): r for r in rows}
    names = list(dict.fromkeys(r["contender"] for r in rows))
    numbers: dict[str, int] = {}
    cells = []
    for c in names:
        cell, notes = [c], []
        for ph in ("no-grad", "fwd+bwd"):
            r = by.get((ph, c), {})
            us = None if r.get("ms") is None else r["ms"] * 1e3
            cell += ["" if us is None else f"{us:.1f} us", _spread(r),
                     "" if not r.get("vs_peft") else f"{1 / r['vs_peft']:.2f}x"]
            if r.get("status") == "n/a":
                notes.append(f"{ph}: n/a [{numbers.setdefault(r.get('reason', ''), len(numbers) + 1)}]")
        cells.append(cell + ["; ".join(notes)])
    r0 = rows[0]
    notes = [f"[{n}] {why}" for why, n in numbers.items()]
    notes += [f"x [{r0['tokens']}, {r0['in']}], {r0['in']}->{r0['out']}, r={r0['r']}, {r0['dtype']}, "
              f"{r0.get('threads', 1)} thread; wall clock per call; t/PEFT: time over PEFT's lora.Linear"]
    notes += ["goals: " + ln for ln in goal_lines(rows)]
    return Table("overhead - per-call host time (tiny layer)", OVERHEAD_COLS, cells, notes)


def plain_table(cols, cells) -> str:
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def markdown_table(cols, cells) -> str:
    esc = [[v.replace("|", "\\|") for v in row] for row in cells]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)


def print_tables(rows: list[dict], peaks: Optional[dict] = None) -> None:
    tables = table_rows(rows, peaks)
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table as RichTable
    except ImportError:
        for t in tables:
            print(f"\n== {t.title} ==")
            print(plain_table(t.cols, t.cells))
            for n in t.notes:
                print("  " + n)
        return
    console = Console(width=max(160, Console().width))
    for t in tables:
        rt = RichTable(title=escape(t.title), title_justify="left", show_lines=False)
        for c in t.cols:
            rt.add_column(c, justify="left" if c in ("case", "call", "contender", "mode", "note") else "right",
                          overflow="fold", max_width=60 if c == "note" else None)
        for row in t.cells:
            style = "red" if row[-1].startswith("WRONG") else ("dim" if "n/a" in row[-1] else None)
            if row[0] and t.cols[0] == "case":
                rt.add_section()
            rt.add_row(*(escape(v) for v in row), style=style)
        console.print(rt)
        for n in t.notes:
            console.print("  " + n, highlight=False, markup=False)


# ------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------

OUTPUT_FILES = ("results.json", "table.md", "table.txt", "speedup.png")


def new_run_dir(out_dir: str) -> str:
    """`out_dir/<UTC stamp>` (with -2, -3 ... when two runs start in the same second), created."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(out_dir, stamp), 1
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            path = os.path.join(out_dir, f"{stamp}-{n}")


def point_latest(out_dir: str, run_dir: str) -> str:
    """Make `out_dir/latest` a symlink to `run_dir` (replaced atomically); a copy where links are not allowed."""
    latest = os.path.join(out_dir, "latest")
    tmp = latest + f".tmp{os.getpid()}"
    try:
        os.symlink(os.path.basename(run_dir), tmp)
        os.replace(tmp, latest)
    except OSError:  # e.g. Windows without the privilege: a copy
        import shutil

        if os.path.islink(latest) or os.path.isfile(latest):
            os.remove(latest)
        elif os.path.isdir(latest):
            shutil.rmtree(latest)
        shutil.copytree(run_dir, latest)
    return latest


def write_outputs(rows: list[dict], meta: dict, out_dir: str, plot: bool = True) -> dict[str, str]:
    """Write results.json, table.md, table.txt and speedup.png into a new `out_dir/<stamp>/`, point
    `out_dir/latest` at it and return the paths ("dir", "latest" and one per file)."""
    run_dir = new_run_dir(out_dir)
    paths = {"dir": run_dir}
    paths["json"] = os.path.join(run_dir, "results.json")
    with open(paths["json"], "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1, default=str)
    tables = table_rows(rows, meta.get("peaks"))
    head = machine_line(meta["machine"])
    paths["md"] = os.path.join(run_dir, "table.md")
    with open(paths["md"], "w") as f:
        f.write(f"{head}\n\n`{meta['command']}`\n")
        for t in tables:
            f.write(f"\n### {t.title}\n\n{markdown_table(t.cols, t.cells)}\n")
            if t.notes:
                f.write("\n" + "\n".join(f"- {n}" for n in t.notes) + "\n")
        f.write("\n### Summary (geometric means)\n\n```\n" + "\n".join(summary(rows)) + "\n```\n")
    paths["txt"] = os.path.join(run_dir, "table.txt")
    with open(paths["txt"], "w") as f:
        f.write(head + "\n")
        for t in tables:
            f.write(f"\n== {t.title} ==\n{plain_table(t.cols, t.cells)}\n")
            f.write("".join(f"  {n}\n" for n in t.notes))
        f.write("\nSummary (geometric means):\n" + "\n".join("  " + ln for ln in summary(rows)) + "\n")
    if plot:
        p = plot_speedups(rows, meta, os.path.join(run_dir, "speedup.png"))
        if p:
            paths["png"] = p
    paths["latest"] = point_latest(out_dir, run_dir)
    return paths


# ------------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------------

_NICE = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)


def _shape_label(r: dict) -> str:
    return f"{r['model']} {r['proj']} {r['in']}->{r['out']}"


def plot_panels(rows: list[dict]) -> list[list[dict]]:
    """The figure's rows of panels: one row per lora_linear phase (dropout rows apart) with a panel per shape,
    then one row with a panel per (multi_lora phase, shape). Each panel holds only rows of one shape, so no
    point averages different projections. Panel: {"title", "xkey", "rows"}."""
    ok = [r for r in rows if r.get("status") in ("ok", "wrong") and r.get("vs_peft") and r["phase"] != "memory"]
    fig_rows = []
    for suite, xkey in (("lora_linear", "tokens"), ("multi_lora", "adapters"), ("multi_lora_train", "adapters")):
        sel = [r for r in ok if r["suite"] == suite]
        by_phase: dict[str, dict[str, list]] = {}
        for r in sel:
            by_phase.setdefault(phase_label(r), {}).setdefault(_shape_label(r), []).append(r)
        panels = [{"title": f"{suite} {ph}\n{shape}", "xkey": xkey, "rows": rs}
                  for ph, shapes in by_phase.items() for shape, rs in shapes.items()]
        if suite == "lora_linear":
            for ph, shapes in by_phase.items():
                fig_rows.append([p for p in panels if p["title"].startswith(f"{suite} {ph}\n")])
        elif panels:
            fig_rows.append(panels)
    return fig_rows


def _y_ticks(lo: float, hi: float) -> tuple[str, list[float]]:
    """("log", ticks) for data spanning more than 3x, else ("linear", []) and matplotlib's own ticks."""
    if hi / lo <= 3:
        return "linear", []
    ticks = [v for v in _NICE if lo / 1.2 <= v <= hi * 1.2]
    while len(ticks) > 7:  # keep the powers of two
        ticks = [v for v in ticks if math.log2(v) == int(math.log2(v))] if any(
            math.log2(v) != int(math.log2(v)) for v in ticks) else ticks[::2]
    return "log", ticks


def plot_speedups(rows: list[dict], meta: dict, path: str) -> Optional[str]:
    """Speed-up over PEFT against tokens (lora_linear) or distinct adapters (multi_lora), a panel per shape and
    phase, a line per contender (and rank, when a panel has several); the base GEMM alone (no LoRA) is the
    dashed grey ceiling and PEFT the line at 1."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    fig_rows = plot_panels(rows)
    if not fig_rows:
        return None
    ncols = max(len(r) for r in fig_rows)
    nrows = len(fig_rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.3 * nrows + 1.1), squeeze=False)
    contenders = sorted({r["contender"] for fr in fig_rows for p in fr for r in p["rows"]} - set(PEFT_NAMES),
                        key=lambda c: (c != "base", not c.startswith("ours"), c))
    cmap = plt.get_cmap("tab10")
    colors = {c: ("0.45" if c == "base" else cmap(i % 10)) for i, c in enumerate(contenders)}
    styles = ("-", "--", ":", "-.")
    handles = {}
    for i, fr in enumerate(fig_rows):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(fr):
                ax.set_visible(False)
                continue
            p = fr[j]
            ranks = sorted({r["r"] for r in p["rows"]})
            xs_all = sorted({r[p["xkey"]] for r in p["rows"]})
            ys_all = []
            for c in contenders:
                for k, rank in enumerate(ranks):
                    pts = sorted((r[p["xkey"]], r["vs_peft"]) for r in p["rows"]
                                 if r["contender"] == c and r["r"] == rank)
                    if not pts:
                        continue
                    ys_all += [y for _, y in pts]
                    label = "base GEMM alone (no LoRA)" if c == "base" else c
                    (h,) = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=4,
                                   color=colors[c], linewidth=1.6 if c != "base" else 1.2,
                                   linestyle="--" if c == "base" else styles[k % len(styles)])
                    handles.setdefault(label, h)
            ax.axhline(1.0, color="black", linewidth=0.9)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(ticker.FixedLocator(xs_all))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            lo, hi = xs_all[0], xs_all[-1]
            ax.set_xlim(lo / 1.6, hi * 1.6)
            ylo, yhi = min(ys_all + [1.0]), max(ys_all + [1.0])
            scale, yt = _y_ticks(ylo, yhi)
            if scale == "log":
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_locator(ticker.FixedLocator(yt))
                ax.yaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.set_ylim(ylo / 1.25, yhi * 1.25)
            else:
                pad = 0.08 * (yhi - ylo) or 0.1
                ax.set_ylim(max(0.0, ylo - pad), yhi + pad)
                ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=5, min_n_ticks=3))
            ax.set_xlabel("tokens" if p["xkey"] == "tokens" else "distinct adapters", fontsize=9)
            if j == 0:
                ax.set_ylabel("speed-up over PEFT (x)", fontsize=9)
            title = p["title"] + (f" r={ranks[0]}" if len(ranks) == 1 else
                                  " r=" + "/".join(map(str, ranks)) + " (" + "/".join(
                                      ("solid", "dashed", "dotted", "dash-dot")[:len(ranks)]) + ")")
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(True, which="major", alpha=0.3)
    handles["PEFT (= 1)"] = plt.Line2D([], [], color="black", linewidth=0.9)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(len(handles), 6),
               fontsize=9, frameon=False)
    fig.suptitle(plot_title(meta), fontsize=10)
    top = 1 - 0.6 / (3.3 * nrows + 1.1)  # room for the three title lines, whatever the height
    fig.tight_layout(rect=(0, 0.45 / (3.3 * nrows + 1.1), 1, top))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_title(meta: dict) -> str:
    m = meta["machine"]
    s = meta.get("settings", {})
    dt = s.get("dtype", "")
    if m.get("gpu"):
        dev = f"{m['gpu']} (sm_{m['capability'].replace('.', '')}) GPU timings"
    else:
        n = m["cpu_threads"]
        dev = f"CPU timings: {m['cpu']}, {n} thread{'' if n == 1 else 's'} (no GPU)"
    lines = [f"lora_kernels: speed-up over PEFT's lora.Linear, {dev}, {dt}"]
    timed = [b for b in m.get("backends", []) if m.get("gpu") or b not in ("triton", "composite")]
    if not m.get("gpu"):
        lines.append(f"Triton kernels not timed (they need a CUDA device); backends timed: {', '.join(timed)}")
    elif "triton" not in timed:
        lines.append(f"Triton not available: not timed; backends timed: {', '.join(timed)}")
    lines.append(f"torch {m['torch']} | triton {m['triton']} | peft {m['peft']} | commit {m['commit']}"
                 f"{'+dirty' if m.get('dirty') else ''} | {m['date']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------

class Progress:
    """tqdm when installed, else a line every ~10 % of the jobs (or every 15 s)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._last_print = 0.0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="job", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, desc: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(desc[:70], refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        if self.done % step < n or now - self._last_print > 15 or self.done >= self.total:
            self._last_print = now
            print(f"[{self.done}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
