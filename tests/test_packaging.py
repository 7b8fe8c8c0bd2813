"""The wheel installs the `lora_kernels` namespace only (no top-level `bench`), with every module of the
package, the two console scripts pointing into it, and an SPDX license; building it prints no deprecation
warning. Built from a copy of the sources (not in-tree: a stale build/lib would leak into the wheel)
with LORA_KERNELS_NO_EXT=1, so it takes seconds."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("lora_kernels", "csrc"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, LORA_KERNELS_NO_EXT="1", PIP_NO_INDEX="1")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (path,) = glob.glob(str(out / "*.whl"))
    return path, p.stdout + p.stderr, src


def test_wheel_installs_only_lora_kernels(wheel):
    path, _, src = wheel
    names = zipfile.ZipFile(path).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"lora_kernels"}, sorted(tops)
    # every module of the package ships, the benchmark and the command line included
    want = {os.path.relpath(f, src).replace(os.sep, "/") for f in glob.glob(str(src / "lora_kernels" / "**" / "*.py"),
                                                                          recursive=True)}
    assert want <= set(names), sorted(want - set(names))
    for module in ("lora_kernels/__main__.py", "lora_kernels/diagnostics.py", "lora_kernels/bench/__main__.py",
                   "lora_kernels/bench/timing.py", "lora_kernels/bench/report.py"):
        assert module in names


def test_wheel_metadata_scripts_and_license(wheel):
    path, _, _ = wheel
    z = zipfile.ZipFile(path)
    (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
    scripts = z.read(ep).decode()
    assert "lora-kernels = lora_kernels.__main__:main" in scripts
    assert "lora-kernels-bench = lora_kernels.bench.__main__:main" in scripts
    assert "bench." not in scripts.replace("lora_kernels.bench.", "")
    (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    text = z.read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Requires-Dist: torch" in text


def test_wheel_build_prints_no_deprecation_warning(wheel):
    _, log, _ = wheel
    bad = [ln for ln in log.splitlines() if "deprecat" in ln.lower()]
    assert not bad, "\n".join(bad)
