"""Standalone Hugging Face models from a run: LoRA merged into the weights, adapters merged exactly.

* :func:`merge_adapters_into` adds the merge (TIES, task arithmetic, DARE, ...) of K LoRA adapters' dense
  updates ``scaling * B @ A`` to a base model's weights: the exact merge, with no rank truncation.
* :func:`export_directional` writes every model a direction-aware run routes to (the merged XX->En model, the
  En->XX model) as a plain checkpoint, plus the ``directional.json`` that routes to them (``mmt eval`` reads it).
* ``mmt export --run DIR --output OUT`` is the CLI for both kinds of run (a single-model run's ``final/`` is
  already standalone and is copied).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mmt.errors import CheckpointError


def _lora_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """{base parameter name: dense fp32 update} of one peft LoRA adapter directory."""
    from mmt.merge.lora import LoraAdapter, _peft_module_key

    ad = LoraAdapter.load(adapter_dir)
    if ad.config.get("use_dora"):
        raise CheckpointError(f"{adapter_dir}: DoRA adapters are not linear updates; merge them with peft")
    fan_in_fan_out = bool(ad.config.get("fan_in_fan_out"))
    out = {}
    for mod in ad.modules():
        a, b = ad.factors(mod)
        delta = ad.scaling(_peft_module_key(mod)) * (b.float() @ a.float())
        out[_peft_module_key(mod) + ".weight"] = delta.t().contiguous() if fan_in_fan_out else delta
    return out


@torch.no_grad()
def merge_adapters_into(
    model: nn.Module,
    adapters: Sequence[str | Path],
    *,
    method: str = "ties",
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    lam: float = 1.0,
    sign: str = "total",
    seed: int = 0,
) -> dict[str, Any]:
    """Add the ``method`` merge of the adapters' dense updates to ``model``'s weights (in place).

    Each adapted weight becomes ``W + merge(delta_1, ..., delta_K)``; nothing is truncated. Returns a summary
    (tensors changed, relative size of the merged update)."""
    from mmt.merge import tensor_seed
    from mmt_kernels import merge as kmerge

    deltas = [_lora_deltas(p) for p in adapters]
    names = sorted(deltas[0])
    for p, d in zip(adapters[1:], deltas[1:]):
        if sorted(d) != names:
            diff = sorted(set(names) ^ set(d))
            raise CheckpointError(f"LoRA adapter {p} adapts different modules (e.g. {diff[0]}) than {adapters[0]}")
    params = dict(model.named_parameters())
    method_k = "task_arithmetic" if method == "linear" else method
    w = list(weights) if weights is not None else None
    num = den = 0.0
    for name in names:
        if name not in params:
            raise CheckpointError(f"LoRA update for {name} has no weight of that name in the base model")
        p = params[name]
        ds = [d[name] for d in deltas]
        if ds[0].shape != p.shape:
            raise CheckpointError(f"LoRA update for {name} has shape {tuple(ds[0].shape)}, the weight {tuple(p.shape)}")
        merged = kmerge.merge(
            ds, None, method=method_k, weights=w, density=density, lam=lam, seed=tensor_seed(seed, name), sign=sign
        )
        p.copy_((p.float() + merged).to(p.dtype))
        num += float(merged.norm()) ** 2
        den += float(p.float().norm()) ** 2
    return {
        "method": method,
        "density": density,
        "lam": lam,
        "adapters": [str(a) for a in adapters],
        "tensors": len(names),
        "relative_update": (num / max(den, 1e-30)) ** 0.5,
        "truncation": None,
    }


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain model with a peft model's LoRA merged into the weights (the peft model is left as it was)."""
    import copy

    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


def export_directional(run_dir: str | Path, output: str | Path) -> Path:
    """Every model a direction-aware run routes to, as standalone checkpoints under ``output`` (LoRA merged into
    the weights), with a ``directional.json`` that routes the same directions to them. Atomic."""
    import os
    import tempfile

    from mmt.methods.directional.gate import MANIFEST, DirectionGate
    from mmt.models import save_model

    gate = DirectionGate(run_dir)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp", dir=output.parent))
    try:
        names: dict[str, str] = {}
        manifest: dict[str, Any] = {
            "lora": False,
            "base": None,
            "units": {},
            "gate": {},
            "exported_from": str(Path(run_dir).resolve()),
        }
        for direction in gate.directions():
            weights = gate.weights_for(*direction.split("-"))
            if weights not in names:
                names[weights] = _export_name(Path(run_dir), Path(weights), len(names))
                if _is_full_model(Path(weights)):
                    shutil.copytree(weights, tmp / names[weights])
                else:
                    save_model(*gate.load(weights), tmp / names[weights])
            name = names[weights]
            manifest["gate"][direction] = name
            side = "xx-en" if direction.endswith("-en") else "en-xx"
            unit = manifest["units"].setdefault(name, {"side": side, "directions": [], "weights": name})
            unit["directions"].append(direction)
        if "merged" in gate.manifest:
            merged = gate.resolve(gate.manifest["merged"]["weights"])
            if merged in names:
                manifest["merged"] = {**gate.manifest["merged"], "weights": names[merged]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _is_full_model(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def _export_name(run_dir: Path, weights: Path, i: int) -> str:
    """The unit's folder name inside the run (``xx-en.merged``, ``en-xx.all``, ...)."""
    try:
        return weights.resolve().relative_to(run_dir.resolve()).parts[0]
    except ValueError:
        return f"model-{i}"


# ------------------------------------------------------------------------------------------
# CLI: mmt export


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt export --run runs/directional_demo --output exported/directional
  mmt export --run runs/mfti_demo --output exported/mfti

A direction-aware run gives one standalone model per route (LoRA merged into the weights) and its
directional.json; `mmt eval --model <output>` routes each direction to its model."""
    p.add_argument("--run", required=True, help="a run's output directory (train.output_dir)")
    p.add_argument("--output", "-o", required=True, help="where to write the standalone model(s)")


def run_export(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if (run / "directional.json").is_file():
        out = export_directional(run, args.output)
    elif (run / "final" / "config.json").is_file():  # already standalone
        out = Path(args.output)
        if out.exists():
            raise CheckpointError(f"{out} exists; choose a new --output")
        shutil.copytree(run / "final", out)
    else:
        raise CheckpointError(f"{run} is neither a direction-aware run (directional.json) nor a run with final/")
    print(f"exported to {out}")
    return 0
