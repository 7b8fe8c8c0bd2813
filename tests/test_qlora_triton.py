"""The Triton 4-bit kernels (lora_kernels/kernels/qlora.py): the dequantize kernel against the reference
dequantization (bit-exact; bf16 within one ulp under the interpreter, which truncates fp32 -> bf16 where a GPU
rounds), and the fused W4A16 GEMM with the LoRA epilogue against the float64 reference on the dequantized weight.
Outputs start as NaN (poisoned), so an element a kernel fails to write fails the test. Quantized weights are built
directly (random codes and scales, nested or not), so no bitsandbytes is needed; tests/test_qlora.py checks the
reference itself against bitsandbytes."""
import pytest
import torch

from conftest import assert_close_to_ref

triton = pytest.importorskip("triton", reason="these tests run the Triton kernels")

from lora_kernels import quant  # noqa: E402
from lora_kernels.backends import TRITON_INTERPRETED  # noqa: E402
from lora_kernels.kernels import lora_linear as klk, qlora as kq  # noqa: E402
from lora_kernels.ops.qlora import qlora_linear  # noqa: E402

pytestmark = pytest.mark.skipif(not (TRITON_INTERPRETED or torch.cuda.is_available()),
                                reason="runs Triton kernels: needs a GPU or TRITON_INTERPRET=1 (CPU)")
DEVICE = "cpu" if TRITON_INTERPRETED else "cuda"
DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.float16, torch.bfloat16)]
# in % 64 != 0 (blocks cross rows), an odd value count (a padding nibble), one value, > 256 blocks (nested groups).
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in ((64, 128), (37, 90), (5, 7), (1, 1), (300, 65))]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(klk, "POISON_OUTPUTS", True)


def make_qweight(shape, quant_type="nf4", nested=False, dtype=torch.float32, seed=0) -> quant.QuantWeight:
    """A valid 4-bit weight of random codes and scales (every code, a spread of scales)."""
    g = torch.Generator().manual_seed(seed)
    fmt = quant.QuantFormat(quant_type, shape, dtype, nested=nested)
    nb = fmt.num_blocks
    codes = torch.randint(0, 256, (-(-fmt.numel // 2),), generator=g, dtype=torch.uint8)
    if not nested:
        qw = quant.QuantWeight(fmt, codes, torch.rand(nb, generator=g) * 2 + 0.1)
    else:
        nb2 = -(-nb // fmt.nested_blocksize)
        qw = quant.QuantWeight(fmt, codes, torch.randint(0, 256, (nb,), generator=g, dtype=torch.uint8),
                               torch.rand(nb2, generator=g) + 0.5, torch.randn(256, generator=g).sort().values,
                               torch.tensor([0.37]))
    quant.check_quant_weight(*qw)
    return quant.QuantWeight(qw.fmt, *(t.to(DEVICE) if t is not None else None for t in qw.tensors()))


def assert_equal_or_one_ulp(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN (an unwritten element)"
    if dtype == torch.bfloat16 and TRITON_INTERPRETED:
        # The interpreter truncates fp32 -> bf16; the reference rounds: at most one bf16 ulp apart.
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert ((got.float() - want.float()).abs() <= ulp).all()
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_reference(quant_type, nested, shape, dtype):
    qw = make_qweight(shape, quant_type, nested, dtype)
    want = qw.dequantize()
    assert_equal_or_one_ulp(kq.dequantize_triton(qw), want, dtype)
    # and to another output dtype (the format's dtype first, then the cast, as the reference)
    assert_equal_or_one_ulp(kq.dequantize_triton(qw, torch.float16), qw.dequantize(torch.float16),
                            dtype if dtype == torch.bfloat16 else torch.float16)


def reference_y(x, qw, bias, A, B, scaling):
    W = qw.dequantize(x.dtype).double()
    y = x.double() @ W.t() + scaling * (x.double() @ A.double().t()) @ B.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 17])
@pytest.mark.parametrize("R", [1, 3, 16])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_fused_gemm_matches_reference(has_bias, R, M, dtype):
    shape = (70, 90)  # in % 64 != 0: scale blocks cross rows inside the BLOCK_K tiles
    qw = make_qweight(shape, "nf4" if R != 3 else "fp4", nested=R != 1, dtype=torch.float32, seed=R)
    torch.manual_seed(M + R)
    x = torch.randn(M, 2 * shape[1], dtype=dtype, device=DEVICE)[:, ::2]  # non-contiguous
    A = torch.randn(R, shape[1], dtype=dtype, device=DEVICE) / 8
    B = torch.randn(shape[0], R, dtype=dtype, device=DEVICE) / 8
    bias = torch.randn(shape[0], dtype=dtype, device=DEVICE) if has_bias else None
    y, S = kq.qlora_linear_fwd_triton(x, qw, bias, A, B, 0.75, 0.0, None)
    assert y.dtype == dtype and y.shape == (M, shape[0])
    assert_close_to_ref(y, reference_y(x, qw, bias, A, B, 0.75), dtype, "y")


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 17])
@pytest.mark.parametrize("R", [1, 3, 16])
def test_fused_backward_matches_reference(R, M, dtype, dropout):
    """dx = G deq(W0) + (dS A) ⊙ m / (1-p) by the W4A16 GEMM reading W0 transposed (no dense copy), dA and dB,
    against lora_linear's torch backward in float64 on the dequantized weight with the same dropout seed."""
    from lora_kernels.dropout import new_seed
    from lora_kernels.ops import lora_linear as lora_ops
    from lora_kernels.ops.plumbing import seed_tensor

    shape = (70, 90)  # in % 64 != 0: scale blocks cross rows inside the transposed tiles too
    qw = make_qweight(shape, "nf4" if R != 3 else "fp4", nested=R != 1, dtype=torch.float32, seed=R)
    torch.manual_seed(M + R)
    x = torch.randn(M, shape[1], dtype=dtype, device=DEVICE)
    G = torch.randn(M, 2 * shape[0], dtype=dtype, device=DEVICE)[:, ::2]  # non-contiguous dy
    A = torch.randn(R, shape[1], dtype=dtype, device=DEVICE) / 8
    B = torch.randn(shape[0], R, dtype=dtype, device=DEVICE) / 8
    seed = seed_tensor(new_seed()) if dropout else None
    seed_int = None if seed is None else int(seed.item())
    _, S = kq.qlora_linear_fwd_triton(x, qw, None, A, B, 0.75, dropout, seed_int)
    dx, dA, dB = kq.qlora_linear_bwd_triton(G, x, qw, A, B, S, 0.75, dropout, seed_int, True, True, True)
    want = lora_ops.torch_bwd(G.double(), x.double(), qw.dequantize(dtype).double(), A.double(), B.double(),
                              S.double(), 0.75, dropout, seed, True, True, True)
    for name, got, ref in zip(("dx", "dA", "dB"), (dx, dA, dB), want):
        assert got.dtype == dtype
        assert_close_to_ref(got, ref, dtype, name)


@pytest.mark.parametrize("config", kq.gemm_configs(64, 2), ids=str)
def test_every_shipped_16bit_config(config):
    shape = (130, 200)
    # fmt dtype float16: a bfloat16 one rounds differently under the interpreter (truncation, see above)
    qw = make_qweight(shape, "nf4", nested=True, dtype=torch.float16)
    x = torch.randn(33, shape[1], dtype=torch.float16, device=DEVICE)
    A = torch.randn(16, shape[1], dtype=torch.float16, device=DEVICE) / 8
    B = torch.randn(shape[0], 16, dtype=torch.float16, device=DEVICE) / 8
    y, _ = kq.qlora_linear_fwd_triton(x, qw, None, A, B, 0.5, 0.0, None, gemm_config=config)
    assert_close_to_ref(y, reference_y(x, qw, None, A, B, 0.5), torch.float16, str(config))


def test_split_k_and_an_unwritten_output_fails(monkeypatch):
    """The split-K path (partials summed after) is right, and a skipped launch leaves NaN the check catches."""
    shape = (40, 2048)
    qw = make_qweight(shape, "nf4", nested=True)
    x = torch.randn(1, shape[1], device=DEVICE)
    A, B = torch.randn(4, shape[1], device=DEVICE) / 8, torch.randn(shape[0], 4, device=DEVICE) / 8
    launches, y, _ = kq.plan_fwd(x, qw, None, A, B, 1.0, 0.0, None, False)
    assert launches[-1].kernel_name() == "_sum_splits_kernel", "expected a K-split at this shape"
    klk._run(launches)
    assert_close_to_ref(y, reference_y(x, qw, None, A, B, 1.0), torch.float32, "split-K y")
    launches, y, _ = kq.plan_fwd(x, qw, None, A, B, 1.0, 0.0, None, False)
    klk._run([launch for launch in launches if launch.kernel_name() != "_sum_splits_kernel"])
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_ref(y, reference_y(x, qw, None, A, B, 1.0), torch.float32, "unsummed y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_op_triton_backend_forward_and_grads(dtype):
    """qlora_linear(backend="triton"): the fused forward and backward (no dense W0) against the "torch" backend."""
    shape = (48, 72)
    qw = make_qweight(shape, "nf4", nested=True, dtype=torch.float16)
    torch.manual_seed(1)
    x = torch.randn(5, shape[1], dtype=dtype, device=DEVICE, requires_grad=True)
    A = (torch.randn(4, shape[1], dtype=dtype, device=DEVICE) / 8).requires_grad_()
    B = (torch.randn(shape[0], 4, dtype=dtype, device=DEVICE) / 8).requires_grad_()
    grads = []
    for backend in ("triton", "torch"):
        y = qlora_linear(x, qw, None, A, B, 0.5, backend=backend)
        g = torch.autograd.grad(y.float().square().sum(), (x, A, B))
        grads.append((y, *g))
    for name, got, want in zip(("y", "dx", "dA", "dB"), grads[0], grads[1]):
        assert_close_to_ref(got, want, dtype, name)
