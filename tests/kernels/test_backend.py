"""Backend selection, the _C fallback, and `python -m mmt_kernels.info`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmt_kernels import _backend, _registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_auto_prefers_compiled_cpu_kernel():
    expected = "cpu" if _backend.has_compiled("sparse_adamw_", "CPU") else "reference"
    assert _registry.choose("sparse_adamw_", torch.device("cpu")) == expected


def test_forced_backend_and_clear_error():
    assert _registry.choose("sparse_adamw_", "cpu", backend="reference") == "reference"
    with pytest.raises(_backend.BackendUnavailableError, match="CUDA tensors"):
        _registry.choose("sparse_adamw_", "cpu", backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.set_backend("fortran")


def test_env_override_is_validated():
    res = run_python("import mmt_kernels", MMT_KERNELS_BACKEND="bogus")
    assert res.returncode != 0 and "MMT_KERNELS_BACKEND" in res.stderr


def test_env_override_forces_reference():
    res = run_python(
        """
        import torch, mmt_kernels
        from mmt_kernels import _backend, _registry
        print(_registry.choose('sparse_adamw_', torch.device('cpu')))
    """,
        MMT_KERNELS_BACKEND="reference",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"


def test_failed_C_load_warns_once_and_falls_back():
    # Make `import mmt_kernels._C` fail the way a broken build would.
    res = run_python("""
        import sys, warnings
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "mmt_kernels._C":
                    raise ImportError("undefined symbol: simulated")
        sys.meta_path.insert(0, Broken())
        warnings.simplefilter("always")
        import torch, mmt_kernels
        from mmt_kernels import _backend, _registry
        p = torch.randn(4, 3)
        for _ in range(3):
            mmt_kernels.sparse_adamw_(p, torch.zeros(4, 3), torch.zeros(4, 3), torch.randn(4, 3), torch.tensor([1]),
                                      lr=1e-3)
        print("choice", _registry.choose("sparse_adamw_", torch.device("cpu")))
    """)
    assert res.returncode == 0, res.stderr
    assert "choice reference" in res.stdout
    assert res.stderr.count("could not be loaded") == 1 and "simulated" in res.stderr


def test_info_reports_backends():
    res = run_python("import runpy; runpy.run_module('mmt_kernels.info', run_name='__main__')")
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "usable" in res.stdout
    if _backend.has_compiled("sparse_adamw_", "CPU"):
        assert "cpu_kernels       True" in res.stdout or "cpu_kernels True" in " ".join(res.stdout.split())


def test_every_spec_repeats_its_cpp_schema():
    from mmt_kernels._registry import OPS

    if _backend.load_C():  # every C++ op has exactly one spec
        cpp = {n.split("::")[1] for n in _backend._mmt_op_names() if "_triton" not in n}
        assert cpp == set(OPS)
    for name, op in OPS.items():
        if op.triton_op is not None:
            tname = _registry.triton_name(name)
            assert str(getattr(torch.ops.mmt, tname).default._schema) == f"mmt::{tname}{op.spec.schema}"
        if _backend.has_compiled(name, "CPU"):
            assert str(getattr(torch.ops.mmt, name).default._schema) == f"mmt::{name}{op.spec.schema}"
