"""QLoRA on the CPU: a tiny random-init Llama quantized to NF4 in place, trained with PEFT unpatched vs.
`lora_kernels.patch_peft`, from the same init and on the same data.

    python examples/qlora_finetune.py                 # ~15 s on a CPU; needs bitsandbytes (pip install 'lora_kernels[qlora]')
    python examples/qlora_finetune.py --steps 40 --hidden 256

Every nn.Linear of the decoder layers becomes a bitsandbytes Linear4bit (NF4, double quantization, as QLoRA's
BitsAndBytesConfig does; quantized when moved to the CPU), then PEFT puts LoRA on all seven projections. The patched
copy runs `lk.qlora_linear` in every lora.Linear4bit. Both print their losses (equal within bitsandbytes' precision:
its CPU base may run in bf16 where the CPU has AVX512-BF16, ours is float32 x deq(W0)ᵀ) and tokens/s. The sizes are
multiples of 64 on purpose: bitsandbytes 0.50's CPU kernel is wrong when 64-blocks cross rows (in % 64 != 0).
"""
from __future__ import annotations

import argparse
import copy

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lora_kernels
from lora_kernels import diagnostics
from finetune_peft import train  # the sibling example: same synthetic data, same interleaved training loop


def quantize_nf4_(model: nn.Module) -> nn.Module:
    """Every nn.Linear inside the decoder layers replaced by a bitsandbytes NF4 Linear4bit holding its weight."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if type(lin) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q.to("cpu"))  # bitsandbytes quantizes on the move to the device
    model.is_loaded_in_4bit = True  # what PEFT reads to build its lora.Linear4bit layers
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 64, 1),
                      vocab_size=args.vocab, max_position_embeddings=max(args.seq, 128))
    base = quantize_nf4_(LlamaForCausalLM(cfg))
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    plain = get_peft_model(base, lcfg)
    patched = copy.deepcopy(plain)
    print(lora_kernels.patch_peft(patched))
    print(f"NF4 (nested) base, threads={torch.get_num_threads()} batch={args.batch} seq={args.seq} "
          f"hidden={args.hidden} layers={args.layers} r={args.rank}")

    results = train({"unpatched PEFT + bnb": plain, "patched (lora_kernels)": patched}, args, device)
    for name, (losses, tok_s, _) in results.items():
        print(f"{name:24s} loss {losses[0]:.4f} -> {losses[-1]:.4f}   {tok_s:,.0f} tokens/s")
    (l0, t0, _), (l1, t1, _) = results.values()
    rel = max(abs(a - b) / abs(b) for a, b in zip(l0, l1))
    print(f"lora_kernels ran: {diagnostics.backend_summary(device, None)}")
    print(f"speed-up over unpatched PEFT + bnb: {t1 / t0:.2f}x tokens/s; max relative loss difference over "
          f"{len(l0)} steps: {rel:.1e}")


if __name__ == "__main__":
    main()
