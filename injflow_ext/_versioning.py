"""The package version and the local version tag that names the torch and CUDA a build is for.

Pure Python with no imports of torch or of the package, so that ``setup.py`` can load it before
anything is built. A wheel of injflow_ext only works with the torch it was compiled against, so
its version carries that torch in a PEP 440 local label, e.g. ``0.1.0+pt213cpu`` (torch 2.13,
CPU kernels only) or ``0.1.0+pt214cu130`` (torch 2.14, CUDA 13.0 kernels), and its metadata pins
the exact torch release (``torch==2.13.0``).
"""

from __future__ import annotations

import re

BASE_VERSION = "0.1.0"


def torch_release(torch_version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"2.13.0"`` (the public release, without a local label)."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", torch_version)
    if not m:
        raise ValueError(f"cannot read a torch version from {torch_version!r}")
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def local_version_tag(torch_version: str, cuda_version: str | None) -> str:
    """``("2.13.0+cpu", None)`` -> ``"pt213cpu"``; ``("2.14.1+cu130", "13.0")`` -> ``"pt214cu130"``.

    ``cuda_version`` is the CUDA version the kernels were compiled with, or None for a CPU-only
    build (also when torch itself is a CUDA build)."""
    major, minor, _ = torch_release(torch_version).split(".")
    tag = f"pt{major}{minor}"
    if cuda_version:
        m = re.match(r"^(\d+)\.(\d+)", cuda_version)
        if not m:
            raise ValueError(f"cannot read a CUDA version from {cuda_version!r}")
        return f"{tag}cu{m.group(1)}{m.group(2)}"
    return f"{tag}cpu"


def package_version(torch_version: str, cuda_version: str | None) -> str:
    """The full version of a build, e.g. ``"0.1.0+pt213cpu"``."""
    return f"{BASE_VERSION}+{local_version_tag(torch_version, cuda_version)}"
