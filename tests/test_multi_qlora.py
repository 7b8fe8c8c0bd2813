"""Multi-adapter LoRA over a quantized (bitsandbytes) base: `MultiLoRALinear` over Linear4bit (nf4 / fp4, nested
absmax or not) and Linear8bitLt against the float64 reference on the dequantized weight and against the same
layer over a dense nn.Linear holding that weight (dequantize-then-dense); joint training gradients; and
`MultiLoRAModel` over a tiny Llama quantized to NF4 on the CPU against PEFT's own 4-bit model per sequence."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import quant, reference
from lora_kernels.backends import available_backends
from lora_kernels.ops import qlora
from lora_kernels.layers.multi_lora import StepBatch

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="quantized bases need bitsandbytes: pip install "
                                                    "'lora_kernels[qlora]'")

# Tiny shapes on a loaded 2-core machine: one thread is far faster than contended intra-op threads.
torch.set_num_threads(1)

IN, OUT = 100, 72  # in % 64 != 0: 4-bit blocks cross rows
# float32 GEMMs of different summation order against the float64 reference (|y| ~ 10 here).
RTOL, ATOL = 1e-5, 1e-4
KINDS = ["nf4", "nf4-nested", "fp4", "int8"]
BACKENDS = ["native", "torch"]


def bnb_layer(kind: str, in_f=IN, out_f=OUT, bias=True, seed=0) -> nn.Module:
    """A bitsandbytes layer holding a random weight, quantized on the CPU (moved there)."""
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(out_f, in_f, generator=g) * 0.2, torch.randn(out_f, generator=g)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
    else:
        qt, nested = kind.split("-")[0], kind.endswith("nested")
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type=qt,
                                  compress_statistics=nested)
        layer.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type=qt, compress_statistics=nested)
    if bias:
        layer.bias = nn.Parameter(b, requires_grad=False)
    return layer.to("cpu")


def dense_of(layer: nn.Module) -> nn.Linear:
    """nn.Linear holding the bitsandbytes layer's dequantized weight (bit-exact with bitsandbytes) and bias."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    lin.weight = nn.Parameter(quant.from_bnb(layer).dequantize(torch.float32), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.data.float().clone(), requires_grad=False)
    return lin


RANKS = {0: 1, 1: 5, 2: 8}  # rank 1, a rank not a multiple of 16, the max rank; slot 3 stays empty


def fill(layer: lk.MultiLoRALinear, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    for slot, r in RANKS.items():
        layer.set_slot(slot, torch.randn(r, IN, generator=g) * 0.3, torch.randn(OUT, r, generator=g) * 0.3,
                       0.5 + slot)


def tokens(T: int, seed=2) -> torch.Tensor:
    """Slots of T tokens: every slot 0..2, the empty slot 3 and -1 (no adapter) mixed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 4, (T,), generator=g)


def ref_forward(layer: lk.MultiLoRALinear, x: torch.Tensor, ids: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    b = layer.base_layer.bias
    y = reference.multi_lora_linear_forward(x.reshape(-1, IN).double(), W.double(), None if b is None else b.double(),
                                            [a.double() for a in layer.A_stacks], [s.double() for s in layer.B_stacks],
                                            layer.scalings.double(), ids, layer.ranks)
    return y.view(*x.shape[:-1], OUT)


# ----------------------------------------------------------------------------------------------------
# Serving: MultiLoRALinear over a quantized base
# ----------------------------------------------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead", [(0,), (3,), (2, 5), (17,), (4, 6, "strided")],
                         ids=["M0", "M3", "lead2x5", "M17", "strided"])
@torch.no_grad()
def test_served_output_matches_reference_and_dense(kind, backend, lead):
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here (the C++ extension is not built)")
    base = bnb_layer(kind)
    layer = lk.MultiLoRALinear(base, max_loras=4, max_rank=8, backend=backend)
    twin = lk.MultiLoRALinear(dense_of(base), max_loras=4, max_rank=8, backend=backend)
    assert layer.quant_kind == ("8bit" if kind == "int8" else "4bit") and layer.lora_A_0.dtype == torch.float32
    assert "base=" + layer.quant_kind in repr(layer)
    fill(layer)
    fill(twin)
    strided = lead[-1] == "strided"
    shape = lead[:-1] if strided else lead
    x = torch.randn(*shape, 2 * IN if strided else IN, generator=torch.Generator().manual_seed(3))
    x = x[..., ::2] if strided else x  # non-contiguous rows
    T = x.numel() // IN
    ids = tokens(T)
    batch = lk.LoRABatch.from_token_adapters(ids, num_slots=4)
    for _ in range(2):  # the first call checks everything, the second takes the checked fast path
        y = layer(x, batch)
        W = quant.from_bnb(base).dequantize(torch.float32)
        want = ref_forward(layer, x, ids, W)
        assert y.shape == (*shape, OUT) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, rtol=RTOL, atol=ATOL)
        dense = twin(x, batch)
        if T > qlora.gemv_max_m() or backend != "native":
            # Dequantize-then-dense: the same dense GEMM on the bit-exact dequantized weight.
            assert torch.equal(y, dense)
        else:  # the native GEMV decodes W0 on the fly: same products, another summation order
            torch.testing.assert_close(y, dense, rtol=1e-6, atol=1e-5)
    if T:
        # The adapters change the output, so the comparison above can fail: no slot at all is the base alone.
        none = lk.LoRABatch.from_token_adapters(torch.full((T,), -1), num_slots=4)
        base_only = layer(x, none)
        torch.testing.assert_close(base_only.double(), (x.double() @ W.double().T + base.bias.double()),
                                   rtol=RTOL, atol=ATOL)
        has = (ids >= 0) & (ids <= 2)
        assert (y.reshape(T, OUT) - base_only.reshape(T, OUT))[has].abs().max() > 1e-2
        torch.testing.assert_close(layer(x), base_only, rtol=1e-6, atol=1e-5)  # no batch: the base layer


@needs_bnb
@pytest.mark.skipif("triton" not in available_backends("cpu"),
                    reason="Triton on CPU needs TRITON_INTERPRET=1 set before lora_kernels is imported")
@torch.no_grad()
def test_served_output_triton_backend():
    base = bnb_layer("nf4-nested")
    layer = lk.MultiLoRALinear(base, max_loras=4, max_rank=8, backend="triton")
    fill(layer)
    x = torch.randn(11, IN)
    ids = tokens(11)
    y = layer(x, lk.LoRABatch.from_token_adapters(ids, num_slots=4))
    want = ref_forward(layer, x, ids, quant.from_bnb(base).dequantize(torch.float32))
    torch.testing.assert_close(y.double(), want, rtol=RTOL, atol=ATOL)


@needs_bnb
@torch.no_grad()
def test_nan_in_x_is_not_hidden():
    layer = lk.MultiLoRALinear(bnb_layer("nf4"), max_loras=4, max_rank=8)
    fill(layer)
    x = torch.randn(5, IN)
    x[2, 7] = float("nan")
    y = layer(x, lk.LoRABatch.from_token_adapters(torch.tensor([0, 1, 2, -1, 0]), num_slots=4))
    assert y[2].isnan().all() and not y[[0, 1, 3, 4]].isnan().any()


# ----------------------------------------------------------------------------------------------------
# Joint training over a 4-bit base
# ----------------------------------------------------------------------------------------------------

TRAIN = {0: 3, 1: 5}  # trainable slots and their ranks; slot 2 is a served (frozen) adapter


def _train_layer(base):
    layer = lk.MultiLoRALinear(base, max_loras=4, max_rank=8)
    g = torch.Generator().manual_seed(5)
    params = {}
    for slot, r in TRAIN.items():
        params[slot] = layer.add_trainable(slot, torch.randn(r, IN, generator=g) * 0.3,
                                           torch.randn(OUT, r, generator=g) * 0.3, 0.5 + slot)
    layer.set_slot(2, torch.randn(4, IN, generator=g) * 0.3, torch.randn(OUT, 4, generator=g) * 0.3, 2.0)
    return layer.train(), params


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "nf4-nested", "fp4"])
def test_joint_training_gradients_match_reference_per_adapter(kind):
    base = bnb_layer(kind)
    layer, params = _train_layer(base)
    W = quant.from_bnb(base).dequantize(torch.float64)
    seq_slots, S = [0, 1, -1, 2, 0], 3  # 5 sequences of 3 tokens
    step = StepBatch.from_sequences(seq_slots, S)
    x = torch.randn(len(seq_slots), S, IN, generator=torch.Generator().manual_seed(6), requires_grad=True)
    gy = torch.randn(len(seq_slots), S, OUT, generator=torch.Generator().manual_seed(7))
    y = layer(x, step)
    (y * gy).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())  # the base stays frozen
    dx_want = torch.zeros(x.shape, dtype=torch.float64)
    for slot, (A, B) in params.items():
        rows = [b for b, s in enumerate(seq_slots) if s == slot]
        xr = x.detach()[rows].double().requires_grad_(True)
        A64, B64 = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
        yr, _ = reference.lora_linear_forward(xr, W, base.bias.double(), A64, B64, layer._host_scalings[slot])
        (yr * gy[rows].double()).sum().backward()
        torch.testing.assert_close(y.detach()[rows].double(), yr.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-5, atol=1e-4, msg=lambda m: f"dA {slot}: {m}")
        torch.testing.assert_close(B.grad.double(), B64.grad, rtol=1e-5, atol=1e-4, msg=lambda m: f"dB {slot}: {m}")
        assert A.grad.abs().max() > 1e-2 and B.grad.abs().max() > 1e-2
        dx_want[rows] = xr.grad
    # dx of the served slot's and the base-only rows: the base plus slot 2's frozen LoRA (its buffers).
    for b in (2, 3):
        xr = x.detach()[b:b + 1].double().requires_grad_(True)
        ids = torch.full((S,), 2 if seq_slots[b] == 2 else -1)
        yr = reference.multi_lora_linear_forward(xr[0], W, base.bias.double(), [layer.lora_A_0.double()],
                                                 [layer.lora_B_0.double()], layer.scalings.double(), ids,
                                                 layer.ranks)
        (yr * gy[b].double()).sum().backward()
        dx_want[b] = xr.grad[0]
    torch.testing.assert_close(x.grad.double(), dx_want, rtol=1e-5, atol=1e-4)


@needs_bnb
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_joint_training_equals_dense_twin(dropout):
    """With LoRA dropout: the same masks (one seed per step) as the layer over the dequantized dense weight, so
    outputs and every gradient are bit-identical (the same dense GEMMs; W0 dequantized again for dx)."""
    base = bnb_layer("nf4-nested")
    outs = []
    for b in (base, dense_of(base)):
        layer, params = _train_layer(b)
        torch.manual_seed(11)
        step = StepBatch.from_sequences([1, 0, -1, 1], 4, dropout_p=[dropout, dropout / 2, 0.0, 0.0])
        x = torch.randn(4, 4, IN, generator=torch.Generator().manual_seed(6), requires_grad=True)
        y = layer(x, step)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad] + [p.grad for slot in TRAIN for p in params[slot]])
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@needs_bnb
def test_step_without_adapters_in_this_layer_is_the_base():
    """A step whose slots are all empty in this layer runs the base alone (dx through W0 dequantized again)."""
    base = bnb_layer("fp4")
    outs = []
    for b in (base, dense_of(base)):
        layer, _ = _train_layer(b)
        x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(6), requires_grad=True)
        y = layer(x, StepBatch.from_sequences([3, -1], 3))  # slot 3: no adapter
        (y * torch.arange(OUT)).sum().backward()
        outs.append((y.detach(), x.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# MultiLoRAModel over a tiny Llama quantized to NF4 on the CPU vs. PEFT's own 4-bit model
# ----------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the PEFT comparisons need `peft`")
from conftest import LLAMA_ADAPTERS, LLAMA_LINEAR, llama_inputs, save_peft_adapter, tiny_llama  # noqa: E402
from lora_kernels.serving import MultiLoRAModel  # noqa: E402

ALL_LINEAR = LLAMA_LINEAR
ADAPTERS = LLAMA_ADAPTERS


def _tiny_llama(seed=0):
    # in % 64 == 0 for every projection: bitsandbytes 0.50's CPU 4-bit kernels (what PEFT runs) misplace the scales
    # of blocks that cross rows (rel. RMS error 0.36 in these logits at hidden 96); odd shapes are tested above.
    return tiny_llama(64, seed)


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Every nn.Linear but the LM head replaced by a bitsandbytes NF4 Linear4bit (nested absmax) holding the
    same weight, quantized on the CPU; marked as PEFT expects a 4-bit model to be."""
    head = model.get_output_embeddings()
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or m is head:
            continue
        new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32,
                                quant_type="nf4", compress_statistics=True)
        new.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.to("cpu"))
    model.is_loaded_in_4bit = True
    return model


def dequantized_copy(qmodel: nn.Module) -> nn.Module:
    """The quantized model with every Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    dense = copy.deepcopy(qmodel)
    for name, m in list(dense.named_modules()):
        if quant.bnb_kind(m) and isinstance(m, nn.Module) and hasattr(m, "in_features"):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, dense_of(m))
    return dense


@pytest.fixture(scope="module")
def qsetup(tmp_path_factory):
    if bnb is None:
        pytest.skip("quantized bases need bitsandbytes: pip install 'lora_kernels[qlora]'")
    base = _tiny_llama()
    root = tmp_path_factory.mktemp("qadapters")
    paths = {name: save_peft_adapter(base, root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(ADAPTERS.items())}
    qbase = quantize_nf4(copy.deepcopy(base))
    # PEFT's own model per adapter over (a copy of) the same 4-bit model: lora.Linear4bit over bitsandbytes' matmul.
    peft_models = {n: peft.PeftModel.from_pretrained(copy.deepcopy(qbase), str(p)).eval() for n, p in paths.items()}
    assert type(peft_models["b"].base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    return qbase, paths, peft_models


def _bnb_cpu_bf16() -> bool:
    """Whether bitsandbytes' CPU 4-bit matmul runs in bfloat16 here (its AVX512-BF16 path)."""
    try:
        from bitsandbytes.nn.modules import has_avx512bf16
        return bool(has_avx512bf16())
    except ImportError:  # an internal name: assume the reduced-precision path when it moved
        return True


PEFT_BOUND = 5e-2 if bnb is not None and _bnb_cpu_bf16() else 1e-5  # see the comment at its use


def rel_rms(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@torch.no_grad()
def test_multi_lora_model_over_nf4_matches_peft_per_sequence(qsetup):
    qbase, paths, peft_models = qsetup
    mm = MultiLoRAModel(copy.deepcopy(qbase), max_loras=4, max_rank=8)
    assert len(mm.layers) == 2 * len(ALL_LINEAR) and all(l.quant_kind == "4bit" for l in mm.layers.values())
    twin = MultiLoRAModel(dequantized_copy(qbase), max_loras=4, max_rank=8)
    assert not any(l.quant_kind for l in twin.layers.values())
    for name, p in paths.items():
        mm.load_adapter(name, p)
        twin.load_adapter(name, p)
    ids, mask = llama_inputs()
    names = ["a", None, "c", "b"]
    out = mm(ids, attention_mask=mask, adapter_names=names).logits
    valid = mask.bool()
    # Ours against the same model over the dequantized weights (dequantize-then-dense): 28 tokens, bit-exact
    # weights; the native GEMV where this machine measured it faster than the GEMM (qlora.gemv_max_m()), so
    # float32 summation order apart (measured 1.5e-6 at most on logits of ~1).
    dense = twin(ids, attention_mask=mask, adapter_names=names).logits
    torch.testing.assert_close(out[valid], dense[valid], rtol=1e-5, atol=1e-5)
    plain = mm(ids, attention_mask=mask).logits  # no adapter: our base alone
    # bitsandbytes' own base for the rows without an adapter, on a copy: on CPUs with AVX512-BF16 an eval-mode
    # call repacks the weight in place (a layout MultiLoRALinear refuses), and qbase is shared by the tests.
    bnb_base = copy.deepcopy(qbase)
    for b, name in enumerate(names):
        model = bnb_base if name is None else peft_models[name]
        want = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
        # PEFT's base is bitsandbytes' CPU matmul_4bit, not x deq(W0)ᵀ in float32. On CPUs without AVX512-BF16
        # it dequantizes and runs a float32 GEMM: measured rel. RMS error of PEFT's logits against ours
        # 2e-7 .. 1.2e-6 per sequence (Intel Xeon). With AVX512-BF16 it repacks the weight and computes in
        # bfloat16 through both layers: measured 1e-3 .. 2.04e-2 per sequence (AMD EPYC), bound 2.5x that. The
        # adapters move the logits by a rel. RMS of 1.1 .. 1.5 (asserted > 5e-2 below), so a wrong or missing
        # adapter cannot pass either bound.
        err = rel_rms(out[b][valid[b]], want[valid[b]])
        assert err < PEFT_BOUND, (name, err)
        if name is not None:
            assert rel_rms(out[b][valid[b]], plain[b][valid[b]]) > 5e-2, name
    # No adapter at all: the quantized base alone, again the dense twin's.
    torch.testing.assert_close(plain, twin(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_multi_lora_model_over_nf4_generates_like_dense_twin(qsetup):
    """Greedy decoding: one token per sequence per step (4 tokens: the native GEMV decoding W0 on the fly)."""
    qbase, paths, _ = qsetup
    mm = MultiLoRAModel(copy.deepcopy(qbase), max_loras=4, max_rank=8)
    twin = MultiLoRAModel(dequantized_copy(qbase), max_loras=4, max_rank=8)
    for name, p in paths.items():
        mm.load_adapter(name, p)
        twin.load_adapter(name, p)
    ids, mask = llama_inputs()
    names = ["b", "a", None, "c"]
    kw = dict(attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    got, want = mm.generate(ids, **kw), twin.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for s_got, s_want in zip(got.scores, want.scores):
        torch.testing.assert_close(s_got, s_want, rtol=1e-5, atol=1e-5)


def test_multi_lora_model_over_nf4_trains_like_dense_twin(qsetup):
    """Joint training of two adapters over the 4-bit model: loss and every gradient equal the dense twin's."""
    qbase, _, _ = qsetup
    grads = []
    for model in (copy.deepcopy(qbase), dequantized_copy(qbase)):
        mm = MultiLoRAModel(model, max_loras=4, max_rank=8)
        torch.manual_seed(1)
        mm.add_adapter("x", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        mm.add_adapter("y", dict(r=3, lora_alpha=6, target_modules="all-linear", lora_dropout=0.1,
                                 init_lora_weights=False))
        mm.train()
        ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(4))
        torch.manual_seed(2)
        out = mm(ids, adapter_names=["x", "y", None], labels=ids)
        out.loss.backward()
        grads.append([out.loss.detach()] + [p.grad for n in ("x", "y") for p in mm.parameters_of(n)])
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert len(grads[0]) == 1 + 2 * 4 + 2 * 14  # x: q, v of 2 layers; y: all 7 linears of 2 layers
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------

def test_unsupported_base_names_what_is_accepted():
    with pytest.raises(TypeError, match=r"nn\.Linear, or a bitsandbytes Linear4bit \(nf4 / fp4\) or Linear8bitLt"):
        lk.MultiLoRALinear(nn.Conv1d(4, 4, 1), max_loras=2, max_rank=2)
    with pytest.raises(TypeError, match="got Embedding"):
        lk.MultiLoRALinear(nn.Embedding(4, 4), max_loras=2, max_rank=2)


@needs_bnb
def test_quantized_base_refusals():
    with pytest.raises(ValueError, match="not quantized yet"):  # never moved to its device
        lk.MultiLoRALinear(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32), max_loras=2, max_rank=2)
    layer = lk.MultiLoRALinear(bnb_layer("nf4"), max_loras=2, max_rank=4)
    # DoRA slots are supported over a quantized base (tests/test_quant_dora.py); a bad magnitude is refused.
    with pytest.raises(ValueError, match=r"magnitude must be a floating-point tensor of shape \[out=72\]"):
        layer.set_slot(0, torch.randn(2, IN), torch.randn(OUT, 2), 1.0, magnitude=torch.ones(OUT - 1))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., in=100\]"):
        layer(torch.randn(3, 99), lk.LoRABatch.from_token_adapters(torch.tensor([0, 1, -1]), num_slots=2))
    with pytest.raises(ValueError, match="bias requires grad"):
        layer.base_layer.bias.requires_grad_(True)
        layer.set_slot(0, torch.randn(2, IN), torch.randn(OUT, 2), 1.0)
        layer(torch.randn(3, IN, requires_grad=True),
              lk.LoRABatch.from_token_adapters(torch.tensor([0, 1, -1]), num_slots=2))
