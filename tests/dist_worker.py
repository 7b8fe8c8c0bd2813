"""Two-process training of a patched tiny PEFT model under DDP and FSDP2 (gloo, CPU), for test_distributed.py.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=PORT python tests/dist_worker.py --out RESULT.pt [--modes ddp,fsdp2]

Spawns 2 ranks (gloo, env:// rendezvous at MASTER_ADDR:MASTER_PORT, default 127.0.0.1:29500). For each mode,
every rank builds the same seeded model, patches it with `patch_peft(backend="torch")`, wraps it, and trains
`steps` SGD steps on its half of a fixed global batch.
Rank 0 also trains an unwrapped copy on the whole batch (the single-process reference) and saves, per mode:
first-step LoRA gradients, final LoRA parameters and losses of both runs, or the error text if the mode failed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 2
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 128


def build_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_kernels

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    # init_lora_weights=False: B is non-zero, so the LoRA path contributes to the loss from step one.
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    report = lora_kernels.patch_peft(model, backend="torch")
    assert report.num_patched == 14 and not report.skipped, report
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def _key(name: str) -> str:
    return name.removeprefix("module.")


def lora_state(model, grads: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        t = p.grad if grads else p
        if t is None:
            continue
        if hasattr(t, "full_tensor"):  # FSDP2 shards are DTensors
            t = t.full_tensor()
        out[_key(name)] = t.detach().clone()
    return out


def train(model, ids, steps):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, first_grads, fused_calls = [], None, 0
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if step == 0:  # count the fused op's calls: proves the wrapped model runs it, not PEFT's fallback
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            fused_calls = {op: sum(e.name == f"lora_kernels::{op}" for e in prof.events())
                           for op in ("lora_linear_fwd", "lora_linear_bwd")}
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        if first_grads is None:
            first_grads = lora_state(model, grads=True)
        opt.step()
        losses.append(loss.detach())
    return first_grads, lora_state(model, grads=False), torch.stack(losses), fused_calls


def run_mode(mode, rank, steps):
    model = build_model()
    ids = batch().chunk(WORLD)[rank]
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        raise ValueError(mode)
    grads, params, losses, fused_calls = train(model, ids, steps)
    dist.all_reduce(losses)  # each rank's loss is its shard's mean: average them for the global mean
    return {"grads": grads, "params": params, "losses": losses / WORLD, "fused_calls": fused_calls}


def worker(rank, out, modes, steps):
    torch.set_num_threads(1)  # two ranks on a small machine
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for mode in modes:
            try:
                results[mode] = run_mode(mode, rank, steps)
            except Exception:  # the same failure on both ranks (e.g. an unsupported collective): record it
                results[mode] = {"error": traceback.format_exc()}
            dist.barrier()
        if rank == 0:
            ref = build_model()
            grads, params, losses, fused_calls = train(ref, batch(), steps)
            results["single"] = {"grads": grads, "params": params, "losses": losses, "fused_calls": fused_calls}
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="ddp,fsdp2")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    mp.spawn(worker, args=(a.out, a.modes.split(","), a.steps), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
