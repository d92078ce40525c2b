"""The direction gate: which weights translate a (src, tgt) pair, and evaluation through it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM

import mmt.evaluate
import mmt.models
from mmt import languages as L
from mmt.errors import ConfigError, require
from mmt.evaluate import EvalReport

from .config import PIVOT

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
        raise ConfigError(f"direction gate: no weights for {key}")

    def model_for(self, src: str, tgt: str, base_model: nn.Module | None = None):
        path = self.weights_for(src, tgt)
        if self.manifest.get("lora"):
            if base_model is None:
                raise ConfigError("direction gate: LoRA weights need the base model")
            return require("peft", purpose="LoRA direction gate").PeftModel.from_pretrained(base_model, path)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def evaluate_gated(cfg: Any, manifest: str | Path, *, label: str = "directional", merged: bool = True,
                   skip: dict[str, Any] | None = None, done: dict[str, Any] | None = None):
    """Evaluate every eval direction with the weights the gate picks (merged=False: the unit models).

    skip: {weights: EvalReport} already scored (reused, not re-decoded); done: filled with {weights: EvalReport}
    of what this call scored (pass it as ``skip`` to the next call)."""
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
        base, tok = mmt.models.load_model(cfg.model)
        if gate.manifest.get("lora"):
            # exactly the adapter picked (never stacked on another)
            model = require("peft", purpose="LoRA direction gate").PeftModel.from_pretrained(base, w)
        else:
            model = mmt.models.load_model(cfg.model, name_or_path=w)[0]
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.directions = dirs
        rep = mmt.evaluate.evaluate(model, tok, ecfg, template=cfg.data.template, data_dir=cfg.data.data_dir, label=label)
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
