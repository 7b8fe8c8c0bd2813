"""Serve several PEFT LoRA adapters behind one base model, one adapter per sequence of a batch.

Builds a tiny random-init Llama (no downloads), creates and saves three PEFT adapters with different ranks
and target modules, loads them into a `MultiLoRAModel` with two slots (so the third load evicts the least
recently used adapter), and greedily generates for a mixed batch. Each sequence is checked against PEFT
running that sequence's adapter alone.

    python examples/serve_multi_lora.py                   # fastest backend for the device
    TRITON_INTERPRET=1 python examples/serve_multi_lora.py --backend triton   # Triton kernels on CPU
"""
from __future__ import annotations

import argparse
import copy
import tempfile
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
    ap.add_argument("--backend", default=None, choices=["torch", "triton", "native"])
    ap.add_argument("--max-new-tokens", type=int, default=6)
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

        server = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, backend=args.backend)
        print(f"wrapped {len(server.layers)} linear layers, 2 adapter slots of rank <= 8")
        server.load_adapter("summarize", paths["summarize"])
        server.load_adapter("translate", paths["translate"])
        server.load_adapter("code", paths["code"])  # both slots full: evicts the least recently used
        print("loaded:", server.adapters, "(summarize was evicted)")

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


if __name__ == "__main__":
    main()
