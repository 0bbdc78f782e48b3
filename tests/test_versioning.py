"""Version tags of builds and wheels, and the message on a torch mismatch."""

import pytest
import torch

import injflow_ext
from injflow_ext._extension import mismatch_message
from injflow_ext._versioning import BASE_VERSION, local_version_tag, package_version, torch_release


@pytest.mark.parametrize("torch_version,cuda,tag", [
    ("2.13.0+cpu", None, "pt213cpu"),
    ("2.13.0", None, "pt213cpu"),
    ("2.11.0+cu130", "13.0", "pt211cu130"),
    ("2.14.1+cu128", "12.8", "pt214cu128"),
    ("2.14.1+cu128", None, "pt214cpu"),          # CUDA torch, CPU-only kernels
    ("2.15.0a0+git1234", "12.6", "pt215cu126"),
])
def test_local_version_tag(torch_version, cuda, tag):
    assert local_version_tag(torch_version, cuda) == tag
    assert package_version(torch_version, cuda) == f"{BASE_VERSION}+{tag}"


def test_torch_release_drops_local_label():
    assert torch_release("2.13.0+cpu") == "2.13.0"
    assert torch_release("2.14.1+cu130") == "2.14.1"
    assert torch_release("2.15") == "2.15.0"
    with pytest.raises(ValueError, match="torch version"):
        torch_release("nightly")


def test_build_info_names_this_build():
    info = injflow_ext.build_info()
    assert info["version"] == injflow_ext.__version__
    assert info["version"] == package_version(torch.__version__, info["cuda_version"])
    assert torch_release(info["torch_version"]) == torch_release(torch.__version__)


def test_mismatch_message_says_what_to_do():
    msg = mismatch_message("2.13.0", "2.14.1+cu130", "13.0")
    assert "built against torch 2.13.0" in msg and "2.14.1+cu130 is installed" in msg
    assert 'pip install "torch==2.13.0"' in msg
    assert "+pt214cu130" in msg and "scripts/build_wheel.sh" in msg
    assert "pip install --no-build-isolation -e ." in msg
