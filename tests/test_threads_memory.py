"""Threads and long runs.

* One thread loads adapters while another runs forwards: every forward sees each adapter entirely before or
  entirely after a reload (its logits equal one of the consistent outcomes bit for bit), a forward never
  runs with an adapter evicted under it, and an evicted adapter comes back when a forward names it.
* 10,000 decode-sized forwards through MultiLoRAModel with adapter churn (2,500 in CI, 10,000 in the nightly
  run: see tests/conftest.py), and 2,000 training steps of a patched tiny PEFT model: resident memory and the
  number of live tensors stay within a small bound after warm-up.
"""
from __future__ import annotations

import copy
import gc
import os
import threading

import pytest
import torch

pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the tests save real PEFT adapters")

import lora_kernels  # noqa: E402
from lora_kernels.serving import MultiLoRAModel  # noqa: E402

from conftest import llama_inputs  # noqa: E402
from test_serving import _save_adapter, _tiny_llama  # noqa: E402

JOIN_TIMEOUT_S = 300  # a thread still alive after this is a deadlock
# Six of the fourteen linear layers: every kind of projection shape, at half the cost of a step.
TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    base = _tiny_llama()
    root = tmp_path_factory.mktemp("threads")
    paths = {"p": _save_adapter(base, root / "p", seed=1, r=8, lora_alpha=16, target_modules=TARGETS),
             "q": _save_adapter(base, root / "q", seed=2, r=4, lora_alpha=4, target_modules=TARGETS,
                                use_rslora=True),
             "small": _save_adapter(base, root / "small", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])}
    return base, paths


def run_threads(*fns):
    """Run each fn in its own thread; re-raise the first exception; fail on a deadlock."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), f"threads still running after {JOIN_TIMEOUT_S} s: a deadlock"
    if errors:
        raise errors[0]


@torch.no_grad()
def test_reload_while_forwarding_is_never_torn(adapters):
    """Thread 1 re-loads name "x" alternately from adapters p and q; thread 2 runs forwards on "x". A forward
    that saw some layers of p and some of q would match neither p's nor q's logits."""
    base, paths = adapters
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, backend="torch")
    ids, mask = llama_inputs()
    expected = {}
    for k in ("p", "q"):
        mm.load_adapter("x", paths[k])
        expected[k] = mm(ids, attention_mask=mask, adapter_names=["x", None, "x", "x"]).logits
    assert (expected["p"] - expected["q"]).abs().max() > 1e-2
    iters = 300
    seen = {"p": 0, "q": 0}

    def loader():
        for i in range(iters):
            mm.load_adapter("x", paths["pq"[i % 2]])

    def forwarder():
        for _ in range(iters):
            out = mm(ids, attention_mask=mask, adapter_names=["x", None, "x", "x"]).logits
            match = [k for k, e in expected.items() if torch.equal(out, e)]
            assert match, "a forward saw a torn adapter (its logits match neither the old nor the new one)"
            seen[match[0]] += 1

    run_threads(loader, forwarder)
    assert sum(seen.values()) == iters


@torch.no_grad()
def test_eviction_while_forwarding(adapters):
    """One slot; thread 1 alternates loading "x" and "y" (each evicts the other); thread 2 runs forwards on "x".
    An evicted "x" stays registered, so every forward brings it back (from its directory) and gives exactly
    x's logits: the name is brought in and pinned atomically, so its slot is never rewritten under a running
    forward."""
    base, paths = adapters
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=1, max_rank=8, backend="torch")
    ids, mask = llama_inputs()
    mm.load_adapter("x", paths["p"])
    expected = mm(ids, attention_mask=mask, adapter_names=["x"] * 4).logits
    iters = 300
    outcomes = {"ok": 0, "busy": 0}

    def loader():
        for i in range(iters):
            try:
                mm.load_adapter("xy"[i % 2], paths["q" if i % 2 else "p"])
            except RuntimeError as e:  # cannot happen with the lock: the forward never holds a pin here
                outcomes["busy"] += 1
                raise AssertionError(f"load raised although no forward was running: {e}") from e

    def forwarder():
        for _ in range(iters):
            out = mm(ids, attention_mask=mask, adapter_names=["x"] * 4).logits
            assert torch.equal(out, expected), "a forward ran with another adapter's weights under the name x"
            outcomes["ok"] += 1

    run_threads(loader, forwarder)
    assert outcomes["ok"] == iters and not mm._store.pins
    stats = mm.stats()  # every forward found "x" in its slot or read it back after an eviction
    assert stats["hits"] + stats["disk_reads"] == 2 * (iters + 1) and stats["host_hits"] == 0  # + the loads


@torch.no_grad()
def test_deepcopy_gets_its_own_lock(adapters):
    """The lock cannot be copied: a deepcopy (or pickle) of the model gets a fresh one and works alone."""
    base, paths = adapters
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, target_modules=TARGETS, backend="torch")
    mm.load_adapter("x", paths["p"])
    twin = copy.deepcopy(mm)
    assert twin._lock is not mm._lock
    ids, mask = llama_inputs()
    assert torch.equal(twin(ids, attention_mask=mask, adapter_names=["x"] * 4).logits,
                       mm(ids, attention_mask=mask, adapter_names=["x"] * 4).logits)
    twin.unload_adapter("x")
    assert mm.adapters == {"x": 0} and twin.adapters == {}


# ----------------------------------------------------------------------------------------------- memory

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    # issubclass(type(o), ...) rather than isinstance: it never calls a proxy object's __class__ / __getattr__
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


# Growth allowed after warm-up. Python's allocator and glibc keep some freed memory: 16 MiB is ~1000x a
# leak of one decode step's activations (a [4, 64] fp32 tensor per layer) or of the LoRABatch per step.
RSS_SLACK = 16 << 20
TENSOR_SLACK = 8


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
@pytest.mark.parametrize("steps,warmup", [pytest.param(2_500, 500, id="2500"),
                                          pytest.param(10_000, 1_000, id="10000", marks=pytest.mark.nightly)])
@torch.no_grad()
def test_decode_forwards_with_adapter_churn_do_not_leak(adapters, steps, warmup):
    """~5 ms a forward on CPU: CI runs 2,500 of them, the nightly run 10,000."""
    base, paths = adapters
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=3, max_rank=8, target_modules=TARGETS, backend="torch")
    ids = torch.randint(1, 128, (4, 1), generator=torch.Generator().manual_seed(0))  # 4 sequences, 1 token
    churn_every = 25
    files = list(paths.values())
    baseline = None
    for step in range(steps):
        if step % churn_every == 0:
            # A fresh name each time: eviction, and name tables that must not grow with the names seen.
            mm.load_adapter(f"a{step}", files[(step // churn_every) % len(files)])
        names = list(mm.adapters) + [None]
        out = mm(ids, adapter_names=[names[(step + b) % len(names)] for b in range(4)])
        del out
        if step == warmup:
            baseline = (rss_bytes(), live_tensors())
    rss, tensors = rss_bytes(), live_tensors()
    # Registrations grow with the names (a path each, by design: unload_adapter forgets one); the slot
    # table and the host tier do not.
    assert len(mm._store.last_used) <= 3 and not mm._store.pins and not mm._store.host and mm.context.batch is None
    assert tensors - baseline[1] <= TENSOR_SLACK, f"live tensors grew from {baseline[1]} to {tensors}"
    assert rss - baseline[0] <= RSS_SLACK, f"resident memory grew by {(rss - baseline[0]) / 2**20:.1f} MiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_patched_peft_training_does_not_leak():
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(_tiny_llama(hidden=32), cfg)
    report = lora_kernels.patch_peft(model)
    assert report.num_patched == 2 * len(TARGETS) and not report.skipped, str(report)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    steps, warmup = 2_000, 200
    baseline, first_loss = None, None
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            first_loss = loss.item()
        if step == warmup:
            baseline = (rss_bytes(), live_tensors())
    last_loss = loss.item()
    del loss
    rss, tensors = rss_bytes(), live_tensors()
    assert last_loss < first_loss, "training did not train: the test would not notice a broken backward"
    assert tensors - baseline[1] <= TENSOR_SLACK, f"live tensors grew from {baseline[1]} to {tensors}"
    assert rss - baseline[0] <= RSS_SLACK, f"resident memory grew by {(rss - baseline[0]) / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------- atomic writes
# Files the package writes go through a temporary file and a rename: a failure mid-write leaves the old file
# (readers never see half a file) and no temporary behind.

def _fail_mid_write(monkeypatch, module):
    """Make os.fsync / json.dump in `module` raise after some bytes have been written."""
    def boom(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(module.os, "fsync", boom)


def test_dispatch_cache_write_is_atomic(tmp_path, monkeypatch):
    from lora_kernels import dispatch
    path = tmp_path / "cache.json"
    dispatch.write_atomic(str(path), '{"old": 1}')
    _fail_mid_write(monkeypatch, dispatch)
    with pytest.raises(OSError, match="disk full"):
        dispatch.write_atomic(str(path), '{"new": 2}' * 1000)
    assert path.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"], "a temporary file was left behind"


def test_static_report_write_is_atomic(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="the static report compiles Triton kernels")
    from lora_kernels.kernels import static_report
    path = tmp_path / "report.json"
    path.write_text('{"old": 1}')
    # An object json cannot encode, after a large valid prefix: json.dump fails mid-write.
    monkeypatch.setattr(static_report, "build_report", lambda *a, **k: {"rows": list(range(10_000)) + [object()]})
    with pytest.raises(TypeError, match="not JSON serializable"):
        static_report.write_report(str(path))
    assert path.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "a temporary file was left behind"
