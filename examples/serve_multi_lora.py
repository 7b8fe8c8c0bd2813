"""Serve several PEFT LoRA adapters behind one base model, one adapter per sequence of a batch.

Builds a tiny random-init Llama (no downloads), creates and saves three PEFT adapters with different ranks
and target modules, loads them into a `MultiLoRAModel` with two slots (so the third load evicts the least
recently used adapter), and greedily generates for a mixed batch. Each sequence is checked against PEFT
running that sequence's adapter alone. Then it times the forward pass of the mixed batch against PEFT's own
mixed-batch path (a PeftModel holding the same adapters, called with adapter_names=) and says which
backend ran. Last, a request for the evicted adapter brings it back from the host tier, and the cache
counters (`stats()`) are printed.

    python examples/serve_multi_lora.py                   # fastest backend for the device
    TRITON_INTERPRET=1 python examples/serve_multi_lora.py --backend triton   # Triton kernels on CPU
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def tiny_llama(device):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(device).eval()


def save_adapter(base, path: Path, seed: int, **lora_config) -> Path:
    """A PEFT adapter with random (non-zero) B, as if it had been trained, saved with save_pretrained."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora_config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(path))
    return path


def main() -> None:
    import peft

    from lora_kernels.serving import MultiLoRAModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None, choices=["torch", "triton", "native"],
                    help="default None: see lora_kernels.backends; the line 'lora_kernels ran:' says what it picked")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--reps", type=int, default=20, help="timed forward passes of each model")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base = tiny_llama(device)
    adapters = {
        "summarize": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "translate": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "code": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: save_adapter(base, Path(tmp) / name, seed=i, **cfg)
                 for i, (name, cfg) in enumerate(adapters.items())}

        # max_cpu_loras: validated tensors of the 3 most recently used adapters stay in host memory.
        server = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, backend=args.backend, max_cpu_loras=3)
        print(f"wrapped {len(server.layers)} linear layers, 2 adapter slots of rank <= 8, 3 in host memory")
        server.load_adapter("summarize", paths["summarize"])
        server.load_adapter("translate", paths["translate"])
        server.load_adapter("code", paths["code"])  # both slots full: evicts the least recently used
        print("in slots:", server.adapters, "(summarize was evicted; it stays registered)")

        g = torch.Generator().manual_seed(1)
        input_ids = torch.randint(1, 128, (4, 5), generator=g).to(device)
        attention_mask = torch.ones_like(input_ids)
        names = ["code", None, "translate", "code"]
        out = server.generate(input_ids, attention_mask=attention_mask, adapter_names=names,
                              max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
        for b, name in enumerate(names):
            ref = base if name is None else peft.PeftModel.from_pretrained(copy.deepcopy(base), str(paths[name]))
            expected = ref.generate(input_ids=input_ids[b:b + 1], attention_mask=attention_mask[b:b + 1],
                                    max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)[0]
            status = "matches PEFT" if torch.equal(out[b], expected) else "DIFFERS from PEFT"
            print(f"seq {b} [{name or 'base'}]: {out[b, input_ids.shape[1]:].tolist()}  ({status})")

        # PEFT's mixed-batch inference over the same two adapters; "__base__" is its name for no adapter.
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(paths["code"]), adapter_name="code")
        peft_model.load_adapter(str(paths["translate"]), adapter_name="translate")
        peft_model.eval()
        peft_names = [n or "__base__" for n in names]
        ms = time_interleaved({
            "lora_kernels MultiLoRAModel": lambda: server(input_ids, attention_mask=attention_mask, adapter_names=names),
            "PEFT (adapter_names=)": lambda: peft_model(input_ids=input_ids, attention_mask=attention_mask,
                                                        adapter_names=peft_names),
        }, device, reps=args.reps)
        (ours, t_ours), (_, t_peft) = ms.items()
        print(f"forward of the mixed batch ({input_ids.shape[0]} x {input_ids.shape[1]} tokens), median of "
              f"{args.reps}: {ours} {t_ours:.2f} ms, PEFT {t_peft:.2f} ms -> {t_peft / t_ours:.2f}x")
        from lora_kernels import diagnostics
        print(f"lora_kernels ran: {diagnostics.backend_summary(torch.device(device), args.backend)}")

        # An evicted adapter comes back when a request names it (here from the host tier, no disk read).
        with torch.no_grad():
            server(input_ids[:1], attention_mask=attention_mask[:1], adapter_names=["summarize"])
        print("in slots:", server.adapters, "| cache counters:", server.stats())


def time_interleaved(calls: dict, device: str, reps: int) -> dict:
    """Median ms per call of each callable, one call of each in turn (a busy machine slows them alike)."""
    times = {n: [] for n in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        for _ in range(reps):
            for n, fn in calls.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


if __name__ == "__main__":
    main()
