"""Loading of the compiled module ``injflow_ext._C`` and what it was built with.

Everything that touches the compiled library goes through here, so that a missing or
mismatched build fails once, at import, with the command that fixes it.
"""

from __future__ import annotations

import importlib
import os

import torch

from ._versioning import BASE_VERSION, local_version_tag

REBUILD_HINT = (
    "Build it against the installed torch from the repository root with\n"
    "    pip install --no-build-isolation -e .\n"
    "(add FORCE_CUDA=1 for the CUDA kernels; see README.md, 'Building for GPUs')."
)


def mismatch_message(built: str, installed: str, installed_cuda) -> str:
    """What to do when the compiled module and the installed torch differ."""
    want_tag = local_version_tag(installed, installed_cuda)
    return (
        f"injflow_ext: the compiled extension was built against torch {built}, but torch "
        f"{installed} is installed; the two must match. Either\n"
        f"  - install the torch it was built for: pip install \"torch=={built}\" (a CUDA build "
        "from the index of your CUDA version), or\n"
        f"  - install an injflow_ext wheel built for your torch (its version ends in +{want_tag}; "
        "build one with scripts/build_wheel.sh), or\n"
        f"  - rebuild from source. {REBUILD_HINT}")


def _load():
    try:
        # registers torch.ops.injflow.*; by name, not "from . import _C", which static import
        # graphs (import-linter) read as an import of the package root
        _C = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"injflow_ext: the compiled extension injflow_ext._C could not be loaded from {here} "
            f"({exc}).\n"
            "Either it has not been built yet, or it was built against another torch than the "
            f"installed {torch.__version__}. {REBUILD_HINT}") from exc
    built = _C.built_torch_version()
    running = torch.__version__.split("+")[0]
    if built != running:
        raise ImportError(mismatch_message(built, torch.__version__, torch.version.cuda))
    return _C


_C = _load()


# Read once: a plain bool keeps the device checks traceable by torch.compile (dynamo cannot
# call into a pybind11 function while tracing).
CUDA_COMPILED = bool(_C.cuda_compiled())


def build_info() -> dict:
    """How the compiled extension was built.

    Returns a dict with ``version`` (the package version with its local tag naming torch and
    CUDA, e.g. ``0.1.0+pt213cpu``), ``torch_version`` (the torch it was compiled against),
    ``cuda_version`` (CUDA toolkit version of the kernels, or None), ``cuda_arch_list``
    (``TORCH_CUDA_ARCH_LIST`` of the build, or None) and ``cuda_compiled`` (bool).
    """
    try:
        from . import _build_config as cfg
        torch_version, cuda_version, arch = cfg.TORCH_VERSION, cfg.CUDA_VERSION, cfg.CUDA_ARCH_LIST
        version = getattr(cfg, "VERSION", BASE_VERSION)
    except ImportError:  # built by other means than setup.py
        torch_version, cuda_version, arch = _C.built_torch_version(), None, None
        version = BASE_VERSION
    cuda = CUDA_COMPILED
    if cuda and cuda_version is None:
        v = _C.cuda_runtime_version()
        cuda_version = f"{v // 1000}.{(v % 1000) // 10}"
    return {
        "version": version,
        "torch_version": torch_version,
        "cuda_version": cuda_version if cuda else None,
        "cuda_arch_list": arch if cuda else None,
        "cuda_compiled": cuda,
    }


def check_device(name: str, op: str, t: torch.Tensor) -> None:
    """Raise a clear error for a device the build has no kernels for."""
    if t.device.type == "cuda" and not CUDA_COMPILED:
        raise RuntimeError(
            f"{op}: {name} is on {t.device}, but injflow_ext was built without CUDA kernels. "
            "Rebuild with a CUDA build of torch and nvcc available: "
            "FORCE_CUDA=1 pip install --no-build-isolation -e . "
            "(TORCH_CUDA_ARCH_LIST selects the GPU architectures).")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{op}: {name} is on {t.device}; injflow_ext has CPU and CUDA kernels "
                           "only. Move the tensor with .cpu() or .cuda().")
