"""What a GPU would expose, checked on CPU: strided tensors, index and step checks, backend choice on CUDA,
the GPU opcheck arguments, build flags, and (with a real Triton) the compile of a specialised kernel."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend, _registry
from mmt_kernels import reference as ref
from mmt_kernels.merge import MERGE
from mmt_kernels.moe.dispatch import MOE_DISPATCH
from mmt_kernels.sparse_adamw import SPARSE_ADAMW

from .tolerance import assert_close_to_golden

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "sparse_adamw_")[0]]


# ---- strided tensors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neuron_dim", [0, 1])
def test_sparse_adamw_on_transposed_param_changes_only_the_selected_neurons(backend, neuron_dim):
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(12, 48, generator=gen)
    param = storage.t()  # [48, 12], not contiguous
    grad = torch.randn(48, 12, generator=gen).t().contiguous().t()
    R = param.shape[neuron_dim]
    rows = torch.tensor([1, 5, 9])
    C = param.numel() // R
    kw = dict(lr=1e-2, weight_decay=0.1, step=3, neuron_dim=neuron_dim, compact=True)
    want = param.clone()
    shape = (3, C) if neuron_dim == 0 else (C, 3)  # compact: [K, C] for rows, [C, K] for columns
    m_ref, v_ref = torch.zeros(shape), torch.zeros(shape)
    ref.sparse_adamw_(want, m_ref, v_ref, grad, rows, None, None, beta1=0.9, beta2=0.999, eps=1e-8, **kw)
    m, v = torch.zeros(shape).t().contiguous().t(), torch.zeros(shape)  # a strided state, too
    before = storage.clone()
    mmt_kernels.sparse_adamw_(param, m, v, grad, rows, backend=backend, **kw)
    torch.testing.assert_close(param, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-7)
    changed = (storage != before).t()
    keep = torch.ones(R, dtype=torch.bool)
    keep[rows] = False
    assert not (changed if neuron_dim == 0 else changed.t())[keep].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_taylor_into_a_column_view_leaves_the_neighbour_column(backend):
    gen = torch.Generator().manual_seed(1)
    table = torch.zeros(7, 3)
    act, grad = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    mmt_kernels.taylor_accumulate_(table[:, 1], act, grad, backend=backend)
    want = torch.zeros(7)
    ref.taylor_accumulate_(want, act, grad, torch.full((5,), 1 / 5))
    torch.testing.assert_close(table[:, 1], want)
    assert not table[:, 0].any() and not table[:, 2].any()


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_ops_refuse_strided_tensors_when_called_directly():
    param = torch.randn(12, 48).t()
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.mmt.sparse_adamw_triton_(
            param,
            torch.zeros(3, 12),
            torch.zeros(3, 12),
            param.contiguous(),
            torch.tensor([1, 5, 9]),
            None,
            None,
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.0,
            1,
            0,
            True,
        )
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.mmt.taylor_accumulate_triton_(
            torch.zeros(7, 3)[:, 1], torch.randn(5, 7), torch.randn(5, 7), torch.ones(5)
        )


# ---- indices and steps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,match", [([0, 3, 3], "increasing"), ([0, 48], "outside"), ([-1, 2], "outside")])
def test_sparse_adamw_rejects_bad_rows(backend, rows, match):
    p = torch.randn(48, 4)
    with pytest.raises(RuntimeError, match=match):
        mmt_kernels.sparse_adamw_(
            p,
            torch.zeros_like(p),
            torch.zeros_like(p),
            torch.randn(48, 4),
            torch.tensor(rows),
            lr=1e-3,
            backend=backend,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_adamw_checks_row_step(backend):
    p = torch.randn(8, 4)
    args = (p, torch.zeros(2, 4), torch.zeros(2, 4), torch.randn(8, 4), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="row_step"):
        mmt_kernels.sparse_adamw_(*args, lr=1e-3, compact=True, row_step=torch.tensor([1, 0]), backend=backend)
    with pytest.raises(ValueError, match="row_step is on meta"):
        mmt_kernels.sparse_adamw_(
            *args, lr=1e-3, compact=True, row_step=torch.ones(2, dtype=torch.int64, device="meta"), backend=backend
        )
    with pytest.raises(TypeError, match="row_step must be int32 or int64"):
        mmt_kernels.sparse_adamw_(*args, lr=1e-3, compact=True, row_step=torch.ones(2), backend=backend)
    with pytest.raises(ValueError, match="step must be >= 1"):
        mmt_kernels.sparse_adamw_(*args, lr=1e-3, compact=True, step=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ops_reject_out_of_range_indices(backend):
    with pytest.raises(RuntimeError, match="outside"):
        mmt_kernels.moe_permute(torch.tensor([[0, 5]]), 4, backend=backend)
    x = torch.randn(3, 8)
    bad = torch.tensor([0, 1, 2, 3, 4, 6])
    with pytest.raises(RuntimeError, match="outside"):
        mmt_kernels.moe_dispatch(x, bad, torch.arange(6), 2, backend=backend)
    with pytest.raises(RuntimeError, match="outside"):
        mmt_kernels.moe_combine(torch.randn(6, 8), bad, torch.arange(6), None, 2, backend=backend)
    with pytest.raises(RuntimeError, match="offsets"):
        mmt_kernels.grouped_mlp(
            torch.randn(4, 8),
            torch.tensor([0, 5]),
            torch.randn(1, 3, 8),
            torch.randn(1, 3, 8),
            torch.randn(1, 8, 3),
            backend=backend,
        )


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_triton_merge_refuses_a_short_base():
    xs = [torch.randn(100), torch.randn(100)]
    with pytest.raises(ValueError, match="base"):
        torch.ops.mmt.merge_triton(xs, torch.randn(50), [1.0, 1.0], None, [1.0, 1.0], "task_arithmetic", 1.0, 0, False)
    with pytest.raises(ValueError, match="base"):
        torch.ops.mmt.merge_threshold_triton(xs, torch.randn(50), [3, 3])


# ---- backend choice on CUDA (simulated: a CUDA build of _C) -----------------------------------------------------


@pytest.fixture
def cuda_build(monkeypatch):
    monkeypatch.setattr(_backend, "has_compiled", lambda op, key: True)
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)


def test_default_backends_on_cuda(cuda_build):
    assert SPARSE_ADAMW.choose("cuda") == "cuda"
    assert _registry.choose("moe_grouped_mlp", "cuda") == "triton"
    assert _registry.choose("moe_fft_features", "cuda", backend="cuda") == "triton"  # no CUDA C++ kernel
    assert MERGE.choose("cuda", None, torch.bfloat16) == "cuda"
    assert _registry.choose("sparse_weight_grad_", "cuda") == "triton"  # tensor cores; its CUDA kernel is SIMT
    assert _registry.choose("sparse_weight_grad_", "cuda", backend="cuda") == "cuda"


def test_merge_of_more_than_32_tensors_falls_back_to_triton_on_cuda(cuda_build):
    assert MERGE.choose("cuda", None, torch.float32, mmt_kernels.merge._unable(32)) == "cuda"
    assert MERGE.choose("cuda", None, torch.float32, mmt_kernels.merge._unable(33)) == "triton"
    with pytest.raises(mmt_kernels.BackendUnavailableError, match="these inputs"):
        MERGE.choose("cuda", "cuda", torch.float32, mmt_kernels.merge._unable(33))


def test_fp64_moe_on_cuda_runs_the_reference(cuda_build):
    assert MOE_DISPATCH.choose("cuda", None, torch.float64) == "reference"
    assert MOE_DISPATCH.choose("cpu", None, torch.float64) == "cpu"
    with pytest.raises(mmt_kernels.BackendUnavailableError, match="fp64"):
        MOE_DISPATCH.choose("cuda", "cuda", torch.float64)


# ---- the GPU test's opcheck arguments are valid (they are run on CPU here) --------------------------------------


def sparse_adamw_multi_opcheck_args(dev):
    """A bf16 column-neuron param with a compact state of its 2 selected columns ([C, K]), next to an fp32 row
    param with a union state addressed through state_rows."""
    return (
        [torch.randn(9, 5, device=dev), torch.randn(4, 6, device=dev, dtype=torch.bfloat16)],
        [torch.zeros(5, 5, device=dev), torch.zeros(4, 2, device=dev)],
        [torch.zeros(5, 5, device=dev), torch.zeros(4, 2, device=dev)],
        [torch.randn(9, 5, device=dev), torch.randn(4, 6, device=dev, dtype=torch.bfloat16)],
        [torch.tensor([0, 4, 8], device=dev), torch.tensor([1, 5], device=dev)],
        [torch.tensor([4, 0, 2], device=dev), None],
        [torch.rand(3, device=dev), None],
        [torch.tensor([1, 2, 3], device=dev), None],
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
        1,
        [0, 1],
        True,
    )


@pytest.mark.skipif(not _backend.has_compiled("sparse_adamw_multi_", "CPU"), reason="mmt_kernels._C not built")
def test_gpu_opcheck_arguments_are_valid_on_cpu():
    torch.library.opcheck(torch.ops.mmt.sparse_adamw_multi_.default, sparse_adamw_multi_opcheck_args("cpu"))


# ---- build flags --------------------------------------------------------------------------------------------------


def test_shipped_nvcc_flags_are_the_checked_ones_and_keep_denormals():
    flags = open(os.path.join(REPO, "csrc", "cuda", "nvcc.flags")).read().split()
    assert "--use_fast_math" not in flags and "-ftz=true" not in flags
    makefile = open(os.path.join(REPO, "Makefile")).read()
    rule = makefile.split("\ncuda-check:")[1].split("\n\n")[0]
    assert "$$(cat csrc/cuda/nvcc.flags)" in rule


def _load_setup(monkeypatch):
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    return runpy.run_path(os.path.join(REPO, "setup.py"), run_name="setup")


def test_setup_builds_cpu_only_when_nvcc_and_torch_cuda_majors_differ(monkeypatch, tmp_path, capsys):
    setup = _load_setup(monkeypatch)
    assert "--use_fast_math" not in setup["NVCC_FLAGS"]
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    monkeypatch.delenv("MMT_BUILD_CUDA", raising=False)

    class FakeTorch:
        class version:
            cuda = "13.0"

    assert setup["_want_cuda"](FakeTorch, str(tmp_path)) is False
    assert "CPU kernels only" in capsys.readouterr().err
    FakeTorch.version.cuda = "12.8"
    assert setup["_want_cuda"](FakeTorch, str(tmp_path)) is True


def test_default_arch_list_embeds_ptx():
    text = open(os.path.join(REPO, "setup.py")).read()
    assert '"TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX"' in text


# ---- a real compile of the specialisation the interpreter cannot see ---------------------------------------------


def _real_triton() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _real_triton(), reason="triton not installed")
def test_dare_merge_kernel_compiles_for_seed_one_on_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmt_kernels.triton.compile_check",
            "--arch",
            "90",
            "--only",
            "n=1 K=2 dare_ties seed=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "_merge_kernel" in res.stdout and "1 specialisations compiled" in res.stdout, res.stdout


def test_merge_with_seed_one_matches_reference_on_every_backend():
    gen = torch.Generator().manual_seed(3)
    xs, base = [torch.randn(777, generator=gen) for _ in range(3)], torch.randn(777, generator=gen)
    want = mmt_kernels.merge_tensors(xs, base, method="dare_ties", density=0.5, seed=1, backend="reference")
    for backend in BACKENDS:
        got = mmt_kernels.merge_tensors(xs, base, method="dare_ties", density=0.5, seed=1, backend=backend)
        assert_close_to_golden(got, want, want.double(), name=f"merge {backend}")


def test_docstring_example_runs():
    code = textwrap.dedent(mmt_kernels.merge.__doc__.split("Example::")[1]).strip()
    w0 = torch.randn(16)
    scope = {"w0": w0, "w_de": w0 + torch.randn(16), "w_fr": w0 + torch.randn(16), "w_zh": w0 + torch.randn(16)}
    exec(code, scope)
    assert scope["merged"].shape == (16,)
