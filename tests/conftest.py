"""Test setup: without a GPU, run Triton kernels through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_backend_on_cpu():
    """Whole-model tests on CPU pin the torch backend: the interpreter would run the Triton
    kernels, far too slowly for generation (tests/test_triton_backend.py covers them)."""
    if HAS_CUDA:
        yield
    else:
        from llama4_fast import registry

        with registry.use("torch"):
            yield
