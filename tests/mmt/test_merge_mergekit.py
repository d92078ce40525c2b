"""``tie_break: exact_k`` against mergekit itself, when mergekit is installed (here, or in MMT_MERGEKIT_PATH)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmt import merge as mm

try:
    from mmt.testing import tiny_model
except ImportError:
    from mmt.testing import tiny_model


def _mergekit_env() -> dict[str, str] | None:
    if importlib.util.find_spec("mergekit") is not None:
        return dict(os.environ)
    path = os.environ.get("MMT_MERGEKIT_PATH")
    if path and (Path(path) / "mergekit").is_dir():
        return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p))
    return None


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_exact_k_equals_mergekit_ties_bit_for_bit(tmp_path):
    env = _mergekit_env()
    if env is None:
        pytest.skip("mergekit is not installed (set MMT_MERGEKIT_PATH to a folder holding it)")
    paths = []
    for i in range(4):
        m = tiny_model("llama", vocab=256, hidden=64, layers=2, intermediate=128)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        m.to(torch.bfloat16).save_pretrained(tmp_path / f"m{i}", safe_serialization=True)
        paths.append(str(tmp_path / f"m{i}"))
    cfg = {
        "merge_method": "ties",
        "base_model": paths[0],
        "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.3}} for p in paths[1:]],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    src = tmp_path / "mk.yml"
    src.write_text(yaml.safe_dump(cfg))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit.scripts.run_yaml",
            str(src),
            str(tmp_path / "mergekit"),
            "--no-copy-tokenizer",
        ],
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )
    for tie_break in ("exact_k", "threshold"):
        mm.run_merge(
            mm.load_merge_config(src, [f"tie_break={tie_break}", f"output={tmp_path / tie_break}"]), progress=False
        )
    want, exact, thr = _state(tmp_path / "mergekit"), _state(tmp_path / "exact_k"), _state(tmp_path / "threshold")
    assert want.keys() <= exact.keys()
    for name, w in want.items():
        assert torch.equal(exact[name].view(torch.int16), w.view(torch.int16)), name
    assert any(not torch.equal(thr[n], w) for n, w in want.items())  # the default keeps the ties, and differs
