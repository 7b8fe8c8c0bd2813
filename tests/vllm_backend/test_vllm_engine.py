"""vLLM end to end with lora_kernels' backend (LORA_KERNELS_VLLM=1, through the plugin) against vLLM's own, fp32 CPU.

Three engines start side by side, each in its own process: lora_kernels' backend (with vLLM's engine-core and
worker processes: the plugin must switch the backend on there by itself), vLLM's own, and the model without
LoRA (enable_lora=False), all over one tiny random Llama and five PEFT
adapters of ranks 4 / 8 / 16 whose targets go from two attention projections to every linear layer, plus the
embeddings and the LM head. max_loras=2 < 5 adapters makes vLLM swap adapters through its slots, and a token
budget of 64 per step splits the longer prompts over several steps (chunked prefill).

    rows with an adapter      greedy tokens and their logprobs equal vLLM's own backend's
    rows without an adapter   equal the model without LoRA (vLLM's own mixed batch gets them wrong: its CPU
                              ops read slot -1, the last slot; so can its batch without adapters, in the LM
                              head, once an adapter of the LM head sits in the last slot)
    prompt logprobs           one request per adapter, against PEFT's own logits for the prompt (vLLM's own
                              CPU backend fails on this)
"""
import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

import torch  # noqa: E402

from lora_kernels.bench.bench_vllm import (ALL_LINEAR, ATTENTION, MLP, Engine, LlamaShape,  # noqa: E402
                                           write_adapter, write_llama)

TINY = LlamaShape("tiny", 128, 256, 2, 4, 2, 512)   # head_dim 32, GQA (k / v narrower than q)
ADAPTERS = {  # name: (rank, targets)
    "r4-qv": (4, ("q_proj", "v_proj")),
    "r8-attn": (8, ATTENTION),
    "r16-all": (16, ALL_LINEAR),
    "r8-mlp": (8, MLP),
    "r16-emb-head": (16, ("embed_tokens", "q_proj", "down_proj", "lm_head")),
}
LLM_ARGS = dict(max_loras=2, max_lora_rank=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
# Mixed batch: every adapter twice and four requests without one; prompts of 5 to 100 tokens (those over 64
# are prefilled in chunks). More requests than max_num_seqs: later ones join while others decode.
MIXED = [None, "r4-qv", "r8-attn", None, "r16-all", "r8-mlp", "r16-emb-head", None,
         "r16-emb-head", "r8-mlp", "r16-all", "r8-attn", "r4-qv", None]
LENS = [7, 90, 23, 64, 5, 41, 100, 12, 33, 77, 16, 55, 70, 9]
NEW_TOKENS = 10
# fp32 logprobs of the same model from two kernel orders, or from vLLM and PEFT: ~1e-6 apart on this model.
LOGPROB_ATOL = 1e-4


def _prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, TINY.vocab, (n,), generator=g).tolist()


def _requests(adapters, **kw) -> list[dict]:
    return [{"prompt": _prompt(i, n), "adapter": a, "max_tokens": NEW_TOKENS, "logprobs": 2, **kw}
            for i, (a, n) in enumerate(zip(adapters, LENS))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_tiny")
    model = write_llama(str(d / "model"), TINY, init_range=0.1)
    adapters = {n: write_adapter(str(d / n), model, TINY, r, t, seed=i + 1, std=0.08)
                for i, (n, (r, t)) in enumerate(ADAPTERS.items())}
    return model, adapters


@pytest.fixture(scope="module")
def runs(files):
    """Every generate both engines run, once for the module."""
    model, adapters = files
    ours = Engine("lora_kernels", model, adapters, LLM_ARGS, multiprocessing=True)
    theirs = Engine("vllm", model, adapters, LLM_ARGS)
    plain = Engine("vllm", model, {}, dict(LLM_ARGS, enable_lora=False))
    engines = (ours, theirs, plain)
    try:
        for e in engines:
            e.wait()
        plp = [{"prompt": _prompt(100 + i, n), "adapter": a, "max_tokens": 1, "prompt_logprobs": 1}
               for i, (a, n) in enumerate(zip([*ADAPTERS, None], [70, 45, 90, 30, 66, 50]))]
        out = {"mixed": ours.generate(_requests(MIXED)),
               "mixed_vllm": theirs.generate(_requests(MIXED)),
               "base": plain.generate(_requests([None] * len(MIXED))),
               "base_ours": ours.generate(_requests([None] * len(MIXED))),
               "prompt_logprobs": ours.generate(plp), "prompt_logprobs_requests": plp,
               "wrappers": (ours.wrapper, theirs.wrapper)}
    finally:
        for e in engines:
            e.close()
    return out


def _compare_greedy(a: dict, b: dict) -> str:
    """'equal', or 'tie at k' when the sequences part at a token whose two candidates have logprobs within
    LOGPROB_ATOL in both runs (an exact tie up to rounding); asserts otherwise."""
    for k, (ta, tb) in enumerate(zip(a["token_ids"], b["token_ids"])):
        la, lb = dict(map(tuple, a["logprobs"][k])), dict(map(tuple, b["logprobs"][k]))
        if ta != tb:
            gap_a = la[ta] - la.get(tb, -math.inf)
            gap_b = lb[tb] - lb.get(ta, -math.inf)
            assert gap_a <= LOGPROB_ATOL and gap_b <= LOGPROB_ATOL, (
                f"token {k}: {ta} vs {tb} is no tie (logprob gaps {gap_a:.2e}, {gap_b:.2e})")
            return f"tie at {k}"
        assert abs(la[ta] - lb[tb]) <= LOGPROB_ATOL, f"token {k}: logprob {la[ta]} vs {lb[tb]}"
    assert len(a["token_ids"]) == len(b["token_ids"]) == NEW_TOKENS
    return "equal"


def test_the_plugin_installed_our_wrapper_in_the_worker(runs):
    assert runs["wrappers"] == ("PunicaWrapperLoRAKernels", "PunicaWrapperCPU")


def test_rows_with_an_adapter_equal_vllms_backend(runs):
    verdicts = [_compare_greedy(o, v) for a, o, v in zip(MIXED, runs["mixed"]["outputs"],
                                                         runs["mixed_vllm"]["outputs"]) if a is not None]
    assert sum(v == "equal" for v in verdicts) >= len(verdicts) - 1, verdicts


def test_rows_without_an_adapter_equal_a_batch_without_adapters(runs):
    for a, o, base in zip(MIXED, runs["mixed"]["outputs"], runs["base"]["outputs"]):
        if a is None:
            assert _compare_greedy(o, base) == "equal"


def test_no_adapter_batch_equals_the_model_without_lora(runs):
    for o, base in zip(runs["base_ours"]["outputs"], runs["base"]["outputs"]):
        assert _compare_greedy(o, base) == "equal"  # no LoRA work at all (the last bits may differ)


def test_adapters_change_the_outputs(runs):
    """The equalities above mean something only if the adapters move the tokens."""
    changed = [o["token_ids"] != b["token_ids"] for a, o, b in zip(MIXED, runs["mixed"]["outputs"],
                                                                   runs["base"]["outputs"]) if a is not None]
    assert sum(changed) >= len(changed) - 1, changed


def test_prompt_logprobs_equal_pefts(runs, files):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model, adapters = files
    for req, out in zip(runs["prompt_logprobs_requests"], runs["prompt_logprobs"]["outputs"]):
        base = LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
        m = base if req["adapter"] is None else PeftModel.from_pretrained(base, adapters[req["adapter"]])
        ids = torch.tensor([req["prompt"]])
        with torch.no_grad():
            ref = torch.log_softmax(m(ids).logits[0].double(), dim=-1)  # [n, vocab]: position i predicts i + 1
        plp = out["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(req["prompt"])
        got = torch.tensor([plp[i][0][1] for i in range(1, len(plp))], dtype=torch.float64)
        want = ref[torch.arange(len(plp) - 1), ids[0, 1:]]
        torch.testing.assert_close(got, want, rtol=0, atol=LOGPROB_ATOL,
                                   msg=lambda m: f"adapter {req['adapter']}: {m}")
