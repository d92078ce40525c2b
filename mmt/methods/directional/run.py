"""Direction-aware training as one command: every unit from the same base, the TIES merge of the XX->En units,
the gate's manifest (``directional.json``), and optionally direction-gated scores."""

from __future__ import annotations

import copy
import gc
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmt import train
from mmt.data import load_source, resolve_data_dir
from mmt.errors import ConfigError
from mmt.evaluate import write_report
from mmt.merge import MergeConfig, run_merge
from mmt.models import load_model, save_model, without_zero3_init

from .config import Config
from .gate import evaluate_gated
from .units import TrainingUnit, parse_direction_list, plan_units


def training_directions(cfg: Any) -> list[tuple[str, str]]:
    """The directions of data.train (or method.directions), in order, without duplicates."""
    if cfg.method.directions:
        dirs = parse_direction_list(cfg.method.directions)
    else:
        dirs = []
        for src in cfg.data.train:
            if src.kind == "mono":
                continue
            if src.directions:
                dirs += parse_direction_list(src.directions)
            else:  # e.g. a JSONL file: its directions are in the data
                data_dir = resolve_data_dir(cfg.data.data_dir, required=False)
                items = load_source(
                    src, data_dir, max_chars=cfg.data.max_chars, on_bad_line=cfg.data.on_bad_line, seed=cfg.data.seed
                )
                dirs += [(ex.src_lang, ex.tgt_lang) for ex in items]
    if not dirs:
        raise ConfigError("directional: no directions; list them in data.train[*].directions or method.directions")
    return list(dict.fromkeys(dirs))


def run_directional(cfg: Any, *, model: nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train every unit of ``cfg`` (a RunConfig whose method is ``directional``), merge the XX->En units,
    and write ``<train.output_dir>/directional.json``. Returns that manifest."""
    from accelerate import PartialState

    # under accelerate launch every process trains every unit (sharded or data-parallel); the files shared by
    # the units (base copy, merge, manifest) are written by the main process alone, between barriers
    state = PartialState()
    main = state.is_main_process
    mcfg: Config = cfg.method
    out = Path(cfg.train.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if model is None:
        # a plain base on every process (each unit trains a deep copy of it; the merge reads it): under DeepSpeed
        # ZeRO-3, transformers would otherwise partition it at load time, and a partitioned model cannot be copied
        with without_zero3_init():
            model, tokenizer = load_model(cfg.model)
    if mcfg.unit:  # one named unit over every direction (e.g. a joint baseline with the same LoRA settings)
        units = [TrainingUnit(mcfg.unit, "joint", training_directions(cfg))]
    else:
        units = plan_units(mcfg, training_directions(cfg))
    if main:
        print(
            "directional units: "
            + "; ".join(f"{u.name} ({', '.join('-'.join(d) for d in u.directions)})" for u in units),
            flush=True,
        )
    base_dir = out / "base"
    if main and not mcfg.lora and not (base_dir / "config.json").exists():
        save_model(model, tokenizer, base_dir)  # the merge streams task vectors against this copy
    state.wait_for_everyone()
    # ``model`` itself is never trained (each unit trains a deep copy), so no snapshot of the base is kept:
    # one less full copy of the weights in memory (several units of a 270M model OOM-ed a shared 23 GB box).
    base_name = cfg.model.name_or_path  # a local base is recorded absolute: the manifest must work from anywhere
    base_name = str(Path(base_name).resolve()) if Path(base_name).exists() else base_name
    manifest: dict[str, Any] = {"lora": mcfg.lora, "base": base_name, "units": {}, "gate": {}}

    def rel(p: Path | str) -> str:  # weights are recorded relative to the run folder
        return os.path.relpath(p, out)

    for unit in units:
        ucfg = copy.deepcopy(cfg)
        ucfg.method.unit = unit.name
        ucfg.method.directions = ["-".join(d) for d in unit.directions]
        ucfg.train.output_dir = str(out / unit.name)
        ucfg.train.save_model = True  # the merge and the gate read each unit's final/, whatever the caller saves
        final = out / unit.name / "final"
        weights = final / "adapter" if mcfg.lora else final
        done = (weights / ("adapter_config.json" if mcfg.lora else "config.json")).exists()
        if done and cfg.train.resume == "auto":  # a unit finished by an earlier (interrupted) run is reused
            if main:
                print(f"directional: unit {unit.name} already trained ({weights}); reusing it", flush=True)
            manifest["units"][unit.name] = {
                "side": unit.side,
                "directions": ucfg.method.directions,
                "weights": rel(weights),
                "steps": None,
                "final_loss": None,
                "reused": True,
            }
            continue
        umodel, _, _, result = train.run(ucfg, model=copy.deepcopy(model), tokenizer=tokenizer)  # same base each
        manifest["units"][unit.name] = {
            "side": unit.side,
            "directions": ucfg.method.directions,
            "weights": rel(weights),
            "steps": result.steps,
            "final_loss": result.final_loss,
        }
        del umodel, result
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    xx_units = [u for u in units if u.side == "xx-en"]
    merged = None
    state.wait_for_everyone()  # every unit's final/ is written before the merge reads them
    if mcfg.merge and len(xx_units) > 1:
        merged = out / "xx-en.merged"
        if main:  # the other processes wait at the barrier below
            paths = [str(out / manifest["units"][u.name]["weights"]) for u in xx_units]
            info = {
                "from": [u.name for u in xx_units],
                "method": mcfg.merge_method,
                "density": mcfg.merge_density,
                "lam": mcfg.merge_lam,
                "sign": mcfg.merge_sign,
                "lora_merge_mode": mcfg.lora_merge_mode if mcfg.lora else None,
            }
            if mcfg.lora and mcfg.lora_merge_mode == "dense":  # exact: base + TIES of the dense updates, full model
                from mmt.export import merge_adapters_into

                merged_model = copy.deepcopy(model)
                summary = merge_adapters_into(
                    merged_model,
                    paths,
                    method=mcfg.merge_method,
                    density=mcfg.merge_density,
                    lam=mcfg.merge_lam,
                    sign=mcfg.merge_sign,
                )
                save_model(merged_model, tokenizer, merged)
                del merged_model
                info.update(exact=True, relative_update=summary["relative_update"])
                print(
                    f"merged {len(paths)} XX->En adapters exactly ({mcfg.merge_method}, density {mcfg.merge_density}) "
                    f"into the base weights: {merged}",
                    flush=True,
                )
            else:
                mc = dict(
                    method=mcfg.merge_method,
                    density=mcfg.merge_density,
                    lam=mcfg.merge_lam,
                    sign=mcfg.merge_sign,
                    output=str(merged),
                    overwrite=True,
                )
                if mcfg.lora:
                    mc.update(adapters=paths, lora_mode=mcfg.lora_merge_mode, rank=mcfg.merge_rank or mcfg.lora_r)
                else:
                    mc.update(models=paths, base_model=str(base_dir))
                report = run_merge(MergeConfig.from_dict(mc), progress=cfg.train.progress)
                print(report.summary(), flush=True)
                if not mcfg.lora:  # a full checkpoint still needs the tokenizer next to it
                    tokenizer.save_pretrained(str(merged))
                info.update(exact=not mcfg.lora, notes=report.notes)  # svd: the notes give the truncation error
            manifest["merged"] = {"weights": rel(merged), **info}
    elif len(xx_units) == 1:
        merged = out / manifest["units"][xx_units[0].name]["weights"]
    for unit in units:
        for s, t in unit.directions:
            routed_to_merge = unit.side == "xx-en" and merged is not None
            manifest["gate"][f"{s}-{t}"] = rel(merged) if routed_to_merge else manifest["units"][unit.name]["weights"]
    if main:
        (out / "directional.json").write_text(json.dumps(manifest, indent=2))
    state.wait_for_everyone()
    return json.loads((out / "directional.json").read_text())  # the same manifest on every process


def train_and_report(cfg: Any, *, with_eval: bool = False) -> int:
    """Every unit, the XX->En merge and the gate; with ``with_eval``, direction-gated scores of the merged
    ("datm") and unmerged ("dat") systems. Used by ``mmt train --method directional`` and ``main``."""
    from accelerate import PartialState

    manifest = run_directional(cfg)
    if not PartialState().is_main_process:  # scores come from the main process (the models are on disk)
        return 0
    print(json.dumps(manifest["gate"], indent=1))
    if with_eval:
        out = Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")
        scored: dict[str, Any] = {}
        runs = [(True, "datm"), (False, "dat")] if "merged" in manifest else [(False, cfg.method.unit or "dat")]
        for merged, label in runs:
            rep = evaluate_gated(
                cfg, Path(cfg.train.output_dir), label=label, merged=merged, skip=dict(scored), done=scored
            )
            if rep is not None:
                write_report(rep, out)
                print(rep.markdown())
    return 0
