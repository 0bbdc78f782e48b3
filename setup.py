"""Build script for injflow_ext: a torch C++/CUDA extension (``injflow_ext._C``).

The CPU kernels always build. The CUDA kernels build when ``FORCE_CUDA=1``, or when
``nvcc`` is found and the installed torch has CUDA. Honoured environment variables:

- ``FORCE_CUDA=1``            build the CUDA kernels even without a visible GPU
- ``FORCE_CPU=1``             never build the CUDA kernels
- ``TORCH_CUDA_ARCH_LIST``    GPU architectures, e.g. ``"8.0;9.0+PTX"`` (default without a
                              visible GPU: ``"8.0;9.0+PTX"``)
- ``MAX_JOBS``                parallel compile jobs (ninja)
- ``CUDA_HOME``               CUDA toolkit root (found automatically otherwise, even when
                              ``nvcc`` on PATH is a wrapper script)

Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CLUSTER_ARCHS = "8.0;9.0+PTX"


def _is_toolkit_root(path):
    """A CUDA toolkit root holds ``bin/nvcc`` and the CUDA runtime library."""
    if not path or not os.path.isfile(os.path.join(path, "bin", "nvcc")):
        return False
    libs = glob.glob(os.path.join(path, "lib64", "libcudart.so*")) + glob.glob(
        os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    return bool(libs)


def _nvcc_targets_from_wrapper(nvcc):
    """Paths named inside a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    found = re.findall(rb"(/[^\s\"']+)/bin/nvcc", head)
    return [p.decode() for p in found]


def find_cuda_home():
    """Locate the CUDA toolkit root, or return None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.extend(_nvcc_targets_from_wrapper(nvcc))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for path in candidates:
        if _is_toolkit_root(path):
            return os.path.realpath(path)
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: fix it up first, so that a
# wrapper script called nvcc on PATH does not send the linker to the wrong folder.
_cuda_home = find_cuda_home()
if _cuda_home and not _is_toolkit_root(os.environ.get("CUDA_HOME", "")):
    os.environ["CUDA_HOME"] = _cuda_home

import runpy  # noqa: E402

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension, CppExtension, CUDAExtension)

# Loaded by path: importing the package would need the extension this script builds.
_versioning = runpy.run_path(os.path.join(HERE, "injflow_ext", "_versioning.py"))
# The library needs numpy and torch only; the command line's extras (datasets, metrics, plots,
# progress) are the [cli] extra in pyproject.toml.
RUNTIME_REQUIREMENTS = ["numpy"]


def want_cuda():
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    torch_has_cuda = torch.version.cuda is not None
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not torch_has_cuda:
            sys.exit("injflow_ext: FORCE_CUDA=1 but the installed torch "
                     f"({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
                     "or unset FORCE_CUDA.")
        if _cuda_home is None:
            sys.exit("injflow_ext: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to "
                     "the folder holding bin/nvcc and lib64/libcudart.so.")
        return True
    return torch_has_cuda and _cuda_home is not None


def nvidia_pip_include_dirs():
    """Headers of the ``nvidia-*`` pip packages (cublas_v2.h, cusparse.h, ...) that torch's
    CUDA headers include; a toolkit without them would fail to compile otherwise."""
    try:
        import nvidia  # type: ignore
    except ImportError:
        return []
    dirs = []
    for root in list(nvidia.__path__):
        dirs += glob.glob(os.path.join(root, "cu*", "include"))
        dirs += glob.glob(os.path.join(root, "*", "include"))
    return sorted(d for d in set(dirs) if os.path.isdir(d))


def write_build_config(with_cuda, arch_list, version):
    """Record how this build was made; ``injflow_ext.build_info()`` reads it (it ships in the
    wheel)."""
    path = os.path.join(HERE, "injflow_ext", "_build_config.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"VERSION = {version!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def make_extension(with_cuda):
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # The C++ standard is left to torch (C++17 code; torch >= 2.14 headers need C++20).
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]
    define_macros = []
    extra_link = ["-fopenmp"] if sys.platform != "win32" else []
    arch_list = None
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CLUSTER_ARCHS
            print(f"injflow_ext: no GPU visible, building for TORCH_CUDA_ARCH_LIST="
                  f"{DEFAULT_CLUSTER_ARCHS}")
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or "native"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("INJFLOW_WITH_CUDA", None))
        ext = CUDAExtension(
            "injflow_ext._C", sources,
            include_dirs=[os.path.join(HERE, "csrc")] + nvidia_pip_include_dirs(),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=extra_link)
    else:
        ext = CppExtension(
            "injflow_ext._C", sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link)
    write_build_config(with_cuda, arch_list, VERSION)
    print(f"injflow_ext {VERSION}: building {'CPU+CUDA' if with_cuda else 'CPU-only'} extension "
          f"against torch {torch.__version__}"
          + (f", CUDA_HOME={_cuda_home}" if with_cuda else ""))
    return ext


WITH_CUDA = want_cuda()
# The version names the torch (and CUDA) of this build, e.g. 0.1.0+pt213cpu, and the metadata
# pins that torch release: the compiled module works with no other.
VERSION = _versioning["package_version"](torch.__version__,
                                         torch.version.cuda if WITH_CUDA else None)

setup(
    version=VERSION,
    install_requires=[f"torch=={_versioning['torch_release'](torch.__version__)}"]
    + RUNTIME_REQUIREMENTS,
    packages=find_packages(include=["injflow_ext", "injflow_ext.*"]),
    ext_modules=[make_extension(WITH_CUDA)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
