"""Kernels run through the Triton interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, hence before fastvl.kernels
is imported: this file is the first thing pytest imports.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import fastvl  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 only where it can be right: the interpreter computes bf16 dots from raw bit patterns
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bf16 and compiled kernels are checked on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def kernel_dtype(request):
    """fp32 and fp16 everywhere; bf16 on a GPU."""
    return request.param


@pytest.fixture(autouse=True)
def _reference_by_default():
    """Tests run the reference unless they ask for the kernels (triton_backend)."""
    with fastvl.use_backend("reference"):
        yield


@pytest.fixture
def triton_backend():
    """Run ops through their Triton kernels (interpreter on CPU)."""
    with fastvl.use_backend("triton"):
        yield
