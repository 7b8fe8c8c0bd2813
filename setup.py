"""Build script for the C++/CUDA extension `lora_kernels._C` (csrc/); everything else is in pyproject.toml.

What gets built:
  * a CUDA extension (csrc/*.cpp + csrc/cuda/*.cu) when torch is a CUDA build and nvcc is found (CUDA_HOME,
    else nvcc on PATH, else /usr/local/cuda -- torch.utils.cpp_extension's search); no GPU is needed;
  * a CPU-only C++ extension (csrc/*.cpp) otherwise; it registers CUDA kernels that raise an error saying
    the extension was built without CUDA, so a GPU user never gets a silent fallback;
  * nothing with LORA_KERNELS_NO_EXT=1 (the package then runs its "torch" and "triton" backends only).

Environment switches:
  LORA_KERNELS_NO_EXT=1          skip the extension
  LORA_KERNELS_FORCE_CPU=1       build the CPU-only extension even when CUDA is available
  LORA_KERNELS_REQUIRE_CUDA=1    fail instead of falling back to a CPU-only build
  TORCH_CUDA_ARCH_LIST           GPU architectures (default "8.0;9.0": A100, H100)
  MAX_JOBS                       parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _log(msg: str) -> None:
    print(f"lora_kernels setup.py: {msg}", file=sys.stderr)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_dirs(cuda_home: str) -> tuple[list[str], list[str]]:
    """Include/lib folders of the nvidia-* wheels next to torch, when the toolkit lacks cuBLAS/cuSPARSE headers.

    ATen's CUDA headers include cublas_v2.h, cublasLt.h and cusparse.h; a minimal toolkit (nvcc + cudart
    only) lacks them, but the CUDA build of torch depends on wheels that ship them
    (site-packages/nvidia/cu13/include, or nvidia/<lib>/include for older CUDA).
    """
    needed = ("cublas_v2.h", "cublasLt.h", "cusparse.h")
    toolkit_inc = [os.path.join(cuda_home, "include"), os.path.join(cuda_home, "targets", "x86_64-linux", "include")]
    missing = [h for h in needed if not any(os.path.exists(os.path.join(d, h)) for d in toolkit_inc)]
    if not missing:
        return [], []
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    inc, lib = [], []
    for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        if any(os.path.exists(os.path.join(d, h)) for h in missing):
            inc.append(d)
            libdir = os.path.join(os.path.dirname(d), "lib")
            if os.path.isdir(libdir):
                lib.append(libdir)
    found = {h for h in missing for d in inc if os.path.exists(os.path.join(d, h))}
    if set(missing) - found:
        _log(f"warning: {sorted(set(missing) - found)} found neither in {cuda_home} nor in {site}/nvidia/*")
    else:
        _log(f"toolkit lacks {missing}: using the nvidia wheels' {inc}")
    return inc, lib


def _extensions() -> tuple[list, dict]:
    if _flag("LORA_KERNELS_NO_EXT"):
        _log("LORA_KERNELS_NO_EXT=1: not building lora_kernels._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not installed in the build environment: not building lora_kernels._C "
             "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}

    # setuptools wants source paths relative to the project root.
    cpp_sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT) + glob.glob("csrc/cuda/*.cpp", root_dir=ROOT))
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    use_cuda = (torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
                and not _flag("LORA_KERNELS_FORCE_CPU"))
    if not use_cuda:
        why = ("LORA_KERNELS_FORCE_CPU=1" if _flag("LORA_KERNELS_FORCE_CPU") else
               "torch is a CPU-only build" if torch.version.cuda is None else
               "nvcc not found (set CUDA_HOME)")
        if _flag("LORA_KERNELS_REQUIRE_CUDA"):
            raise RuntimeError(f"LORA_KERNELS_REQUIRE_CUDA=1 but the CUDA extension cannot be built: {why}")
        if torch.version.cuda is not None:
            _log(f"WARNING: torch has CUDA {torch.version.cuda} but {why}: building a CPU-only extension; "
                 "backend='native' will raise on CUDA tensors")
        else:
            _log(f"{why}: building the CPU-only extension")

    cxx_flags = ["-O3"]  # torch adds the C++ standard it needs
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs: list[str] = []
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        _log(f"CUDA build with nvcc from {cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        extra_inc, library_dirs = _nvidia_wheel_dirs(cuda_home)
        # Searched after the toolkit's own include folder, so its cuda_runtime.h etc. win over the wheels'.
        after = [f"-idirafter{d}" for d in extra_inc]
        cxx_flags += after
        # ptxas reports register spills / local memory per kernel; scripts/build_cuda_check.sh fails on them.
        nvcc_flags = (["-O3", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills,-warn-lmem-usage"]
                      + [f"-Xcompiler={a}" for a in after])
        define_macros.append(("LK_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "lora_kernels._C", cpp_sources + cu_sources, include_dirs=include_dirs, library_dirs=library_dirs,
            define_macros=define_macros, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        ext = cpp_extension.CppExtension(
            "lora_kernels._C", cpp_sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
