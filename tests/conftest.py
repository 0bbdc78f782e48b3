"""Shared fixtures: every op test runs on each available device (CUDA skips cleanly)."""

import pytest
import torch

import injflow_ext


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and injflow_ext.build_info()["cuda_compiled"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _cuda_usable(), reason="needs a GPU and an extension built with CUDA kernels"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
