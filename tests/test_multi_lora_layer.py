"""MultiLoRALinear's argument errors: the first call (which also runs the full check of the slot tensors)
blames the same argument, with the same message, as every later call; non-finite scalings are refused."""
from __future__ import annotations

import math

import pytest
import torch

import lora_kernels as lk


def _layer():
    torch.manual_seed(0)
    layer = lk.MultiLoRALinear(torch.nn.Linear(500, 64), max_loras=4, max_rank=8)
    layer.set_slot(0, torch.randn(3, 500), torch.randn(64, 3), 1.0)
    return layer


def _message(fn) -> str:
    with pytest.raises(ValueError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("bad", ["x_in", "x_tokens", "num_slots", "not_a_batch"])
def test_first_and_later_calls_blame_the_same_argument(bad):
    batch = lk.LoRABatch.from_token_adapters(torch.tensor([0, 1, -1]), num_slots=4)
    args = {"x_in": (torch.randn(3, 499), batch),
            "x_tokens": (torch.randn(4, 500), batch),
            "num_slots": (torch.randn(3, 500), lk.LoRABatch.from_token_adapters(torch.tensor([0, 1, -1]), num_slots=8)),
            "not_a_batch": (torch.randn(3, 500), torch.tensor([0, 1, -1]))}[bad]
    first_layer = _layer()
    first = _message(lambda: first_layer(*args))      # nothing checked yet
    warm = _layer()
    warm(torch.randn(3, 500), batch)                   # the slot tensors are checked once
    later = _message(lambda: warm(*args))
    assert first == later
    if bad.startswith("x"):
        assert first.startswith("x must have shape [..., in=500]") and "A_stack" not in first
    else:
        assert first.startswith("batch must be a LoRABatch over max_loras=4 slots") and "got" in first


@pytest.mark.parametrize("scaling", [math.nan, math.inf, -math.inf, 1e39, True, "2"])
def test_set_slot_refuses_non_finite_scalings(scaling):
    layer = _layer()
    before = (layer.scalings.clone(), layer.lora_A_0.clone(), layer.ranks.clone())
    with pytest.raises(ValueError, match="scaling must be a finite float"):
        layer.set_slot(1, torch.randn(2, 500), torch.randn(64, 2), scaling)
    assert torch.equal(layer.scalings, before[0]) and torch.equal(layer.lora_A_0, before[1])
    assert torch.equal(layer.ranks, before[2])  # nothing was written


def test_set_slot_takes_numeric_scalings():
    layer = _layer()
    for s in (2, 0.5, torch.tensor(1.5)):
        layer.set_slot(1, torch.randn(2, 500), torch.randn(64, 2), s)
        assert layer.scalings[1].item() == float(s)
