"""Training several LoRA adapters in one batch through `MultiLoRAModel` (issue 14): equivalence with training
each adapter alone in PEFT, absent adapters, save / load, torch.compile, backends.

The joint loss is `loss_reduction="per_adapter"` (the default): the sum over the adapters in the batch of each
one's own mean token loss, so each adapter's gradient is exactly the one of training it alone on its rows.
"""
import copy
import math

import pytest
import torch

from conftest import require_backend

transformers = pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the PEFT comparisons need `peft`")

from lora_kernels import serving  # noqa: E402
from lora_kernels.serving import adapter_files  # noqa: E402
from lora_kernels.serving import MultiLoRAModel  # noqa: E402

# Tiny models on a loaded 2-core machine: one thread is ~20x faster than contended intra-op threads.
torch.set_num_threads(1)

VOCAB, SEQ = 96, 8
CONFIGS = {  # heterogeneous ranks, targets, rslora and a rank pattern
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "c": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj", "gate_proj"], rank_pattern={"down_proj": 6}),
}
# Adam divides each gradient by its own magnitude, so fp32 rounding differences (the order of the scaling
# multiply, float32 slot scalings) grow with the learning rate: measured max |joint - PEFT| after 20 steps
# 2e-7 at lr=1e-3, 3e-5 at lr=1e-2 (4e-6 even in float64, from the float32 scalings alone).
LR = 1e-3


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base():
    return _tiny_llama()


def _joint(base, configs=CONFIGS, backend="torch", max_loras=4, seed=1):
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=max_loras, max_rank=8, backend=backend)
    torch.manual_seed(seed)
    for n, c in configs.items():
        mm.add_adapter(n, c)
    return mm.train()


def _task_batch(step, name, rows=2):
    """Rows of adapter `name` at `step`: its own synthetic data (a seeded generator per adapter and step)."""
    g = torch.Generator().manual_seed(1000 * step + ord(name))
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : 1 + step % 3] = -100  # some unlabelled tokens, a different count per step
    return ids, labels


def _peft_solo(base, mm, name):
    """PEFT model of adapter `name` alone, starting from mm's initial weights of that adapter."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIGS[name]))
    state = {}
    for module, layer in mm.layers.items():
        (A,), (B,) = layer.trainable_weights(mm.adapters[name])
        if A is not None:
            state[f"base_model.model.{module}.lora_A.weight"] = A.detach().clone()
            state[f"base_model.model.{module}.lora_B.weight"] = B.detach().clone()
    res = peft.set_peft_model_state_dict(pm, state)
    assert not [k for k in res.unexpected_keys if "lora" in k]
    return pm.train()


def _assert_params_equal(mm, pm, name, atol=1e-6, rtol=1e-4):
    got = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    ours = mm.parameters_of(name)
    assert len(got) == len(ours)
    for (key, p), q in zip(got.items(), ours):
        assert p.shape == q.shape, key
        torch.testing.assert_close(q.detach(), p.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{name} {key}: {m}")


def test_add_adapter_init_like_peft(base):
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=3, max_rank=8)
    mm.add_adapter("k", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"]))
    mm.add_adapter("g", dict(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    for name, r in (("k", 8), ("g", 4)):
        ps = mm.parameters_of(name)
        assert all(p.is_leaf and p.requires_grad for p in ps)
        for A, B in zip(ps[0::2], ps[1::2]):
            assert A.shape[0] == r == B.shape[1] and not B.any()
            if name == "k":  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
                bound = 1 / math.sqrt(A.shape[1])
                assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
            else:  # N(0, 1/r)
                assert abs(A.std().item() - 1 / r) < 0.35 / r
    # Everything but the adapters is frozen, as in PEFT.
    trainable = {id(p) for n in mm.trainable_adapters for p in mm.parameters_of(n)}
    assert all(not p.requires_grad for p in mm.parameters() if id(p) not in trainable)
    assert len(mm.parameters_of("k")) == 2 * 2 * 2  # 2 layers x (q_proj, up_proj) x (A, B)
    with pytest.raises(ValueError, match="exists"):
        mm.add_adapter("k", dict(r=2, target_modules=["q_proj"]))
    with pytest.raises(serving.AdapterError, match="max_rank"):
        mm.add_adapter("big", dict(r=16, target_modules=["q_proj"]))
    with pytest.raises(serving.AdapterError, match="target_modules"):
        mm.add_adapter("none", dict(r=2))
    with pytest.raises(serving.AdapterError, match="lora_dropout"):
        mm.add_adapter("drop", dict(r=2, target_modules=["q_proj"], lora_dropout=1.5))
    with pytest.raises(KeyError, match="add_adapter"):
        mm.parameters_of("nope")


def _train_solo(base, mm, name, steps, present):
    pm = _peft_solo(base, mm, name)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(steps):
        if name not in present(step):
            continue
        ids, labels = _task_batch(step, name)
        loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return pm, losses


def _joint_step(mm, opt, step, names):
    batches = [_task_batch(step, n) for n in names]
    ids = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    rows = [n for n in names for _ in range(batches[0][0].shape[0])]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(step))  # rows interleaved
    out = mm(ids[perm], labels=labels[perm], adapter_names=[rows[i] for i in perm])
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return {n: out.adapter_losses[n].item() for n in names}


def test_joint_training_equals_peft_alone(base):
    """20 AdamW steps, every adapter in every step: each adapter ends where training it alone in PEFT ends."""
    steps = 20
    mm = _joint(base)
    initial = {n: [p.detach().clone() for p in mm.parameters_of(n)] for n in CONFIGS}
    solos = {n: _train_solo(base, mm, n, steps, lambda s: CONFIGS) for n in CONFIGS}
    opt = torch.optim.AdamW(mm.param_groups(), lr=LR)
    joint_losses = {n: [] for n in CONFIGS}
    for step in range(steps):
        for n, v in _joint_step(mm, opt, step, list(CONFIGS)).items():
            joint_losses[n].append(v)
    for n, (pm, losses) in solos.items():
        torch.testing.assert_close(torch.tensor(joint_losses[n]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        moved = max((p - q).abs().max().item() for p, q in zip(mm.parameters_of(n), initial[n]))
        assert moved > 10 * LR, f"{n}: training did not move the parameters ({moved})"
        _assert_params_equal(mm, pm, n)


def test_absent_adapter_does_not_move(base):
    """An adapter without rows in a step gets grad None: AdamW skips it, its state (momentum, step) included;
    the others still match PEFT trained on its own steps. "c" has dropout: the others are unaffected by it."""
    configs = dict(CONFIGS, c=dict(CONFIGS["c"], lora_dropout=0.3))
    mm = _joint(base, configs)
    opt = torch.optim.AdamW(mm.param_groups(), lr=LR)

    def present(step):
        return ["a", "b", "c"] if step % 3 == 0 else ["a", "b"]
    solo_b = _train_solo(base, mm, "b", 6, present)[0]
    for step in range(6):
        c_params = [p.detach().clone() for p in mm.parameters_of("c")]
        c_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in mm.parameters_of("c")]
        _joint_step(mm, opt, step, present(step))
        same = all(torch.equal(p, q) for p, q in zip(mm.parameters_of("c"), c_params))
        assert same == ("c" not in present(step)), step
        if "c" not in present(step):
            for p, st in zip(mm.parameters_of("c"), c_state):
                assert opt.state[p].keys() == st.keys()
                assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    _assert_params_equal(mm, solo_b, "b")


def _trained(base, steps=3):
    mm = _joint(base)
    opt = torch.optim.AdamW(mm.param_groups(), lr=LR)
    for step in range(steps):
        _joint_step(mm, opt, step, list(CONFIGS))
    return mm


def test_save_adapter_loads_in_peft_and_back(base, tmp_path):
    mm = _trained(base).eval()
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))
    names = ["a", "c", None, "b"]
    with torch.no_grad():
        ours = mm(ids, adapter_names=names).logits
    mm2 = MultiLoRAModel(copy.deepcopy(base), max_loras=3, max_rank=8)
    for n in CONFIGS:
        path = mm.save_adapter(n, tmp_path / n)
        assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
        with torch.no_grad():
            for b in [i for i, m in enumerate(names) if m == n]:
                torch.testing.assert_close(ours[b], pm(ids[b:b + 1]).logits[0], atol=1e-5, rtol=1e-5)
        mm2.load_adapter(n, path)
    with torch.no_grad():
        torch.testing.assert_close(mm2(ids, adapter_names=names).logits, ours, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours[2], base(ids[2:3]).logits[0], atol=1e-6, rtol=1e-6)
    # eval() served the trained values; a later in-place update (an optimizer step) is copied into the slot
    # before the next eval-mode forward (version counters), and only adapter "a"'s rows change.
    with torch.no_grad():
        for p in mm.parameters_of("a"):
            p.add_(0.1)
        again = mm(ids, adapter_names=names).logits
    assert not torch.allclose(again[0], ours[0])
    torch.testing.assert_close(again[1:], ours[1:], atol=0, rtol=0)


def test_save_adapter_is_atomic(base, tmp_path, monkeypatch):
    mm = _trained(base, steps=1)
    path = mm.save_adapter("a", tmp_path / "a")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        for p in mm.parameters_of("a"):
            p.add_(1.0)
    real, calls = adapter_files._write_file, []

    def failing(p, data):  # dies after the config, before the weights file is complete
        calls.append(p.name)
        if len(calls) == 2:
            p.write_bytes(data[: len(data) // 2])
            raise OSError("disk full")
        real(p, data)
    monkeypatch.setattr(adapter_files, "_write_file", failing)
    for target in (path, tmp_path / "new"):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            mm.save_adapter("a", target)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # the old adapter, untouched
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers
    mm2 = MultiLoRAModel(copy.deepcopy(base), max_loras=1, max_rank=8)
    mm2.load_adapter("a", path)
    with pytest.raises(FileExistsError):  # a directory that is not an adapter is never replaced
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("x")
        monkeypatch.setattr(adapter_files, "_write_file", real)
        mm.save_adapter("a", tmp_path / "other")


def test_compile_fullgraph_joint_step(base):
    """torch.compile(fullgraph=True) over the model forward + per-adapter loss; the StepBatch is built by
    `prepare` outside the compiled region. Loss and every gradient equal eager."""
    torch._dynamo.reset()
    names = ["a", "b", "c", "a"]
    ids, labels = (torch.cat(t) for t in zip(*[_task_batch(0, n, rows=1) for n in names]))
    results = []
    for compiled in (False, True):
        mm = _joint(base)
        step = torch.compile(mm.forward_prepared, fullgraph=True) if compiled else mm.forward_prepared
        with mm.prepare(names, ids):
            loss = step(ids, labels=labels, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for n in CONFIGS for p in mm.parameters_of(n)]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert all(g is not None for g in g1)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_backends_match_torch(base, backend):
    """One joint fwd+bwd with each CPU backend (triton under TRITON_INTERPRET=1) against the torch backend."""
    require_backend(backend, "cpu")
    names = ["b", "a", "c", "b", None]
    ids = torch.randint(1, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(3))
    grads = []
    for be in ("torch", backend):
        mm = _joint(base, backend=be)
        with torch.no_grad():  # non-zero B, so every gradient is non-trivial
            for n in CONFIGS:
                for B in mm.parameters_of(n)[1::2]:
                    B.normal_(0, 0.1, generator=torch.Generator().manual_seed(B.numel()))
        out = mm(ids, labels=ids, adapter_names=names)
        out.loss.backward()
        grads.append([out.loss.detach()] + [p.grad for n in CONFIGS for p in mm.parameters_of(n)])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bench_suite_tiny_case():
    """The multi_lora_train bench suite on a tiny shape: every CPU contender runs, matches the float32
    reference (dx, dA, dB) and gets a speed-up over the sequential PEFT passes."""
    from lora_kernels.bench import bench_multi_lora_train as bt
    from lora_kernels.bench.common import Context
    from lora_kernels.bench.report import add_ratios

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, adapter_dtype=torch.float32, budget_ms=1,
                  graph="never")
    cases = bt.grid([], ["q"], [3], [1, 3], seqs=5, seq_len=3, shapes=[(40, 24)])
    rows = bt.run(cases, bt.CONTENDERS, ctx)
    add_ratios(rows)
    assert {(r["adapters"], r["contender"]) for r in rows} == {(n, c) for n in (1, 3) for c in bt.CONTENDERS}
    for r in rows:
        if r["contender"] in ("base", "peft-seq", "ours", "ours:torch"):
            assert r["status"] == "ok", r
        assert r["status"] in ("ok", "n/a") and (r["status"] == "ok" or r["reason"]), r
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["vs_peft"] > 0
            if r["contender"] != "base":
                assert r["rel_err"] < 1e-5, r
    assert "joint 4 adapters" in bt.goal_line(rows)


def test_example_trains_like_peft(monkeypatch):
    """examples/train_multi_adapter.py, 2 steps: its joint and PEFT-alone losses agree (the full run prints them)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "train_multi_adapter.py")
    spec = importlib.util.spec_from_file_location("train_multi_adapter", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    base = ex.tiny_llama()
    mm, init, joint, _ = ex.train_jointly(base, steps=2, lr=3e-3, backend=None)
    for name in ex.TASKS:
        pm, alone, _ = ex.train_alone_peft(base, name, init[name], steps=2, lr=3e-3)
        torch.testing.assert_close(torch.tensor(joint[name]), torch.tensor(alone), atol=1e-5, rtol=1e-5)
        _assert_params_equal(mm, pm, name)
