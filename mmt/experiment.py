"""``mmt experiment experiment.yaml``: several method configs at one matched budget, compared fairly.

For every run of the experiment file:

1. the run config is read and the experiment's shared sections (``model``, ``data``, ``eval``) and
   the budget are applied: every run trains the same number of optimizer steps at the same global
   batch (``budget.steps``), or the steps that give the same number of training tokens
   (``budget.tokens``); ``budget.enforce: check`` refuses configs that differ instead of changing them;
2. the run trains (preparatory stages first, e.g. Mix-MoE's monolingual stage 1, outside the budget),
   saving a checkpoint every ``selection.every`` steps;
3. every checkpoint is scored on FLORES dev (``selection``), the best one is scored on the test side
   (``eval``: the trained directions and the unseen ones);
4. a done marker (written atomically) records the result, so a killed experiment resumes without
   redoing finished runs (an unfinished run resumes from its last checkpoint).

Zero-shot and k-shot baselines of the untrained model are scored the same way, then
:mod:`mmt.compare` tests every system against the chosen baseline. The file format is documented in
``docs/experiments.md``; ``examples/experiments/four_methods_demo.yaml`` is a complete example.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmt.config import check_keys, read_yaml_mapping
from mmt.errors import CheckpointError, ConfigError, MmtError

TOP_KEYS = {"name", "output_dir", "model", "data", "eval", "budget", "selection", "baselines", "runs", "compare"}
BUDGET_KEYS = {"steps", "tokens", "batch_size", "enforce"}
SELECTION_KEYS = {"dev_set", "first_line", "max_sentences", "every", "metric", "directions"}
RUN_KEYS = {"label", "config", "overrides", "pre"}
STAGE_KEYS = {"config", "overrides"}
BASELINE_KEYS = {"label", "shots"}
COMPARE_KEYS = {"baseline", "bootstrap", "ar_trials", "seed", "comet_model"}
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SINGLE_STAGE_SELECTABLE = ("mfti", "landermt", "mixmoe")  # one Trainer run: checkpoints hold its trainable tensors


# --------------------------------------------------------------------------------------------
# the experiment file


@dataclass
class Budget:
    """``steps`` optimizer steps at global batch ``batch_size`` or ``tokens`` training tokens per run."""

    batch_size: int
    steps: int | None = None
    tokens: int | None = None
    enforce: str = "force"  # force: set every run's steps/batch; check: refuse runs that differ

    @property
    def kind(self) -> str:
        return "steps" if self.steps is not None else "tokens"


@dataclass
class Selection:
    """Checkpoint selection on a dev set (never the test set)."""

    dev_set: str = "flores200/dev_subset"
    first_line: int = 0
    max_sentences: int = 32
    every: int | None = None  # checkpoint interval in optimizer steps; None: only the final model
    metric: str = "chrf"  # chrf | bleu, averaged over the dev directions
    directions: list[str] | None = None  # default: the test directions


@dataclass
class Stage:
    config: Path
    overrides: list[str] = field(default_factory=list)


@dataclass
class RunSpec:
    label: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    pre: list[Stage] = field(default_factory=list)


@dataclass
class Experiment:
    source: Path
    output_dir: Path
    budget: Budget
    selection: Selection
    runs: list[RunSpec]
    baselines: list[tuple[str, int]]
    shared: dict[str, dict[str, Any]]
    compare: dict[str, Any]
    name: str = "experiment"


def _check_keys(where: str, values: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    check_keys(known, values, where)
    return values


def _int(where: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return value


def _label(where: str, value: Any) -> str:
    if not isinstance(value, str) or not LABEL_RE.match(value):
        raise ConfigError(f"{where}: label {value!r} must be letters, digits, '.', '_', '+' or '-' (it names files)")
    return value


def _overrides(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}: expected a list of 'section.key=value' strings")
    return list(value)


def load_experiment(path: str | Path, output_dir: str | None = None) -> Experiment:
    """Parse and check an experiment file; every problem names the file and the key."""
    path = Path(path)
    raw = _check_keys(str(path), read_yaml_mapping(path, "experiment file"), TOP_KEYS)
    here = path.parent

    b = _check_keys(f"{path}: budget", raw.get("budget") or {}, BUDGET_KEYS)
    if ("steps" in b) == ("tokens" in b):
        raise ConfigError(
            f"{path}: budget: give exactly one of 'steps' (optimizer steps per run) or 'tokens' "
            "(training tokens per run)"
        )
    if "batch_size" not in b:
        raise ConfigError(f"{path}: budget.batch_size: required (global examples per optimizer step, every run)")
    enforce = b.get("enforce", "force")
    if enforce not in ("force", "check"):
        raise ConfigError(f"{path}: budget.enforce: must be 'force' or 'check', got {enforce!r}")
    budget = Budget(
        batch_size=_int(f"{path}: budget.batch_size", b["batch_size"]),
        steps=_int(f"{path}: budget.steps", b["steps"]) if "steps" in b else None,
        tokens=_int(f"{path}: budget.tokens", b["tokens"]) if "tokens" in b else None,
        enforce=enforce,
    )

    s = _check_keys(f"{path}: selection", raw.get("selection") or {}, SELECTION_KEYS)
    sel = Selection(**s)
    if sel.every is not None:
        _int(f"{path}: selection.every", sel.every)
    _int(f"{path}: selection.max_sentences", sel.max_sentences)
    _int(f"{path}: selection.first_line", sel.first_line, minimum=0)
    if sel.metric not in ("chrf", "bleu"):
        raise ConfigError(f"{path}: selection.metric: must be 'chrf' or 'bleu', got {sel.metric!r}")

    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise ConfigError(f"{path}: runs: expected a non-empty list of {{label, config, overrides, pre}}")
    runs = []
    for i, r in enumerate(runs_raw):
        where = f"{path}: runs[{i}]"
        r = _check_keys(where, r, RUN_KEYS)
        if "label" not in r or "config" not in r:
            raise ConfigError(f"{where}: needs 'label' and 'config'")
        pre = []
        for j, st in enumerate(r.get("pre") or []):
            st = _check_keys(f"{where}.pre[{j}]", st, STAGE_KEYS)
            if "config" not in st:
                raise ConfigError(f"{where}.pre[{j}]: needs 'config'")
            pre.append(
                Stage(
                    _config_path(here, st["config"], f"{where}.pre[{j}].config"),
                    _overrides(f"{where}.pre[{j}].overrides", st.get("overrides")),
                )
            )
        runs.append(
            RunSpec(
                _label(f"{where}.label", r["label"]),
                _config_path(here, r["config"], f"{where}.config"),
                _overrides(f"{where}.overrides", r.get("overrides")),
                pre,
            )
        )

    baselines = []
    for i, bl in enumerate(raw.get("baselines") or []):
        bl = _check_keys(f"{path}: baselines[{i}]", bl, BASELINE_KEYS)
        baselines.append(
            (
                _label(f"{path}: baselines[{i}].label", bl.get("label")),
                _int(f"{path}: baselines[{i}].shots", bl.get("shots", 0), minimum=0),
            )
        )
    labels = [r.label for r in runs] + [b[0] for b in baselines]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"{path}: labels must be unique, {dup} appear more than once")
    cmp = _check_keys(f"{path}: compare", raw.get("compare") or {}, COMPARE_KEYS)
    if cmp.get("baseline") is not None and cmp["baseline"] not in labels:
        raise ConfigError(f"{path}: compare.baseline {cmp['baseline']!r} is not one of the labels {labels}")
    shared = {}
    for sec in ("model", "data", "eval"):
        if raw.get(sec) is not None:
            if not isinstance(raw[sec], dict):
                raise ConfigError(f"{path}: {sec}: expected a mapping (a run config section shared by every run)")
            shared[sec] = raw[sec]
    out = output_dir or raw.get("output_dir") or f"runs/experiments/{path.stem}"
    return Experiment(
        source=path,
        output_dir=Path(out),
        budget=budget,
        selection=sel,
        runs=runs,
        baselines=baselines,
        shared=shared,
        compare=cmp,
        name=str(raw.get("name") or path.stem),
    )


def _config_path(here: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a path to a run config")
    p = Path(value)
    p = p if p.is_absolute() else here / p
    if not p.is_file():
        raise ConfigError(f"{where}: run config {p} not found (paths are relative to the experiment file)")
    return p


# --------------------------------------------------------------------------------------------
# run configs (the one place that builds mmt.config objects)


def _merge(base: Any, extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base or {})
    for k, v in extra.items():
        out[k] = _merge(out.get(k), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_run_config(
    config: Path,
    overrides: list[str],
    *,
    shared: dict[str, dict[str, Any]],
    where: str,
    placeholders: dict[str, str],
    train: dict[str, Any] | None = None,
):
    """A :class:`mmt.config.RunConfig` from a run config file plus the experiment's shared sections,
    the run's overrides (``{run_dir}`` / ``{exp_dir}`` expanded) and forced ``train`` values."""
    from mmt.config import apply_overrides, from_dict

    raw = read_yaml_mapping(config, f"{where}: run config")
    for sec, values in shared.items():
        raw[sec] = _merge(raw.get(sec), values)
    try:
        ov = [o.format(**placeholders) for o in overrides]
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{where}: bad placeholder in overrides ({exc}); use {{run_dir}} or {{exp_dir}}") from None
    raw = apply_overrides(raw, ov)
    raw["train"] = _merge(raw.get("train"), train or {})
    return from_dict(raw, source=f"{where} ({config})")


def _fit_micro_batch(batch: int, micro: int) -> int:
    return math.gcd(batch, micro) if batch % micro else micro


def _config_hash(cfg_dict: dict[str, Any], extra: dict[str, Any]) -> str:
    blob = json.dumps({"config": cfg_dict, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# model loading (checkpoints hold the trainable tensors of the prepared model)


def load_checkpoint_weights(model: Any, checkpoint: Path) -> None:
    """Put a trainer checkpoint's tensors into ``model`` (the model its run trained, method applied).

    This is the one place that turns a checkpoint folder into a model to score."""
    import torch
    from safetensors.torch import load_file

    f = Path(checkpoint) / "trainable.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{checkpoint}: no trainable.safetensors (not a finished trainer checkpoint)")
    saved = load_file(str(f))
    params = dict(model.named_parameters())
    extra = sorted(set(saved) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    if extra or missing:
        raise CheckpointError(
            f"{checkpoint}: tensors do not match the model (unknown {extra[:3]}, missing "
            f"{missing[:3]}); was it written by this run?"
        )
    with torch.no_grad():
        for n, t in saved.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{checkpoint}: {n} is {tuple(t.shape)}, the model's is {tuple(params[n].shape)}")
            params[n].copy_(t.to(params[n].dtype))


def checkpoints(train_dir: Path) -> list[Path]:
    """Finished trainer checkpoints (``checkpoints/checkpoint-N`` with a manifest), oldest first."""
    from mmt.checkpoint import list_checkpoints

    return list_checkpoints(Path(train_dir) / "checkpoints")


# --------------------------------------------------------------------------------------------
# done markers and atomic files


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _read_marker(path: Path, config_hash: str, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    marker = json.loads(path.read_text(encoding="utf-8"))
    if marker.get("config_hash") != config_hash:
        raise ConfigError(
            f"{what} finished earlier with another configuration ({path}); delete {path.parent} to "
            "redo it, or use another output_dir"
        )
    return marker


# --------------------------------------------------------------------------------------------
# running


def _train(cfg: Any, model: Any = None, tokenizer: Any = None):
    """One training run (the trainer resumes from the run's last checkpoint)."""
    from mmt import train

    return train.run(cfg, model=model, tokenizer=tokenizer)


def _train_directional(cfg: Any) -> dict[str, Any]:
    from mmt.methods.directional import run_directional

    return run_directional(cfg)


def _evaluate(model: Any, tokenizer: Any, cfg: Any, eval_cfg: Any, *, label: str, shots: int = 0):
    from mmt.evaluate import evaluate

    return evaluate(
        model,
        tokenizer,
        eval_cfg,
        template=cfg.data.template,
        data_dir=cfg.data.data_dir,
        label=label,
        shots=shots,
        progress=False,
    )


def _write_test_report(report: Any, out: Path, label: str, cfg: Any, extra: dict[str, Any]) -> Path:
    """Result files as ``mmt eval`` writes them, plus the references (``<label>_refs/``) for mmt compare."""
    from mmt.data import load_flores, resolve_data_dir
    from mmt.evaluate import write_report

    report.settings.update(extra)
    write_report(report, out, label)
    test = Path(report.settings["test_set"])
    test = test if test.is_absolute() else resolve_data_dir(cfg.data.data_dir) / test
    ref_dir = out / f"{label}_refs"
    ref_dir.mkdir(exist_ok=True)
    first = int(report.settings.get("first_line") or 0)
    for r in report.results:
        s, t = r.direction.split("-")
        refs = load_flores(test, (s, t))[t][first : first + r.n]
        (ref_dir / f"{r.direction}.txt").write_text("".join(x + "\n" for x in refs), encoding="utf-8")
    return out / f"{label}.json"


def _trained_directions(cfg: Any) -> list[str]:
    """The directions of the examples the run trains on (its sources, filtered as the trainer filters them)."""
    from mmt import languages as L
    from mmt.data import filter_directions, load_source, resolve_data_dir

    data_dir = resolve_data_dir(cfg.data.data_dir, required=False)
    method_dirs = getattr(cfg.method, "directions", None)
    wanted = [L.parse_direction(d) for d in method_dirs] if method_dirs else None
    found: list[str] = []
    for src in cfg.data.train:
        if src.kind == "mono":
            continue
        items = load_source(
            src, data_dir, max_chars=cfg.data.max_chars, on_bad_line=cfg.data.on_bad_line, seed=cfg.data.seed
        )
        found += [
            f"{ex.src_lang}-{ex.tgt_lang}"
            for ex in filter_directions(items, wanted, cfg.data.languages, cfg.data.groups)
        ]
    return list(dict.fromkeys(found))


def _dev_eval_cfg(cfg: Any, sel: Selection) -> Any:
    e = copy.deepcopy(cfg.eval)
    e.test_set, e.first_line, e.max_sentences, e.shots = sel.dev_set, sel.first_line, sel.max_sentences, 0
    e.directions = list(sel.directions or cfg.eval.directions)
    e.comet_model = None
    return e


def _mean_metric(report: Any, metric: str) -> float:
    vals = [getattr(r, metric) for r in report.results]
    return float(sum(vals) / max(len(vals), 1))


class Runner:
    def __init__(self, exp: Experiment, log=print):
        self.exp = exp
        self.log = log if log is not None else (lambda *a, **k: None)
        self.out = exp.output_dir
        self.test_dir = self.out / "test"
        self.calls = {"train": 0, "evaluate": 0}
        self._configs: dict[int, tuple[Any, dict[str, Any]]] = {}

    # ---- configs

    def _placeholders(self, run_dir: Path) -> dict[str, str]:
        return {"run_dir": str(run_dir), "exp_dir": str(self.out)}

    def run_config(self, i: int, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        """The run's resolved config with the budget applied, and a description of the budget."""
        if i not in self._configs:
            self._configs[i] = self._resolve_run_config(i, spec)
        cfg, budget = self._configs[i]
        return copy.deepcopy(cfg), dict(budget)

    def _resolve_run_config(self, i: int, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        exp, b = self.exp, self.exp.budget
        run_dir = self.out / "runs" / spec.label
        where = f"{exp.source}: runs[{i}] ({spec.label})"
        forced: dict[str, Any] = {"output_dir": str(run_dir / "train"), "resume": "auto", "save_model": False}
        cfg = build_run_config(
            spec.config,
            spec.overrides,
            shared=exp.shared,
            where=where,
            placeholders=self._placeholders(run_dir),
            train=forced,
        )
        units = 1
        if cfg.method_name == "directional":
            from mmt.methods.directional import plan_units, training_directions

            units = 1 if cfg.method.unit else len(plan_units(cfg.method, training_directions(cfg)))
        if b.kind == "steps":
            total = b.steps
        else:
            total = self._steps_for_tokens(cfg, where)
        per_unit, rest = divmod(total, units)
        problems = []
        if cfg.train.batch_size != b.batch_size:
            problems.append(f"train.batch_size={cfg.train.batch_size} (budget {b.batch_size})")
        if cfg.train.max_steps * units != total:
            problems.append(
                f"train.max_steps={cfg.train.max_steps}"
                + (f" x {units} units" if units > 1 else "")
                + f" (budget {total} steps)"
            )
        if problems and b.enforce == "check":
            raise ConfigError(f"{where}: does not match the budget: {'; '.join(problems)} (budget.enforce: check)")
        if rest and b.enforce == "force":
            self.log(
                f"[experiment] {spec.label}: {units} units; {total} steps split as {per_unit} per unit "
                f"({per_unit * units} in all)"
            )
        if per_unit < 1:
            raise ConfigError(f"{where}: budget of {total} steps is less than one step per unit ({units} units)")
        cfg.train.batch_size = b.batch_size
        cfg.train.micro_batch_size = _fit_micro_batch(b.batch_size, cfg.train.micro_batch_size)
        cfg.train.max_steps = per_unit
        sel = self.exp.selection
        selectable = cfg.method_name in SINGLE_STAGE_SELECTABLE
        if sel.every and selectable:
            cfg.train.save_every = sel.every
            cfg.train.keep_last = per_unit // sel.every + 2
        elif cfg.method_name != "directional":
            cfg.train.save_every = per_unit  # one checkpoint: the final model, and a resume point
            cfg.train.keep_last = 2
        budget = {
            "kind": b.kind,
            "optimizer_steps": per_unit * units,
            "units": units,
            "steps_per_unit": per_unit,
            "batch_size": b.batch_size,
            "examples": per_unit * units * b.batch_size,
            "tokens_budget": b.tokens,
            "checkpoint_every": cfg.train.save_every or None,
        }
        return cfg, budget

    def _steps_for_tokens(self, cfg: Any, where: str) -> int:
        """Steps whose expected token count (batch x mean example length of this run's data) reaches the budget."""
        from transformers import AutoTokenizer

        from mmt.data import build_train_set
        from mmt.models import resolve

        b = self.exp.budget
        name, gguf = resolve(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.gguf_file)
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(name)
        ts = build_train_set(cfg.data, tok)
        mean_len = sum(len(x) for x in ts.ids) / max(len(ts.ids), 1)
        steps = max(1, round(b.tokens / (b.batch_size * mean_len)))
        self.log(
            f"[experiment] {where}: {mean_len:.1f} tokens per example -> {steps} steps of {b.batch_size} "
            f"for {b.tokens} tokens"
        )
        return steps

    # ---- baselines

    def baselines(self) -> list[str]:
        """Score the untuned model k-shot on the test side; zero-shot also on dev (step 0 of every dev curve;
        k-shot is not scored on dev because its examples are drawn from the dev set)."""
        if not self.exp.baselines:
            return []
        spec = self.exp.runs[0]
        cfg, _ = self.run_config(0, spec)
        sel = self.exp.selection
        dev_key = _config_hash({"dev": [sel.dev_set, sel.first_line, sel.max_sentences, sel.directions]}, {})
        todo = []
        for label, shots in self.exp.baselines:
            h = _config_hash(
                {"model": cfg.to_dict()["model"], "eval": cfg.to_dict()["eval"], "template": cfg.data.template},
                {"shots": shots},
            )
            path = self.out / "baselines" / label / "done.json"
            marker = _read_marker(path, h, f"baseline {label}")
            need_dev = shots == 0 and (marker is None or (marker.get("dev") or {}).get("key") != dev_key)
            if marker is None or need_dev:
                todo.append((label, shots, h, path, marker, need_dev))
            else:
                self.log(f"[experiment] baseline {label}: done earlier, skipped")
        if todo:
            from mmt.models import load_model

            model, tok = load_model(cfg.model)
            for label, shots, h, path, marker, need_dev in todo:
                if marker is None:
                    t0 = time.time()
                    rep = _evaluate(model, tok, cfg, cfg.eval, label=label, shots=shots)
                    self.calls["evaluate"] += 1
                    res = _write_test_report(
                        rep, self.test_dir, label, cfg, {"trained_directions": [], "shots": shots, "system": "baseline"}
                    )
                    marker = {
                        "label": label,
                        "shots": shots,
                        "config_hash": h,
                        "result": str(res),
                        "seconds": time.time() - t0,
                        "averages": rep.averages(),
                    }
                    _atomic_json(path, marker)
                    self.log(f"[experiment] baseline {label}: {rep.averages().get('all')} ({time.time() - t0:.0f}s)")
                if need_dev:
                    t0 = time.time()
                    rep = _evaluate(model, tok, cfg, _dev_eval_cfg(cfg, sel), label=f"{label}@dev", shots=0)
                    self.calls["evaluate"] += 1
                    marker["dev"] = {
                        "key": dev_key,
                        "bleu": _mean_metric(rep, "bleu"),
                        "chrf": _mean_metric(rep, "chrf"),
                        "seconds": time.time() - t0,
                    }
                    _atomic_json(path, marker)
            del model
            gc.collect()
        return [label for label, _ in self.exp.baselines]

    def baseline_markers(self) -> list[dict[str, Any]]:
        out = []
        for label, _ in self.exp.baselines:
            p = self.out / "baselines" / label / "done.json"
            if p.is_file():
                out.append(json.loads(p.read_text(encoding="utf-8")))
        return out

    # ---- training runs

    def run(self, i: int, spec: RunSpec) -> dict[str, Any]:
        cfg, budget = self.run_config(i, spec)
        run_dir = self.out / "runs" / spec.label
        sel = self.exp.selection
        h = _config_hash(
            cfg.to_dict(),
            {"budget": budget, "selection": sel.__dict__, "pre": [(str(s.config), s.overrides) for s in spec.pre]},
        )
        marker = _read_marker(run_dir / "done.json", h, f"run {spec.label}")
        if marker is not None:
            self.log(f"[experiment] {spec.label}: done earlier, skipped")
            return marker
        t0 = time.time()
        pre = [self._pre_stage(spec, j, st, run_dir) for j, st in enumerate(spec.pre)]
        self.log(
            f"[experiment] {spec.label}: {cfg.method_name}, {budget['optimizer_steps']} steps x batch "
            f"{budget['batch_size']}"
        )
        if cfg.method_name == "directional":
            info = self._run_directional(cfg, spec.label)
        else:
            info = self._run_single(cfg, spec.label, run_dir, sel)
        info |= {
            "label": spec.label,
            "method": cfg.method_name,
            "budget": budget,
            "pre_stages": pre,
            "config_hash": h,
            "seconds": time.time() - t0,
        }
        _atomic_json(run_dir / "done.json", info)
        return info

    def _pre_stage(self, spec: RunSpec, j: int, st: Stage, run_dir: Path) -> dict[str, Any]:
        stage_dir = run_dir / f"pre-{j}"
        cfg = build_run_config(
            st.config,
            st.overrides,
            shared={k: v for k, v in self.exp.shared.items() if k == "model"},
            where=f"{self.exp.source}: runs {spec.label} pre[{j}]",
            placeholders=self._placeholders(run_dir),
            train={"output_dir": str(stage_dir), "resume": "auto"},
        )
        h = _config_hash(cfg.to_dict(), {})
        done = _read_marker(stage_dir / "done.json", h, f"run {spec.label} pre-stage {j}")
        if done is not None:
            return done
        t0 = time.time()
        _, _, _, result = _train(cfg)
        self.calls["train"] += 1
        info = {
            "config": str(st.config),
            "method": cfg.method_name,
            "steps": result.steps,
            "tokens": result.tokens,
            "batch_size": cfg.train.batch_size,
            "seconds": time.time() - t0,
            "config_hash": h,
        }
        _atomic_json(stage_dir / "done.json", info)
        gc.collect()
        return info

    def _run_single(self, cfg: Any, label: str, run_dir: Path, sel: Selection) -> dict[str, Any]:
        model, tok, _, result = _train(cfg)
        self.calls["train"] += 1
        ckpts = checkpoints(Path(cfg.train.output_dir))
        if not ckpts:
            raise CheckpointError(f"{cfg.train.output_dir}: training wrote no checkpoint to select from")
        dev_file = run_dir / "dev_scores.json"
        dev = json.loads(dev_file.read_text(encoding="utf-8")) if dev_file.is_file() else {}
        dev_cfg = _dev_eval_cfg(cfg, sel)
        t_select = time.time()
        if len(ckpts) > 1:
            for ck in ckpts:
                if ck.name in dev:
                    continue
                load_checkpoint_weights(model, ck)
                rep = _evaluate(model, tok, cfg, dev_cfg, label=f"{label}@{ck.name}")
                self.calls["evaluate"] += 1
                dev[ck.name] = {
                    "step": int(json.loads((ck / "trainer_state.json").read_text())["step"]),
                    "bleu": _mean_metric(rep, "bleu"),
                    "chrf": _mean_metric(rep, "chrf"),
                }
                _atomic_json(dev_file, dev)
                self.log(
                    f"[experiment] {label} {ck.name}: dev BLEU {dev[ck.name]['bleu']:.2f} "
                    f"chrF++ {dev[ck.name]['chrf']:.2f}"
                )
            best = max(ckpts, key=lambda c: (dev[c.name][sel.metric], -int(c.name.split("-")[-1])))
        else:
            best = ckpts[-1]
        load_checkpoint_weights(model, best)
        state = json.loads((best / "trainer_state.json").read_text())
        t_test = time.time()
        rep = _evaluate(model, tok, cfg, cfg.eval, label=label)
        test_seconds = time.time() - t_test
        self.calls["evaluate"] += 1
        path = _write_test_report(
            rep,
            self.test_dir,
            label,
            cfg,
            {
                "trained_directions": _trained_directions(cfg),
                "checkpoint": str(best),
                "checkpoint_step": state["step"],
                "system": cfg.method_name,
            },
        )
        del model
        gc.collect()
        return {
            "result": str(path),
            "trained_steps": result.steps,
            "tokens": result.tokens,
            "train_seconds": result.seconds,
            "select_seconds": t_test - t_select,
            "test_seconds": test_seconds,
            "best_checkpoint": best.name,
            "best_step": state["step"],
            "tokens_at_best": state.get("tokens_seen"),
            "dev": dev,
            "averages": rep.averages(),
        }

    def _run_directional(self, cfg: Any, label: str) -> dict[str, Any]:
        """Every unit and the merge; scored as a whole (the units are merged, so no per-checkpoint selection)."""
        from mmt.methods.directional import evaluate_gated

        manifest = _train_directional(cfg)
        self.calls["train"] += 1
        rep = evaluate_gated(cfg, Path(cfg.train.output_dir), label=label, merged="merged" in manifest)
        self.calls["evaluate"] += 1
        if rep is None:
            raise MmtError(f"{label}: the direction gate covers none of the test directions {cfg.eval.directions}")
        path = _write_test_report(
            rep, self.test_dir, label, cfg, {"trained_directions": _trained_directions(cfg), "system": "directional"}
        )
        steps = sum(u.get("steps") or cfg.train.max_steps for u in manifest["units"].values())
        return {
            "result": str(path),
            "trained_steps": steps,
            "units": list(manifest["units"]),
            "merged": "merged" in manifest,
            "best_checkpoint": "final (merged units)",
            "averages": rep.averages(),
        }

    # ---- all

    def run_all(self) -> dict[str, Any]:
        from mmt.compare import run_comparison

        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        from mmt.data import resolve_data_dir

        templates = set()
        for i, spec in enumerate(self.exp.runs):  # check every config first: a typo fails before hours of training
            cfg, _ = self.run_config(i, spec)
            resolve_data_dir(cfg.data.data_dir)
            templates.add(cfg.eval.template or cfg.data.template)
        if len(templates) > 1:
            self.log(
                f"[experiment] warning: the runs use different prompt templates {sorted(templates)}; the "
                "baselines use the first run's"
            )
        baseline_labels = self.baselines()
        runs = [self.run(i, spec) for i, spec in enumerate(self.exp.runs)]
        labels = baseline_labels + [r["label"] for r in runs]
        cmp = self.exp.compare
        inputs = [str(self.test_dir / f"{x}.json") for x in labels]
        result = run_comparison(
            inputs,
            self.out / "compare",
            baseline=cmp.get("baseline"),
            samples=int(cmp.get("bootstrap", 1000)),
            ar_trials=int(cmp.get("ar_trials", 10000)),
            seed=int(cmp.get("seed", 12345)),
            comet_model=cmp.get("comet_model"),
            log=self.log,
        )
        summary = {
            "name": self.exp.name,
            "experiment": str(self.exp.source),
            "budget": self.exp.budget.__dict__,
            "selection": self.exp.selection.__dict__,
            "runs": runs,
            "baselines": self.baseline_markers(),
            "compare": str(self.out / "compare" / "compare.md"),
            "seconds_this_call": time.time() - t0,
        }
        _atomic_json(self.out / "experiment.json", summary)
        md = budget_markdown(summary, result)
        md += "\n\n" + (self.out / "compare" / "compare.md").read_text(encoding="utf-8")
        tmp = self.out / ".experiment.md.tmp"
        tmp.write_text(md, encoding="utf-8")
        os.replace(tmp, self.out / "experiment.md")
        return {"summary": summary, "compare": result}


def budget_markdown(summary: dict[str, Any], compare: dict[str, Any] | None = None) -> str:
    """Budget per run, the dev curves (with zero-shot as step 0) and each run's test result against the baseline."""
    rows = [
        f"# Experiment {summary['name']}",
        "",
        "| run | method | optimizer steps x batch | tokens | best checkpoint (dev) | extra stages | seconds |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for r in summary["runs"]:
        b = r["budget"]
        pre = "; ".join(f"{p['method']} {p['steps']} x {p['batch_size']}" for p in r.get("pre_stages") or []) or "-"
        rows.append(
            f"| {r['label']} | {r['method']} | {b['optimizer_steps']} x {b['batch_size']}"
            + (f" ({b['units']} units)" if b["units"] > 1 else "")
            + f" | {r.get('tokens') or '-'} | {r.get('best_checkpoint')} | {pre} | {r['seconds']:.0f} |"
        )
    for bl in summary["baselines"]:
        rows.append(f"| {bl['label']} | {bl['shots']}-shot prompting | 0 | 0 | - | - | {bl.get('seconds', 0):.0f} |")
    metric = summary["selection"]["metric"]
    name = {"chrf": "chrF++", "bleu": "BLEU"}[metric]
    curves = {r["label"]: sorted(r["dev"].values(), key=lambda v: v["step"]) for r in summary["runs"] if r.get("dev")}
    zero = next((bl["dev"][metric] for bl in summary["baselines"] if bl.get("dev")), None)
    if curves:
        steps = sorted({v["step"] for c in curves.values() for v in c})
        rows += [
            "",
            f"Dev {name} (mean over the dev directions) per optimizer step"
            + (" (step 0: the untuned model, zero-shot)" if zero is not None else "")
            + ":",
            "",
            "| run | " + " | ".join(str(s) for s in ([0] if zero is not None else []) + steps) + " |",
            "|---|" + "---:|" * (len(steps) + (zero is not None)),
        ]
        for label, c in curves.items():
            by = {v["step"]: v[metric] for v in c}
            cells = ([f"{zero:.1f}"] if zero is not None else []) + [f"{by[s]:.1f}" if s in by else "-" for s in steps]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if compare is not None:
        base, g = compare["baseline"], compare["groups"]["all"]["systems"]
        rows += ["", f"Test, average over all directions, against {base} (paired bootstrap, 95% intervals):", ""]
        for label, r in g.items():
            if label == base:
                continue
            x = r["chrf"]
            lo, hi = x["delta_ci"]
            verdict = ("better" if lo > 0 else "worse" if hi < 0 else "not distinguishable") + f" (p = {x['p_bs']:.3f})"
            rows.append(f"- {label}: chrF++ {x['delta']:+.1f} [{lo:+.1f}, {hi:+.1f}], {verdict}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# CLI


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt experiment examples/experiments/four_methods_demo.yaml
  mmt experiment my_experiment.yaml --output-dir runs/exp2      # same runs, another folder

Rerunning the same command after a kill skips finished runs and resumes the unfinished one.
See docs/experiments.md for the file format."""
    p.add_argument("experiment", help="experiment YAML (budget, selection, baselines, runs, compare)")
    p.add_argument("--output-dir", "-o", help="overrides output_dir of the file")


def run_experiment(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment, output_dir=args.output_dir)
    out = Runner(exp).run_all()
    print((exp.output_dir / "experiment.md").read_text(encoding="utf-8").split("\n## ")[0])
    print(f"experiment results: {exp.output_dir}/experiment.md, comparison: {out['summary']['compare']}")
    return 0
