"""No blocking host-to-device copies on the hot paths (issue 9, item 9): PEFT mixed batches build their slot
ids once for all layers, LoRABatch copies Python ids through pinned memory. On a GPU,
torch.cuda.set_sync_debug_mode("error") turns any synchronising call into an error."""
import copy

import pytest
import torch
from peft import get_peft_model

import lora_kernels
from lora_kernels import peft_patch
from lora_kernels.ops import multi_lora

from conftest import cuda_param
from test_peft_patch import N_LAYERS, ids, lora_config, tiny_llama


def mixed_model(device="cpu"):
    model = get_peft_model(tiny_llama(), lora_config())
    model.add_adapter("other", lora_config(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=5, r=3))
    lora_kernels.patch_peft(model, backend="torch")
    return model.to(device).eval()


def test_peft_mixed_batch_builds_slot_ids_once_for_all_layers(monkeypatch):
    """One forward over N_LAYERS patched layers: every layer gets the same id tensor, created once."""
    model = mixed_model()
    seen = []
    real = multi_lora.LoRABatch.from_sequences

    def spy(seq_slots, *a, **k):
        seen.append(seq_slots)
        return real(seq_slots, *a, **k)

    monkeypatch.setattr(multi_lora.LoRABatch, "from_sequences", spy)
    peft_patch._SLOT_IDS.clear()
    created = []
    real_tensor = torch.tensor
    monkeypatch.setattr(peft_patch.torch, "tensor", lambda *a, **k: created.append(a) or real_tensor(*a, **k))
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        model(input_ids=ids(batch=4, seq=5), adapter_names=names)
        model(input_ids=ids(batch=4, seq=5), adapter_names=names)  # a second step reuses them too
    assert len(seen) == 2 * N_LAYERS
    # Layers with both adapters see ids [0, -1, 1, 0]; those with only 'default' see [-1, -1, 0, -1].
    assert len({id(t) for t in seen}) == len(peft_patch._SLOT_IDS) == 2
    assert len([a for a in created if isinstance(a[0], tuple) and len(a[0]) == 4]) == 2


@pytest.mark.parametrize("device", [cuda_param()])
def test_no_sync_in_peft_mixed_batch_or_lora_batch_on_gpu(device):
    model = mixed_model(device)
    x = ids(batch=4, seq=5).to(device)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        model(input_ids=x, adapter_names=names)  # warm-up: allocations, caches, lazy init
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=x, adapter_names=names)
            multi_lora.LoRABatch.from_token_adapters([0, 1, -1, 1], num_slots=2, device=device, check=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_lora_batch_from_python_ids_copies_through_pinned_memory(monkeypatch):
    """On CUDA the ids go through pin_memory() + non_blocking (mocked here: no GPU needed)."""
    calls = []
    real_to = torch.Tensor.to

    def fake_pin(self):
        calls.append("pin")
        return self

    def fake_to(self, *a, **k):
        calls.append(("to", str(a[0]), k.get("non_blocking")))
        return real_to(self, "cpu")

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    t = multi_lora._ids_tensor([0, 1, -1], "cuda")
    monkeypatch.undo()
    assert calls == ["pin", ("to", "cuda", True)] and t.tolist() == [0, 1, -1]


# ----------------------------------------------------------------------------------------------------
# Host reads per multi-adapter training step (issue 18): only while the step's batch is built
# ----------------------------------------------------------------------------------------------------

_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")


def _count_package_reads(monkeypatch) -> list:
    """Patch the Tensor methods that read values to the host; record each call made from lora_kernels' code
    (not from torch, transformers or the tests) as (method, file, line)."""
    import sys
    seen = []
    for name in _READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            code = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/lora_kernels/" in code and "/tests/" not in code:
                seen.append((_name, code.rsplit("/lora_kernels/", 1)[1], sys._getframe(1).f_lineno))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def _training_step_reads(monkeypatch, layers: int, backend) -> list:
    from transformers import LlamaConfig, LlamaForCausalLM
    from lora_kernels.serving import MultiLoRAModel
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    mm = MultiLoRAModel(LlamaForCausalLM(cfg), max_loras=4, max_rank=8, backend=backend)
    mm.add_adapter("de", dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    mm.add_adapter("fr", dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "down_proj"]))
    mm.train()
    ids = torch.randint(0, 64, (3, 5))
    names = ["de", None, "fr"]
    mm(ids, labels=ids, adapter_names=names).loss.backward()  # warm-up: lazy imports, caches
    with monkeypatch.context() as m:
        seen = _count_package_reads(m)
        mm(ids, labels=ids, adapter_names=names).loss.backward()
    return seen


@pytest.mark.parametrize("backend", [None] + [b for b in lora_kernels.available_backends("cpu")])
def test_multi_adapter_training_step_reads_do_not_grow_with_layers(monkeypatch, backend):
    """One training step with dropout on two adapters: the host reads our code makes (.tolist(), .item(), int(t),
    ...; each one a sync on CUDA) happen while the step's batch is built, not per layer. Before issue 18 a 2-layer
    Llama made 232 of them and a 4-layer one 464."""
    two = _training_step_reads(monkeypatch, 2, backend)
    four = _training_step_reads(monkeypatch, 4, backend)
    assert len(four) == len(two), f"2 layers: {len(two)} reads {sorted(set(two))}; 4 layers: {len(four)} reads " \
                                  f"{sorted(set(four))}"
    assert len(two) <= 8, sorted(set(two))
