"""Multi-adapter DoRA (issue 20, item 4): MultiLoRALinear / MultiLoRAModel serving batches that mix DoRA
adapters, plain LoRA adapters and rows without one, joint DoRA training, and PEFT DoRA directories -- against
PEFT run per sequence (or per adapter), in float32."""
import copy
import json

import pytest
import torch

from conftest import require_backend, save_peft_adapter

transformers = pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the PEFT comparisons need `peft`")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="PEFT adapters are saved as safetensors")

import lora_kernels as lk  # noqa: E402
from lora_kernels.layers.multi_lora import MultiLoRALinear, StepBatch  # noqa: E402
from lora_kernels.ops.batch import LoRABatch  # noqa: E402
from lora_kernels.reference import dora_linear_forward  # noqa: E402
from lora_kernels.serving import AdapterError, MultiLoRAModel  # noqa: E402

from test_adapter_files import assert_unchanged, snapshot  # noqa: E402
# The tiny Llama (one thread), each adapter's synthetic data, the joint step and the parameter comparison of
# the multi-adapter LoRA training tests, and its learning rate (see there why it is small).
from test_multi_adapter_training import (LR, SEQ, VOCAB, _assert_params_equal, _joint_step,  # noqa: E402
                                         _task_batch, _tiny_llama)

MAG = "lora_magnitude_vector"


@pytest.fixture(scope="module")
def base():
    return _tiny_llama()


_save_peft = save_peft_adapter  # random B, magnitudes moved off their initial norm (g ≠ 1)


ADAPTERS = {  # two DoRA adapters (one with rsLoRA and a rank pattern), a plain one
    "d1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "d2": dict(r=6, lora_alpha=4, target_modules="all-linear", use_dora=True, use_rslora=True,
               rank_pattern={"up_proj": 2}),
    "lo": dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    paths = {n: _save_peft(base, root / n, i, **c) for i, (n, c) in enumerate(ADAPTERS.items())}
    return paths


def _ids(batch, seed=7):
    return torch.randint(1, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _peft_logits(base, path, ids):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        return pm(ids).logits


# ------------------------------------------------------------------------------------------ serving

@pytest.mark.parametrize("backend", ["torch", "native", "triton", "composite"])
def test_mixed_batch_matches_peft_per_sequence(base, adapters, backend):
    require_backend(backend, "cpu")
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=4, max_rank=8, backend=backend).eval()
    for n, p in adapters.items():
        mm.load_adapter(n, p)
    names = ["d1", None, "lo", "d2", "d1"]
    ids = _ids(len(names))
    with torch.no_grad():
        ours = mm(ids, adapter_names=names).logits
        plain = base(ids).logits
    for n, p in adapters.items():
        rows = [b for b, m in enumerate(names) if m == n]
        torch.testing.assert_close(ours[rows], _peft_logits(base, p, ids[rows]), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], plain[1], atol=1e-6, rtol=1e-6)
    # DoRA changes the output: a DoRA row is not what the plain LoRA part alone gives.
    assert not torch.allclose(ours[0], plain[0], atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "native", "triton", "composite"])
def test_layer_rows_by_kind(monkeypatch, backend):
    """The layer alone: DoRA rows = the reference `dora_linear_forward`, plain rows = LoRA, -1 rows = base;
    the op gets dora_scale as its col_scale (no separate rescale) only when a DoRA slot may be in the batch;
    M = 0."""
    require_backend(backend, "cpu")
    import lora_kernels.layers.multi_lora as layer_mod
    torch.manual_seed(0)
    base = torch.nn.Linear(20, 12)
    layer = MultiLoRALinear(base, 4, 5, backend=backend)
    A, B, m = torch.randn(5, 20), torch.randn(12, 5) * 0.2, torch.rand(12) + 0.5
    A2, B2 = torch.randn(3, 20), torch.randn(12, 3)
    layer.set_slot(1, A, B, 0.7, magnitude=m)
    layer.set_slot(3, A2, B2, 1.5)
    x = torch.randn(6, 20)
    seen, rescaled = [], []
    for name in ("multi_lora_linear", "run_linear"):
        real = getattr(layer_mod, name)
        monkeypatch.setattr(layer_mod, name,
                            lambda *a, _real=real, **k: seen.append(k.get("col_scale")) or _real(*a, **k))
    real_rescale = layer._rescale  # still the training path's (StepBatch), not the serving path's
    monkeypatch.setattr(layer, "_rescale", lambda *a, **k: rescaled.append(1) or real_rescale(*a, **k))
    with torch.no_grad():
        for _ in range(2):  # the first call runs the full check, the second the checked fast path
            y = layer(x, LoRABatch.from_token_adapters([1, -1, 3, 1, 3, -1], 4))
            torch.testing.assert_close(y[[0, 3]], dora_linear_forward(x[[0, 3]], base.weight, base.bias, A, B, m, 0.7))
            torch.testing.assert_close(y[[2, 4]], base(x[[2, 4]]) + 1.5 * x[[2, 4]] @ A2.T @ B2.T)
            torch.testing.assert_close(y[[1, 5]], base(x[[1, 5]]))
        assert len(seen) == 2 and all(g is layer.dora_scale for g in seen) and not rescaled
        # Through the context with the batch's slots known: no DoRA slot among them, no column scale.
        layer.context.batch = LoRABatch.from_token_adapters([3, -1], 4)
        layer.context.slots = frozenset({3, -1})
        y2 = layer(x[:2])
        assert len(seen) == 3 and seen[-1] is None and not rescaled
        torch.testing.assert_close(y2[0], base(x[0]) + 1.5 * x[0] @ A2.T @ B2.T)
        layer.context.batch = layer.context.slots = None
        # M = 0.
        assert layer(x[:0], LoRABatch.from_token_adapters([], 4)).shape == (0, 12)
    step = StepBatch.from_sequences([1], 0)
    assert layer(x[:0], step).shape == (0, 12)


@pytest.mark.parametrize("backend", ["torch", "native", "triton", "composite"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_rescale_rounds_once(dtype, backend):
    """16-bit: the column scale and the bias apply in float32 to the unrounded x W0ᵀ + LoRA and y rounds once,
    so plain and -1 rows (g = 1) are within one 16-bit rounding of a layer without DoRA (which adds the bias
    before rounding too), and DoRA rows within one rounding of the float32 reference (plus the op's own)."""
    require_backend(backend, "cpu")
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(dtype)
    A, B, m = torch.randn(4, 64) / 8, torch.randn(48, 4) / 4, torch.rand(48) + 0.5
    layers = [MultiLoRALinear(base, 2, 4, backend=backend) for _ in range(2)]
    for layer in layers:
        layer.set_slot(1, A, B, 2.0)
    layers[0].set_slot(0, A, B, 2.0, magnitude=m)
    x = torch.randn(5, 64).to(dtype)
    batch = LoRABatch.from_token_adapters([0, 1, -1, 0, 1], 2)
    with torch.no_grad():
        y, plain = (layer(x, batch) for layer in layers)
        ref = dora_linear_forward(x[[0, 3]].float(), base.weight.float(), base.bias.float(), A.to(dtype).float(),
                                  B.to(dtype).float(), m, 2.0)
    # One 16-bit ulp at these magnitudes (|y| < 4): 2^-7 · 4 (bf16), 2^-10 · 4 (fp16).
    eps = {torch.bfloat16: 2 ** -5, torch.float16: 2 ** -8}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y[[1, 2, 4]], plain[[1, 2, 4]], atol=eps, rtol=0)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(y[[0, 3]].float(), ref, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ col_scale (the op)

# (T, in, slice widths, R, L, ranks or None): odd shapes and ranks, rank 1, a rank-0 slot, several slices, more
# slices than one Triton launch takes (5 > MAX_SLICES = 4: the fused path hands over to the composite), M = 0.
COL_SCALE_CASES = {
    "odd": (37, 40, (24, 9), 5, 3, (5, 0, 3)),
    "rank1": (19, 33, (17,), 1, 2, None),
    "r20": (70, 24, (30,), 20, 4, (20, 17, 1, 9)),
    "qkv": (23, 32, (16, 8, 8), 6, 5, (6, 2, 0, 4, 3)),
    "five_slices": (11, 16, (5, 7, 3, 9, 4), 3, 2, None),
    "empty": (0, 16, (12,), 4, 3, None),
}
COL_SCALE_TOL = {torch.float32: (2e-5, 2e-5),
                 # bf16: the op rounds y once (8-bit mantissa: 2^-8 relative), on top of bf16 inputs whose
                 # products accumulate in float32; 3e-2 absolute covers |y| up to ~4 at one rounding plus the
                 # interpreter's truncation (another 2^-8).
                 torch.bfloat16: (3e-2, 2e-2)}


def _col_scale_problem(case, dtype, bias=True):
    T, K, widths, R, L, ranks = COL_SCALE_CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x = rnd(T, K).to(dtype)
    N = sum(widths)
    W = (rnd(N, K) / K ** 0.5).to(dtype)
    b = rnd(N).to(dtype) if bias else None
    A = [(rnd(L, R, K) / K ** 0.5).to(dtype) for _ in widths]
    B = [(rnd(L, n, R) / R ** 0.5).to(dtype) for n in widths]
    sc = torch.rand(L, generator=g) + 0.5
    ta = torch.randint(-1, L, (T,), generator=g)
    # g far from 1 (in [2, 5)) for every slot and for the -1 row, so ignoring any part of it cannot pass.
    cs = torch.rand(L + 1, N, generator=g) * 3 + 2
    rk = None if ranks is None else torch.tensor(ranks, dtype=torch.int32)
    return x, W, b, A, B, sc, ta, rk, cs


def _col_scale_reference(x, W, b, A, B, sc, ta, rk, cs):
    """float64: col_scale[l_t] ⊙ (x W0ᵀ + LoRA) + b (reference.multi_lora_linear_forward without the bias)."""
    from lora_kernels.reference import multi_lora_linear_forward
    d = torch.float64
    x2 = x.reshape(-1, x.shape[-1])
    y = multi_lora_linear_forward(x2.to(d), W.to(d), None, [a.to(d) for a in A], [t.to(d) for t in B], sc.to(d), ta,
                                  rk)
    key = torch.where(ta >= 0, ta, cs.shape[0] - 1)
    y = y * cs.to(d)[key]
    return y if b is None else y + b.to(d)


@pytest.fixture
def _poison(monkeypatch):
    """NaN in every output buffer the Triton kernels allocate: an element they skip fails the comparison."""
    try:
        import lora_kernels.kernels.multi_lora as k
    except ImportError:  # no triton: nothing to poison
        return
    monkeypatch.setattr(k, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("backend", ["torch", "native", "triton", "composite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(COL_SCALE_CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_col_scale_matches_reference(_poison, backend, dtype, case, bias):
    """multi_lora_linear(col_scale=g) = g[l_t] ⊙ (x W0ᵀ + LoRA) + b (float64 reference) on every backend, with g
    far from 1 on every row (the -1 tokens' row L too, and a rank-0 slot's rows); and it is not the plain op's
    result (a backend that ignored g fails)."""
    require_backend(backend, "cpu")
    x, W, b, A, B, sc, ta, rk, cs = _col_scale_problem(case, dtype, bias)
    batch = LoRABatch.from_token_adapters(ta, len(sc))
    with torch.no_grad():
        y = lk.ops.multi_lora.multi_lora_linear(x, W, b, A, B, sc, batch, rk, backend=backend, col_scale=cs)
        plain = lk.ops.multi_lora.multi_lora_linear(x, W, b, A, B, sc, batch, rk, backend=backend)
    ref = _col_scale_reference(x, W, b, A, B, sc, ta, rk, cs)
    assert y.dtype == dtype and y.shape == ref.shape
    atol, rtol = COL_SCALE_TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)  # NaN never passes (equal_nan=False)
    if y.numel():
        assert (y.double() - plain.double()).abs().max() > 1.0


@pytest.mark.parametrize("backend", ["torch", "native", "triton", "composite"])
def test_col_scale_leading_dims_and_strides(_poison, backend):
    """x [2, 3, 5, in] (leading dims) and a non-contiguous x (a column slice of a wider tensor)."""
    require_backend(backend, "cpu")
    x, W, b, A, B, sc, ta, rk, cs = _col_scale_problem("odd", torch.float32)
    x = x[:30]
    ta = ta[:30]
    wide = torch.randn(30, 2 * x.shape[1])
    wide[:, 1::2] = x
    xs = wide[:, 1::2]
    batch = LoRABatch.from_token_adapters(ta, len(sc))
    ref = _col_scale_reference(x, W, b, A, B, sc, ta, rk, cs)
    with torch.no_grad():
        y = lk.ops.multi_lora.multi_lora_linear(x.reshape(2, 3, 5, -1), W, b, A, B, sc, batch, rk, backend=backend,
                                                col_scale=cs)
        y2 = lk.ops.multi_lora.multi_lora_linear(xs, W, b, A, B, sc, batch, rk, backend=backend, col_scale=cs)
    assert y.shape == (2, 3, 5, W.shape[0])
    torch.testing.assert_close(y.reshape(30, -1).double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(y2.double(), ref, atol=2e-5, rtol=2e-5)


def test_col_scale_bad_input_raises_before_any_kernel(monkeypatch):
    """Wrong shape / dtype / type: a ValueError naming col_scale and the expected shape, before any backend."""
    from lora_kernels.ops import multi_lora as om
    x, W, b, A, B, sc, ta, rk, cs = _col_scale_problem("odd", torch.float32)
    batch = LoRABatch.from_token_adapters(ta, len(sc))
    boom = {n: (lambda *a, **k: pytest.fail("a backend ran on bad input")) for n in om.LINEAR}
    monkeypatch.setattr(om, "LINEAR", boom)
    for bad in (cs[:-1], cs[:, :-1], cs.T.contiguous(), cs.half(), cs.to(torch.int32), cs[0], "g"):
        with pytest.raises(ValueError, match=r"col_scale must be None or a tensor of shape \[L\+1=4, out=33\]"):
            om.multi_lora_linear(x, W, b, A, B, sc, batch, rk, backend="torch", col_scale=bad)
    # The kernel backends take float32 only (float64 is the torch backend's for float64 inputs).
    with pytest.raises(ValueError, match=r"col_scale must be .* in torch.float32 for backend='triton'"):
        om.multi_lora_linear(x, W, b, A, B, sc, batch, rk, backend="triton", col_scale=cs.double())


def test_native_op_checks_col_scale():
    """The C++ op's own check (it is also reachable directly): shape and dtype named."""
    require_backend("native", "cpu")
    x, W, b, A, B, sc, ta, rk, cs = _col_scale_problem("odd", torch.float32)
    bt = LoRABatch.from_token_adapters(ta, len(sc)).op_args()
    with pytest.raises(RuntimeError, match=r"col_scale must be None or a tensor of shape \[L\+1=4, out=33\]"):
        torch.ops.lora_kernels.native_multi_lora_linear(x, W, b, A, B, sc, *bt, rk, cs[:2])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_col_scale_with_autograd_and_compile(backend):
    """With a gradient the scale is applied after the (differentiable) op: the gradients of x, A and B equal
    the float64 reference's; the registered op (torch.compile, opcheck) takes col_scale too."""
    require_backend(backend, "cpu")
    x, W, b, A, B, sc, ta, rk, cs = _col_scale_problem("qkv", torch.float32)
    batch = LoRABatch.from_token_adapters(ta, len(sc))
    leaves = [t.clone().requires_grad_() for t in (x, *A, *B)]
    y = lk.ops.multi_lora.multi_lora_linear(leaves[0], W, b, leaves[1:4], leaves[4:], sc, batch, rk, backend=backend,
                                            col_scale=cs)
    ref_leaves = [t.double().requires_grad_() for t in (x, *A, *B)]
    ref = _col_scale_reference(ref_leaves[0], W, b, ref_leaves[1:4], ref_leaves[4:], sc, ta, rk, cs)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    torch.autograd.backward(y, dy)
    torch.autograd.backward(ref, dy.double())
    for ours, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-4, rtol=1e-4)
    bt = batch.op_args()
    torch.library.opcheck(lk.ops.multi_lora.multi_lora_linear_op,
                          (x, W, b, A, B, sc, *bt, rk, backend, cs), test_utils=("test_schema", "test_faketensor"))


def test_set_slot_checks_magnitude():
    layer = MultiLoRALinear(torch.nn.Linear(8, 6), 2, 4)
    for bad in (torch.ones(5), torch.ones(6, dtype=torch.int64), [1.0] * 6):
        with pytest.raises(ValueError, match="magnitude must be"):
            layer.set_slot(0, torch.ones(2, 8), torch.ones(6, 2), 1.0, magnitude=bad)
    assert not layer._dora_slots and torch.equal(layer.dora_scale, torch.ones(3, 6))


def test_scale_recomputed_on_load_into_the_slot(base, adapters, tmp_path):
    """Reloading a name into its slot recomputes that slot's g (a new DoRA adapter, then a plain one)."""
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, backend="torch").eval()
    slot = mm.load_adapter("x", adapters["d1"])
    ids = _ids(2)
    other = _save_peft(base, tmp_path / "other", 11, **ADAPTERS["d1"])
    for path in (other, adapters["lo"], adapters["d2"]):
        assert mm.load_adapter("x", path) == slot
        with torch.no_grad():
            torch.testing.assert_close(mm(ids, adapter_names=["x", "x"]).logits, _peft_logits(base, path, ids),
                                       atol=2e-5, rtol=1e-5)
    q = mm.layers["model.layers.0.self_attn.q_proj"]
    assert q._dora_slots == {slot}
    mm.unload_adapter("x")
    assert not q._dora_slots and torch.equal(q.dora_scale, torch.ones_like(q.dora_scale))


# ------------------------------------------------------------------------------------------ training

TRAIN = {  # two DoRA adapters (different targets, rsLoRA) and a plain one
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, use_rslora=True),
    "c": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
}


def _joint(base, backend="torch"):
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=4, max_rank=8, backend=backend)
    torch.manual_seed(1)
    for n, c in TRAIN.items():
        mm.add_adapter(n, c)
    return mm.train()


def _peft_solo(base, mm, name, fresh=True):
    """PEFT alone on adapter `name`, with mm's current weights (fresh: its initial ones, and PEFT's own initial
    m is checked equal to ours first)."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**TRAIN[name]))
    theirs = [(k, p) for k, p in pm.named_parameters() if p.requires_grad]
    ours = mm.parameters_of(name)
    assert [p.shape for _, p in theirs] == [p.shape for p in ours]
    with torch.no_grad():
        for (k, p), q in zip(theirs, ours):
            if fresh and MAG in k:  # PEFT's init: m = ‖W0 + s B A‖_row = ‖W0_j‖ (B = 0)
                torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)
            p.copy_(q)
    return pm.train()


def test_joint_dora_training_equals_peft_alone(base):
    """5 AdamW steps of three adapters in one batch (two DoRA): each ends where PEFT alone ends, m included."""
    steps = 5
    mm = _joint(base)
    assert all(len(mm.parameters_of(n)) == k for n, k in (("a", 2 * 2 * 3), ("b", 2 * 7 * 3), ("c", 2 * 2 * 2)))
    solos = {}
    for n in TRAIN:
        pm = _peft_solo(base, mm, n)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
        losses = []
        for step in range(steps):
            ids, labels = _task_batch(step, n)
            loss = pm(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        solos[n] = (pm, losses)
    initial = {n: [p.detach().clone() for p in mm.parameters_of(n)] for n in TRAIN}
    opt = torch.optim.AdamW(mm.param_groups(), lr=LR)
    joint = {n: [] for n in TRAIN}
    for step in range(steps):
        for n, v in _joint_step(mm, opt, step, list(TRAIN)).items():
            joint[n].append(v)
    for n, (pm, losses) in solos.items():
        torch.testing.assert_close(torch.tensor(joint[n]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        moved = [(p - q).abs().max().item() for p, q in zip(mm.parameters_of(n), initial[n])]
        assert min(moved) > LR, f"{n}: a parameter did not move ({moved})"  # m too
        _assert_params_equal(mm, pm, n)


def test_layer_dropout_matches_reference():
    """The training path with LoRA dropout: PEFT's DoRA form (x − x̂) W0ᵀ + b + g ⊙ (x̂ W0ᵀ + s x̂ Aᵀ Bᵀ) on a
    DoRA slot's rows, plain LoRA dropout on a plain slot's, the base on -1 rows; the mask is
    `lk.dropout_mask(seed, (T, in), p_l)`. Forward and the gradients of x, A, B and m."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 10).requires_grad_(False)
    layer = MultiLoRALinear(base, 3, 4, backend="torch").train()
    A, B, m = torch.randn(4, 16), torch.randn(10, 4) * 0.3, torch.rand(10) + 0.5
    A2, B2 = torch.randn(2, 16), torch.randn(10, 2) * 0.3
    pa, pb, pm_ = layer.add_trainable(2, A, B, 0.5, magnitude=m)
    pa2, pb2 = layer.add_trainable(0, A2, B2, 2.0)
    seq_slots, T = [2, -1, 0, 2], 12
    step = StepBatch.from_sequences(seq_slots, 3, dropout_p=[0.25, 0.0, 0.4])
    seed = step.dropout_p.next_seed()
    step.dropout_p._calls[0] -= 1  # the layer's call draws this seed
    x = torch.randn(T, 16, requires_grad=True)
    y = layer(x, step)
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x.detach().clone().requires_grad_(True)
    Ar, Br, mr, A2r, B2r = (t.detach().clone().requires_grad_(True) for t in (pa, pb, pm_, pa2, pb2))
    tok = torch.tensor(seq_slots).repeat_interleave(3)
    rows = []
    for t in range(T):
        xt = xr[t:t + 1]
        if tok[t] == 2:
            keep = lk.dropout_mask(seed, (T, 16), 0.4)[t:t + 1]
            rows.append(dora_linear_forward(xt, base.weight, base.bias, Ar, Br, mr, 0.5, keep, 0.4))
        elif tok[t] == 0:
            keep = lk.dropout_mask(seed, (T, 16), 0.25)[t:t + 1]
            rows.append(base(xt) + 2.0 * (xt * keep / 0.75) @ A2r.T @ B2r.T)
        else:
            rows.append(base(xt))
    ref = torch.cat(rows)
    ref.backward(dy)
    torch.testing.assert_close(y.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for ours, theirs in ((x, xr), (pa, Ar), (pb, Br), (pm_, mr), (pa2, A2r), (pb2, B2r)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_optimizer_step_refreshes_the_served_scale(base):
    """train → optimizer step → eval: the served g is recomputed from the new A, B and m (eval() and the
    version counters), and equals PEFT with the same weights."""
    mm = _joint(base)
    opt = torch.optim.AdamW(mm.param_groups(), lr=1e-2)
    _joint_step(mm, opt, 0, ["a", "b"])
    mm.eval()
    ids = _ids(2)

    def peft_eval(name):
        pm = _peft_solo(base, mm, name, fresh=False).eval()
        with torch.no_grad():
            return pm(ids).logits

    with torch.no_grad():
        torch.testing.assert_close(mm(ids, adapter_names=["a", "a"]).logits, peft_eval("a"), atol=2e-5, rtol=1e-5)
        for p in mm.parameters_of("a")[2::3]:  # the magnitudes only, in place (as an optimizer step does)
            p.mul_(1.5)
        torch.testing.assert_close(mm(ids, adapter_names=["a", "a"]).logits, peft_eval("a"), atol=2e-5, rtol=1e-5)


def test_save_load_round_trip_through_peft(base, tmp_path):
    mm = _joint(base)
    opt = torch.optim.AdamW(mm.param_groups(), lr=1e-2)
    for step in range(2):
        _joint_step(mm, opt, step, list(TRAIN))
    mm.eval()
    names = ["a", None, "b", "c"]
    ids = _ids(len(names), seed=3)
    with torch.no_grad():
        ours = mm(ids, adapter_names=names).logits
    mm2 = MultiLoRAModel(copy.deepcopy(base), max_loras=3, max_rank=8, backend="torch")
    for n in TRAIN:
        path = mm.save_adapter(n, tmp_path / n)
        keys = safetensors_torch.load_file(str(path / "adapter_model.safetensors")).keys()
        assert any(k.endswith(MAG) for k in keys) == TRAIN[n].get("use_dora", False)
        assert json.loads((path / "adapter_config.json").read_text()).get("use_dora", False) == \
            TRAIN[n].get("use_dora", False)
        rows = [b for b, m in enumerate(names) if m == n]
        torch.testing.assert_close(ours[rows], _peft_logits(base, path, ids[rows]), atol=2e-5, rtol=1e-5)
        mm2.load_adapter(n, path)
    with torch.no_grad():
        torch.testing.assert_close(mm2(ids, adapter_names=names).logits, ours, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ bad files

def _edit_copy(src, dst, state=None, cfg=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    if cfg:
        cfg(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = safetensors_torch.load_file(str(src / "adapter_model.safetensors"))
    if state:
        state(tensors)
    safetensors_torch.save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _mag_key(t):
    return next(k for k in t if k.endswith("q_proj." + MAG))


def _set(fn):
    def edit(t):
        k = _mag_key(t)
        t[k] = fn(t[k])
    return edit


BAD = {
    "wrong_shape": (dict(state=_set(lambda m: m[:-1].clone())), r"lora_magnitude_vector \(31,\); the base layer "
                                                                r"needs \[32\]"),
    "two_dims": (dict(state=_set(lambda m: m[None].clone())), r"lora_magnitude_vector \(1, 32\)"),
    "nan": (dict(state=_set(lambda m: torch.where(torch.arange(32) == 3, float("nan"), m))),
            r"lora_magnitude_vector' has non-finite values"),
    "int": (dict(state=_set(lambda m: m.to(torch.int32))), r"has dtype .*cannot be cast"),
    "missing": (dict(state=lambda t: t.pop(_mag_key(t))), r"q_proj' has no lora_magnitude_vector"),
    "not_dora": (dict(cfg=lambda c: c.update(use_dora=False)), r"unsupported tensor .*lora_magnitude_vector"),
    "orphan": (dict(state=lambda t: [t.pop(k) for k in list(t) if "q_proj.lora_" in k and MAG not in k]),
               r"q_proj' has lora_A missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dora_files_raise_and_change_nothing(base, adapters, tmp_path, case):
    kw, pattern = BAD[case]
    mm = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, backend="torch").eval()
    mm.load_adapter("d", adapters["d1"])
    mm.load_adapter("l", adapters["lo"])
    snap = snapshot(mm)
    path = _edit_copy(adapters["d1"], tmp_path / case, **kw)
    for name in ("d", "new"):
        with pytest.raises(AdapterError, match=pattern):
            mm.load_adapter(name, path)
        assert_unchanged(mm, snap)
