"""DoRA and lora_bias over quantized (bitsandbytes) bases (issues 19 and 20): `dora_linear` over an int8_row
QuantWeight (and lora_bias over 4-bit / int8) against dense DoRA on the dequantized weight; `patch_peft` fusing
PEFT's Linear8bitLt DoRA layers and lora_bias layers over 4-bit / 8-bit bases (no fallback) against the same
model over dense bases holding the dequantized weights and against PEFT's own layers; and `MultiLoRALinear` with
DoRA slots over NF4 / int8 bases, served and trained, against the float64 reference on the dequantized weight."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels import quant, reference
from lora_kernels.backends import available_backends
from lora_kernels.layers.multi_lora import MultiLoRALinear, StepBatch

bnb = pytest.importorskip("bitsandbytes", reason="quantized bases need bitsandbytes: pip install "
                                                 "'lora_kernels[qlora]'")
pytest.importorskip("peft", reason="the PEFT comparisons (and test_qlora's helpers) need `peft`")
pytest.importorskip("transformers", reason="test_multi_qlora's helpers need `transformers`")

from test_multi_qlora import IN, OUT, bnb_layer, dense_of  # noqa: E402  (one thread, tiny shapes)
from test_qlora import Quantizable, dense_twin, quantize_model, rel_rms, run  # noqa: E402

NAMES = ["x", "lora_A", "lora_B", "magnitude", "lora_bias"]


def _rand(shape, g, scale=1.0):
    return torch.randn(shape, generator=g) * scale


# ----------------------------------------------------------------------------------------------------
# dora_linear over a QuantWeight: int8_row (and nf4) with and without lora_bias, against dense DoRA on deq(W0)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("lora_bias", [False, True], ids=["no_bias", "lora_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("kind", ["int8", "nf4-nested"])
def test_qdora_matches_dense_dora_and_reference(kind, dropout, lora_bias, backend):
    """y and every gradient (x, A, B, m, c) of dora_linear over the QuantWeight equal dense dora_linear over
    deq(W0) (the same math on the bit-exact dequantized weight: float32-tight), and without dropout y equals the
    float64 reference. in = 100 (4-bit blocks cross rows), rank 5, leading batch dims."""
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here (the C++ extension is not built)")
    layer = bnb_layer(kind, bias=True)
    qw = quant.from_bnb(layer)
    Wd = qw.dequantize(torch.float32)
    g = torch.Generator().manual_seed(1)
    t = dict(x=_rand((2, 3, IN), g), lora_A=_rand((5, IN), g, 0.3), lora_B=_rand((OUT, 5), g, 0.3),
             magnitude=torch.linalg.vector_norm(Wd, dim=1) * (1 + 0.3 * _rand(OUT, g)),
             lora_bias=_rand(OUT, g, 0.5) if lora_bias else None)
    names = [n for n in NAMES if t[n] is not None]
    ins = [t[n].clone().requires_grad_() for n in names]
    dense = [t[n].clone().requires_grad_() for n in names]
    c, c_d = (ins[4], dense[4]) if lora_bias else (None, None)
    bias = layer.bias.detach()
    torch.manual_seed(3)
    y = lk.dora_linear(ins[0], qw, bias, *ins[1:4], 1.5, dropout, training=True, backend=backend, lora_bias=c)
    torch.manual_seed(3)
    y_d = lk.dora_linear(dense[0], Wd, bias, *dense[1:4], 1.5, dropout, training=True, backend="torch",
                         lora_bias=c_d)
    assert y.shape == (2, 3, OUT) and torch.isfinite(y).all()
    torch.testing.assert_close(y, y_d, rtol=1e-5, atol=1e-5)
    if not dropout:
        want = reference.dora_linear_forward(t["x"].double().reshape(-1, IN), Wd.double(), bias.double(),
                                             t["lora_A"].double(), t["lora_B"].double(), t["magnitude"].double(),
                                             1.5, lora_bias=None if c is None else t["lora_bias"].double())
        torch.testing.assert_close(y.double().reshape(-1, OUT), want, rtol=1e-5, atol=1e-4)
    dy = torch.randn_like(y)
    for n, a, b in zip(names, torch.autograd.grad(y, ins, dy), torch.autograd.grad(y_d, dense, dy)):
        assert a.abs().max() > 1e-3, n  # every input moves the output: a zero gradient would be a bug
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@torch.no_grad()
def test_qdora_int8_m0_and_nan():
    """M = 0 gives an empty [0, out]; a NaN in x reaches y (never hidden)."""
    qw = quant.from_bnb(bnb_layer("int8"))
    A, B, m = torch.randn(1, IN), torch.randn(OUT, 1), torch.rand(OUT) + 0.5
    assert lk.dora_linear(torch.randn(0, IN), qw, None, A, B, m, 1.0).shape == (0, OUT)
    x = torch.randn(3, IN)
    x[1, 7] = float("nan")
    y = lk.dora_linear(x, qw, None, A, B, m, 1.0)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# ----------------------------------------------------------------------------------------------------
# patch_peft: Linear8bitLt DoRA, lora_bias over 4-bit / 8-bit bases
# ----------------------------------------------------------------------------------------------------

def _no_fallback(monkeypatch):
    """Fail the test if a quantized layer runs PEFT's own forward (`_quant_call` returns None for those)."""
    real = lk.peft_patch._quant_call

    def checked(self, x):
        y = real(self, x)
        if y is None:
            pytest.fail(f"fell back to PEFT: {lk.peft_patch._quant_patch_reason(self) or 'a runtime check'}")
        return y
    monkeypatch.setattr(lk.peft_patch, "_quant_call", checked)


TARGETS = ["q", "v", "o"]  # o has no base bias: PEFT warns that lora_bias then cannot merge, and trains it
LORA_BIAS_NO_MERGE = "ignore:`lora_bias=True` was passed but the targeted layer"
CASES = {  # kind, LoraConfig keywords
    "8bit-dora": ("8bit", dict(use_dora=True)),
    "4bit-lora_bias": ("4bit", dict(lora_bias=True)),
    "8bit-lora_bias": ("8bit", dict(lora_bias=True)),
}


def _pair(kind, dropout, **kw):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False, target_modules=TARGETS, **kw)
    ref = get_peft_model(quantize_model(Quantizable(), kind), cfg)
    if kw.get("lora_bias"):  # PEFT initialises lora_B's bias to zero: move it, so its gradient path is tested
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n.endswith("lora_B.default.bias"):
                    p.normal_(0, 0.3)
    model = copy.deepcopy(ref)
    report = lk.patch_peft(model)
    assert report.num_patched == 3 and not report.skipped, report
    return model, ref, cfg


@pytest.mark.filterwarnings(LORA_BIAS_NO_MERGE)
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop"])
@pytest.mark.parametrize("case", list(CASES))
def test_patched_quantized_dora_and_lora_bias_match_dense_twin_and_peft(case, dropout, monkeypatch):
    kind, kw = CASES[case]
    model, ref, cfg = _pair(kind, dropout, **kw)
    _no_fallback(monkeypatch)
    twin = dense_twin(model, cfg)  # patched, over nn.Linear bases holding deq(W0): the same dropout seeds
    n_params = 9  # A, B and m or c of each layer
    x = torch.randn(2, 9, 128)  # 18 rows: bitsandbytes' CPU matmul takes its GEMM path (not the GEMV)
    model.train(), twin.train(), ref.train()
    y, grads = run(model, x)
    y_twin, grads_twin = run(twin, x)
    # The same float32 math on the bit-exact dequantized weight (the twin's base GEMM vs ours: summation order).
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_twin.keys() and len(grads) == n_params, sorted(grads)
    assert sum(n.endswith("lora_B.default.bias") for n in grads) == (3 if kw.get("lora_bias") else 0)
    assert sum("magnitude" in n for n in grads) == (3 if kw.get("use_dora") else 0)
    for n in grads:
        assert grads[n].abs().max() > 0, n
        torch.testing.assert_close(grads[n], grads_twin[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    # bitsandbytes' CPU base is not the float32 x deq(W0)ᵀ everywhere: its 4-bit GEMM may run in bfloat16 on
    # AVX512-BF16 CPUs (relative error ~3e-3 at 16+ rows), its 8-bit matmul quantizes the activations to int8 in
    # eval mode (measured here: y ~8e-3). Bounds: about twice that, relative RMS, for y and every gradient.
    bound = 2e-2 if kind == "8bit" else 6e-3
    if dropout:
        # PEFT draws its own dropout masks (ours regenerate from a seed: the dense twin above checks that math),
        # so PEFT's layer is compared where dropout is off: in eval mode, the forward only -- there its 8-bit
        # matmul quantizes the activations, and through three layers the gradients move by up to 7e-2.
        model.eval(), ref.eval()
        with torch.no_grad():
            assert rel_rms(model(x), ref(x)) < bound
        return
    y_ref, grads_ref = run(ref, x)
    assert rel_rms(y, y_ref) < bound
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert rel_rms(grads[n], grads_ref[n]) < 2 * bound, n


@pytest.mark.filterwarnings(LORA_BIAS_NO_MERGE)
def test_patched_quantized_dora_with_lora_bias_matches_dense_twin(monkeypatch):
    """DoRA and lora_bias together (PEFT's LoraConfig refuses the pair; set after validation, PEFT builds the
    layers): over 4-bit and 8-bit bases the fused layer equals the same model over dense bases, forward and
    every gradient (the norm n = ‖W0 + s (B A + c 1ᵀ)‖ of `dora_linear`, dc = s Σ g ⊙ dy)."""
    from peft import LoraConfig, get_peft_model
    _no_fallback(monkeypatch)
    for kind in ("4bit", "8bit"):
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
        cfg.lora_bias = True
        model = get_peft_model(quantize_model(Quantizable(), kind), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B.default.bias"):
                    p.normal_(0, 0.3)
        assert not lk.patch_peft(model).skipped
        twin = dense_twin(model, cfg)
        x = torch.randn(3, 5, 128)
        model.train(), twin.train()
        y, grads = run(model, x)
        y_twin, grads_twin = run(twin, x)
        torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)
        assert len(grads) == 12 and grads.keys() == grads_twin.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], grads_twin[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------------
# MultiLoRALinear: DoRA slots over NF4 / int8 bases
# ----------------------------------------------------------------------------------------------------

SLICES = (40, 32)  # two output slices (a fused projection): each slice's norm from its own rows of deq(W0)


def _dora_slots(layer: MultiLoRALinear, trainable: bool = False, seed=1) -> dict:
    """Slot 0: DoRA rank 1 on both slices; slot 1: plain rank 5; slot 2: DoRA rank 8 on slice 0 only (slice 1
    keeps g = m / ‖W0_j‖); slot 3 empty. Returns {slot: (As, Bs, s, m)} (m None for plain)."""
    g = torch.Generator().manual_seed(seed)
    W = layer._dense_weight()
    specs = {0: ((1, 1), 0.7, True), 1: ((5, 5), 1.5, False), 2: ((8, None), 0.5, True)}
    out = {}
    for slot, (ranks, s, dora) in specs.items():
        As = [None if r is None else _rand((r, IN), g, 0.3) for r in ranks]
        Bs = [None if r is None else _rand((n, r), g, 0.3) for r, n in zip(ranks, SLICES)]
        m = (torch.linalg.vector_norm(W, dim=1) * (1 + 0.3 * _rand(OUT, g))) if dora else None
        if trainable:
            layer.add_trainable(slot, As, Bs, s, magnitude=m)
        else:
            layer.set_slot(slot, As, Bs, s, magnitude=m)
        out[slot] = (As, Bs, s, m)
    return out


def _ref_rows(x64, W64, b64, spec, dropout_keep=None, p=0.0):
    """Slot `spec`'s rows by the float64 reference, slice by slice (DoRA is row-separable: each output row's g
    depends only on that row of W0 and B); a slice the adapter does not touch is DoRA with B = 0."""
    As, Bs, s, m = spec
    parts, c = [], 0
    for A, B, n in zip(As, Bs, SLICES):
        rows = slice(c, c + n)
        A_ = A if A is not None else torch.zeros(1, IN, dtype=x64.dtype)
        B_ = B if B is not None else torch.zeros(n, 1, dtype=x64.dtype)
        if m is None:
            xh = x64 if dropout_keep is None else x64 * dropout_keep / (1 - p)
            parts.append(x64 @ W64[rows].T + b64[rows] + s * xh @ A_.T @ B_.T)
        else:
            parts.append(reference.dora_linear_forward(x64, W64[rows], b64[rows], A_, B_, m[rows], s,
                                                       dropout_keep, p))
        c += n
    return torch.cat(parts, 1)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@torch.no_grad()
def test_served_dora_slots_over_quantized_base_match_reference(kind, backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here (the C++ extension is not built)")
    base = bnb_layer(kind)
    layer = MultiLoRALinear(base, max_loras=4, max_rank=8, output_slices=SLICES, backend=backend)
    twin = MultiLoRALinear(dense_of(base), max_loras=4, max_rank=8, output_slices=SLICES, backend=backend)
    specs = _dora_slots(layer)
    _dora_slots(twin)
    W64, b64 = quant.from_bnb(base).dequantize(torch.float64), base.bias.double()
    # The DoRA norm over the quantized base is the norm of deq(W0) (PEFT's initial magnitude).
    As, Bs, s, _ = specs[0]
    want_n = torch.cat([reference.dora_weight_norm(W64[:40], As[0].double(), Bs[0].double(), s),
                        reference.dora_weight_norm(W64[40:], As[1].double(), Bs[1].double(), s)])
    torch.testing.assert_close(layer.dora_weight_norm(As, Bs, s).double(), want_n, rtol=1e-6, atol=1e-6)
    for T in (0, 3, 19):  # M = 0, a decode-sized step (the native GEMV), a prefill-sized one
        x = torch.randn(T, IN, generator=torch.Generator().manual_seed(T))
        ids = torch.tensor([0, 1, 2, 3, -1] * 4)[:T]
        batch = lk.LoRABatch.from_token_adapters(ids, num_slots=4)
        y = layer(x, batch)
        assert y.shape == (T, OUT)
        want = torch.empty(T, OUT, dtype=torch.float64)
        for t in range(T):
            sl = int(ids[t])
            x64 = x[t:t + 1].double()
            if sl in specs:
                As, Bs, s, m = specs[sl]
                spec = ([None if a is None else a.double() for a in As],
                        [None if b is None else b.double() for b in Bs], s, None if m is None else m.double())
                want[t] = _ref_rows(x64, W64, b64, spec)[0]
            else:
                want[t] = (x64 @ W64.T + b64)[0]
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y, twin(x, batch), rtol=1e-6, atol=1e-5)
        if T:
            dora_rows = (ids == 0) | (ids == 2)
            base_y = x.double() @ W64.T + b64
            assert (y.double() - base_y)[dora_rows].abs().max() > 1e-2  # the DoRA slots change the output


def _train_ref(specs, x, gy, W64, b64, seq_slots, S, seed=None, ps=None):
    """Per sequence: the float64 reference of its slot (keep mask `lk.dropout_mask(seed, (T, in), p)` rows when
    `seed`), backpropagated; returns ({slot: grads of (A..., B..., m)}, dx)."""
    T = x.shape[0] * S
    x64 = x.detach().reshape(T, IN).double().requires_grad_(True)
    grads = {}
    ys = []
    leaves = {}
    for slot, (As, Bs, s, m) in specs.items():
        leaves[slot] = ([None if a is None else a.detach().double().requires_grad_(True) for a in As],
                        [None if b is None else b.detach().double().requires_grad_(True) for b in Bs], s,
                        None if m is None else m.detach().double().requires_grad_(True))
    tok = torch.tensor(seq_slots).repeat_interleave(S)
    for t in range(T):
        sl = int(tok[t])
        if sl in leaves:
            keep = None
            if seed is not None and ps[sl]:
                keep = lk.dropout_mask(seed, (T, IN), ps[sl])[t:t + 1]
            ys.append(_ref_rows(x64[t:t + 1], W64, b64, leaves[sl], keep, ps[sl] if ps else 0.0))
        else:
            ys.append(x64[t:t + 1] @ W64.T + b64)
    y = torch.cat(ys)
    (y * gy.reshape(T, OUT).double()).sum().backward()
    for slot, (As, Bs, s, m) in leaves.items():  # the order of trainable_parameters: A, B per slice, then m
        grads[slot] = [g for a, b in zip(As, Bs) if a is not None for g in (a.grad, b.grad)] \
            + ([m.grad] if m is not None else [])
    return y.detach(), grads, x64.grad


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_joint_dora_training_over_quantized_base_matches_reference(kind, dropout):
    """Trainable DoRA slots (and a plain one) over a quantized base in one step: y, dx and the gradients of
    every A, B and m against the float64 reference per adapter on deq(W0); with dropout PEFT's DoRA form
    (x − x̂) W0ᵀ + b + g ⊙ (x̂ W0ᵀ + s x̂ Aᵀ Bᵀ), masks from the step's seed; and equal to the same layer over
    a dense nn.Linear holding deq(W0) (the same dense math on the bit-exact dequantized weight)."""
    base = bnb_layer(kind)
    seq_slots, S = [0, 2, -1, 1, 0], 3
    ps = [dropout, dropout / 2, dropout, 0.0]
    results = []
    for b in (base, dense_of(base)):
        layer = MultiLoRALinear(b, max_loras=4, max_rank=8, output_slices=SLICES).train()
        specs = _dora_slots(layer, trainable=True)
        params = {slot: layer.trainable_parameters(slot) for slot in specs}
        torch.manual_seed(11)  # the step's base dropout seed: the same for both layers
        step = StepBatch.from_sequences(seq_slots, S, dropout_p=ps if dropout else None)
        seed = None
        if dropout:
            seed = step.dropout_p.next_seed()
            step.dropout_p._calls[0] -= 1  # the layer's call draws this seed
        x = torch.randn(len(seq_slots), S, IN, generator=torch.Generator().manual_seed(6), requires_grad=True)
        gy = torch.randn(len(seq_slots), S, OUT, generator=torch.Generator().manual_seed(7))
        y = layer(x, step)
        (y * gy).sum().backward()
        results.append((y.detach(), x.grad, {s: [p.grad for p in ps_] for s, ps_ in params.items()}))
        if b is base:
            assert all(p.grad is None and not p.requires_grad for p in base.parameters())  # the base stays frozen
            W64, b64 = quant.from_bnb(base).dequantize(torch.float64), base.bias.double()
            current = {s: (*layer.trainable_weights(s), specs[s][2], layer.trainable_magnitude(s)) for s in specs}
            y_ref, g_ref, dx_ref = _train_ref(current, x, gy, W64, b64, seq_slots, S, seed, ps if dropout else None)
            torch.testing.assert_close(y.reshape(-1, OUT).double(), y_ref, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(x.grad.reshape(-1, IN).double(), dx_ref, rtol=1e-5, atol=1e-4)
            for slot, ps_ in params.items():
                assert len(ps_) == len(g_ref[slot]) == (5 if slot == 0 else 3 if slot == 2 else 4)
                for i, (p, want) in enumerate(zip(ps_, g_ref[slot])):
                    assert p.grad is not None and p.grad.abs().max() > 1e-3, (slot, i)
                    torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-4,
                                               msg=lambda m: f"slot {slot} param {i}: {m}")
    (y, dx, g), (y_d, dx_d, g_d) = results
    torch.testing.assert_close(y, y_d, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dx, dx_d, rtol=1e-6, atol=1e-5)
    for slot in g:
        for a, b_ in zip(g[slot], g_d[slot]):
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
