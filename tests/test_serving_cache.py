"""MultiLoRAModel as an adapter cache (issue 18): far more adapters registered than fit in the device slots,
brought in per batch from the host tier or from disk.

* A seeded stream of mixed batches over 40 registered adapters (max_loras=4, max_cpu_loras=8; popular and
  rare adapters, rows without an adapter) gives each row PEFT's logits for its adapter, and the counters,
  the slot set and the host tier follow a plain-Python model of the two tiers after every batch.
* A batch that needs more adapters than there are slots raises before any forward, the model unchanged.
* Registration checks the config at once and the weights at first use; the host tier serves an adapter
  whose files are gone (and is pinned memory on CUDA).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the cache is checked against PEFT")

from lora_kernels.serving import AdapterError, MultiLoRAModel  # noqa: E402

from conftest import cuda_param  # noqa: E402
from test_adapter_files import assert_unchanged, snapshot  # noqa: E402
from test_serving import _save_adapter, _tiny_llama  # noqa: E402

N_ADAPTERS, MAX_LORAS, MAX_CPU_LORAS, BATCHES = 40, 4, 8, 12
# PEFT's three ways to name targets (suffixes, a regex matched in full, "all-linear"), all loaded by files.
TARGETS = [["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"], r".*\.(gate|up)_proj", "all-linear"]
NAMES = [f"ad{i:02d}" for i in range(N_ADAPTERS)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base model, {name: adapter dir}, one PeftModel holding every adapter (set_adapter picks one)."""
    base = _tiny_llama()
    root = tmp_path_factory.mktemp("cache")
    paths = {n: _save_adapter(base, root / n, seed=100 + i, safe=i % 7 != 3, r=4, lora_alpha=4 + i % 5,
                              target_modules=TARGETS[i % len(TARGETS)], use_rslora=i % 6 == 0)
             for i, n in enumerate(NAMES)}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(paths[NAMES[0]]), adapter_name=NAMES[0])
    for n in NAMES[1:]:
        pm.load_adapter(str(paths[n]), adapter_name=n)
    return base, paths, pm.eval()


@torch.no_grad()
def peft_logits(world, names, ids, mask):
    base, _, pm = world
    rows = []
    for b, n in enumerate(names):
        if n is None:
            rows.append(base(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0])
        else:
            pm.set_adapter(n)
            rows.append(pm(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0])
    return torch.stack(rows)


class TwoTiers:
    """The cache written the obvious way: device slots hold the most recently used adapters, evicting the
    least recently used one the batch does not use; the host tier holds the max_cpu most recently used
    adapters' tensors (those in slots too), and an adapter read from disk enters it."""

    def __init__(self, max_loras, max_cpu):
        self.max_loras, self.max_cpu = max_loras, max_cpu
        self.device, self.host = OrderedDict(), OrderedDict()  # least recently used first
        self.counts = dict(hits=0, host_hits=0, disk_reads=0, evictions=0, host_evictions=0)

    def batch(self, names):
        distinct = [n for n in dict.fromkeys(names) if n is not None]
        found = {n: "hits" if n in self.device else "host_hits" if n in self.host else "disk_reads"
                 for n in distinct}
        for n in distinct:
            self.counts[found[n]] += 1
        for n in distinct:
            if n not in self.device:
                if len(self.device) == self.max_loras:
                    del self.device[next(v for v in self.device if v not in distinct)]
                    self.counts["evictions"] += 1
                self.device[n] = True
        for n in distinct:
            if found[n] == "disk_reads" and self.max_cpu:
                self.host[n] = True
                if len(self.host) > self.max_cpu:
                    self.host.popitem(last=False)
                    self.counts["host_evictions"] += 1
            if n in self.host:
                self.host.move_to_end(n)
            self.device.move_to_end(n)


def stream(seed):
    """Mixed batches: 1..MAX_LORAS distinct adapters drawn by popularity (Zipf-like: a few hot adapters
    and a long tail), 2..6 rows, some rows without an adapter, one left-padded row."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    weights = [1 / (i + 1) for i in range(N_ADAPTERS)]
    for _ in range(BATCHES):
        chosen = []
        for _ in range(rng.randint(1, MAX_LORAS)):
            chosen.append(rng.choices(NAMES, weights)[0])
        chosen = list(dict.fromkeys(chosen))
        names = chosen + [rng.choice(chosen + [None, None]) for _ in range(rng.randint(1, 6 - len(chosen)))]
        rng.shuffle(names)
        ids = torch.randint(1, 128, (len(names), 6), generator=g)
        mask = torch.ones_like(ids)
        ids[0, :2], mask[0, :2] = 0, 0
        yield names, ids, mask


@torch.no_grad()
def test_registered_adapters_stream_matches_peft_and_the_two_tier_model(world):
    base, paths, _ = world
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=MAX_LORAS, max_rank=4, max_cpu_loras=MAX_CPU_LORAS,
                        backend="torch")
    for i, n in enumerate(NAMES):  # both spellings of registration
        assert (mm.register_adapter(n, paths[n]) if i % 2 else mm.load_adapter(n, paths[n], lazy=True)) is None
    assert mm.adapters == {} and mm.stats()["registered"] == N_ADAPTERS
    model = TwoTiers(MAX_LORAS, MAX_CPU_LORAS)
    rows_without = 0
    for step, (names, ids, mask) in enumerate(stream(seed=18)):
        out = mm(ids, attention_mask=mask, adapter_names=names).logits
        model.batch(names)
        valid = mask.bool()
        torch.testing.assert_close(out[valid], peft_logits(world, names, ids, mask)[valid], atol=2e-5, rtol=2e-5,
                                   msg=lambda m: f"batch {step} {names}: {m}")
        assert set(mm.adapters) == set(model.device), f"batch {step}: slots"
        assert list(mm._store.host) == list(model.host), f"batch {step}: host tier (LRU order)"
        assert mm.stats() == dict(model.counts, registered=N_ADAPTERS, resident=len(model.device),
                                  host=len(model.host)), f"batch {step}: counters"
        rows_without += names.count(None)
    # The stream took every path (so the comparisons above can fail).
    assert all(v > 0 for v in model.counts.values()) and rows_without, model.counts


@torch.no_grad()
def test_too_many_adapters_raise_before_any_forward(world):
    base, paths, _ = world
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=MAX_LORAS, max_rank=4, max_cpu_loras=2, backend="torch")
    for n in NAMES[:6]:
        mm.register_adapter(n, paths[n])
    ids = torch.randint(1, 128, (6, 4), generator=torch.Generator().manual_seed(0))
    mm(ids[:2], adapter_names=["ad00", "ad01"])
    forwards = []
    mm.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    snap = snapshot(mm)
    names = ["ad00", "ad02", None, "ad03", "ad04", "ad05"]
    with pytest.raises(ValueError, match=r"5 distinct adapters \['ad00', 'ad02', 'ad03', 'ad04', 'ad05'\], "
                                         r"more than the max_loras=4 slots"):
        mm(ids, adapter_names=names)
    with pytest.raises(ValueError, match=r"5 distinct adapters .* split the batch"):  # generate does not split
        mm.generate(ids, adapter_names=names, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert_unchanged(mm, snap)
    # Fits max_loras, but the slots it would need are pinned by running batches.
    with mm.running(["ad00", "ad01", "ad02", "ad03"]):
        snap = snapshot(mm)
        with pytest.raises(RuntimeError, match="all 4 adapter slots are used by running batches"):
            mm(ids[:2], adapter_names=["ad04", "ad05"])
        assert_unchanged(mm, snap)
    assert forwards == []
    assert mm(ids[:2], adapter_names=["ad04", "ad05"]).logits.shape == (2, 4, 128) and forwards == [1]


@torch.no_grad()
def test_host_tier_serves_adapters_whose_files_are_gone(world, tmp_path):
    base, paths, _ = world
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for cpu in (2, 0):
        x = shutil.copytree(paths["ad01"], tmp_path / f"x{cpu}")
        y = shutil.copytree(paths["ad02"], tmp_path / f"y{cpu}")
        mm = MultiLoRAModel(copy.deepcopy(base), max_loras=1, max_rank=4, max_cpu_loras=cpu, backend="torch")
        mm.register_adapter("x", x)
        mm.register_adapter("y", y)
        mm(ids, adapter_names=["x"])
        mm(ids, adapter_names=["y"])  # evicts "x" from its slot
        shutil.rmtree(x)
        if cpu:
            out = mm(ids, adapter_names=["x"]).logits
            torch.testing.assert_close(out, peft_logits(world, ["ad01"], ids, mask), atol=2e-5, rtol=2e-5)
            assert mm.stats()["host_hits"] == 1 and mm.stats()["disk_reads"] == 2
        else:
            snap = snapshot(mm)
            with pytest.raises(FileNotFoundError, match=r"x0' does not exist"):
                mm(ids, adapter_names=["x"])
            assert_unchanged(mm, snap)


def test_register_checks_config_now_and_weights_at_first_use(world, tmp_path):
    base, paths, _ = world
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=4, backend="torch")
    mm.register_adapter("ok", paths["ad00"])

    def broken(name, cfg=None, weights=None):
        d = shutil.copytree(paths["ad00"], tmp_path / name)
        if cfg:
            config = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps(dict(config, **cfg)))
        if weights:
            f = d / "adapter_model.safetensors"
            f.write_bytes(weights(f.read_bytes()))
        return d

    snap = snapshot(mm)
    for path, exc, msg in [
        (broken("fan_in", cfg=dict(fan_in_fan_out=True)), AdapterError, "fan_in_fan_out=True is not supported"),
        (broken("nothing", cfg=dict(target_modules=["w_proj", "x_proj"])), AdapterError,
         r"Target modules \{'w_proj', 'x_proj'\} not found in the base model"),
        (tmp_path / "missing", FileNotFoundError, "does not exist"),
    ]:
        with pytest.raises(exc, match=msg):
            mm.register_adapter("bad", path)
        assert_unchanged(mm, snap)
    # Weights are read when a batch first names the adapter: a broken file fails then, changing nothing.
    mm.register_adapter("late", broken("truncated", weights=lambda b: b[:len(b) // 2]))
    snap = snapshot(mm)
    with torch.no_grad():
        with pytest.raises(AdapterError, match="corrupt adapter weights"):
            mm(torch.ones(2, 3, dtype=torch.long), adapter_names=["ok", "late"])
    assert_unchanged(mm, snap)


@pytest.mark.parametrize("device", [cuda_param()])
@torch.no_grad()
def test_host_tier_is_pinned_on_cuda(world, device):
    base, paths, _ = world
    mm = MultiLoRAModel(copy.deepcopy(base).to(device), max_loras=1, max_rank=4, max_cpu_loras=2)
    for n in ("ad00", "ad01"):
        mm.register_adapter(n, paths[n])
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    mm(ids.to(device), adapter_names=["ad00"])
    out = mm(ids.to(device), adapter_names=["ad01"]).logits
    again = mm(ids.to(device), adapter_names=["ad00"]).logits  # a host hit: a non-blocking copy in
    assert mm.stats()["host_hits"] == 1
    assert all(t.is_pinned() for w in mm._store.host.values() for A, B, _ in w.modules.values() for t in (A, B))
    for name, got in (("ad01", out), ("ad00", again)):
        torch.testing.assert_close(got.cpu(), peft_logits(world, [name], ids, torch.ones_like(ids)), atol=1e-4,
                                   rtol=1e-4)


@torch.no_grad()
def test_info_reports_the_counters_of_live_models(world):
    from lora_kernels import diagnostics

    base, paths, _ = world
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=1, max_rank=4, backend="torch")
    mm.register_adapter("x", paths["ad00"])
    mm(torch.ones(1, 2, dtype=torch.long), adapter_names=["x"])
    d = diagnostics.info("cpu")
    assert mm.stats() in d["serving"]
    assert "hits=0, host_hits=0, disk_reads=1, evictions=0" in diagnostics.format_info(d)
