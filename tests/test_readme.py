"""Every fenced ```python block of README.md runs as written: each in a fresh interpreter, from an empty
folder, with this process's environment (TRITON_INTERPRET as `make test` sets it). A snippet that needs
anything not defined in it, or a download, fails here."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(id, code) of each ```python block, the id naming the section it sits in."""
    blocks, section, counts = [], "top", {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
        fence = re.match(r"^(\s*)```python\s*$", line)
        if fence:
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            counts[section] = counts.get(section, 0) + 1
            blocks.append((f"{section}-{counts[section]}", "\n".join(body) + "\n"))
        i += 1
    return blocks


with open(README) as _f:
    BLOCKS = python_blocks(_f.read())


def test_readme_has_the_usage_blocks():
    ids = [b for b, _ in BLOCKS]
    assert len(BLOCKS) >= 3, ids
    assert any(i.startswith("use-with-peft") for i in ids), ids


def test_block_extraction():
    text = "# A\n```python\nx = 1\n```\n## B c\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [("a-1", "x = 1\n"), ("b-c-1", "y = 2\nz = 3\n")]


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[b for b, _ in BLOCKS])
def test_readme_python_block_runs(code, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # a download would fail, not hang
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"README block failed (exit {p.returncode}):\n{code}\n--- stderr ---\n{p.stderr[-4000:]}"
