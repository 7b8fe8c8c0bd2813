"""Load a built lora_kernels._C and check that every native op is registered with CPU and CUDA kernels.

    python scripts/check_native_build.py BUILD_LIB_DIR [--no-cuda]

BUILD_LIB_DIR holds lora_kernels/_C*.so. The extension is loaded by path, without importing the package
(whose in-tree _C may be a build for another torch). The expected ops are NATIVE_OPS of
lora_kernels/ops/native.py (read with ast, not imported). No GPU is needed: only the registrations are checked.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_ops() -> list[str]:
    tree = ast.parse(open(os.path.join(ROOT, "lora_kernels", "ops", "native.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NATIVE_OPS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("NATIVE_OPS not found in lora_kernels/ops/native.py")


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    want_cuda = "--no-cuda" not in sys.argv
    lib_dir = args[0] if args else os.path.join(ROOT, "build", "cuda", "lib")
    paths = glob.glob(os.path.join(lib_dir, "lora_kernels", "_C*.so"))
    if len(paths) != 1:
        raise SystemExit(f"expected one lora_kernels/_C*.so under {lib_dir}, found {paths}")
    spec = importlib.util.spec_from_file_location("lora_kernels._C", paths[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # runs the static initialisers: TORCH_LIBRARY registrations
    print(f"loaded {paths[0]} (torch {torch.__version__}, CUDA {torch.version.cuda}, WITH_CUDA={mod.WITH_CUDA})")

    errors = []
    if want_cuda and mod.WITH_CUDA != 1:
        errors.append("the extension was built without CUDA (WITH_CUDA == 0)")
    registered = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lora_kernels::native_"))
    expected = ["lora_kernels::" + n for n in expected_ops()]
    for name in sorted(set(expected) | set(registered)):
        if name not in registered:
            errors.append(f"{name}: no schema registered")
            continue
        if name not in expected:
            errors.append(f"{name}: registered but missing from NATIVE_OPS in lora_kernels/ops/native.py")
        keys = ["CPU"] + (["CUDA"] if want_cuda else [])
        missing = [k for k in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        print(f"  {name}: " + ("OK" if not missing else f"missing {missing}"))
        if missing:
            errors.append(f"{name}: no {'/'.join(missing)} kernel")
    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    if not errors:
        print(f"all {len(registered)} native ops have {'CPU and CUDA' if want_cuda else 'CPU'} kernels")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
