"""Direction-aware training (DAT) with group-wise merging (DATM): Zheng et al., Findings of ACL 2025.

METHODS.md section 4. XX->En suffers from conflict between languages, En->XX profits from synergy, so:

* XX->En is trained **separately** per unit (an X-ALMA language group by default, or per language with
  ``separate_unit: language``), each unit from the same base;
* En->XX is trained **jointly** (``en_xx_unit: all``; or per group with ``en_xx_unit: group``);
* the XX->En unit models are combined by **TIES** (``merge_method``) through :mod:`mmt.merge`
  (LoRA adapters: dense delta, merge, SVD back to the rank; full fine-tuning: streamed checkpoints);
  En->XX is never merged;
* inference is **direction-gated**: :class:`DirectionGate` says, for a (src, tgt) pair, which weights or
  adapter to use (tgt == en -> the merged XX->En model, else the En->XX model of that language's unit).

One ``prepare()`` trains one unit (``Config.unit``); :func:`run_directional` trains every unit with the
pipeline's Trainer, merges, and writes ``directional.json`` (the gate's manifest) in ``train.output_dir``.
From the shell: ``mmt train -c examples/configs/directional_demo.yaml [--eval]``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .base import MethodConfig, TrainingPlan

PIVOT = "en"


@dataclass
class Config(MethodConfig):
    """Direction-aware training options (defaults follow METHODS.md 4(b)/(c); [UNV] items are fields).

    groups: language groups as {name: [codes]}; None = X-ALMA's eight groups (mmt.languages.GROUPS).
    separate_unit: "group" (one XX->En model per group) or "language" (one per language).
    en_xx_unit: "all" (one joint En->XX model, the paper's reading) or "group".
    directions: restrict to these directions (e.g. ["de-en", "en-de"]); None = every direction of data.train.
    unit: the unit this prepare() trains (set by run_directional); None is an error for prepare().
    lora, lora_*: LoRA through peft (default; X-ALMA uses rank 512 at 13B, scaled down here);
        lora=false trains all weights (then merging streams full checkpoints).
    merge: merge the XX->En unit models with merge_method (ties), density, lam, sign.
    lora_merge_mode: "svd" (dense delta -> merge -> rank-r SVD) or "factor" (peft-style factor merge).
    freeze_embeddings: full fine-tuning only: keep (tied) embeddings frozen (a large share of a small model).
    """

    groups: dict[str, list[str]] | None = None
    separate_unit: str = "group"
    en_xx_unit: str = "all"
    directions: list[str] | None = None
    unit: str | None = None
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    freeze_embeddings: bool = True
    merge: bool = True
    merge_method: str = "ties"
    merge_density: float = 0.2
    merge_lam: float = 1.0
    merge_sign: str = "total"
    lora_merge_mode: str = "svd"
    sampler: str = "mixed"


@dataclass
class Unit:
    """One separately trained model: a name, its side (xx-en or en-xx) and its directions."""

    name: str
    side: str
    directions: list[tuple[str, str]] = field(default_factory=list)


def _groups(config: Config) -> dict[str, list[str]]:
    from mmt import languages as L

    if config.groups is not None:
        return {str(k): [L.normalize(c) for c in v] for k, v in config.groups.items()}
    return {f"g{g}": list(langs) for g, langs in L.GROUPS.items()}


def _group_of(lang: str, groups: dict[str, list[str]]) -> str:
    for name, langs in groups.items():
        if lang in langs:
            return name
    return f"other-{lang}"  # a language outside every group trains as its own unit


def plan_units(config: Config, directions: list[tuple[str, str]]) -> list[Unit]:
    """Split En-centric directions into training units (XX->En per group/language, En->XX joint/per group)."""
    from mmt import languages as L

    if config.separate_unit not in ("group", "language"):
        raise ValueError(f"directional: separate_unit must be 'group' or 'language', got {config.separate_unit!r}")
    if config.en_xx_unit not in ("all", "group"):
        raise ValueError(f"directional: en_xx_unit must be 'all' or 'group', got {config.en_xx_unit!r}")
    groups = _groups(config)
    units: dict[str, Unit] = {}
    for src, tgt in directions:
        src, tgt = L.normalize(src), L.normalize(tgt)
        if tgt == PIVOT and src != PIVOT:
            key = _group_of(src, groups) if config.separate_unit == "group" else src
            name = f"xx-en.{key}"
            units.setdefault(name, Unit(name, "xx-en")).directions.append((src, tgt))
        elif src == PIVOT and tgt != PIVOT:
            name = "en-xx.all" if config.en_xx_unit == "all" else f"en-xx.{_group_of(tgt, groups)}"
            units.setdefault(name, Unit(name, "en-xx")).directions.append((src, tgt))
        else:
            raise ValueError(f"directional: direction {src}-{tgt} is not English-centric; DAT splits XX->En "
                             "and En->XX (drop it from data.train or method.directions)")
    return sorted(units.values(), key=lambda u: (u.side != "xx-en", u.name))


def _parse(items: list[str]) -> list[tuple[str, str]]:
    from mmt import languages as L

    return [L.parse_direction(d) for d in items]


def prepare(model: nn.Module, config: Config, tokenizer=None) -> tuple[nn.Module, TrainingPlan]:
    """Prepare ``model`` to train the unit ``config.unit`` (whose directions the orchestrator fills in)."""
    if config.unit is None or config.directions is None:
        raise ValueError(
            "directional trains one model per unit; run every unit and the merge with "
            "`mmt train --method directional -c <config.yaml>` (mmt.methods.directional.run_directional), "
            "or set method.unit and method.directions to train a single unit")
    from .mfti import make_trainable

    model, info, save_artifacts = make_trainable(model, config)
    info = {"unit": config.unit, **info}

    plan = TrainingPlan(method="directional", sampler=config.sampler, directions=_parse(config.directions),
                        save_artifacts=save_artifacts, info=info, model=model)
    return model, plan


# ------------------------------------------------------------------------------------------
# orchestration: every unit, then the merge


def training_directions(cfg: Any) -> list[tuple[str, str]]:
    """The directions of data.train (or method.directions), in order, without duplicates."""
    if cfg.method.directions:
        dirs = _parse(cfg.method.directions)
    else:
        dirs = []
        for src in cfg.data.train:
            if src.kind == "mono":
                continue
            if src.directions:
                dirs += _parse(src.directions)
            else:  # e.g. a JSONL file: its directions are in the data
                from mmt.data import load_source, resolve_data_dir

                data_dir = resolve_data_dir(cfg.data.data_dir, required=False)
                items = load_source(src, data_dir, max_chars=cfg.data.max_chars, on_bad_line=cfg.data.on_bad_line,
                                    seed=cfg.data.seed)
                dirs += [(ex.src_lang, ex.tgt_lang) for ex in items]
    if not dirs:
        raise ValueError("directional: no directions; list them in data.train[*].directions or method.directions")
    return list(dict.fromkeys(dirs))


def run_directional(cfg: Any, *, model: nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train every unit of ``cfg`` (a RunConfig whose method is ``directional``), merge the XX->En units,
    and write ``<train.output_dir>/directional.json``. Returns that manifest."""
    import torch

    from mmt import train
    from mmt.models import load_model, save_model

    mcfg: Config = cfg.method
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    if mcfg.unit:  # one named unit over every direction (e.g. a joint baseline with the same LoRA settings)
        units = [Unit(mcfg.unit, "joint", training_directions(cfg))]
    else:
        units = plan_units(mcfg, training_directions(cfg))
    print("directional units: " + "; ".join(f"{u.name} ({', '.join('-'.join(d) for d in u.directions)})"
                                             for u in units), flush=True)
    base_dir = out / "base"
    if not mcfg.lora and not (base_dir / "config.json").exists():
        save_model(model, tokenizer, base_dir)  # the merge streams task vectors against this copy
    # ``model`` itself is never trained (each unit trains a deep copy), so no snapshot of the base is kept:
    # one less full copy of the weights in memory (several units of a 270M model OOM-ed a shared 23 GB box).
    manifest: dict[str, Any] = {"lora": mcfg.lora, "base": cfg.model.name_or_path, "units": {}, "gate": {}}
    for unit in units:
        ucfg = copy.deepcopy(cfg)
        ucfg.method.unit = unit.name
        ucfg.method.directions = ["-".join(d) for d in unit.directions]
        ucfg.train.output_dir = str(out / unit.name)
        final = out / unit.name / "final"
        weights = final / "adapter" if mcfg.lora else final
        done = (weights / ("adapter_config.json" if mcfg.lora else "config.json")).exists()
        if done and cfg.train.resume == "auto":  # a unit finished by an earlier (interrupted) run is reused
            print(f"directional: unit {unit.name} already trained ({weights}); reusing it", flush=True)
            manifest["units"][unit.name] = {"side": unit.side, "directions": ucfg.method.directions,
                                            "weights": str(weights), "steps": None, "final_loss": None,
                                            "reused": True}
            continue
        umodel, _, _, result = train.run(ucfg, model=copy.deepcopy(model), tokenizer=tokenizer)  # same base each
        manifest["units"][unit.name] = {"side": unit.side, "directions": ucfg.method.directions,
                                        "weights": str(weights), "steps": result.steps,
                                        "final_loss": result.final_loss}
        del umodel, result
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    xx_units = [u for u in units if u.side == "xx-en"]
    merged = None
    if mcfg.merge and len(xx_units) > 1:
        from mmt.merge import MergeConfig, run_merge

        merged = out / "xx-en.merged"
        paths = [manifest["units"][u.name]["weights"] for u in xx_units]
        mc = dict(method=mcfg.merge_method, density=mcfg.merge_density, lam=mcfg.merge_lam, sign=mcfg.merge_sign,
                  output=str(merged), overwrite=True)
        if mcfg.lora:
            mc.update(adapters=paths, lora_mode=mcfg.lora_merge_mode, rank=mcfg.lora_r)
        else:
            mc.update(models=paths, base_model=str(base_dir))
        report = run_merge(MergeConfig.from_dict(mc), progress=cfg.train.progress)
        print(report.summary(), flush=True)
        if not mcfg.lora:  # a full checkpoint still needs the tokenizer next to it
            tokenizer.save_pretrained(str(merged))
        manifest["merged"] = {"weights": str(merged), "from": [u.name for u in xx_units], "method": mcfg.merge_method,
                              "density": mcfg.merge_density}
    elif len(xx_units) == 1:
        merged = Path(manifest["units"][xx_units[0].name]["weights"])
    for unit in units:
        for s, t in unit.directions:
            use = str(merged) if (unit.side == "xx-en" and merged is not None) else manifest["units"][unit.name]["weights"]
            manifest["gate"][f"{s}-{t}"] = use
    (out / "directional.json").write_text(json.dumps(manifest, indent=2))
    return manifest


class DirectionGate:
    """Hard direction gate over a ``directional.json`` manifest.

    ``weights_for("de", "en")`` -> the merged XX->En weights; ``weights_for("en", "de")`` -> En->XX.
    ``model_for(direction, base_model)`` returns a ready model (LoRA: the base with that adapter).
    """

    def __init__(self, manifest: str | Path | dict[str, Any]):
        if not isinstance(manifest, dict):
            p = Path(manifest)
            manifest = json.loads((p / "directional.json" if p.is_dir() else p).read_text())
        self.manifest = manifest

    def weights_for(self, src: str, tgt: str) -> str:
        from mmt import languages as L

        key = f"{L.normalize(src)}-{L.normalize(tgt)}"
        gate = self.manifest["gate"]
        if key in gate:
            return gate[key]
        # an unseen language: route by side (XX->En merged model, else the joint En->XX one)
        side = "xx-en" if L.normalize(tgt) == PIVOT else "en-xx"
        if side == "xx-en" and "merged" in self.manifest:
            return self.manifest["merged"]["weights"]
        for name, u in self.manifest["units"].items():
            if u["side"] == side:
                return u["weights"]
        raise KeyError(f"direction gate: no weights for {key}")

    def model_for(self, src: str, tgt: str, base_model: nn.Module | None = None):
        path = self.weights_for(src, tgt)
        if self.manifest.get("lora"):
            if base_model is None:
                raise ValueError("direction gate: LoRA weights need the base model")
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, path)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def evaluate_gated(cfg: Any, manifest: str | Path, *, label: str = "directional", merged: bool = True,
                   skip: dict[str, Any] | None = None, done: dict[str, Any] | None = None):
    """Evaluate every eval direction with the weights the gate picks (merged=False: the unit models).

    skip: {weights: EvalReport} already scored (reused, not re-decoded); done: filled with {weights: EvalReport}
    of what this call scored (pass it as ``skip`` to the next call)."""
    from mmt.evaluate import EvalReport, evaluate
    from mmt.models import load_model

    gate = DirectionGate(manifest)
    by_weights: dict[str, list[str]] = {}
    for d in cfg.eval.directions:
        w = _eval_weights(gate, d, merged)
        by_weights.setdefault(w, []).append(d)
    results, hyps, settings = {}, {}, {}
    for w, dirs in by_weights.items():
        if skip and w in skip:  # the same weights were already scored (e.g. the En->XX unit in datm and dat)
            for d in dirs:
                r = next((r for r in skip[w].results if r.direction == d), None)
                if r is not None:
                    results[d], hyps[d] = r, skip[w].hypotheses.get(d, [])
            settings = settings or skip[w].settings
            dirs = [d for d in dirs if d not in results]
            if not dirs:
                continue
        base, tok = load_model(cfg.model)
        if gate.manifest.get("lora"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, w)  # exactly the adapter picked (never stacked on another)
        else:
            model = load_model(cfg.model, name_or_path=w)[0]
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.directions = dirs
        rep = evaluate(model, tok, ecfg, template=cfg.data.template, data_dir=cfg.data.data_dir, label=label)
        for r in rep.results:
            results[r.direction] = r
        hyps.update(rep.hypotheses)
        settings = settings or rep.settings
        if done is not None:
            done[w] = rep
        del model, base
    if not results:
        return None
    order = [d for d in cfg.eval.directions if d in results]
    return EvalReport(label=label, results=[results[d] for d in order], hypotheses={d: hyps[d] for d in order if d in hyps},
                      settings=settings)


def _eval_weights(gate: "DirectionGate", direction: str, merged: bool) -> str:
    """The weights used for ``direction``: the gate's pick, or (merged=False) the unit that trained it."""
    s, t = direction.split("-")
    w = gate.weights_for(s, t)
    if not merged and t == PIVOT:
        w = next((u["weights"] for u in gate.manifest["units"].values() if direction in u["directions"]), w)
    return w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmt.methods.directional",
                                     description="Direction-aware training: every unit, TIES merge of XX->En, gate")
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--eval", action="store_true", help="evaluate with the direction gate afterwards")
    args = parser.parse_args(argv)
    from mmt.config import load_config

    return train_and_report(load_config(args.config, args.overrides, method="directional"), with_eval=args.eval)


def train_and_report(cfg: Any, *, with_eval: bool = False) -> int:
    """Every unit, the XX->En merge and the gate; with ``with_eval``, direction-gated scores of the merged
    ("datm") and unmerged ("dat") systems. Used by ``mmt train --method directional`` and ``main``."""
    manifest = run_directional(cfg)
    print(json.dumps(manifest["gate"], indent=1))
    if with_eval:
        from mmt.evaluate import write_report

        out = Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")
        scored: dict[str, Any] = {}
        runs = [(True, "datm"), (False, "dat")] if "merged" in manifest else [(False, cfg.method.unit or "dat")]
        for merged, label in runs:
            rep = evaluate_gated(cfg, Path(cfg.train.output_dir), label=label, merged=merged, skip=dict(scored),
                                 done=scored)
            if rep is not None:
                write_report(rep, out)
                print(rep.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
