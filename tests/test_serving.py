"""MultiLoRAModel vs. PEFT on a tiny random-init Llama with three real PEFT adapters saved to disk:
mixed-batch logits and greedy generation, eviction / transparent reload / unload, and failed loads that must
leave the slots untouched."""
from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="MultiLoRAModel tests need `peft`")

from conftest import LLAMA_ADAPTERS, LLAMA_LINEAR, llama_inputs, save_peft_adapter, tiny_llama  # noqa: E402
from lora_kernels.backends import available_backends  # noqa: E402
from lora_kernels.serving import AdapterError, MultiLoRAModel  # noqa: E402

ALL_LINEAR = LLAMA_LINEAR
ADAPTERS = LLAMA_ADAPTERS  # saved as safetensors and .bin files


def _tiny_llama(hidden=64, seed=0):
    return tiny_llama(hidden, seed)


_save_adapter = save_peft_adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = _tiny_llama()
    root = tmp_path_factory.mktemp("adapters")
    paths = {name: _save_adapter(base, root / name, seed=i, safe=name != "c", **cfg)
             for i, (name, cfg) in enumerate(ADAPTERS.items())}
    peft_models = {name: peft.PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval()
                   for name, p in paths.items()}
    assert (root / "c" / "adapter_model.bin").exists() and (root / "a" / "adapter_model.safetensors").exists()
    return base, root, paths, peft_models


@torch.no_grad()
def _expected_logits(setup, names, ids, mask):
    base, _, _, peft_models = setup
    rows = []
    for b, name in enumerate(names):
        model = base if name is None else peft_models[name]
        rows.append(model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0])
    return torch.stack(rows)


def _state(mm):
    return {n: [b.clone() for b in l.buffers()] for n, l in mm.layers.items()}, mm.adapters


def _assert_state(mm, state):
    bufs, adapters = state
    assert mm.adapters == adapters
    for n, l in mm.layers.items():
        for b0, b1 in zip(bufs[n], l.buffers()):
            assert torch.equal(b0, b1), f"{n} slot buffers changed"


@pytest.mark.parametrize("backend", [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        "triton" not in available_backends("cpu"),
        reason="Triton on CPU needs TRITON_INTERPRET=1 set before lora_kernels is imported"))])
@torch.no_grad()
def test_mixed_batch_matches_peft(setup, backend):
    base, _, paths, peft_models = setup
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=4, max_rank=8, backend=backend)
    assert len(mm.layers) == 2 * len(ALL_LINEAR)
    for name in "abc":
        mm.load_adapter(name, paths[name])
    ids, mask = llama_inputs()
    names = ["a", None, "c", "b"]
    out = mm(ids, attention_mask=mask, adapter_names=names).logits
    expected = _expected_logits(setup, names, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=2e-5, rtol=2e-5)
    # Each adapter really changes the output (B is non-zero), so the comparison above can fail.
    plain = base(input_ids=ids, attention_mask=mask).logits
    for b in (0, 2, 3):
        assert (out[b][valid[b]] - plain[b][valid[b]]).abs().max() > 1e-2
    # No adapter at all: exactly the base path.
    torch.testing.assert_close(mm(ids, attention_mask=mask).logits[valid], plain[valid], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_generate_matches_peft(setup):
    base, _, paths, peft_models = setup
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=3, max_rank=8)
    for name in "abc":
        mm.load_adapter(name, paths[name])
    ids, mask = llama_inputs()
    names = ["b", "a", None, "c"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = mm.generate(ids, attention_mask=mask, adapter_names=names, **kw)
    for b, name in enumerate(names):
        model = base if name is None else peft_models[name]
        exp = model.generate(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], **kw)
        assert torch.equal(out[b], exp[0]), f"sequence {b} ({name})"
    assert mm.context.batch is None and not mm._store.pins


@torch.no_grad()
def test_eviction_reload_unload(setup):
    base, _, paths, _ = setup
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8)
    ids, mask = llama_inputs()
    ids, mask = ids[:1], mask[:1]
    assert mm.load_adapter("a", paths["a"]) == 0 and mm.load_adapter("b", paths["b"]) == 1
    mm(ids, attention_mask=mask, adapter_names=["a"])  # "a" is now more recently used than "b"
    assert mm.load_adapter("c", paths["c"]) == 1 and mm.adapters == {"a": 0, "c": 1}  # evicts LRU "b"
    # The evicted "b" stays registered: a request brings it back from its directory, evicting the LRU "a".
    out = mm(ids, attention_mask=mask, adapter_names=["b"]).logits
    torch.testing.assert_close(out, _expected_logits(setup, ["b"], ids, mask), atol=2e-5, rtol=2e-5)
    assert mm.adapters == {"b": 0, "c": 1}
    assert mm.stats() == dict(hits=1, host_hits=0, disk_reads=4, evictions=2, host_evictions=0, registered=3,
                              resident=2, host=0)
    # Adapters pinned by a running batch are never evicted; with every slot pinned, loading fails cleanly.
    with mm.running(["a", "c"]):  # brings "a" back too, evicting "b" (the batch uses "c")
        assert mm.adapters == {"a": 0, "c": 1}
        state = _state(mm)
        with pytest.raises(RuntimeError, match="running batches"):
            mm.load_adapter("b", paths["b"])
        _assert_state(mm, state)
        with pytest.raises(RuntimeError, match="in use"):
            mm.unload_adapter("a")
    with mm.running(["c"]):
        assert mm.load_adapter("b", paths["b"]) == 0 and mm.adapters == {"b": 0, "c": 1}  # evicts "a", not "c"
    # Reloaded "b" (and still-resident "c") give PEFT's logits; reloading a name reuses its slot.
    assert mm.load_adapter("b", paths["b"]) == 0
    for name in ("b", "c"):
        out = mm(ids, attention_mask=mask, adapter_names=[name]).logits
        torch.testing.assert_close(out, _expected_logits(setup, [name], ids, mask), atol=2e-5, rtol=2e-5)
    mm.unload_adapter("b")
    assert mm.adapters == {"c": 1} and all(l.ranks[0] == 0 for l in mm.layers.values())
    with pytest.raises(KeyError, match="unknown adapter 'b'"):
        mm.unload_adapter("b")
    with pytest.raises(ValueError, match="one per sequence"):
        mm(ids, attention_mask=mask, adapter_names=["c", "c"])


@torch.no_grad()
def test_failed_loads_leave_slots_unchanged(setup, tmp_path):
    base, root, paths, _ = setup
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=4, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                       "down_proj", "gate_proj"])
    mm.load_adapter("a", paths["a"])
    mm.load_adapter("a2", paths["a"])  # every slot is taken: a failed load must not evict either

    def bad_copy(name, edit_cfg=None, weights=None):
        d = tmp_path / name
        d.mkdir()
        src = paths["a"]
        cfg = json.loads((src / "adapter_config.json").read_text())
        if edit_cfg:
            edit_cfg(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        data = (src / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(weights(data) if weights else data)
        return d

    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    bad_json = bad_copy("bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    no_weights = bad_copy("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    other_base = _save_adapter(_tiny_llama(hidden=32), tmp_path / "other_base", seed=3, r=2, lora_alpha=2,
                               target_modules=["q_proj"])
    dora = bad_copy("dora", edit_cfg=lambda c: c.update(use_dora=True))  # DoRA config, no magnitude tensors
    cases = [
        (tmp_path / "missing", FileNotFoundError, "does not exist"),
        (no_cfg, FileNotFoundError, "adapter_config.json"),
        (bad_json, AdapterError, "corrupt .*adapter_config.json"),
        (no_weights, FileNotFoundError, "neither adapter_model.safetensors nor adapter_model.bin"),
        (bad_copy("truncated", weights=lambda b: b[:len(b) // 2]), AdapterError, "corrupt adapter weights"),
        (paths["b"], AdapterError, "incompatible target modules.*k_proj"),  # k/up_proj are not wrapped here
        (paths["c"], AdapterError, "rank r=6 .*exceeds max_rank=4"),
        (other_base, AdapterError, "incompatible shapes"),
        (dora, AdapterError, "has no lora_magnitude_vector"),
        (bad_copy("rank_mismatch", edit_cfg=lambda c: c.update(r=3)), AdapterError, "config says 3"),
    ]
    state = _state(mm)
    for path, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            mm.load_adapter("new", path)
        _assert_state(mm, state)
    with pytest.raises(AdapterError, match="rank r=6 .*exceeds max_rank=4"):  # a bad reload keeps the old one
        mm.load_adapter("a", paths["c"])
    _assert_state(mm, state)
