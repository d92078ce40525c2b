"""mmt merge against mergekit itself, when mergekit is installed (here, or in MMT_MERGEKIT_PATH): the same mergekit
YAML run by both tools gives the same bf16 checkpoint (``tie_break: exact_k`` for the magnitude cut-offs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmt import merge as mm
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
    paths = _bf16_models(tmp_path, 4)
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


def _bf16_models(root: Path, n: int, layers: int = 2) -> list[str]:
    paths = []
    for i in range(n):
        m = tiny_model("llama", vocab=256, hidden=64, layers=layers, intermediate=128)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        m.to(torch.bfloat16).save_pretrained(root / f"m{i}", safe_serialization=True)
        paths.append(str(root / f"m{i}"))
    return paths


def _run_mergekit(env, cfg: dict, root: Path, name: str) -> dict[str, torch.Tensor]:
    src = root / f"{name}.yml"
    src.write_text(yaml.safe_dump(cfg))
    subprocess.run(
        [sys.executable, "-m", "mergekit.scripts.run_yaml", str(src), str(root / f"mk_{name}"), "--no-copy-tokenizer"],
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )
    return _state(root / f"mk_{name}")


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value of x."""
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), torch.frexp(x.float()).exponent - 8)


# (method, per-model parameters, extra top-level keys, at most 1 bf16 ulp apart instead of bit-identical)
_METHODS = [
    ("task_arithmetic", {"weight": 0.5}, {}, False),
    ("ties", {"weight": 1.0, "density": 0.3}, {}, False),
    ("breadcrumbs", {"weight": 1.0, "density": 0.7, "gamma": 0.05}, {}, False),
    ("breadcrumbs_ties", {"weight": 1.0, "density": 0.7, "gamma": 0.05}, {}, False),
    ("model_stock", None, {}, False),
    ("linear", "weights", {}, True),  # fp32 sums in another order: a few elements round to the neighbouring bf16
    ("slerp", "slerp", {"parameters": {"t": 0.3}}, True),
    ("nuslerp", "nuslerp", {}, False),  # task vectors from the base, the whole tensor as one vector
    ("nuslerp", "nuslerp_rows", {"parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}, False),
    ("sce", None, {"parameters": {"select_topk": 0.5}}, False),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,params,extra,one_ulp", _METHODS, ids=[m[1] if m[1] == "nuslerp_rows" else m[0] for m in _METHODS]
)
def test_mergekit_yaml_gives_mergekits_checkpoint(tmp_path, method, params, extra, one_ulp):
    env = _mergekit_env()
    if env is None:
        pytest.skip("mergekit is not installed (set MMT_MERGEKIT_PATH to a folder holding it)")
    paths = _bf16_models(tmp_path, 4)
    if params == "weights":  # linear: no base, unequal weights
        cfg = {"models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths[1:], (1.0, 0.5, 0.25))]}
    elif params == "slerp":
        cfg = {"base_model": paths[0], "models": [{"model": paths[0]}, {"model": paths[1]}]}
    elif params == "nuslerp":  # the base listed among the models, as mergekit's examples do
        models = [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths[1:3], (1.0, 0.5))]
        cfg = {"base_model": paths[0], "models": [{"model": paths[0]}, *models]}
    elif params == "nuslerp_rows":  # no base: the models themselves, per column
        cfg = {"models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths[1:3], (0.25, 1.0))]}
    else:
        models = [{"model": p, **({"parameters": params} if params else {})} for p in paths[1:]]
        cfg = {"base_model": paths[0], "models": models}
    cfg = {"merge_method": method, **cfg, **extra, "dtype": "float32", "out_dtype": "bfloat16"}
    want = _run_mergekit(env, cfg, tmp_path, method)
    mm.run_merge(
        mm.load_merge_config(tmp_path / f"{method}.yml", ["tie_break=exact_k", f"output={tmp_path / 'mmt'}"]),
        progress=False,
    )
    got = _state(tmp_path / "mmt")
    assert want.keys() <= got.keys()
    for name, w in want.items():
        assert got[name].dtype == w.dtype == torch.bfloat16, name
        if not one_ulp:
            assert torch.equal(got[name].view(torch.int16), w.view(torch.int16)), name
        else:
            gap = (got[name].float() - w.float()).abs()
            assert bool((gap <= _ulp_bf16(w)).all()), f"{name}: {float(gap.max())}"
            assert float((gap > 0).float().mean()) < 0.01, name  # rounding, not another formula


def _slices(paths: list[str], method: str) -> dict:
    """Two slices over 4-layer models; the second takes other layer ranges, and its own parameters."""
    m0, m1, m2 = paths[:3]

    def src(m, a, b, **params):
        return {"model": m, "layer_range": [a, b], **({"parameters": params} if params else {})}

    if method == "passthrough":  # a frankenmerge: 3 layers of m1, then 3 of m2 (pre from m1, post from m2)
        return {"slices": [{"sources": [src(m1, 0, 3)]}, {"sources": [src(m2, 1, 4, scale=0.5)]}]}
    if method == "linear":  # weights summing to powers of two, so that normalising them is exact
        return {
            "slices": [
                {"sources": [src(m1, 0, 1, weight=0.75), src(m2, 3, 4)], "parameters": {"weight": 0.25}},
                {"sources": [src(m1, 1, 4), src(m2, 0, 3, weight=[0.5, 1.5, 3.5])], "parameters": {"weight": 0.5}},
            ]
        }
    if method == "slerp":
        return {
            "base_model": m0,
            "parameters": {"t": 0.5},
            "slices": [
                {"sources": [src(m0, 0, 2), src(m1, 0, 2)], "parameters": {"t": [0.1, 0.9]}},
                {"sources": [src(m0, 2, 4), src(m1, 1, 3)], "parameters": {"t": [{"filter": "mlp", "value": 0.2}]}},
            ],
        }
    return {  # ties
        "base_model": m0,
        "parameters": {"density": 0.3, "weight": 1.0},
        "slices": [
            {"sources": [src(m0, 0, 2), src(m1, 0, 2), src(m2, 0, 2)], "parameters": {"density": 0.5}},
            {"sources": [src(m0, 2, 4), src(m1, 2, 4, density=[0.2, 0.6]), src(m2, 1, 3)]},
        ],
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["passthrough", "linear", "slerp", "ties"])
def test_mergekit_slices_give_mergekits_checkpoint(tmp_path, method):
    """Slices: a frankenmerge and per-slice merges (other layer ranges, slice and source parameters, gradients)."""
    env = _mergekit_env()
    if env is None:
        pytest.skip("mergekit is not installed (set MMT_MERGEKIT_PATH to a folder holding it)")
    paths = _bf16_models(tmp_path, 3, layers=4)
    cfg = {"merge_method": method, **_slices(paths, method), "dtype": "float32", "out_dtype": "bfloat16"}
    want = _run_mergekit(env, cfg, tmp_path, method)
    mm.run_merge(
        mm.load_merge_config(tmp_path / f"{method}.yml", ["tie_break=exact_k", f"output={tmp_path / 'mmt'}"]),
        progress=False,
    )
    got = _state(tmp_path / "mmt")
    assert want.keys() == got.keys()
    for name, w in want.items():
        assert got[name].dtype == w.dtype == torch.bfloat16, name
        if method != "slerp":
            assert torch.equal(got[name].view(torch.int16), w.view(torch.int16)), name
        else:  # slerp rounds a few elements to the neighbouring bf16, as in test_mergekit_yaml_gives_mergekits_checkpoint
            gap = (got[name].float() - w.float()).abs()
            assert bool((gap <= _ulp_bf16(w)).all()), f"{name}: {float(gap.max())}"
            assert float((gap > 0).float().mean()) < 0.01, name
    conf = json.loads((tmp_path / "mmt" / "config.json").read_text())
    assert (
        conf["num_hidden_layers"]
        == json.loads((tmp_path / f"mk_{method}" / "config.json").read_text())["num_hidden_layers"]
    )
