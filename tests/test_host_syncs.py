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
