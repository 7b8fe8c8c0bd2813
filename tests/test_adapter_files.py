"""Hostile and broken adapter files against MultiLoRAModel.load_adapter: every one must raise a clear error
naming the file and the problem, read no tensor data before the header has been checked, and leave every
slot (and the slot table) bit-identical. Serving treats adapter files as untrusted input."""
from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
import struct

import pytest
import torch

pytest.importorskip("transformers", reason="MultiLoRAModel tests need `transformers`")
peft = pytest.importorskip("peft", reason="the tests save real PEFT adapters")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="PEFT adapters are saved as safetensors")

import safetensors  # noqa: E402

from lora_kernels import serving  # noqa: E402
from lora_kernels.serving import adapter_files  # noqa: E402
from lora_kernels.serving import AdapterError, MultiLoRAModel  # noqa: E402

from test_serving import _save_adapter, _tiny_llama  # noqa: E402

ST, BIN, CFG = serving.SAFETENSORS_NAME, serving.BIN_NAME, serving.CONFIG_NAME
TARGETS = ["q_proj", "v_proj"]
Q = "base_model.model.model.layers.0.self_attn.q_proj"  # a module of the adapter, as PEFT names its keys


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(base model, a valid rank-4 PEFT adapter directory on q/v_proj)."""
    base = _tiny_llama()
    path = _save_adapter(base, tmp_path_factory.mktemp("good") / "a", seed=0, r=4, lora_alpha=8,
                         target_modules=TARGETS)
    return base, path


@pytest.fixture
def mm(good):
    """Every slot taken, so a failed load that evicted anything would show."""
    base, path = good
    m = MultiLoRAModel(copy.deepcopy(base), max_loras=2, max_rank=8, target_modules=TARGETS, backend="torch")
    m.load_adapter("a", path)
    m.load_adapter("b", path)
    return m


def snapshot(m):
    """Raw bytes of every slot buffer, and the slot table."""
    bufs = {f"{n}.{b}": t.detach().clone().contiguous().view(torch.uint8) for n, l in m.layers.items()
            for b, t in l.named_buffers()}
    st = m._store
    return bufs, (dict(st.slots), list(st.slot_names), dict(st.last_used), dict(st.pins), dict(st.sources),
                  list(st.host), st.stats())


def assert_unchanged(m, snap):
    bufs, table = snap
    now_bufs, now_table = snapshot(m)
    assert now_table == table, "the slot table changed"
    for k, t in bufs.items():
        assert torch.equal(now_bufs[k], t), f"slot buffer {k} changed"


def copy_adapter(src, dst, state=None, cfg=None, fmt="safetensors"):
    """A copy of adapter dir `src` with its tensors edited by state(dict) and its config by cfg(dict)."""
    dst.mkdir()
    config = json.loads((src / CFG).read_text())
    if cfg:
        cfg(config)
    (dst / CFG).write_text(json.dumps(config))
    tensors = safetensors_torch.load_file(str(src / ST))
    if state:
        state(tensors)
    if fmt == "safetensors":
        safetensors_torch.save_file(tensors, str(dst / ST))
    else:
        torch.save(tensors, str(dst / BIN))
    return dst


def expect(m, path, exc, *patterns, name="new"):
    """load_adapter(path) raises exc whose message matches every pattern; nothing changes."""
    snap = snapshot(m)
    with pytest.raises(exc) as info:
        m.load_adapter(name, path)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in: {msg}"
    assert_unchanged(m, snap)
    return msg


class SpySafeOpen:
    """safetensors.safe_open that records which tensors' data were read."""

    reads: list = []

    def __init__(self, *args, **kwargs):
        self._f = _REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._inner = self._f.__enter__()
        return self

    def __exit__(self, *a):
        return self._f.__exit__(*a)

    def keys(self):
        return self._inner.keys()

    def get_slice(self, k):
        return self._inner.get_slice(k)

    def get_tensor(self, k):
        SpySafeOpen.reads.append(k)
        return self._inner.get_tensor(k)


_REAL_SAFE_OPEN = safetensors.safe_open


@pytest.fixture
def spy(monkeypatch):
    SpySafeOpen.reads = []
    monkeypatch.setattr(safetensors, "safe_open", SpySafeOpen)
    return SpySafeOpen


def _edit(key_suffix, fn):
    """State editor: replace the tensor whose key ends with key_suffix by fn(tensor)."""
    def edit(t):
        k = next(k for k in t if k.endswith(key_suffix))
        t[k] = fn(t[k])
    return edit


# ------------------------------------------------------------------------------------ header problems
# Each is detectable from the safetensors header alone: no tensor data may be read.

HEADER_CASES = {
    "wrong_in": (_edit("q_proj.lora_A.weight", lambda a: torch.randn(4, 65)),
                 [r"incompatible shapes in \S*adapter_model\.safetensors for '.*q_proj'", r"A \(4, 65\)",
                  r"A \[r, 64\]"]),
    "wrong_out": (_edit("v_proj.lora_B.weight", lambda b: torch.randn(b.shape[0] + 1, 4)),
                  [r"incompatible shapes in \S*adapter_model\.safetensors for '.*v_proj'"]),
    "rank_mismatch_AB": (_edit("q_proj.lora_B.weight", lambda b: b[:, :3].contiguous()),
                         [r"incompatible shapes.*A \(4, 64\), B \(64, 3\)"]),
    "one_dim": (_edit("q_proj.lora_A.weight", lambda a: a.flatten()), [r"incompatible shapes.*A \(256,\)"]),
    "three_dim": (_edit("q_proj.lora_A.weight", lambda a: a[None]), [r"incompatible shapes.*A \(1, 4, 64\)"]),
    "rank_zero": (_edit("q_proj.lora_A.weight", lambda a: a[:0]), [r"incompatible shapes|rank 0"]),
    "missing_B": (lambda t: t.pop(f"{Q}.lora_B.weight"),
                  [r"adapter_model\.safetensors: module '.*q_proj' has lora_B missing"]),
    "missing_A": (lambda t: t.pop(f"{Q}.lora_A.weight"), [r"has lora_A missing"]),
    "duplicate_A": (lambda t: t.update({f"{Q}.lora_A.other.weight": t[f"{Q}.lora_A.weight"].clone()}),
                    [r"two lora_A tensors for module '.*q_proj'"]),
    "not_lora": (lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
                 [r"adapter_model\.safetensors: unsupported tensor 'base_model\.model\.lm_head\.weight'"]),
    "unknown_module": (lambda t: t.update({k.replace("q_proj", "k_proj"): v.clone() for k, v in list(t.items())}),
                       [r"incompatible target modules: the adapter in \S*adapter_model\.safetensors targets "
                        r"\['model\.layers\.0\.self_attn\.k_proj'"]),
    "empty": (lambda t: t.clear(), [r"holds no LoRA weights"]),
    "rank_above_max": (lambda t: t.update({f"{Q}.lora_A.weight": torch.randn(9, 64),
                                           f"{Q}.lora_B.weight": torch.randn(64, 9)}),
                       [r"adapter_model\.safetensors: rank r=9 of '.*q_proj' exceeds max_rank=8"]),
}
DTYPES = {"int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
          "complex64": torch.complex64}
for _n in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _n):
        DTYPES[_n] = getattr(torch, _n)
for _n, _dt in DTYPES.items():
    HEADER_CASES[f"dtype_{_n}"] = (_edit("v_proj.lora_A.weight", lambda a, dt=_dt: a.to(dt)),
                                   [r"adapter_model\.safetensors: tensor '.*v_proj\.lora_A\.weight' has dtype",
                                    "cannot be cast", "float16, bfloat16, float32 or float64"])


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_problems_read_no_data(mm, good, tmp_path, spy, case):
    edit, patterns = HEADER_CASES[case]
    path = copy_adapter(good[1], tmp_path / case, state=edit)
    expect(mm, path, AdapterError, *patterns)
    assert spy.reads == [], f"tensor data read before the header was rejected: {spy.reads}"


@pytest.mark.parametrize("case", ["wrong_in", "missing_B", "dtype_int32", "dtype_complex64", "rank_above_max"])
def test_header_problems_in_bin_files(mm, good, tmp_path, case):
    edit, patterns = HEADER_CASES[case]
    path = copy_adapter(good[1], tmp_path / case, state=edit, fmt="bin")
    expect(mm, path, AdapterError, *[p.replace(r"adapter_model\.safetensors", r"adapter_model\.bin") for p in patterns])


def test_valid_adapter_reads_only_its_tensors(mm, good, spy):
    """The spy sees reads at all (so the tests above can fail), and only of LoRA A/B tensors."""
    mm.load_adapter("a", good[1])
    assert len(spy.reads) == 8 and all(".lora_" in k for k in spy.reads)


# ------------------------------------------------------------------------------------ broken files

@pytest.mark.parametrize("cut", ["8_bytes", "mid_header", "mid_data", "one_byte_short", "empty"])
def test_truncated_safetensors(mm, good, tmp_path, cut):
    data = (good[1] / ST).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    n = {"8_bytes": 8, "mid_header": 8 + header_len // 2, "mid_data": (8 + header_len + len(data)) // 2,
         "one_byte_short": len(data) - 1, "empty": 0}[cut]
    path = copy_adapter(good[1], tmp_path / cut)
    (path / ST).write_bytes(data[:n])
    expect(mm, path, AdapterError, r"corrupt adapter weights in \S*adapter_model\.safetensors: SafetensorError")


def test_header_claiming_huge_tensor(mm, good, tmp_path):
    """A header that claims 16 TiB of data in a tiny file fails on the header, allocating nothing."""
    header = json.dumps({f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [4, 2**40],
                                                 "data_offsets": [0, 16 * 2**40]}}).encode()
    path = copy_adapter(good[1], tmp_path / "huge")
    (path / ST).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    expect(mm, path, AdapterError, r"corrupt adapter weights in \S*adapter_model\.safetensors")


def test_garbage_header_length(mm, good, tmp_path):
    path = copy_adapter(good[1], tmp_path / "garbage")
    (path / ST).write_bytes(struct.pack("<Q", 2**63) + b"{}")
    expect(mm, path, AdapterError, r"corrupt adapter weights in \S*adapter_model\.safetensors")


def test_file_larger_than_any_adapter(mm, good, tmp_path):
    """Checked on the file size alone (a sparse file: no disk space, and nothing is read)."""
    path = copy_adapter(good[1], tmp_path / "big")
    with open(path / ST, "r+b") as f:
        f.truncate(1 << 30)
    expect(mm, path, AdapterError, r"adapter_model\.safetensors: 1073741824 bytes, larger than any adapter this "
                                   r"model can hold at max_rank=8")


# ------------------------------------------------------------------------------------ configs

CONFIG_CASES = {
    "r_huge": (lambda c: c.update(r=10**12), r"config says 1000000000000"),
    "r_zero": (lambda c: c.update(r=0), r"r must be a positive int, got 0"),
    "r_negative": (lambda c: c.update(r=-4), r"r must be a positive int, got -4"),
    "r_float": (lambda c: c.update(r=4.5), r"r must be a positive int, got 4\.5"),
    "r_string": (lambda c: c.update(r="4"), r"r must be a positive int, got '4'"),
    "r_bool": (lambda c: c.update(r=True), r"r must be a positive int, got True"),
    "r_nan": (lambda c: c.update(r=float("nan")), r"r must be a positive int, got nan"),
    "alpha_huge": (lambda c: c.update(lora_alpha=1e308),
                   r"scaling lora_alpha / r = 2\.5e\+307 .* not a finite float32"),
    "alpha_above_fp32": (lambda c: c.update(lora_alpha=4e39), r"not a finite float32"),
    "alpha_nan": (lambda c: c.update(lora_alpha=float("nan")), r"lora_alpha must be a positive number, got nan"),
    "alpha_inf": (lambda c: c.update(lora_alpha=float("inf")), r"lora_alpha must be a positive number, got inf"),
    "alpha_zero": (lambda c: c.update(lora_alpha=0), r"lora_alpha must be a positive number, got 0"),
    "rank_pattern_huge": (lambda c: c.update(rank_pattern={"q_proj": 10**12}), r"config says 1000000000000"),
    "rank_pattern_bad": (lambda c: c.update(rank_pattern={"q_proj": "x"}),
                         r"rank_pattern\['q_proj'\] must be a positive int"),
    "rank_pattern_not_dict": (lambda c: c.update(rank_pattern=[1]), r"rank_pattern must be an object"),
    "alpha_pattern_nan": (lambda c: c.update(alpha_pattern={"v_proj": float("nan")}),
                          r"alpha_pattern\['v_proj'\] must be a positive number, got nan"),
    "pattern_bad_regex": (lambda c: c.update(alpha_pattern={"(": 2}),
                          r"alpha_pattern key '\(' is refused: not a valid"),
    # Keys that make Python's backtracking `re` take exponential time on a module name (a hung load before).
    "redos_nested": (lambda c: c.update(rank_pattern={"(.*)*X": 4}), r"rank_pattern key .* refused: a repetition "
                                                                       r"inside a repetition"),
    "redos_alternation": (lambda c: c.update(alpha_pattern={"(a|aa)*X": 4}), r"an alternation inside a repetition"),
    "redos_many_repeats": (lambda c: c.update(alpha_pattern={".*.*.*.*.*.*.*.*.*X": 4}),
                           r"more than 2 variable-length repeats"),
    "redos_fixed_repeat": (lambda c: c.update(rank_pattern={"(a*){1000}X": 4}), r"a repetition inside a repetition"),
    "redos_backref": (lambda c: c.update(alpha_pattern={r"(.*)\1X": 4}), r"a backreference"),
    "pattern_too_long": (lambda c: c.update(alpha_pattern={"q" * 300: 4}), r"longer than 256 characters"),
    "not_lora": (lambda c: c.update(peft_type="IA3"), r"peft_type 'IA3' is not LORA"),
    # DoRA is served (tests/test_multi_dora.py); a DoRA config over tensors without magnitudes is refused.
    "dora_without_magnitudes": (lambda c: c.update(use_dora=True),
                                r"'.*_proj' has no lora_magnitude_vector \(use_dora=true in adapter_config\.json\)"),
    # target_modules as PEFT reads it (suffixes, or a regex the whole module name must match): one that
    # matches no module is refused as PEFT refuses it, one that leaves out modules the tensors adapt too
    # (PEFT would ignore those tensors, so serving them would not be the adapter PEFT serves).
    "targets_nothing": (lambda c: c.update(target_modules=["nope", "k_proj2"]),
                        r"adapter_config\.json: Target modules \{'k_proj2', 'nope'\} not found in the base model"),
    "targets_regex_nothing": (lambda c: c.update(target_modules="q_proj|v_proj"),  # no name is just "q_proj"
                              r"Target modules 'q_proj\|v_proj' not found in the base model"),
    "targets_fewer_than_tensors": (lambda c: c.update(target_modules=["q_proj"]),
                                   r"adapter_model\.safetensors: tensors for \['model\.layers\.0\.self_attn\.v_proj', "
                                   r"'model\.layers\.1\.self_attn\.v_proj'\], which target_modules=\['q_proj'\] in "
                                   r"adapter_config\.json does not target"),
    "targets_regex_fewer": (lambda c: c.update(target_modules=r".*\.q_proj"), r"\.v_proj'\], which target_modules="),
    "targets_unsafe_regex": (lambda c: c.update(target_modules="(.*)*q_proj"),
                             r"target_modules '\(\.\*\)\*q_proj' is refused: a repetition inside a repetition"),
    "targets_not_strings": (lambda c: c.update(target_modules=[1]),
                            r"target_modules must be a string or a list of strings, got \[1\]"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_absurd_configs(mm, good, tmp_path, spy, case):
    edit, pattern = CONFIG_CASES[case]
    path = copy_adapter(good[1], tmp_path / case, cfg=edit)
    msg = expect(mm, path, AdapterError, pattern)
    assert "adapter_config.json" in msg or "adapter_model.safetensors" in msg, msg
    assert spy.reads == []


def test_peft_refuses_a_config_that_targets_nothing_too(mm, good, tmp_path):
    """The message is PEFT's own (NoMatchingPeftModuleError), so a user who knows one knows the other."""
    base, path = good
    bad = copy_adapter(path, tmp_path / "nothing", cfg=lambda c: c.update(target_modules=["nope"]))
    msg = r"Target modules \{'nope'\} not found in the base model\. Please check the target modules and try again\."
    with pytest.raises(ValueError, match=msg):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(bad))
    expect(mm, bad, AdapterError, msg)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj", "v_proj", "q_proj"],
                                     r".*\.(q|v)_proj", "all-linear", None],
                         ids=["suffixes", "full_names", "regex", "all_linear", "absent"])
def test_target_modules_that_cover_the_tensors_load(mm, good, tmp_path, targets):
    path = copy_adapter(good[1], tmp_path / "t", cfg=lambda c: c.update(target_modules=targets))
    mm.load_adapter("a", path)
    assert all(int(layer.ranks[0]) == 4 for layer in mm.layers.values())


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", "\xff\xfe", "[" * 100_000 + "]" * 100_000])
def test_corrupt_config_json(mm, good, tmp_path, text):
    path = copy_adapter(good[1], tmp_path / "cfg")
    (path / CFG).write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    expect(mm, path, AdapterError, r"corrupt \S*adapter_config\.json")


# ------------------------------------------------------------------------------------ pickles

class _MakesFile:
    """Unpickling this calls open(path, "w"): a pickle that runs code creates the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fmt", ["raw_pickle", "torch_zip"])
def test_pickle_that_runs_code_is_refused(mm, good, tmp_path, fmt):
    marker = tmp_path / "marker"
    path = copy_adapter(good[1], tmp_path / fmt, fmt="bin")
    state = {f"{Q}.lora_A.weight": _MakesFile(marker)}
    if fmt == "raw_pickle":
        (path / BIN).write_bytes(pickle.dumps(state))
    else:
        torch.save(state, str(path / BIN))
    # Make sure the payload works (so the test can fail): plain unpickling does create the marker.
    pickle.loads(pickle.dumps(_MakesFile(tmp_path / "control"))).close()
    assert (tmp_path / "control").exists()
    expect(mm, path, AdapterError, r"corrupt adapter weights in \S*adapter_model\.bin: UnpicklingError",
           "Weights only load failed")
    assert not marker.exists(), "loading the adapter executed code from its pickle"


@pytest.mark.parametrize("state", [{"k": 3}, [torch.zeros(2)], {3: torch.zeros(2)}], ids=["int", "list", "int_key"])
def test_bin_that_is_not_a_dict_of_tensors(mm, good, tmp_path, state):
    path = copy_adapter(good[1], tmp_path / "bin", fmt="bin")
    torch.save(state, str(path / BIN))
    expect(mm, path, AdapterError, r"adapter_model\.bin.*not a dict of tensors")


# ------------------------------------------------------------------------------------ paths

def test_path_that_is_a_file(mm, good):
    expect(mm, good[1] / ST, NotADirectoryError, r"adapter_model\.safetensors' is a file, not a PEFT adapter directory")


def test_missing_and_empty_directories(mm, good, tmp_path):
    expect(mm, tmp_path / "nope", FileNotFoundError, "does not exist")
    (tmp_path / "empty").mkdir()
    expect(mm, tmp_path / "empty", FileNotFoundError, "has no adapter_config.json")
    shutil.copy(good[1] / CFG, tmp_path / "empty" / CFG)
    expect(mm, tmp_path / "empty", FileNotFoundError, "neither adapter_model.safetensors nor adapter_model.bin")


# ------------------------------------------------------------------------------------ non-finite weights
# Policy (serving.adapter_files.read_adapter): rejected with AdapterError, also when the cast to the slots'
# dtype overflows. A served adapter never turns its tokens' outputs into inf / NaN.

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_finite_weights_rejected(mm, good, tmp_path, value, fmt):
    def poison(t):
        t[f"{Q}.lora_B.weight"][3, 1] = value
    path = copy_adapter(good[1], tmp_path / "nf", state=poison, fmt=fmt)
    file = ST if fmt == "safetensors" else BIN
    expect(mm, path, AdapterError, rf"corrupt adapter in \S*{re.escape(file)}: tensor '.*q_proj\.lora_B\.weight' has "
                                   "non-finite values")


def test_overflow_in_cast_to_slot_dtype_rejected(good, tmp_path):
    base, path = good
    m = MultiLoRAModel(copy.deepcopy(base).half(), max_loras=2, max_rank=8, target_modules=TARGETS, backend="torch")
    m.load_adapter("a", path)  # the same adapter fits fp16
    big = copy_adapter(path, tmp_path / "big", state=_edit("v_proj.lora_A.weight", lambda a: a * 0 + 1e6))
    expect(m, big, AdapterError, r"tensor '.*v_proj\.lora_A\.weight' overflows when cast to the slots' dtype "
                                 r"torch\.float16")


def test_bad_reload_keeps_the_old_adapter(mm, good, tmp_path):
    path = copy_adapter(good[1], tmp_path / "bad", state=_edit("q_proj.lora_A.weight", lambda a: a * float("nan")))
    expect(mm, path, AdapterError, "non-finite", name="a")
    assert mm.adapters == {"a": 0, "b": 1}


def test_legitimate_pattern_keys_still_apply(mm, good, tmp_path):
    """Regex keys as PEFT writes them pass the safety check and select modules by PEFT's rule."""
    path = copy_adapter(good[1], tmp_path / "pat", cfg=lambda c: c.update(
        alpha_pattern={r"model\.layers\.\d+\.self_attn\.q_proj": 12, "(v_proj|nothing)": 2}))
    slot = mm.load_adapter("p", path)
    for name, layer in mm.layers.items():
        assert float(layer.scalings[slot]) == (12 / 4 if name.endswith("q_proj") else 2 / 4), name


def test_pattern_matching_time_budget(mm, good, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_files, "PATTERN_BUDGET_S", -1.0)
    path = copy_adapter(good[1], tmp_path / "slow", cfg=lambda c: c.update(rank_pattern={"v_proj": 4}))
    expect(mm, path, AdapterError, r"adapter_config\.json: matching rank_pattern / alpha_pattern against the "
                                   r"adapter's modules took over -1\.0 s")


# ------------------------------------------------------------------------------------ adapter_files alone
# read_adapter knows no model: the same hostile directories, checked against plain data -- {module: (in,
# out)} of the layers, a max rank and a dtype. Every one raises the same error, reading no tensor data.

@pytest.fixture(scope="module")
def layers(good):
    return {n: (m.in_features, m.out_features) for n, m in good[0].named_modules() if n.endswith(tuple(TARGETS))}


def expect_alone(layers, path, exc, *patterns, dtype=torch.float32):
    with pytest.raises(exc) as info:
        adapter_files.read_adapter(path, layers, 8, dtype)
    for p in patterns:
        assert re.search(p, str(info.value)), f"{p!r} not in: {info.value}"


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_alone_header_problems(layers, good, tmp_path, spy, case):
    edit, patterns = HEADER_CASES[case]
    expect_alone(layers, copy_adapter(good[1], tmp_path / case, state=edit), AdapterError, *patterns)
    assert spy.reads == []


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_alone_configs(layers, good, tmp_path, spy, case):
    edit, pattern = CONFIG_CASES[case]
    expect_alone(layers, copy_adapter(good[1], tmp_path / case, cfg=edit), AdapterError, pattern)
    assert spy.reads == []


def test_alone_broken_files(layers, good, tmp_path):
    cut = copy_adapter(good[1], tmp_path / "cut")
    (cut / ST).write_bytes((cut / ST).read_bytes()[:100])
    expect_alone(layers, cut, AdapterError, r"corrupt adapter weights in \S*adapter_model\.safetensors")
    marker = tmp_path / "marker"
    evil = copy_adapter(good[1], tmp_path / "evil", fmt="bin")
    torch.save({f"{Q}.lora_A.weight": _MakesFile(marker)}, str(evil / BIN))
    expect_alone(layers, evil, AdapterError, "Weights only load failed")
    assert not marker.exists()
    nan = copy_adapter(good[1], tmp_path / "nan", state=_edit("q_proj.lora_B.weight", lambda b: b * float("nan")))
    expect_alone(layers, nan, AdapterError, "has non-finite values")
    big = copy_adapter(good[1], tmp_path / "big", state=_edit("v_proj.lora_A.weight", lambda a: a * 0 + 1e6))
    expect_alone(layers, big, AdapterError, r"overflows when cast to the slots' dtype torch\.float16",
                 dtype=torch.float16)
    expect_alone(layers, good[1] / ST, NotADirectoryError, "is a file")
    expect_alone(layers, tmp_path / "nope", FileNotFoundError, "does not exist")


def test_alone_valid_adapter(layers, good):
    """Exactly the file's tensors, per module, in the asked dtype and in memory of their own, with PEFT's
    scaling (lora_alpha / r = 8 / 4)."""
    weights = adapter_files.read_adapter(good[1], layers, 8, torch.float16)
    raw = safetensors_torch.load_file(str(good[1] / ST))
    assert weights.path == good[1] and set(weights.modules) == set(layers)
    for module, (A, B, scaling) in weights.modules.items():
        assert A.dtype == B.dtype == torch.float16 and scaling == 2.0
        assert torch.equal(A, raw[f"base_model.model.{module}.lora_A.weight"].half())
        assert torch.equal(B, raw[f"base_model.model.{module}.lora_B.weight"].half())
        assert not A.is_pinned()
