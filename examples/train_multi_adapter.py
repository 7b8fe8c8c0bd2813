"""Train four LoRA adapters at once, in one batch, on one base model -- and check it equals training each alone.

Builds a tiny random-init Llama (no downloads) and four small synthetic tasks (continue an arithmetic
sequence with step 1, 2, 3 or 5 modulo the vocabulary). A `MultiLoRAModel` gets four trainable adapters
(`add_adapter`, different ranks and target modules) and trains them jointly: every step is one batch whose
rows belong to the four adapters, one forward + backward, one AdamW step. Then each adapter is trained alone
with PEFT from the same initial weights on the same rows in the same order. Per-adapter losses agree up to
fp32 rounding (the joint loss is the sum of each adapter's own mean loss, so each adapter's gradient is its
solo one). Prints both runs' losses and tokens/s, and saves the adapters as PEFT adapter directories.

    python examples/train_multi_adapter.py                   # ~1 minute on a CPU
    python examples/train_multi_adapter.py --steps 60 --backend native
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

VOCAB, SEQ, ROWS = 128, 16, 4  # ROWS sequences per adapter per step
TASKS = {  # adapter name: (sequence step, its LoRA config)
    "step1": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "step2": (2, dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "step3": (3, dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    "step5": (5, dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])),
}


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def task_batch(name: str, step: int) -> torch.Tensor:
    """ROWS sequences of task `name` at `step`: start at a random token, advance by the task's step."""
    g = torch.Generator().manual_seed(10_000 * step + sum(map(ord, name)))
    start = torch.randint(0, VOCAB, (ROWS, 1), generator=g)
    return (start + TASKS[name][0] * torch.arange(SEQ)) % VOCAB


def train_jointly(base, steps: int, lr: float, backend):
    from lora_kernels.serving import MultiLoRAModel

    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=len(TASKS), max_rank=16, backend=backend)
    torch.manual_seed(1)
    for name, (_, cfg) in TASKS.items():
        mm.add_adapter(name, cfg)
    init = {n: [p.detach().clone() for p in mm.parameters_of(n)] for n in TASKS}
    mm.train()
    opt = torch.optim.AdamW(mm.param_groups(), lr=lr)  # one group per adapter: each updated as if alone
    names = [n for n in TASKS for _ in range(ROWS)]
    losses = {n: [] for n in TASKS}
    t0 = time.perf_counter()
    for step in range(steps):
        ids = torch.cat([task_batch(n, step) for n in TASKS])
        out = mm(ids, labels=ids, adapter_names=names, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()  # set_to_none: an adapter absent from a step would keep grad None and not move
        for n in TASKS:
            losses[n].append(out.adapter_losses[n].item())
    return mm, init, losses, time.perf_counter() - t0


def train_alone_peft(base, name: str, init, steps: int, lr: float):
    import peft

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**TASKS[name][1]))
    with torch.no_grad():  # the same initial weights as the joint run (PEFT's parameter order is ours)
        for p, q in zip([p for p in pm.parameters() if p.requires_grad], init):
            p.copy_(q)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        ids = task_batch(name, step)
        loss = pm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return pm, losses, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--backend", default=None, help="torch, native or triton (default: fastest available)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = tiny_llama()
    tokens = args.steps * ROWS * SEQ  # per adapter
    mm, init, joint, t_joint = train_jointly(base, args.steps, args.lr, args.backend)
    print(f"{'adapter':8} {'loss @0':>9} {'joint @end':>11} {'PEFT @end':>11} {'max |dloss|':>12} "
          f"{'max |dparam|':>13}")
    t_alone, worst = 0.0, 0.0
    for n in TASKS:
        pm, alone, t = train_alone_peft(base, n, init[n], args.steps, args.lr)
        t_alone += t
        dloss = max(abs(a - b) for a, b in zip(joint[n], alone))
        dparam = max((p - q).abs().max().item()
                     for p, q in zip([p for p in pm.parameters() if p.requires_grad], mm.parameters_of(n)))
        worst = max(worst, dloss)
        print(f"{n:8} {joint[n][0]:9.5f} {joint[n][-1]:11.5f} {alone[-1]:11.5f} {dloss:12.2e} {dparam:13.2e}")
    n_ad = len(TASKS)
    print(f"\njoint ({n_ad} adapters per batch): {n_ad * tokens / t_joint:9.0f} tokens/s ({t_joint:.2f} s)")
    print(f"PEFT, one adapter at a time:     {n_ad * tokens / t_alone:9.0f} tokens/s ({t_alone:.2f} s)")
    print(f"speed-up {t_alone / t_joint:.2f}x; per-adapter losses "
          f"{'equal up to fp32 rounding' if worst < 1e-3 else 'DIFFER'} (max |dloss| {worst:.1e})")

    mm.eval()  # copies the trained adapters into their slots: the model now serves them
    out_dir = tempfile.mkdtemp(prefix="multi_adapter_")
    for n in TASKS:
        mm.save_adapter(n, f"{out_dir}/{n}")
    print(f"saved {n_ad} PEFT adapter directories under {out_dir} (PeftModel.from_pretrained / load_adapter)")


if __name__ == "__main__":
    main()
