"""Fine-tune a tiny causal LM with PEFT LoRA, unpatched vs. `lora_kernels.patch_peft`, and compare.

    python examples/finetune_peft.py                      # ~10 s on CPU; uses CUDA when present
    python examples/finetune_peft.py --steps 50 --dropout 0.1 --backend torch

The model is a random-init Llama built from a config (no downloads); the data is synthetic: each sequence
counts up from a random start with a random stride (mod vocab), so the next token is predictable and
the LoRA adapters can learn it. Both runs start from the same weights and see the same batches; with
dropout 0 their loss curves agree up to float rounding. The two train step by step in turn, so a busy machine
slows both alike. Prints loss and tokens/s for each, which backend lora_kernels ran, and the speed-up.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lora_kernels
from lora_kernels import diagnostics


def synthetic_batches(steps: int, batch: int, seq: int, vocab: int, device, seed: int = 0):
    """Arithmetic sequences mod vocab: token[t] = (start + stride * t) % vocab."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(seq)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 8, (batch, 1), generator=g)
        yield ((start + stride * t) % vocab).to(device)


def train(models: dict, args, device) -> dict:
    """Train every model on the same batches, one step of each in turn (the order alternating per step), so
    load from other processes slows them alike. Returns {name: (losses, tokens/s, peak MiB or None)}."""
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
            for n, m in models.items()}
    stats = {n: ([], 0, 0.0, 0) for n in models}  # losses, tokens, seconds, peak bytes
    names = list(models)
    for step, ids in enumerate(synthetic_batches(args.steps + args.warmup, args.batch, args.seq, args.vocab,
                                                 device)):
        for name in (names if step % 2 == 0 else names[::-1]):
            model, opt = models[name], opts[name]
            model.train()
            losses, tokens, elapsed, peak = stats[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = max(peak, torch.cuda.max_memory_allocated())
            if step >= args.warmup:  # the first steps allocate and warm caches
                elapsed += time.perf_counter() - t0
                tokens += ids.numel()
            losses.append(loss.item())
            stats[name] = (losses, tokens, elapsed, peak)
    return {n: (l, tok / sec, peak / 2**20 if device.type == "cuda" else None) for n, (l, tok, sec, peak) in stats.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--backend", default=None,
                    help="lora_kernels backend: torch / native / triton / composite (default None: see "
                         "lora_kernels.backends; the line 'lora_kernels ran:' says what it picked)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: the default model's GEMMs are too small to gain from more, and "
                         "extra threads spin when the machine is shared)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 128, 1),
                      vocab_size=args.vocab, max_position_embeddings=max(args.seq, 128))
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    plain = get_peft_model(base, lcfg)
    patched = copy.deepcopy(plain)
    report = lora_kernels.patch_peft(patched, backend=args.backend)
    print(report)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} backend={args.backend} "
          f"batch={args.batch} seq={args.seq} "
          f"hidden={args.hidden} layers={args.layers} r={args.rank} dropout={args.dropout}")

    results = train({"unpatched PEFT": plain, "patched (lora_kernels)": patched}, args, device)
    for name, (losses, tok_s, peak) in results.items():
        mem = f", peak mem {peak:.0f} MiB" if peak is not None else ""
        print(f"{name:24s} loss {losses[0]:.3f} -> {losses[-1]:.3f}   {tok_s:,.0f} tokens/s{mem}")
    (l0, t0, _), (l1, t1, _) = results.values()
    print(f"lora_kernels ran: {diagnostics.backend_summary(device, args.backend)}")
    print(f"speed-up over unpatched PEFT: {t1 / t0:.2f}x tokens/s ({args.steps} steps each, interleaved); "
          f"max |loss difference| over {len(l0)} steps: {max(abs(a - b) for a, b in zip(l0, l1)):.2e}")


if __name__ == "__main__":
    main()
