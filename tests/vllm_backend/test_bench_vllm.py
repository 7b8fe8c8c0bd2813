"""The vllm bench suite's arithmetic (no vLLM needed): goals and notes from rows, and the workloads."""
from lora_kernels.bench import bench_vllm as bv


def _rows(phase, **ms):
    names = {"base": "base", "vllm": "vllm", "ours": "lora_kernels", "none_vllm": "no adapter (vllm)"}
    return [{"suite": bv.SUITE, "phase": phase, "contender": names[k], "ms": v, "status": "ok"} for k, v in ms.items()]


def test_goals_compare_taxes_over_the_model_without_lora():
    rows = (_rows("prefill-heavy", base=100.0, vllm=500.0, ours=130.0, none_vllm=110.0)
            + _rows("decode-heavy", base=100.0, vllm=190.0, ours=131.0))
    g = {x["goal"]: x for x in bv.goals(rows)}
    tax_prefill, tax_decode, speed = (g[d] for d, *_ in bv.GOALS)
    assert abs(tax_prefill["value"] - 30 / 400) < 1e-12 and tax_prefill["met"]
    assert abs(tax_decode["value"] - 31 / 90) < 1e-12 and not tax_decode["met"]
    assert abs(speed["value"] - 500 / 130) < 1e-12 and speed["met"]
    bv._add_notes(rows)
    ours = next(r for r in rows if r["contender"] == "lora_kernels" and r["phase"] == "prefill-heavy")
    assert ours["reason"] == "tax +30% = 0.075x vLLM's; 3.85x faster than vLLM's"
    assert next(r for r in rows if r["contender"] == "no adapter (vllm)")["reason"] == "tax +10%"


def test_goals_not_measured_without_rows():
    assert all(x["value"] is None and x["met"] is None for x in bv.goals(_rows("decode-heavy", base=1.0)))


def test_workloads_spread_requests_over_adapters():
    reqs = bv.workload_requests("decode-heavy", ["a", "b", None], vocab=100)
    assert len(reqs) == bv.REQUESTS
    assert [r["adapter"] for r in reqs[:4]] == ["a", "b", None, "a"]
    assert all(len(r["prompt"]) == 16 and r["max_tokens"] == 48 for r in reqs)
    assert reqs == bv.workload_requests("decode-heavy", ["a", "b", None], vocab=100)  # the same every call
