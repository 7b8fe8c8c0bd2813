"""lora_kernels' punica wrapper called directly (no engine), and the plugin switch.

Every call is held against a float64 reference of vLLM's semantics (punica_base.py), with rows of slot -1 left
exactly as they were; rows with an adapter are also held against vLLM's own CPU wrapper.
"""
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

import torch  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from lora_kernels.integrations import vllm as plugin  # noqa: E402
from lora_kernels.integrations.vllm_punica import PunicaWrapperLoRAKernels  # noqa: E402

L, R, IN = 3, 16, 40            # slots, max rank, input width (odd sizes: no tile fits exactly)
SLICES = (24, 8, 8)             # a fused q/k/v projection with GQA-sized k and v
# Per token: a lora id (0 = none) of four requests of lengths 5, 3, 6, 1; ids 7, 9, 4 sit in slots 0, 1, 2.
REQ_IDS = (7, 0, 9, 4)
REQ_LENS = (5, 3, 6, 1)
INDEX_TO_ID = [7, 9, 4]
TOKEN_IDS = tuple(i for i, n in zip(REQ_IDS, REQ_LENS) for _ in range(n))
T = len(TOKEN_IDS)
SLOT = {0: -1, 7: 0, 9: 1, 4: 2}
RANKS = (4, 8, 16)              # slot ranks; vLLM zero-pads each to R


def _wrappers(prompt_ids=REQ_IDS):
    mapping = LoRAMapping(TOKEN_IDS, prompt_ids, is_prefill=True)
    out = []
    for cls in (PunicaWrapperLoRAKernels, PunicaWrapperCPU):
        w = cls(64, max_batches=8, device=torch.device("cpu"))
        w.update_metadata(mapping, INDEX_TO_ID, L + 1, 100)
        out.append(w)
    return out


def _stacks(outs, fin, gen):
    """vLLM-layout stacks: A [L, 1, R, in], B [L, 1, out, R], zero past each slot's rank."""
    A, B = [], []
    for out in outs:
        a = torch.zeros(L, 1, R, fin)
        b = torch.zeros(L, 1, out, R)
        for l, r in enumerate(RANKS):
            a[l, 0, :r] = torch.randn(r, fin, generator=gen)
            b[l, 0, :, :r] = torch.randn(out, r, generator=gen)
        A.append(a)
        B.append(b)
    return tuple(A), tuple(B)


def _reference(y, x, A, B, scale, slots):
    """float64: y[t, slice i] += scale · x[t] A_i[l]ᵀ B_i[l]ᵀ for slot l = slots[t] >= 0."""
    ref = y.double().clone()
    col = 0
    for a, b in zip(A, B):
        n = b.shape[2]
        for t, l in enumerate(slots):
            if l >= 0:
                ref[t, col:col + n] += scale * (x[t].double() @ a[l, 0].double().T) @ b[l, 0].double().T
        col += n
    return ref


def _token_slots():
    return [SLOT[i] for i in TOKEN_IDS]


def test_add_lora_linear_several_slices():
    gen = torch.Generator().manual_seed(0)
    ours, theirs = _wrappers()
    A, B = _stacks(SLICES, IN, gen)
    x = torch.randn(T, IN, generator=gen)
    y0 = torch.randn(T, sum(SLICES), generator=gen)
    y = y0.clone()
    ours.add_lora_linear(y, x, A, B, 0.5, SLICES)
    ref = _reference(y0, x, A, B, 0.5, _token_slots())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    none = torch.tensor(_token_slots()) < 0
    assert torch.equal(y[none], y0[none]), "rows without an adapter must keep the base output exactly"
    y_vllm = y0.clone()
    theirs.add_lora_linear(y_vllm, x, A, B, 0.5, SLICES)
    torch.testing.assert_close(y[~none], y_vllm[~none], rtol=1e-5, atol=1e-5)


def test_add_lora_linear_bf16_activations_fp32_adapters():
    """vLLM's lora_dtype may differ from the model's: the public ops' "torch" backend takes the mixed dtypes."""
    gen = torch.Generator().manual_seed(7)
    ours, _ = _wrappers()
    A, B = _stacks(SLICES, IN, gen)
    x = torch.randn(T, IN, generator=gen).bfloat16()
    y0 = torch.randn(T, sum(SLICES), generator=gen).bfloat16()
    y = y0.clone()
    ours.add_lora_linear(y, x, A, B, 0.5, SLICES)
    ref = _reference(y0, x, A, B, 0.5, _token_slots())
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    none = torch.tensor(_token_slots()) < 0
    assert torch.equal(y[none], y0[none])


def test_add_shrink_then_add_expand():
    """The split path of vLLM's row-parallel / fully sharded layers: buffer [NS, T, R], then the expand."""
    gen = torch.Generator().manual_seed(1)
    ours, _ = _wrappers()
    A, B = _stacks(SLICES, IN, gen)
    x = torch.randn(T, IN, generator=gen)
    y0 = torch.randn(T, 3 + sum(SLICES), generator=gen)
    buf = torch.zeros(len(SLICES), T, R)
    ours.add_shrink(buf, x, A, 2.0)
    y = y0.clone()
    ours.add_expand(y, buf, B, SLICES, offset_start=3, add_input=True)
    ref = y0.double().clone()
    ref[:, 3:] = _reference(y0[:, 3:], x, A, B, 2.0, _token_slots())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :3], y0[:, :3])


def test_add_lora_embedding_skips_rows_without_adapter():
    gen = torch.Generator().manual_seed(2)
    ours, _ = _wrappers()
    _, (B,) = _stacks((12,), IN, gen)
    x = torch.randn(T, R, generator=gen)  # the A rows vLLM gathered (slot 0's for rows without an adapter)
    y0 = torch.randn(T, 12, generator=gen)
    y = y0.clone()
    ours.add_lora_embedding(y, x, B, add_input=True)
    ref = y0.double().clone()
    for t, l in enumerate(_token_slots()):
        if l >= 0:
            ref[t] += x[t].double() @ B[l, 0].double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_add_lora_logits_sampled_rows_and_prompt_slices():
    """Sampled rows use the requests' slots; a prompt-logprobs slice of the hidden states uses its tokens'."""
    gen = torch.Generator().manual_seed(3)
    ours, theirs = _wrappers()
    (A,), (B,) = _stacks((30,), IN, gen)
    hidden = torch.randn(T + 2, IN, generator=gen)[:T]  # the step's hidden states (padded rows cut off)
    req_slots = [SLOT[i] for i in REQ_IDS]
    ends = torch.tensor(REQ_LENS).cumsum(0)
    sampled = hidden[ends - 1]                           # a gather: a new tensor of one row per request
    y0 = torch.randn(len(REQ_IDS), 30, generator=gen)
    y = y0.clone()
    ours.add_lora_logits(y, sampled, A, B, 1.0)
    torch.testing.assert_close(y.double(), _reference(y0, sampled, (A,), (B,), 1.0, req_slots), rtol=1e-5, atol=1e-5)
    y_vllm = y0.clone()
    theirs.add_lora_logits(y_vllm, sampled, A, B, 1.0)
    has = torch.tensor(req_slots) >= 0
    torch.testing.assert_close(y[has], y_vllm[has], rtol=1e-5, atol=1e-5)
    # prompt logprobs of request 2 (slot 1): hidden[8:14], 6 rows, not the 4 rows sampler_indices describe
    start, n = 8, 6
    y0 = torch.randn(n, 30, generator=gen)
    y = y0.clone()
    ours.add_lora_logits(y, hidden[start:start + n], A, B, 1.0)
    slots = _token_slots()[start:start + n]
    assert set(slots) == {1}
    torch.testing.assert_close(y.double(), _reference(y0, hidden[start:start + n], (A,), (B,), 1.0, slots),
                               rtol=1e-5, atol=1e-5)


def test_effective_ranks_follow_writes_to_the_stacks():
    """The per-slot ranks are cached per layer; vLLM loading another adapter into a slot (an in-place write, as
    its set_lora / reset_lora do) must be seen at the next call, including a slot that becomes all zero."""
    gen = torch.Generator().manual_seed(6)
    ours, _ = _wrappers()
    A, B = _stacks(SLICES, IN, gen)
    x = torch.randn(T, IN, generator=gen)
    y0 = torch.randn(T, sum(SLICES), generator=gen)
    ours.add_lora_linear(y0.clone(), x, A, B, 1.0, SLICES)
    for a, b in zip(A, B):  # slot 0: a rank-16 adapter where a rank-4 one was; slot 2 emptied
        a[0, 0] = torch.randn(R, IN, generator=gen)
        b[0, 0] = torch.randn(b.shape[2], R, generator=gen)
        a[2].zero_()
        b[2].zero_()
    y = y0.clone()
    ours.add_lora_linear(y, x, A, B, 1.0, SLICES)
    torch.testing.assert_close(y.double(), _reference(y0, x, A, B, 1.0, _token_slots()), rtol=1e-5, atol=1e-5)
    for a, b in zip(A, B):  # every slot empty: nothing to add
        a.zero_()
        b.zero_()
    y = y0.clone()
    ours.add_lora_linear(y, x, A, B, 1.0, SLICES)
    assert torch.equal(y, y0)


def test_no_adapter_step_changes_nothing():
    gen = torch.Generator().manual_seed(4)
    w = PunicaWrapperLoRAKernels(64, max_batches=8, device=torch.device("cpu"))
    w.update_metadata(LoRAMapping((0,) * T, (0,) * 4, is_prefill=True), INDEX_TO_ID, L + 1, 100)
    A, B = _stacks(SLICES, IN, gen)
    y0 = torch.randn(T, sum(SLICES), generator=gen)
    y = y0.clone()
    w.add_lora_linear(y, torch.randn(T, IN, generator=gen), A, B, 1.0, SLICES)
    assert torch.equal(y, y0)


def test_delegated_call_runs_the_platform_wrapper():
    """apply_lora_full_linear (request-routed full weights) is vLLM's own wrapper's, on this step's metadata."""
    gen = torch.Generator().manual_seed(5)
    ours, theirs = _wrappers()
    n_out = 6
    weight = torch.randn(L, 1, n_out, IN, generator=gen)
    bias = torch.randn(L, n_out, generator=gen)
    enabled = torch.tensor([True, True, False])
    x = torch.randn(len(REQ_IDS), IN, generator=gen)
    y0 = torch.randn(len(REQ_IDS), n_out, generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    ours.apply_lora_full_linear(y1, x, weight, bias, enabled)
    theirs.apply_lora_full_linear(y2, x, weight, bias, enabled)
    torch.testing.assert_close(y1, y2)
    assert isinstance(ours._fallback, PunicaWrapperCPU)


# ------------------------------------------------------------------------------------------------------
# The plugin
# ------------------------------------------------------------------------------------------------------

CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


@pytest.fixture
def clean_plugin(monkeypatch):
    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.uninstall()
    yield
    plugin.uninstall()


def test_plugin_inactive_unless_asked(clean_plugin):
    plugin.register()
    assert current_platform.get_punica_wrapper() == CPU_WRAPPER
    assert not plugin.installed()
    status = plugin.vllm_status()
    assert status["plugin"] and status["in_range"] and not status["active"]
    assert plugin.ENV in status["reason"]


def test_plugin_installs_when_asked_and_uninstalls(clean_plugin, monkeypatch):
    monkeypatch.setenv(plugin.ENV, "1")
    plugin.register()
    assert current_platform.get_punica_wrapper() == plugin.WRAPPER
    assert plugin.installed() and plugin.original_wrapper() == CPU_WRAPPER
    assert plugin.vllm_status()["active"]
    plugin.register()  # vLLM may load plugins more than once
    assert plugin.original_wrapper() == CPU_WRAPPER
    plugin.uninstall()
    assert current_platform.get_punica_wrapper() == CPU_WRAPPER


def test_enable_sets_the_variable_for_child_processes(clean_plugin):
    import os

    try:
        assert plugin.enable()
        assert os.environ[plugin.ENV] == "1" and plugin.installed()
    finally:
        os.environ.pop(plugin.ENV, None)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_refuses_an_untested_vllm(clean_plugin, monkeypatch, version):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.setenv(plugin.ENV, "1")
    with pytest.warns(RuntimeWarning, match=f"vLLM {version} is outside"):
        plugin.register()
    assert current_platform.get_punica_wrapper() == CPU_WRAPPER
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(vllm, "__version__", "0.32.0")
        plugin.register()
    assert plugin.installed()


def test_importing_lora_kernels_does_not_import_vllm():
    code = ("import sys, lora_kernels, lora_kernels.integrations.vllm as v, lora_kernels.diagnostics as d; "
            "s = v.vllm_status(); d.format_info(d.info()); assert 'vllm' not in sys.modules, 'vllm imported'; "
            "print(s['installed'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vllm" in out.stdout
