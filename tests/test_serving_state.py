"""A stateful model of MultiLoRAModel: a seeded random walk of loads (valid and broken directories, re-loading
a name under another adapter), evictions, unloads, pins and forwards (per-sequence names with None, unknown
names and evicted ones, which come back), checked after every step against a plain-Python model of the slot
table, the registered names and the LRU order:

* the slot table equals the model's, and every slot holds exactly the weights PEFT loads from that adapter's
  files (an empty slot is all zeros);
* an adapter in use (pinned by `running`) is never evicted, reloaded or unloaded;
* a failed operation (bad directory, unknown name, all slots in use) raises a clear error and changes nothing;
* a forward naming an evicted adapter brings it back into a slot (evicting the least recently used adapter
  that the batch does not use and no pin holds);
* a mixed batch's logits equal PEFT's per-sequence logits (spot-checked every SPOT_EVERY steps).

A failure names the walk's seed and step and the last operations, so it replays exactly.
"""
from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch

pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the model compares with PEFT")

from lora_kernels.backends import available_backends  # noqa: E402
from lora_kernels.serving import AdapterError, MultiLoRAModel  # noqa: E402

from conftest import llama_inputs  # noqa: E402
from test_serving import ADAPTERS, ALL_LINEAR, _expected_logits, _save_adapter, _tiny_llama  # noqa: E402

MAX_LORAS, MAX_RANK = 3, 8
NAMES = ["n0", "n1", "n2", "n3", "n4"]
VALID = dict(ADAPTERS, **{
    "r1": dict(r=1, lora_alpha=3, target_modules=["q_proj"]),
    "r8bin": dict(r=8, lora_alpha=4, target_modules=["v_proj", "up_proj", "down_proj"]),
    "r3": dict(r=3, lora_alpha=3, target_modules=["k_proj", "up_proj"]),
})
BIN = {"c", "r8bin"}  # saved as adapter_model.bin
# Broken directories and the error each must raise.
INVALID = {"rank12": AdapterError, "truncated": AdapterError, "nan": AdapterError, "missing": FileNotFoundError,
           "a_file": NotADirectoryError}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base model, {adapter: dir}, {adapter: PEFT model}, {adapter: expected slot contents}."""
    base = _tiny_llama()
    root = tmp_path_factory.mktemp("walk")
    dirs = {k: _save_adapter(base, root / k, seed=i, safe=k not in BIN, **cfg)
            for i, (k, cfg) in enumerate(VALID.items())}
    peft_models = {k: peft.PeftModel.from_pretrained(copy.deepcopy(base), str(p)).eval() for k, p in dirs.items()}
    dirs["rank12"] = _save_adapter(base, root / "rank12", seed=50, r=12, lora_alpha=12, target_modules=["q_proj"])
    trunc = _save_adapter(base, root / "truncated", seed=51, r=2, lora_alpha=2, target_modules=["q_proj"])
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[:len(data) - 7])
    dirs["truncated"] = trunc
    nan = _save_adapter(base, root / "nan", seed=52, r=2, lora_alpha=2, target_modules=["q_proj"], safe=False)
    state = torch.load(str(nan / "adapter_model.bin"), weights_only=True)
    next(iter(state.values()))[0, 0] = float("nan")
    torch.save(state, str(nan / "adapter_model.bin"))
    dirs["nan"] = nan
    dirs["missing"] = root / "missing"
    dirs["a_file"] = dirs["a"] / "adapter_config.json"
    return base, dirs, peft_models, {k: slot_contents(m) for k, m in peft_models.items()}


def slot_contents(peft_model) -> dict[str, tuple]:
    """{wrapped module name: (A [r, in], B [out, r], scaling)} as PEFT loaded them."""
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            module = name.removeprefix("base_model.model.")
            out[module] = (mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach(),
                           float(mod.scaling["default"]))
    return out


class SlotModel:
    """The slot table, registrations and LRU order MultiLoRAModel must keep, written the obvious way."""

    def __init__(self, max_loras):
        self.slots = [None] * max_loras          # slot -> (name, adapter) or None
        self.registered = {}                     # name -> adapter, in a slot or not
        self.last_used, self.pins, self.clock = {}, {}, 0

    def names(self):
        return {s[0]: i for i, s in enumerate(self.slots) if s is not None}

    def touch(self, name):
        self.clock += 1
        self.last_used[name] = self.clock

    def load(self, name, adapter):
        """The slot it goes to, or the error that load_adapter must raise."""
        loaded = self.names()
        if name in loaded:
            if self.pins.get(name):
                return RuntimeError
            slot = loaded[name]
        elif None in self.slots:
            slot = self.slots.index(None)
        else:
            idle = [n for n in loaded if not self.pins.get(n)]
            if not idle:
                return RuntimeError
            victim = min(idle, key=self.last_used.__getitem__)
            slot = loaded[victim]
            del self.last_used[victim]
        self.slots[slot] = (name, adapter)
        self.registered[name] = adapter
        self.touch(name)
        return slot

    def unload(self, name):
        loaded = self.names()
        if name not in self.registered:
            return KeyError
        if self.pins.get(name):
            return RuntimeError
        if name in loaded:
            self.slots[loaded[name]] = None
            del self.last_used[name]
        del self.registered[name]

    def use(self, names):
        """A forward / pin: registered adapters not in a slot come in (a free slot first, else the least
        recently used adapter the batch does not use and no pin holds), then the LRU update in
        first-appearance order; or the error: KeyError for an unknown name, RuntimeError for no slot."""
        distinct = [n for n in dict.fromkeys(names) if n is not None]
        if any(n not in self.registered for n in distinct):
            return KeyError
        loaded = self.names()
        missing = [n for n in distinct if n not in loaded]
        free = [i for i, s in enumerate(self.slots) if s is None]
        idle = sorted((n for n in loaded if n not in distinct and not self.pins.get(n)), key=self.last_used.get)
        if len(missing) > len(free) + len(idle):
            return RuntimeError
        targets = free[:len(missing)] + [loaded[n] for n in idle[:max(0, len(missing) - len(free))]]
        for n, slot in zip(missing, targets):
            if self.slots[slot] is not None:
                del self.last_used[self.slots[slot][0]]
            self.slots[slot] = (n, self.registered[n])
        for n in distinct:
            self.touch(n)
        return missing


def check_slots(mm, model, contents):
    assert mm.adapters == model.names(), "slot table"
    assert mm._store.names() == sorted(model.registered), "registered names"
    for slot, entry in enumerate(model.slots):
        expected = contents[entry[1]] if entry else {}
        for module, layer in mm.layers.items():
            A_slot, B_slot = layer.lora_A_0[slot], layer.lora_B_0[slot]
            if module not in expected:
                assert int(layer.ranks[slot]) == 0 and float(layer.scalings[slot]) == 0.0, f"slot {slot} {module}"
                assert not A_slot.any() and not B_slot.any(), f"slot {slot} {module}: stale weights"
                continue
            A, B, scaling = expected[module]
            r = A.shape[0]
            assert int(layer.ranks[slot]) == r, f"slot {slot} {module}: rank"
            assert float(layer.scalings[slot]) == float(torch.tensor(scaling, dtype=torch.float32)), \
                f"slot {slot} {module}: scaling"
            assert torch.equal(A_slot[:r], A.to(A_slot.dtype)) and not A_slot[r:].any(), f"slot {slot} {module}: A"
            assert torch.equal(B_slot[:, :r], B.to(B_slot.dtype)) and not B_slot[:, r:].any(), \
                f"slot {slot} {module}: B"


def walk(world, backend, steps, seed, spot_every):
    base, dirs, peft_models, contents = world
    rng = random.Random(seed)
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=MAX_LORAS, max_rank=MAX_RANK, backend=backend)
    assert len(mm.layers) == 2 * len(ALL_LINEAR)
    model = SlotModel(MAX_LORAS)
    pins: list[tuple[contextlib.ExitStack, list]] = []
    log: list[str] = []
    counts = dict.fromkeys(["load", "load_bad", "evict", "reload", "unload", "forward", "bring_back", "unknown",
                            "busy", "busy_forward", "pin", "spot"], 0)
    ids_all, mask_all = llama_inputs()

    def expect_error(exc, fn, *args, match=None):
        with pytest.raises(exc, match=match):
            fn(*args)

    for step in range(steps):
        op = rng.choices(["load", "load_bad", "unload", "forward", "pin", "unpin"], [30, 8, 8, 40, 7, 7])[0]
        try:
            if op == "load":
                name, adapter = rng.choice(NAMES), rng.choice(list(contents))
                log.append(f"{step}: load_adapter({name!r}, {adapter!r})")
                before = model.names()
                slot = model.load(name, adapter)
                if slot is RuntimeError:
                    counts["busy"] += 1
                    expect_error(RuntimeError, mm.load_adapter, name, dirs[adapter], match="running batch")
                else:
                    assert mm.load_adapter(name, dirs[adapter]) == slot
                    counts["reload" if name in before else "evict" if len(before) == MAX_LORAS else "load"] += 1
            elif op == "load_bad":
                name, bad = rng.choice(NAMES), rng.choice(list(INVALID))
                log.append(f"{step}: load_adapter({name!r}, broken {bad!r})")
                counts["load_bad"] += 1
                expect_error(INVALID[bad], mm.load_adapter, name, dirs[bad])
            elif op == "unload":
                name = rng.choice(NAMES)
                log.append(f"{step}: unload_adapter({name!r})")
                err = model.unload(name)
                if err is None:
                    mm.unload_adapter(name)
                    counts["unload"] += 1
                else:
                    expect_error(err, mm.unload_adapter, name, match="unknown adapter" if err is KeyError else "in use")
            elif op == "forward":
                b = rng.randint(1, 3)
                choices = sorted(model.registered) + [None] + (["zz"] if rng.random() < 0.15 else [])
                names = [rng.choice(choices) for _ in range(b)]
                log.append(f"{step}: forward({names})")
                ids, mask = ids_all[:b, -3:], mask_all[:b, -3:]
                used = model.use(names)
                if used is KeyError:
                    counts["unknown"] += 1
                    with pytest.raises(KeyError, match=r"unknown adapter 'zz'; loaded: \["):
                        mm(ids, attention_mask=mask, adapter_names=names)
                elif used is RuntimeError:
                    counts["busy_forward"] += 1
                    with pytest.raises(RuntimeError, match="used by running batches"):
                        mm(ids, attention_mask=mask, adapter_names=names)
                else:
                    with torch.no_grad():
                        out = mm(ids, attention_mask=mask, adapter_names=names).logits
                    assert out.shape == (b, 3, 128) and torch.isfinite(out).all()
                    counts["forward"] += 1
                    counts["bring_back"] += bool(used)
            elif op == "pin" and len(pins) < 2 and model.names():
                names = rng.sample(sorted(model.names()), k=min(2, len(model.names())))
                log.append(f"{step}: running({names})")
                stack = contextlib.ExitStack()
                stack.enter_context(mm.running(names))
                model.use(names)
                for n in names:
                    model.pins[n] = model.pins.get(n, 0) + 1
                pins.append((stack, names))
                counts["pin"] += 1
            elif op == "unpin" and pins:
                stack, names = pins.pop(0)
                log.append(f"{step}: end running({names})")
                stack.close()
                for n in names:
                    model.pins[n] -= 1
            check_slots(mm, model, contents)
            assert all(n in mm.adapters for n, k in model.pins.items() if k), "a pinned adapter was evicted"
            if spot_every and step % spot_every == spot_every - 1:
                spot_check(mm, model, base, peft_models)
                counts["spot"] += 1
        except BaseException as e:
            raise AssertionError(f"walk(seed={seed}, backend={backend!r}) failed at step {step}: {e!r}\n"
                                 "last operations:\n  " + "\n  ".join(log[-12:])) from e
    for stack, _ in pins:
        stack.close()
    assert not mm._store.pins, "pins left behind after every running() ended"
    return counts


@torch.no_grad()
def spot_check(mm, model, base, peft_models):
    """A mixed batch through MultiLoRAModel vs. each sequence through PEFT with its adapter."""
    names = list(model.names())[:3] + [None]
    by_name = {n: peft_models[model.slots[s][1]] for n, s in model.names().items()}
    ids, mask = llama_inputs()
    ids, mask = ids[:len(names)], mask[:len(names)]
    out = mm(ids, attention_mask=mask, adapter_names=names).logits
    model.use(names)  # the forward counts as a use in the LRU order
    expected = _expected_logits((base, None, None, by_name), names, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], atol=2e-5, rtol=2e-5)


def test_walk_torch(world):
    counts = walk(world, "torch", steps=1200, seed=0, spot_every=60)
    # The walk really exercises every path (so the invariants above are tested, not vacuous).
    assert all(v > 0 for v in counts.values()), counts


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "torch"])
def test_walk_other_backends(world, backend):
    # Triton-based backends run in the interpreter (~1 s a forward): a shorter walk.
    steps, spot = (300, 20) if backend == "native" else (16, 8)
    walk(world, backend, steps=steps, seed=1, spot_every=spot)
