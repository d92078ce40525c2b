"""The direction gate: which model translates a (src, tgt) pair, and evaluation through it.

A ``directional.json`` manifest (written by :func:`mmt.methods.directional.run_directional`, or by ``mmt export``
next to standalone models) maps each direction to weights: a full model directory (the exact TIES merge of the
XX->En units, or any exported model) or a LoRA adapter (applied to the manifest's ``base`` and merged into its
weights, so that a run and its export compute the same logits). Paths are relative to the manifest's folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

import mmt.evaluate
import mmt.models
from mmt import languages as L
from mmt.errors import ConfigError, require
from mmt.evaluate import EvalReport

from .config import PIVOT

MANIFEST = "directional.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class DirectionGate:
    """Hard direction gate over a ``directional.json`` manifest (a run or export folder, or the file).

    ``weights_for("de", "en")`` -> the merged XX->En weights; ``weights_for("en", "de")`` -> En->XX.
    ``model_for(src, tgt)`` returns a ready model (a LoRA adapter merged into the base's weights).
    """

    def __init__(self, manifest: str | Path | dict[str, Any], root: str | Path | None = None):
        if not isinstance(manifest, dict):
            p = Path(manifest)
            file = p / MANIFEST if p.is_dir() else p
            if not file.is_file():
                raise ConfigError(f"{p}: no {MANIFEST} (not a direction-aware run or export)")
            root = file.parent
            manifest = json.loads(file.read_text())
        self.manifest = manifest
        self.root = Path(root) if root is not None else Path(".")

    def resolve(self, weights: str) -> str:
        p = Path(weights)
        if p.is_absolute():
            return str(p)
        inside = self.root / p
        return str(inside if inside.exists() or not p.exists() else p)  # older manifests: relative to the cwd

    def weights_for(self, src: str, tgt: str) -> str:
        key = f"{L.normalize(src)}-{L.normalize(tgt)}"
        gate = self.manifest["gate"]
        if key in gate:
            return self.resolve(gate[key])
        # an unseen language: route by side (XX->En merged model, else the joint En->XX one)
        side = "xx-en" if L.normalize(tgt) == PIVOT else "en-xx"
        if side == "xx-en" and "merged" in self.manifest:
            return self.resolve(self.manifest["merged"]["weights"])
        for u in self.manifest["units"].values():
            if u["side"] in (side, "joint"):
                return self.resolve(u["weights"])
        raise ConfigError(f"direction gate: no weights for {key}")

    def directions(self) -> list[str]:
        return list(self.manifest["gate"])

    def load(self, weights: str, base_model: nn.Module | None = None, model_cfg: Any = None):
        """(model, tokenizer) for resolved ``weights``; an adapter is merged into (a copy of) the base."""
        if not is_adapter(weights):
            return mmt.models.load_model(model_cfg, name_or_path=weights, verbose=False)
        tok = None
        if base_model is None:
            base_model, tok = mmt.models.load_model(model_cfg, name_or_path=self.manifest["base"], verbose=False)
        else:
            base_model = copy.deepcopy(base_model)
        peft = require("peft", purpose="LoRA direction gate")
        return peft.PeftModel.from_pretrained(base_model, weights).merge_and_unload(), tok

    def model_for(self, src: str, tgt: str, base_model: nn.Module | None = None):
        return self.load(self.weights_for(src, tgt), base_model)[0]

    def translate(
        self,
        sentences: list[str],
        src: str,
        tgt: str,
        *,
        template: str = "T1",
        tokenizer: Any = None,
        **generate_kwargs,
    ) -> list[str]:
        """Translate ``sentences`` with the model this gate routes (src, tgt) to."""
        from mmt.data import build_prompt

        model, tok = self.load(self.weights_for(src, tgt))
        tok = tokenizer or tok
        prompts = [build_prompt(template, src, tgt, s) for s in sentences]
        return mmt.evaluate.generate(model, tok, prompts, template=template, direction=(src, tgt), **generate_kwargs)


def evaluate_gated(
    cfg: Any,
    manifest: str | Path,
    *,
    label: str = "directional",
    merged: bool = True,
    skip: dict[str, Any] | None = None,
    done: dict[str, Any] | None = None,
):
    """Evaluate every eval direction with the weights the gate picks (merged=False: the unit models).

    skip: {weights: EvalReport} already scored (reused, not re-decoded); done: filled with {weights: EvalReport}
    of what this call scored (pass it as ``skip`` to the next call)."""
    gate = DirectionGate(manifest)
    by_weights: dict[str, list[str]] = {}
    for d in cfg.eval.directions:
        w = _eval_weights(gate, d, merged)
        by_weights.setdefault(w, []).append(d)
    seen = gate.directions()
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
        model, tok = gate.load(w, model_cfg=cfg.model)
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.directions = dirs
        rep = mmt.evaluate.evaluate(
            model, tok, ecfg, template=cfg.data.template, data_dir=cfg.data.data_dir, label=label, seen=seen
        )
        for r in rep.results:
            results[r.direction] = r
        hyps.update(rep.hypotheses)
        settings = settings or rep.settings
        if done is not None:
            done[w] = rep
        del model
    if not results:
        return None
    order = [d for d in cfg.eval.directions if d in results]
    return EvalReport(
        label=label,
        results=[results[d] for d in order],
        hypotheses={d: hyps[d] for d in order if d in hyps},
        settings=settings,
    )


def _eval_weights(gate: "DirectionGate", direction: str, merged: bool) -> str:
    """The weights used for ``direction``: the gate's pick, or (merged=False) the unit that trained it."""
    s, t = direction.split("-")
    w = gate.weights_for(s, t)
    if not merged and t == PIVOT:
        unit = next((u for u in gate.manifest["units"].values() if direction in u["directions"]), None)
        w = gate.resolve(unit["weights"]) if unit is not None else w
    return w
