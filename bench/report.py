"""Machine info, ratios, and the three outputs: a terminal table, a JSON file and a PNG plot."""
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
from typing import Iterable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEFT_NAMES = ("peft", "peft-mixed")
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
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gb=round(p.total_memory / 1e9, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None)
    return info


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
           else f"CPU: {info['cpu']} ({info['cpu_threads']} threads)")
    commit = (info["commit"] or "unknown") + ("+dirty" if info.get("dirty") else "")
    return (f"{dev} | torch {info['torch']} (CUDA {info['cuda_runtime']}) | triton {info['triton']} | "
            f"peft {info['peft']} | commit {commit} | {info['date']}")


# ------------------------------------------------------------------------------------------------------
# Ratios
# ------------------------------------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def add_ratios(rows: list[dict]) -> None:
    """vs_base = t / t_base (>= 1: overhead over the floor); vs_peft = t_peft / t (> 1: faster than PEFT).
    Memory rows get peak_vs_peft and saved_vs_peft = ours / PEFT (< 1: less memory)."""
    groups = defaultdict(dict)
    for r in rows:
        groups[_key(r)][r["contender"]] = r
    for g in groups.values():
        base = g.get("base")
        peft = next((g[n] for n in PEFT_NAMES if n in g), None)
        for r in g.values():
            if r.get("ms") is not None:
                if base and base.get("ms"):
                    r["vs_base"] = r["ms"] / base["ms"]
                if peft and peft.get("ms"):
                    r["vs_peft"] = peft["ms"] / r["ms"]
            for k in ("peak_mb", "saved_mb"):
                if r.get(k) is not None and peft and peft.get(k):
                    r[k.replace("_mb", "_vs_peft")] = r[k] / peft[k]


def geomean(vals: Iterable[float]) -> Optional[float]:
    v = [x for x in vals if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def summary(rows: list[dict]) -> list[str]:
    """One line per (suite, phase, contender): geometric-mean speed-up over PEFT and overhead over base."""
    acc = defaultdict(lambda: ([], []))
    for r in rows:
        if r.get("status") == "ok" and r.get("ms") is not None and r["contender"] not in ("base",) + PEFT_NAMES:
            a = acc[(r["suite"], r["phase"], r["contender"])]
            a[0].append(r.get("vs_peft"))
            a[1].append(r.get("vs_base"))
    lines = []
    for (suite, phase, c), (vp, vb) in sorted(acc.items()):
        gp, gb = geomean(vp), geomean(vb)
        lines.append(f"{suite:<12} {phase:<8} {c:<12} speed-up over PEFT " + (f"{gp:6.2f}x" if gp else "   n/a ") +
                     " | time / base GEMM time " + (f"{gb:6.2f}x" if gb else "   n/a ") +
                     f" | geomean over {len(vp)} cases")
    return lines


# ------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------

def fmt_time(ms: Optional[float]) -> str:
    if ms is None:
        return ""
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def _f(v, spec: str, suffix: str = "") -> str:
    return "" if v is None else format(v, spec) + suffix


def _rate(v) -> str:
    """Three significant figures without exponents: 0.0123, 4.56, 789, 2345."""
    if v is None:
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}" if v >= 0.001 else f"{v:.1e}"


def case_label(r: dict) -> str:
    s = f"{r['model']} {r['proj']} {r['in']}->{r['out']} r={r['r']} T={r['tokens']}"
    if r.get("adapters") is not None:
        s += f" d={r['adapters']}"
    return s


TIME_COLS = ("case", "contender", "mode", "time", "t/t_base", "PEFT/t", "TFLOP/s", "GB/s", "% peak", "note")
MEM_COLS = ("case", "dropout", "contender", "saved MB", "saved/PEFT", "peak MB", "peak/PEFT", "note")


def table_rows(rows: list[dict]) -> dict[str, tuple[tuple, list[list[str]]]]:
    """{title: (columns, cells)} for each (suite, phase) in run order; the case is shown once per group."""
    out: dict[str, tuple[tuple, list[list[str]]]] = {}
    last_case: dict[str, str] = {}
    for r in rows:
        title = f"{r['suite']} - {r['phase']}"
        mem = r["phase"] == "memory"
        cols, cells = out.setdefault(title, (MEM_COLS if mem else TIME_COLS, []))
        label = case_label(r)
        if mem:
            label_key = label + f" p={r.get('dropout')}"
        else:
            label_key = label
        shown = "" if last_case.get(title) == label_key else label
        last_case[title] = label_key
        note = r.get("reason", "")
        if r.get("status") == "wrong":
            note = "WRONG: " + note
        elif r.get("status") not in ("ok", "wrong"):
            note = f"{r.get('status')} ({note})"
        if mem:
            cells.append([shown, "" if not shown else f"{r.get('dropout', 0):g}", r["contender"],
                          _f(r.get("saved_mb"), ".2f"), _f(r.get("saved_vs_peft"), ".2f", "x"),
                          _f(r.get("peak_mb"), ".1f"), _f(r.get("peak_vs_peft"), ".2f", "x"), note])
        else:
            cells.append([shown, r["contender"], r.get("mode", ""), fmt_time(r.get("ms")),
                          _f(r.get("vs_base"), ".2f", "x"), _f(r.get("vs_peft"), ".2f", "x"),
                          _rate(r.get("tflops")), _rate(r.get("gbps")), _f(r.get("pct_peak"), ".0f", "%"),
                          note])
    return out


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


def print_tables(rows: list[dict]) -> None:
    tables = table_rows(rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, (cols, cells) in tables.items():
            print(f"\n== {title} ==")
            print(plain_table(cols, cells))
        return
    console = Console(width=max(160, Console().width))
    for title, (cols, cells) in tables.items():
        t = Table(title=title, title_justify="left", show_lines=False)
        for c in cols:
            t.add_column(c, justify="left" if c in ("case", "contender", "mode", "note") else "right",
                         overflow="fold", max_width=60 if c == "note" else None)
        for row in cells:
            style = "red" if row[-1].startswith("WRONG") else ("dim" if row[-1].startswith(("n/a", "error")) else None)
            if row[0]:
                t.add_section()
            t.add_row(*row, style=style)
        console.print(t)


# ------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------

def write_outputs(rows: list[dict], meta: dict, out_dir: str, plot: bool = True) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    paths["json"] = os.path.join(out_dir, "results.json")
    with open(paths["json"], "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1, default=str)
    tables = table_rows(rows)
    paths["md"] = os.path.join(out_dir, "table.md")
    with open(paths["md"], "w") as f:
        f.write(f"{machine_line(meta['machine'])}\n\n`{meta['command']}`\n")
        for title, (cols, cells) in tables.items():
            f.write(f"\n### {title}\n\n{markdown_table(cols, cells)}\n")
    paths["txt"] = os.path.join(out_dir, "table.txt")
    with open(paths["txt"], "w") as f:
        f.write(machine_line(meta["machine"]) + "\n")
        for title, (cols, cells) in tables.items():
            f.write(f"\n== {title} ==\n{plain_table(cols, cells)}\n")
        f.write("\n" + "\n".join(summary(rows)) + "\n")
    if plot:
        p = plot_speedups(rows, meta, os.path.join(out_dir, "speedup.png"))
        if p:
            paths["png"] = p
    return paths


def plot_speedups(rows: list[dict], meta: dict, path: str) -> Optional[str]:
    """Speed-up over PEFT (over the base GEMM's time when PEFT has none) against tokens, or against distinct
    adapters for serving: one line per contender, geometric mean over the shapes and ranks of the run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    panels = []
    for suite, phase, xkey in (("lora_linear", "fwd", "tokens"), ("lora_linear", "fwd+bwd", "tokens"),
                               ("multi_lora", "decode", "adapters"), ("multi_lora", "prefill", "adapters")):
        sel = [r for r in rows if r["suite"] == suite and r["phase"] == phase and r.get("status") == "ok"
               and r.get("ms")]
        if sel:
            panels.append((suite, phase, xkey, sel))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (suite, phase, xkey, sel) in zip(axes[0], panels):
        use_peft = any(r.get("vs_peft") for r in sel)
        metric = "vs_peft" if use_peft else "vs_base"
        series = defaultdict(lambda: defaultdict(list))
        for r in sel:
            v = r.get(metric)
            if v:
                series[r["contender"]][r[xkey]].append(v if use_peft else 1.0 / v)
        for c, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot(xs, [geomean(pts[x]) for x in xs], marker="o", label=c,
                    linestyle="--" if c in ("base",) + PEFT_NAMES else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("tokens" if xkey == "tokens" else "distinct adapters")
        ax.set_ylabel("speed-up over PEFT (x)" if use_peft else "base GEMM time / time")
        ax.set_title(f"{suite} {phase}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = meta["machine"]
    fig.suptitle(f"{m.get('gpu', 'CPU: ' + m['cpu'])} | torch {m['torch']} | commit {m['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
