"""Merging peft LoRA adapters into one adapter.

``lora_mode: svd`` merges the dense deltas ``s * B @ A`` of each module and truncates the result back
to ``rank`` by SVD (the merge's own definition, up to the truncation). ``lora_mode: factor`` merges the
A and B factors separately with weights ``sqrt(w * scaling)``, as peft's ``add_weighted_adapter`` does
for TIES/DARE; the product of merged factors is then not the merged product.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmt.errors import MergeError

from .io import atomic_output
from .methods import kernel_merge
from .plan import MergeConfig, tensor_seed
from .report import MergeReport, peak_rss_mb, write_card_and_config, write_report_and_commit


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "LoraAdapter":
        from safetensors.torch import load_file

        p = Path(path)
        conf, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
        for f in (conf, weights):
            if not f.exists():
                raise MergeError(f"LoRA adapter {p} has no {f.name}")
        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise MergeError(f"cannot read {weights}: {exc} (corrupt?)") from None
        try:
            config = json.loads(conf.read_text())
        except ValueError as exc:
            raise MergeError(f"{conf}: not valid JSON ({exc})") from None
        return cls(p, config, tensors)

    def scaling(self, module: str) -> float:
        r = self.config.get("rank_pattern", {}).get(module, self.config["r"])
        alpha = self.config.get("alpha_pattern", {}).get(module, self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_A", 1)[0] for k in self.tensors if ".lora_A" in k})

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = next((v for k, v in self.tensors.items() if k.startswith(module + ".lora_A")), None)
        b = next((v for k, v in self.tensors.items() if k.startswith(module + ".lora_B")), None)
        if a is None or b is None:
            raise MergeError(f"LoRA adapter {self.path}: module {module} lacks lora_A or lora_B")
        return a, b


def merge_lora_adapters(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge peft LoRA adapters into one adapter (``lora_mode`` svd or factor); atomic output."""
    from tqdm.auto import tqdm

    t0 = time.time()
    adapters = [LoraAdapter.load(s.path) for s in cfg.adapters]
    mods = adapters[0].modules()
    for spec, ad in zip(cfg.adapters, adapters):
        if ad.modules() != mods:
            diff = sorted(set(mods) ^ set(ad.modules()))
            raise MergeError(
                f"LoRA adapter {spec.path} targets different modules (e.g. {diff[0]}) than {cfg.adapters[0].path}"
            )
    weights = [float(s.weight) for s in cfg.adapters]
    dens = cfg.densities(cfg.adapters)
    backend = None if cfg.backend == "auto" else cfg.backend
    ranks = sorted({ad.config["r"] for ad in adapters})
    if cfg.lora_mode == "factor" and len(ranks) > 1:
        raise MergeError(f"lora_mode: factor needs adapters of one rank, got ranks {ranks}; use lora_mode: svd")
    rank = cfg.rank or max(ranks)
    # peft's ties/dare methods take no base: every method works on the deltas, and linear is their sum.
    method = cfg.method if cfg.method != "linear" else "task_arithmetic"
    out_t: dict[str, torch.Tensor] = {}
    report = MergeReport(output=cfg.output, method=f"{cfg.method} ({cfg.lora_mode})", num_models=len(adapters))
    errors = []
    for mod in tqdm(mods, desc=f"merge LoRA ({cfg.lora_mode})", unit="module", disable=not progress):
        facs = [ad.factors(mod) for ad in adapters]
        a_key = next(k for k in adapters[0].tensors if k.startswith(mod + ".lora_A"))
        b_key = next(k for k in adapters[0].tensors if k.startswith(mod + ".lora_B"))
        dtype = facs[0][0].dtype
        seed = tensor_seed(cfg.seed, mod)
        scalings = [ad.scaling(_peft_module_key(mod)) for ad in adapters]
        if cfg.lora_mode == "svd":
            deltas = [s * (b.float() @ a.float()) for s, (a, b) in zip(scalings, facs)]
            dense = kernel_merge(
                deltas,
                None,
                method=method,
                weights=weights,
                densities=dens,
                lam=float(cfg.lam),
                seed=seed,
                sign=cfg.sign,
                backend=backend,
            )
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            r = min(rank, s.numel())
            root = s[:r].sqrt()
            new_b, new_a = u[:, :r] * root, root[:, None] * vh[:r]
            approx = new_b @ new_a
            errors.append(float((dense - approx).norm() / dense.norm().clamp_min(1e-30)))
            out_t[a_key], out_t[b_key] = new_a.to(dtype).contiguous(), new_b.to(dtype).contiguous()
        else:
            # As peft's add_weighted_adapter: each factor carries sqrt(w * scaling).
            roots = [math.sqrt(abs(w) * s) for w, s in zip(weights, scalings)]
            signs = [1.0 if w >= 0 else -1.0 for w in weights]
            new_a = kernel_merge(
                [a.float() for a, _ in facs],
                None,
                method=method,
                weights=[r_ * sg for r_, sg in zip(roots, signs)],
                densities=dens,
                lam=1.0,
                seed=seed,
                sign=cfg.sign,
                backend=backend,
            )
            new_b = kernel_merge(
                [b.float() for _, b in facs],
                None,
                method=method,
                weights=roots,
                densities=dens,
                lam=float(cfg.lam),
                seed=seed + 1,
                sign=cfg.sign,
                backend=backend,
            )
            out_t[a_key], out_t[b_key] = new_a.to(dtype), new_b.to(dtype)
        report.tensors_merged += 2
        report.parameters += out_t[a_key].numel() + out_t[b_key].numel()
    output = Path(cfg.output)
    tmp = atomic_output(output, cfg.overwrite)
    try:
        from safetensors.torch import save_file

        save_file(out_t, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        conf = dict(adapters[0].config)
        new_r = rank if cfg.lora_mode == "svd" else ranks[0]
        conf.update(r=new_r, lora_alpha=new_r, use_rslora=False, rank_pattern={}, alpha_pattern={})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
        report.bytes_written = sum(t.nbytes for t in out_t.values())
        report.seconds = time.time() - t0
        report.peak_rss_mb = peak_rss_mb()
        if errors:
            report.notes.append(
                f"SVD truncation to rank {rank}: relative Frobenius error mean "
                f"{sum(errors) / len(errors):.4f}, max {max(errors):.4f} over {len(errors)} modules"
            )
        else:
            report.notes.append(
                "factor-space merge (peft-style): the product of merged factors is not the merged "
                "product; use lora_mode: svd for the dense definition"
            )
        write_card_and_config(tmp, cfg, report)
        write_report_and_commit(tmp, output, cfg.to_dict(), report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _peft_module_key(module: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> the key peft uses in rank/alpha patterns."""
    return module.removeprefix("base_model.model.")
