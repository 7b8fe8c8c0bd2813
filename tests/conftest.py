import os
import tempfile

import pytest
import torch

import lora_kernels

# Relative error bounds vs. the float64 reference, by the dtype of the activations. fp32 is tight;
# 16-bit inputs are rounded to their mantissa (8 bits for bf16, 11 for fp16) before any kernel sees them.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Elementwise |out - ref| <= tol * (|ref| + max|ref|), a relative-norm bound, and no NaN/inf."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten or NaN)"
    if ref.numel() == 0:
        return
    tol = TOL[dtype]
    scale = ref.abs().max().item()
    err = (out64 - ref).abs()
    bad = err > tol * (ref.abs() + scale)
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements off, max err {err.max().item():.3e} "
                           f"at scale {scale:.3e} (tol {tol})")
    rel = ((out64 - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    assert rel <= tol, f"{name}: relative error {rel:.3e} > {tol}"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): their GEMMs gain
    nothing from intra-op threads, which only add synchronisation and stall badly on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cuda_param(value="cuda"):
    return pytest.param(value, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")])


# Every linear projection of a Llama block: the target_modules of the serving tests' adapters.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The serving tests' three PEFT adapters: different ranks and targets, rsLoRA, rank / alpha patterns.
LLAMA_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR, use_rslora=True),
    "c": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj", "gate_proj"], rank_pattern={"down_proj": 6},
              alpha_pattern={"gate_proj": 10}),
}


def tiny_llama(hidden: int = 64, seed: int = 0, vocab: int = 128):
    """A random-init 2-layer Llama (eval mode) for the serving / adapter tests: hidden -> 2 * hidden MLP, 4 heads,
    2 KV heads (needs transformers)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_inputs():
    """(input_ids [4, 7], attention_mask) for tiny_llama: fixed tokens, sequence 1 left-padded by 2."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 128, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def save_peft_adapter(base, path, seed: int, safe: bool = True, **cfg):
    """A PEFT LoRA adapter of `cfg` over a copy of `base`, with random lora_B (PEFT starts B at 0, which would
    leave the output unchanged) and DoRA magnitudes moved off their initial norm (so g ≠ 1), saved to `path`
    (safetensors, or .bin with safe=False); returns path."""
    import copy

    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    model.save_pretrained(str(path), safe_serialization=safe)
    return path


def require_backend(backend: str, device: str) -> None:
    if backend not in lora_kernels.available_backends(device):
        why = {"triton": "Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)",
               "native": "the lora_kernels._C extension is not built"}.get(backend, "")
        pytest.skip(f"backend {backend!r} not available on {device}: {why}")


# ---------------------------------------------------------------------------------------------------
# Hypothesis profiles for the property tests (tests/test_properties.py and friends).
#   default "ci": derandomized (the same examples every run, so CI cannot flake on a new seed), no example
#       database, sized to CI's budget.
#   LORA_KERNELS_HYPOTHESIS_PROFILE=long: LONG_FACTOR times the examples, fresh random seeds, failures saved
#       in a database under the temp dir (replayed first next time) and printed with @reproduce_failure.
# Every profile prints the shrunk falsifying example. Tests size themselves with hypothesis_examples(n).
# ---------------------------------------------------------------------------------------------------
HYPOTHESIS_PROFILE = os.environ.get("LORA_KERNELS_HYPOTHESIS_PROFILE", "ci")
LONG_FACTOR = 25
try:
    import hypothesis
except ImportError:  # the `test` extra installs it; the property tests importorskip it
    hypothesis = None
if hypothesis is not None:
    _common = dict(deadline=None, print_blob=True,
                   suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
    hypothesis.settings.register_profile("ci", derandomize=True, database=None, **_common)
    hypothesis.settings.register_profile("long", database=hypothesis.database.DirectoryBasedExampleDatabase(
        os.path.join(tempfile.gettempdir(), "lora_kernels_hypothesis")), **_common)
    hypothesis.settings.load_profile(HYPOTHESIS_PROFILE)


def hypothesis_examples(n: int) -> int:
    """Examples for a property test that runs n of them under the default profile."""
    return n * LONG_FACTOR if HYPOTHESIS_PROFILE == "long" else n


# ---------------------------------------------------------------------------------------------------
# `nightly`: tests too long or too large for CI (minutes, several GB), e.g. tests/test_large_index.py and the
# 10,000-forward leak test. Skipped with a reason unless LORA_KERNELS_NIGHTLY=1; run them with
#   LORA_KERNELS_NIGHTLY=1 TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -ra -m nightly tests
# ---------------------------------------------------------------------------------------------------
NIGHTLY = os.environ.get("LORA_KERNELS_NIGHTLY") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "nightly: long / large tests, skipped unless LORA_KERNELS_NIGHTLY=1")


def pytest_collection_modifyitems(config, items):
    if NIGHTLY:
        return
    skip = pytest.mark.skip(reason="nightly test (minutes, GBs of memory): set LORA_KERNELS_NIGHTLY=1 to run it")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)
