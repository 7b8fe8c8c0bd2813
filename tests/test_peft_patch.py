"""`patch_peft` / `unpatch_peft` / `get_fused_peft_model` on a tiny random-init Llama (hidden 64, 2 layers,
vocab 128) with LoRA on q/k/v/o/gate/up/down: patched vs. PEFT's own forward.

B is initialised non-zero (init_lora_weights=False) so the LoRA path changes every output and gradient.
Most tests use backend="torch" (fast on CPU); one runs backend="triton" under the interpreter.
"""
from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="patch_peft needs peft: pip install 'lora_kernels[peft]'")
transformers = pytest.importorskip("transformers", reason="the tests build a transformers LlamaForCausalLM")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners import lora as peft_lora  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import peft_patch  # noqa: E402
from lora_kernels.dropout import dropout_mask, new_seed  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)
VOCAB = 128
RTOL, ATOL = 1e-4, 1e-5  # float32 model: patched and PEFT differ only in summation order


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def lora_config(dropout: float = 0.0, **kw) -> LoraConfig:
    kw = dict(dict(target_modules=TARGETS, r=8, lora_alpha=16), **kw)
    return LoraConfig(lora_dropout=dropout, init_lora_weights=False, **kw)


def peft_pair(dropout: float = 0.0, backend: str = "torch", **kw):
    """(patched, reference): identical PEFT models, the first patched with `backend`."""
    ref = get_peft_model(tiny_llama(), lora_config(dropout, **kw))
    model = copy.deepcopy(ref)
    report = lora_kernels.patch_peft(model, backend=backend)
    return model, ref, report


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    return out.logits.detach(), lora_grads(model)


def assert_grads_close(got: dict, want: dict, rtol=RTOL, atol=ATOL):
    assert set(got) == set(want) and len(want) == 2 * N_LAYERS, sorted(set(got) ^ set(want))
    for name, g in want.items():
        assert torch.count_nonzero(g) > 0, f"{name}: zero reference gradient, the comparison could not fail"
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def fused_op_calls(fn) -> dict[str, int]:
    """How many times each lora_kernels op ran inside fn() (profiler events carry the op names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.name.startswith("lora_kernels::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_fallback_log(monkeypatch):
    monkeypatch.setattr(peft_patch, "_LOGGED_FALLBACKS", set())


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused single- and multi-adapter functions (cheaper than the profiler)."""
    counts = {"lora_linear": 0, "multi_lora_linear": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(peft_patch, "lora_linear", counting("lora_linear", peft_patch.lora_linear))
    ops = peft_patch._multi_lora_ops()
    if ops is not None:
        monkeypatch.setattr(ops, "multi_lora_linear", counting("multi_lora_linear", ops.multi_lora_linear))
    return counts


# ----------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------

def test_patch_report_ops_by_name_and_exact_unpatch():
    model, ref, report = peft_pair()
    assert report.num_patched == N_LAYERS and report.skipped == {} and report.num_skipped == 0
    assert report.patched == [n for n, m in model.named_modules() if isinstance(m, peft_lora.LoraLayer)]
    fused = [m for m in model.modules() if isinstance(m, peft_lora.LoraLayer)]
    assert all(type(m) is peft_patch.FusedLoraLinear for m in fused) and len(fused) == N_LAYERS
    assert all(isinstance(m, peft_lora.Linear) for m in fused)  # PEFT's isinstance checks still hold
    x = ids()
    counts = fused_op_calls(lambda: model(input_ids=x, labels=x).loss.backward())
    assert counts.get("lora_kernels::lora_linear_fwd") == N_LAYERS
    assert counts.get("lora_kernels::lora_linear_bwd") == N_LAYERS
    # Same parameters and state_dict as the unpatched model.
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    # unpatch restores PEFT's class and leaves no attribute behind.
    keys_ref = {n: set(m.__dict__) for n, m in ref.named_modules()}
    assert lora_kernels.unpatch_peft(model) == N_LAYERS
    assert all(type(m) is peft_lora.Linear for m in model.modules() if isinstance(m, peft_lora.LoraLayer))
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == keys_ref
    assert fused_op_calls(lambda: model(input_ids=x)) == {}
    # Patching twice is harmless and can change the backend.
    assert lora_kernels.patch_peft(model).num_patched == N_LAYERS
    assert lora_kernels.patch_peft(model, backend="torch").num_patched == N_LAYERS
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_kernels.patch_peft(model, backend="cuda")


def test_patched_layer_deepcopies_and_pickles():
    model, _, _ = peft_pair()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is peft_patch.FusedLoraLinear
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# numerics vs PEFT
# ----------------------------------------------------------------------------------------------------

def test_logits_and_every_lora_grad_match_peft():
    model, ref, _ = peft_pair(dropout=0.0)
    x = ids()
    logits, grads = loss_and_grads(model, x)
    logits_ref, grads_ref = loss_and_grads(ref, x)
    torch.testing.assert_close(logits, logits_ref, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, grads_ref)


def test_eval_mode_with_dropout_matches_peft():
    model, ref, _ = peft_pair(dropout=0.1)
    model.eval(), ref.eval()
    x = ids()
    torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=RTOL, atol=ATOL)


def _train(model, x, steps=20, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_twenty_adamw_steps_follow_peft_loss_curve():
    model, ref, _ = peft_pair(dropout=0.0)
    x = ids(batch=2, seq=16)
    losses, losses_ref = _train(model, x), _train(ref, x)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0] - 0.05, losses


class RegeneratedDropout(nn.Module):
    """PEFT-side reference for dropout: the mask the fused op regenerates, drawn from the same seed stream
    (one `new_seed()` per LoRA layer call in training, in call order, exactly as `lora_linear` draws)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        seed = new_seed()
        keep = dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), self.p).view(x.shape)
        return x * keep.to(x.dtype) / (1.0 - self.p)


def test_dropout_grads_match_reference_with_regenerated_mask():
    model, ref, _ = peft_pair(dropout=0.1)
    for m in ref.modules():
        if isinstance(m, peft_lora.LoraLayer):
            m.lora_dropout["default"] = RegeneratedDropout(m.lora_dropout["default"].p)
    x = ids()
    torch.manual_seed(123)
    logits, grads = loss_and_grads(model, x)
    torch.manual_seed(123)
    logits_ref, grads_ref = loss_and_grads(ref, x)
    torch.testing.assert_close(logits, logits_ref, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, grads_ref)
    # Dropout really ran: without it the gradients differ.
    model.eval()
    _, grads_eval = loss_and_grads(model, x)
    assert any(not torch.allclose(grads_eval[n], grads[n], rtol=1e-3, atol=1e-5) for n in grads)


def test_dropout_training_loss_decreases():
    model, _, _ = peft_pair(dropout=0.1)
    losses = _train(model, ids(batch=2, seq=16))
    assert torch.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean() - 0.05, losses


def test_gradient_checkpointing_replays_the_same_dropout_mask():
    model, _, _ = peft_pair(dropout=0.1)
    gc_model = copy.deepcopy(model)
    gc_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = ids()
    torch.manual_seed(7)
    _, grads = loss_and_grads(model, x)
    torch.manual_seed(7)
    _, grads_gc = loss_and_grads(gc_model, x)
    assert_grads_close(grads_gc, grads)


def test_autocast_bf16_matches_peft():
    model, ref, _ = peft_pair()
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = loss_and_grads(model, x)
        logits_ref, grads_ref = loss_and_grads(ref, x)
    assert logits.dtype == logits_ref.dtype
    # PEFT runs the LoRA path in bf16 under autocast, the fused op in float32: bf16-level agreement.
    torch.testing.assert_close(logits.float(), logits_ref.float(), rtol=3e-2, atol=3e-2)
    for n, g in grads_ref.items():
        rel = (grads[n] - g).norm() / g.norm()
        assert rel < 5e-2, f"{n}: relative error {rel:.3e}"


# ----------------------------------------------------------------------------------------------------
# PEFT state at call time
# ----------------------------------------------------------------------------------------------------

def test_follows_peft_state_disable_merge_switch_scale(caplog, fused_calls):
    ref = get_peft_model(tiny_llama(), lora_config())
    ref.add_adapter("other", lora_config(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=5, r=3))
    model = copy.deepcopy(ref)
    assert lora_kernels.patch_peft(model, backend="torch").num_patched == N_LAYERS
    model.eval(), ref.eval()
    x = ids()

    def check(what, fused=N_LAYERS):
        fused_calls["lora_linear"] = 0
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what}: {m}")
        assert fused_calls["lora_linear"] == fused, (what, fused_calls)

    check("default adapter")
    with model.disable_adapter(), ref.disable_adapter():
        check("disabled", fused=0)
    check("re-enabled")
    for m in (model, ref):
        m.set_adapter("other")
    check("switched to 'other'", fused=6)  # layers without 'other' run base_layer only, as in PEFT
    for m in (model, ref):
        m.set_adapter("default")
        for layer in m.modules():
            if isinstance(layer, peft_lora.LoraLayer):
                layer.scale_layer(2.5)
    check("scaled")
    for m in (model, ref):
        m.merge_adapter()
    check("merged", fused=0)
    for m in (model, ref):
        m.unmerge_adapter()
    check("unmerged")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_kernels.peft"):
        for m in (model, ref):
            m.base_model.set_adapter(["default", "other"])
        # The 6 layers with both adapters run PEFT's loop; the 8 with only 'default' stay fused.
        check("two active adapters", fused=8)
        check("two active adapters, again", fused=8)
    msgs = [r.getMessage() for r in caplog.records if "several active adapters" in r.getMessage()]
    assert len(msgs) == 1, msgs  # logged once, not per layer or per call


def test_mixed_batch_adapter_names_runs_multi_lora_and_matches_peft(fused_calls):
    if peft_patch._multi_lora_ops() is None:
        pytest.skip("lora_kernels.ops.multi_lora is not available: mixed batches run PEFT's own loop")
    ref = get_peft_model(tiny_llama(), lora_config())
    ref.add_adapter("other", lora_config(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=5, r=3))
    model = copy.deepcopy(ref)
    lora_kernels.patch_peft(model, backend="torch")
    model.eval(), ref.eval()
    x = ids(batch=4, seq=9)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        out, out_ref = model(input_ids=x, adapter_names=names).logits, ref(input_ids=x, adapter_names=names).logits
        assert fused_calls == {"lora_linear": 0, "multi_lora_linear": N_LAYERS}
        torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL)
        # Each sample really used its own adapter: differs from the single-adapter run where names differ.
        plain = ref(input_ids=x).logits
        assert not torch.allclose(out[0], plain[0], atol=1e-3) and torch.allclose(out[2], plain[2], atol=ATOL)
        gen = model.generate(input_ids=x[:, :4], attention_mask=torch.ones_like(x[:, :4]), adapter_names=names,
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
        gen_ref = ref.generate(input_ids=x[:, :4], attention_mask=torch.ones_like(x[:, :4]), adapter_names=names,
                               max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref)
    # With autograd on, the inference-only ops are not used: PEFT's loop runs (logged), same outputs.
    torch.testing.assert_close(model(input_ids=x, adapter_names=names).logits, out_ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="adapter_names"):  # PEFT's own argument check still applies
        model(input_ids=x, adapter_names=names[:2])


# ----------------------------------------------------------------------------------------------------
# skipped layers
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    pytest.param(dict(use_dora=True), id="dora"),
    pytest.param(dict(lora_bias=True), id="lora_bias"),
])
def test_dora_and_lora_bias_layers_are_patched_and_match_peft(kw, fused_calls):
    """(Once skipped with a reason; tests/test_dora.py holds the detailed DoRA checks.)"""
    model, ref, report = peft_pair(**kw)
    assert report.num_patched == N_LAYERS and not report.skipped, report
    x = ids()
    with torch.no_grad():
        for m in (model, ref):  # lora_B's bias is initialised to 0; make it count
            for n, p in m.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()))
    logits, grads = loss_and_grads(model, x)
    logits_ref, grads_ref = loss_and_grads(ref, x)
    assert fused_calls["lora_linear"] == (0 if kw.get("use_dora") else N_LAYERS)
    torch.testing.assert_close(logits, logits_ref, rtol=RTOL, atol=ATOL)
    assert set(grads) == set(grads_ref) and len(grads) > 2 * N_LAYERS  # + magnitudes and / or lora_B biases
    for name, g in grads_ref.items():
        assert torch.count_nonzero(g) > 0, name
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_non_linear_and_hooked_layers_are_skipped():
    model = get_peft_model(tiny_llama(), lora_config(target_modules=["q_proj", "v_proj", "embed_tokens"]))
    layers = model.base_model.model.model.layers
    layers[1].self_attn.v_proj.base_layer.register_forward_hook(lambda *a: None)
    q = layers[1].self_attn.q_proj
    q.forward = q.forward  # what accelerate's add_hook_to_module does: the class forward would never run
    report = lora_kernels.patch_peft(model, backend="torch")
    assert report.num_patched == 2, report
    assert "Embedding" in report.skipped["base_model.model.model.embed_tokens"]
    assert "forward hooks" in report.skipped["base_model.model.model.layers.1.self_attn.v_proj"]
    assert "instance-level forward" in report.skipped["base_model.model.model.layers.1.self_attn.q_proj"]


def test_dora_adapter_added_after_patching_runs_fused():
    ref = get_peft_model(tiny_llama(), lora_config(target_modules=["q_proj", "v_proj"]))
    ref.add_adapter("dora", lora_config(target_modules=["q_proj", "v_proj"], use_dora=True))
    model = copy.deepcopy(ref)
    model.set_adapter("default")
    assert lora_kernels.patch_peft(model, backend="torch").num_patched == 4
    model.set_adapter("dora"), ref.set_adapter("dora")
    x = ids()
    torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=RTOL, atol=ATOL)
    assert peft_patch._DORA_CACHE_ATTR in model.base_model.model.model.layers[0].self_attn.q_proj.__dict__


# ----------------------------------------------------------------------------------------------------
# save / load / merge, get_peft_model integration
# ----------------------------------------------------------------------------------------------------

def test_save_pretrained_roundtrip_and_merge_and_unload(tmp_path):
    model, ref, _ = peft_pair()
    model.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg, cfg_ref = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("patched", "plain"))
    for c in (cfg, cfg_ref):  # PEFT stores target_modules as a set: its JSON list order is arbitrary
        c["target_modules"] = sorted(c["target_modules"])
    assert cfg == cfg_ref
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "patched")  # a plain PEFT model
    x = ids()
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=RTOL, atol=ATOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft_lora.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=x).logits, loaded(input_ids=x).logits, rtol=RTOL, atol=ATOL)


def test_get_fused_peft_model_creates_fused_layers_directly():
    torch.manual_seed(5)
    ref = get_peft_model(tiny_llama(), lora_config())
    torch.manual_seed(5)
    model = lora_kernels.get_fused_peft_model(tiny_llama(), lora_config(), backend="torch")
    layers = [m for m in model.modules() if isinstance(m, peft_lora.LoraLayer)]
    assert len(layers) == N_LAYERS and all(type(m) is peft_patch.FusedLoraLinear for m in layers)
    assert model.lora_kernels_report.num_patched == N_LAYERS
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    x = ids()
    logits, grads = loss_and_grads(model, x)
    logits_ref, grads_ref = loss_and_grads(ref, x)
    torch.testing.assert_close(logits, logits_ref, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, grads_ref)
    # Targets that are not plain nn.Linear go to PEFT's own dispatchers (here: Embedding).
    cfg = lora_config(target_modules=["q_proj", "embed_tokens"])
    model = lora_kernels.get_fused_peft_model(tiny_llama(), cfg)
    assert model.lora_kernels_report.num_patched == 2 and len(model.lora_kernels_report.skipped) == 1


# ----------------------------------------------------------------------------------------------------
# torch.compile and the Triton backend
# ----------------------------------------------------------------------------------------------------

def test_compile_fullgraph_forward_and_backward():
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
            return gm
        return compiler

    # aot_autograd traces forward and backward like inductor does, without inductor's (slow on CPU) codegen.
    backend = aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw"))
    model, ref, _ = peft_pair()
    x = ids()
    torch._dynamo.reset()
    step = torch.compile(lambda m, x: m(input_ids=x, labels=x).loss, fullgraph=True, backend=backend)
    model.zero_grad(set_to_none=True)
    loss = step(model, x)
    loss.backward()
    grads = lora_grads(model)
    _, grads_ref = loss_and_grads(ref, x)
    assert_grads_close(grads, grads_ref)
    torch.testing.assert_close(loss, ref(input_ids=x, labels=x).loss, rtol=RTOL, atol=ATOL)
    # One graph each way; every fused layer is a single opaque op in it.
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    assert sum("lora_linear_fwd" in t for t in graphs["fw"][0]) == N_LAYERS
    assert sum("lora_linear_bwd" in t for t in graphs["bw"][0]) == N_LAYERS
    torch._dynamo.reset()


def test_triton_backend_under_interpreter_matches_peft(fused_calls):
    if "triton" not in lora_kernels.available_backends("cpu"):
        pytest.skip("backend 'triton' on CPU needs TRITON_INTERPRET=1 set before import (make test sets it)")
    model, ref, report = peft_pair(dropout=0.0, backend="triton", target_modules=["q_proj", "down_proj"])
    assert report.num_patched == 4
    x = ids(batch=1, seq=5)
    logits, grads = loss_and_grads(model, x)
    assert fused_calls["lora_linear"] == 4
    logits_ref, grads_ref = loss_and_grads(ref, x)
    torch.testing.assert_close(logits, logits_ref, rtol=RTOL, atol=ATOL)
    assert set(grads) == set(grads_ref) and len(grads) == 8
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")
