"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here."""

import os

import pytest
import torch

# `auto` precision resolves per machine (bf16 on CPUs with native bf16); the suite pins it to fp32 so that it
# checks the same numbers on every CPU (subprocesses inherit it). tests/mmt/test_precision.py tests `auto` itself.
os.environ["MMT_AUTO_PRECISION"] = "no"

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter (see docs/kernels.md).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cpu_backends():
    from mmt_kernels import _backend

    return [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "sparse_adamw_")[0]]


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
