"""``mmt compare``: paired significance tests between systems scored by ``mmt eval`` / ``mmt demo`` /
``mmt train --eval`` / ``mmt experiment``.

Every system is tested against the baseline (the first input unless ``--baseline`` names another)
on the same test sentences:

* per direction, sacreBLEU's paired bootstrap resampling (``PairedTest(test_type="bs")``: system
  mean and 95% CI, p-value) and paired approximate randomisation (``test_type="ar"``: p-value) for
  BLEU and chrF++, through its Python API;
* per group of directions (all, seen/unseen, XX->En/En->XX), a stratified version of the same
  tests: each direction is resampled (or shuffled) with the index draws sacreBLEU uses for it, and
  the group score of a resample is the mean of its direction scores;
* the difference to the baseline with the 95% percentile interval of the paired resampled
  differences; the off-target rate (share of outputs not in the target language) beside the scores;
* COMET with a local checkpoint (``--comet-model``) when unbabel-comet is installed, tested the same
  way on its segment scores; otherwise the report says it is off.

Writes ``compare.json``, ``compare.md`` and ``compare_deltas.png``. See ``docs/experiments.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmt.errors import ConfigError, DataError, MissingDependencyError

METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF++", "comet": "COMET"}
DEFAULT_SEED = 12345  # sacreBLEU's own default
GROUP_ORDER = (
    "all",
    "seen",
    "unseen",
    "xx->en",
    "en->xx",
    "seen xx->en",
    "seen en->xx",
    "unseen xx->en",
    "unseen en->xx",
)


# --------------------------------------------------------------------------------------------
# reading systems


@dataclass
class System:
    """One scored system: hypotheses and references per direction (same sentences for every system)."""

    label: str
    source: str
    hypotheses: dict[str, list[str]]
    references: dict[str, list[str]]
    settings: dict[str, Any] = field(default_factory=dict)
    trained_directions: list[str] | None = None


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _is_report(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), list) and "label" in data


def _find_reports(path: Path) -> list[Path]:
    """Result JSON files of ``mmt eval`` (``<label>.json`` next to ``<label>_hyps/``) in a file or run folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such result file or run folder")
    found: list[Path] = []
    for folder in (path, path / "eval", path / "test"):
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if (folder / f"{p.stem}_hyps").is_dir():
                found.append(p)
    if not found:
        raise DataError(
            f"{path}: no result files (<label>.json next to <label>_hyps/) in it, its eval/ or test/ "
            "folder; pass the output folder of mmt eval, mmt demo, mmt train --eval or mmt experiment"
        )
    return found


def _resolve_test_set(recorded: str, data_dir: str | Path | None) -> Path:
    """The test folder a result names; a result written on another machine is found under the data root."""
    p = Path(recorded)
    if p.is_dir():
        return p
    from mmt.data import resolve_data_dir

    root = resolve_data_dir(data_dir, required=False)
    if root is not None:
        for k in (2, 1, 3):
            cand = root.joinpath(*p.parts[-k:])
            if cand.is_dir():
                return cand
    raise DataError(
        f"test set {recorded} (named by the result file) not found, nor under the data folder {root}; pass --data-dir"
    )


def _trained_directions_from_config(cfg: dict[str, Any]) -> list[str] | None:
    data = cfg.get("data") or {}
    dirs: list[str] = []
    for src in data.get("train") or []:
        if src.get("kind") == "mono":
            continue
        dirs += [_norm_direction(d) for d in src.get("directions") or []]
    method_dirs = (cfg.get("method") or {}).get("directions")
    if method_dirs:
        dirs = [_norm_direction(d) for d in method_dirs]
    return list(dict.fromkeys(dirs)) or None


def _trained_directions(report_path: Path, settings: dict[str, Any]) -> list[str] | None:
    """Directions the system was trained on: from the result's settings, else from the run config next to it."""
    if settings.get("trained_directions") is not None:
        return [_norm_direction(d) for d in settings["trained_directions"]]
    import yaml

    folder = report_path.parent
    for cand in (folder / "config.yaml", folder.parent / "config.yaml", folder / "train" / "config.yaml"):
        if cand.is_file():
            try:
                cfg = yaml.safe_load(cand.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(cfg, dict):
                return _trained_directions_from_config(cfg)
    demo = folder / "demo_results.json"
    if demo.is_file():
        cfg = json.loads(demo.read_text(encoding="utf-8")).get("config")
        if isinstance(cfg, dict):
            return _trained_directions_from_config(cfg)
    return None


def _norm_direction(d: str) -> str:
    from mmt import languages as L

    try:
        s, t = L.parse_direction(str(d))
        return f"{L.normalize(s)}-{L.normalize(t)}"
    except ValueError as exc:
        raise DataError(f"bad direction {d!r}: {exc}") from None


def load_system(path: str | Path, *, label: str | None = None, data_dir: str | Path | None = None) -> System:
    """Read one result file (``<label>.json`` + ``<label>_hyps/<direction>.txt``) with its references."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable result file ({exc})") from None
    if not _is_report(data):
        raise DataError(f"{path}: not an mmt result file (needs 'label' and a 'results' list)")
    settings = data.get("settings") or {}
    hyp_dir, ref_dir = path.parent / f"{path.stem}_hyps", path.parent / f"{path.stem}_refs"
    hyps: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    test_folder = None
    for i, r in enumerate(data["results"]):
        if not isinstance(r, dict) or "direction" not in r or "n" not in r:
            raise DataError(f"{path}: results[{i}] lacks 'direction' or 'n'")
        d = _norm_direction(r["direction"])
        hyp_file = hyp_dir / f"{r['direction']}.txt"
        if not hyp_file.is_file():
            raise DataError(f"{path}: hypotheses for {r['direction']} missing ({hyp_file})")
        hyps[d] = _read_lines(hyp_file)
        if len(hyps[d]) != int(r["n"]):
            raise DataError(f"{hyp_file}: {len(hyps[d])} lines, the result file says n={r['n']}")
        ref_file = ref_dir / f"{r['direction']}.txt"
        if ref_file.is_file():
            refs[d] = _read_lines(ref_file)
        else:  # mmt eval does not copy references: read them from the test set it names
            if not settings.get("test_set"):
                raise DataError(f"{path}: no references ({ref_file}) and no settings.test_set to read them from")
            from mmt.data import load_flores

            test_folder = test_folder or _resolve_test_set(settings["test_set"], data_dir)
            s, t = d.split("-")
            first = int(settings.get("first_line") or 0)
            refs[d] = load_flores(test_folder, (s, t))[t][first : first + len(hyps[d])]
        if len(refs[d]) != len(hyps[d]):
            raise DataError(f"{path}: {d} has {len(hyps[d])} hypotheses but {len(refs[d])} references")
    if not hyps:
        raise DataError(f"{path}: the result file lists no directions")
    return System(
        label=label or str(data["label"]),
        source=str(path),
        hypotheses=hyps,
        references=refs,
        settings=settings,
        trained_directions=_trained_directions(path, settings),
    )


def load_systems(inputs: Sequence[str], data_dir: str | Path | None = None) -> list[System]:
    """Systems from ``RUN_OR_RESULT`` arguments; ``name=path`` renames the system(s) of a path."""
    systems: list[System] = []
    for item in inputs:
        name, sep, target = item.partition("=")
        if not sep or Path(item).exists():
            name, target = "", item
        reports = _find_reports(Path(target))
        for rp in reports:
            label = None
            if name:
                label = name if len(reports) == 1 else f"{name}/{rp.stem}"
            systems.append(load_system(rp, label=label, data_dir=data_dir))
    counts: dict[str, int] = {}
    for s in systems:
        counts[s.label] = counts.get(s.label, 0) + 1
    for s in systems:  # same label twice (e.g. two runs' 'mfti'): qualify by the run folder
        if counts[s.label] > 1:
            src = Path(s.source)
            run = src.parent.parent.name if src.parent.name in ("eval", "test") else src.parent.name
            s.label = f"{run}/{s.label}"
    labels = [s.label for s in systems]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"several systems are labelled {dup}; name them with label=path")
    return systems


# --------------------------------------------------------------------------------------------
# metrics as sentence statistics (sacreBLEU's sufficient statistics; COMET segment scores)


class _Metric:
    """Sentence-level statistics whose column sums give the corpus score."""

    def __init__(
        self,
        name: str,
        stats_fn: Callable[[list[str]], np.ndarray],
        score_fn: Callable[[np.ndarray], float],
        sacrebleu_metric: Any = None,
    ):
        self.name, self.stats_fn, self.score_fn, self.sacrebleu_metric = name, stats_fn, score_fn, sacrebleu_metric


def _sacrebleu_metric(name: str, refs: list[str], metric: Any) -> _Metric:
    def stats(hyps: list[str]) -> np.ndarray:
        return np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype="float32")

    def score(summed: np.ndarray) -> float:
        return float(metric._compute_score_from_stats(summed).score)

    return _Metric(name, stats, score, metric)


def _comet_metric(seg_scores: Callable[[list[str]], list[float]]) -> _Metric:
    def stats(hyps: list[str]) -> np.ndarray:
        s = np.asarray(seg_scores(hyps), dtype="float64")
        return np.stack([s, np.ones_like(s)], axis=1)

    return _Metric("comet", stats, lambda summed: float(100 * summed[0] / max(summed[1], 1)))


def metrics_for(
    direction: str, refs: list[str], comet_scorer: Callable | None = None, srcs: list[str] | None = None
) -> list[_Metric]:
    from sacrebleu.metrics import BLEU, CHRF

    from mmt.evaluate import bleu_tokenizer

    tgt = direction.split("-")[1]
    out = [
        _sacrebleu_metric("bleu", refs, BLEU(tokenize=bleu_tokenizer(tgt))),
        _sacrebleu_metric("chrf", refs, CHRF(word_order=2)),
    ]
    if comet_scorer is not None:
        out.append(_comet_metric(lambda hyps: comet_scorer(srcs, hyps, refs)))
    return out


def comet_segment_scorer(model_path: str) -> Callable[[list[str], list[str], list[str]], list[float]]:
    """Segment scores (0..1) from a local COMET checkpoint; the model is loaded once."""
    try:
        from comet import load_from_checkpoint
    except ImportError:
        raise MissingDependencyError("unbabel-comet", purpose="COMET scores in mmt compare") from None
    p = Path(model_path)
    ckpt = p if p.is_file() else next(iter(sorted(p.rglob("*.ckpt"))), None)
    if ckpt is None:
        raise DataError(f"--comet-model {model_path}: no COMET checkpoint (*.ckpt) there")
    model = load_from_checkpoint(str(ckpt))

    def score(srcs: list[str], hyps: list[str], refs: list[str]) -> list[float]:
        import torch

        data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
        out = model.predict(data, batch_size=16, gpus=1 if torch.cuda.is_available() else 0, progress_bar=False)
        return [float(x) for x in out.scores]

    return score


# --------------------------------------------------------------------------------------------
# resampling (the index draws of sacreBLEU's paired tests, so per-direction numbers agree with it)


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """The resamples of sacreBLEU's paired bootstrap for an n-sentence test set."""
    return np.random.default_rng(seed).choice(n, size=(samples, n), replace=True)


def ar_selectors(n: int, trials: int, seed: int) -> np.ndarray:
    """The swap masks of sacreBLEU's approximate randomisation for an n-sentence test set."""
    return np.random.default_rng(seed).integers(2, size=(trials, n), dtype=bool)


def resampled_scores(metric: _Metric, stats: np.ndarray, idxs: np.ndarray) -> np.ndarray:
    return np.array([metric.score_fn(s.sum(0)) for s in stats[idxs]])


def shuffled_scores(metric: _Metric, bl: np.ndarray, sys: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bl64, sys64 = bl.astype("float64"), sys.astype("float64")
    a = sel @ bl64 + (~sel) @ sys64
    b = (~sel) @ bl64 + sel @ sys64
    return (np.array([metric.score_fn(x) for x in a]), np.array([metric.score_fn(x) for x in b]))


def mean_ci(scores: np.ndarray) -> tuple[float, float]:
    """Bootstrap mean and half-width of the 95% interval, exactly as sacreBLEU computes them."""
    from sacrebleu.significance import estimate_ci

    m, ci = estimate_ci(np.asarray(scores))
    return float(m), float(ci)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """95% interval with sacreBLEU's order statistics (1/40 from each end)."""
    v = np.sort(np.asarray(values))
    lo = len(v) // 40
    return float(v[lo]), float(v[len(v) - lo - 1])


def p_value(sample_stats: np.ndarray, observed: float) -> float:
    from sacrebleu.significance import _compute_p_value

    return float(_compute_p_value(np.asarray(sample_stats), observed))


@contextlib.contextmanager
def _sacrebleu_seed(seed: int):
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old


def sacrebleu_paired(
    named: list[tuple[str, list[str]]], refs: list[str], metrics: list[_Metric], *, test: str, samples: int, seed: int
) -> dict[str, list[Any]]:
    """sacreBLEU's ``PairedTest`` (bs or ar) over ``named`` systems (the first is the baseline):
    {metric name: [Result per system]} with plain floats."""
    from sacrebleu.significance import PairedTest

    sb = {m.name: m.sacrebleu_metric for m in metrics if m.sacrebleu_metric is not None}
    with _sacrebleu_seed(seed):
        pt = PairedTest(named, sb, references=[refs], test_type=test, n_samples=samples)
        _, scores = pt()
    cols = [k for k in scores if k != "System"]
    assert len(cols) == len(sb), (cols, list(sb))
    return {name: scores[col] for name, col in zip(sb, cols)}


# --------------------------------------------------------------------------------------------
# the comparison


def _fnum(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else x


def default_groups(directions: list[str], seen: set[str] | None) -> dict[str, list[str]]:
    """Direction groups to average over; a group equal to an earlier one, or a crossing (seen xx->en ...) of a
    single direction, is left out."""

    def pick(pred):
        return [d for d in directions if pred(d)]

    def xx_en(d):
        return d.endswith("-en") and not d.startswith("en-")

    def en_xx(d):
        return d.startswith("en-") and not d.endswith("-en")

    cand = {"all": directions}
    if seen is not None:
        cand |= {"seen": pick(lambda d: d in seen), "unseen": pick(lambda d: d not in seen)}
    cand |= {"xx->en": pick(xx_en), "en->xx": pick(en_xx)}
    if seen is not None:
        cand |= {
            "seen xx->en": pick(lambda d: d in seen and xx_en(d)),
            "seen en->xx": pick(lambda d: d in seen and en_xx(d)),
            "unseen xx->en": pick(lambda d: d not in seen and xx_en(d)),
            "unseen en->xx": pick(lambda d: d not in seen and en_xx(d)),
        }
    out: dict[str, list[str]] = {}
    for name in GROUP_ORDER:
        dirs = cand.get(name) or []
        if " " in name and len(dirs) < 2:  # a crossing of one direction is that direction's own table
            continue
        if dirs and all(dirs != v for v in out.values()):
            out[name] = dirs
    return out


def compare(
    systems: list[System],
    *,
    baseline: str | None = None,
    seen: Sequence[str] | None = None,
    samples: int = 1000,
    ar_trials: int = 10000,
    seed: int = DEFAULT_SEED,
    comet_scorer: Callable | None = None,
    sources: dict[str, list[str]] | None = None,
    log: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Paired tests of every system against the baseline; returns the JSON-ready result."""
    import sacrebleu

    from mmt.evaluate import off_target_rate

    if len(systems) < 2:
        raise ConfigError("compare needs at least two systems (a baseline and one to test against it)")
    if seed < 1:
        raise ConfigError(f"seed must be >= 1 (sacreBLEU treats seed 0 as 'unseeded'), got {seed}")
    if samples < 40 or ar_trials < 40:
        raise ConfigError("--bootstrap and --ar-trials need at least 40 samples for a 95% interval")
    labels = [s.label for s in systems]
    base_label = baseline or labels[0]
    if base_label not in labels:
        raise ConfigError(f"--baseline {base_label!r} is not one of the systems {labels}")
    systems = [s for s in systems if s.label == base_label] + [s for s in systems if s.label != base_label]
    base = systems[0]
    notes: list[str] = []
    directions = [d for d in base.hypotheses if all(d in s.hypotheses for s in systems)]
    dropped = sorted({d for s in systems for d in s.hypotheses} - set(directions))
    if dropped:
        notes.append(f"directions not scored by every system, left out: {', '.join(dropped)}")
    if not directions:
        raise DataError(
            "the systems share no direction: " + "; ".join(f"{s.label}: {', '.join(s.hypotheses)}" for s in systems)
        )
    for s in systems[1:]:
        for d in directions:
            if s.references[d] != base.references[d]:
                raise DataError(
                    f"{s.label} ({s.source}) and {base.label} ({base.source}) were scored on different "
                    f"{d} sentences (check test_set, first_line, max_sentences)"
                )
    if seen is not None:
        seen_set: set[str] | None = {_norm_direction(d) for d in seen}
    else:
        trained = [s.trained_directions for s in systems if s.trained_directions]
        seen_set = set().union(*map(set, trained)) if trained else None
        if trained and any(set(t) != seen_set for t in trained):
            notes.append("systems were trained on different directions; 'seen' is their union")
    groups = default_groups(directions, seen_set)
    metric_names = ["bleu", "chrf"] + (["comet"] if comet_scorer is not None else [])
    if comet_scorer is None:
        notes.append("COMET off (pass --comet-model PATH with unbabel-comet installed to add it)")

    per_dir: dict[str, Any] = {}
    arrays: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]] = {}  # direction -> metric -> system -> kind
    for d in directions:
        refs = base.references[d]
        srcs = (sources or {}).get(d)
        if comet_scorer is not None and srcs is None:
            raise DataError(f"COMET needs the {d} source sentences")
        metrics = metrics_for(d, refs, comet_scorer, srcs)
        named = [(s.label, s.hypotheses[d]) for s in systems]
        bs = sacrebleu_paired(named, refs, metrics, test="bs", samples=samples, seed=seed)
        ar = sacrebleu_paired(named, refs, metrics, test="ar", samples=ar_trials, seed=seed)
        n = len(refs)
        idxs, sel = bootstrap_indices(n, samples, seed), ar_selectors(n, ar_trials, seed)
        rows: dict[str, Any] = {s.label: {} for s in systems}
        arrays[d] = {}
        for m in metrics:
            stats = {s.label: m.stats_fn(s.hypotheses[d]) for s in systems}
            arr = {s.label: {"bs": resampled_scores(m, stats[s.label], idxs)} for s in systems}
            for s in systems[1:]:
                a, b = shuffled_scores(m, stats[base.label], stats[s.label], sel)
                arr[s.label]["ar"] = a - b
            arrays[d][m.name] = arr
            for i, s in enumerate(systems):
                score = m.score_fn(stats[s.label].astype("float64").sum(0))
                if m.name in bs:  # sacreBLEU's own numbers
                    res = bs[m.name][i]
                    mean, ci = float(res.mean), float(res.ci)
                    p_bs = _fnum(res.p_value)
                    p_ar = _fnum(ar[m.name][i].p_value)
                    assert abs(float(res.score) - score) < 1e-6 * max(1.0, abs(score)), (d, m.name, res.score, score)
                else:
                    mean, ci = mean_ci(arr[s.label]["bs"])
                    p_bs = p_ar = None
                    if i:
                        diff = abs(score - m.score_fn(stats[base.label].astype("float64").sum(0)))
                        sd = np.abs(arr[s.label]["bs"] - arr[base.label]["bs"])
                        p_bs = p_value(sd - sd.mean(), diff)
                        p_ar = p_value(np.abs(arr[s.label]["ar"]), diff)
                row = {"score": score, "mean": mean, "ci": ci}
                if i:
                    base_score = m.score_fn(stats[base.label].astype("float64").sum(0))
                    lo, hi = percentile_interval(arr[s.label]["bs"] - arr[base.label]["bs"])
                    delta = score - base_score
                    if delta == 0:  # sacreBLEU's count of "> 0" gives 1/(n+1) for identical outputs
                        p_bs = p_ar = 1.0
                    row |= {"delta": delta, "delta_ci": [lo, hi], "p_bs": p_bs, "p_ar": p_ar}
                rows[s.label][m.name] = row
        for s in systems:
            rows[s.label]["off_target"] = _fnum(off_target_rate(s.hypotheses[d], d.split("-")[1]))
        per_dir[d] = {"n": n, "systems": rows}
        if log:
            log(f"[compare] {d}: {n} sentences, {len(systems)} systems")

    per_group: dict[str, Any] = {}
    for g, dirs in groups.items():
        rows = {s.label: {} for s in systems}
        for name in metric_names:
            base_arr = np.mean([arrays[d][name][base.label]["bs"] for d in dirs], axis=0)
            base_score = float(np.mean([per_dir[d]["systems"][base.label][name]["score"] for d in dirs]))
            for i, s in enumerate(systems):
                arr = np.mean([arrays[d][name][s.label]["bs"] for d in dirs], axis=0)
                score = float(np.mean([per_dir[d]["systems"][s.label][name]["score"] for d in dirs]))
                mean, ci = mean_ci(arr)
                row = {"score": score, "mean": mean, "ci": ci}
                if i:
                    diff = abs(score - base_score)
                    sd = np.abs(arr - base_arr)
                    ar_diff = np.abs(np.mean([arrays[d][name][s.label]["ar"] for d in dirs], axis=0))
                    lo, hi = percentile_interval(arr - base_arr)
                    p_bs, p_ar = (p_value(sd - sd.mean(), diff), p_value(ar_diff, diff)) if diff else (1.0, 1.0)
                    row |= {"delta": score - base_score, "delta_ci": [lo, hi], "p_bs": p_bs, "p_ar": p_ar}
                rows[s.label][name] = row
        for s in systems:
            ots = [per_dir[d]["systems"][s.label]["off_target"] for d in dirs]
            ots = [x for x in ots if x is not None]
            rows[s.label]["off_target"] = float(np.mean(ots)) if ots else None
        per_group[g] = {"directions": dirs, "systems": rows}

    return {
        "baseline": base.label,
        "systems": [
            {"label": s.label, "source": s.source, "trained_directions": s.trained_directions, "settings": s.settings}
            for s in systems
        ],
        "metrics": metric_names,
        "seen_directions": sorted(seen_set) if seen_set is not None else None,
        "settings": {
            "bootstrap_samples": samples,
            "ar_trials": ar_trials,
            "seed": seed,
            "sacrebleu": sacrebleu.__version__,
            "comet": comet_scorer is not None,
            "interval": "95%: bootstrap mean +- half-width (sacreBLEU); delta: 2.5th-97.5th percentile "
            "of paired resampled differences",
            "groups": "stratified: each direction resampled with its own sacreBLEU draws, scores averaged",
        },
        "groups": per_group,
        "directions": per_dir,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------
# output


def _p(x: float | None) -> str:
    if x is None:
        return "-"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _table(block: dict[str, Any], systems: list[str], metrics: list[str], baseline: str) -> list[str]:
    head = ["system"]
    for m in metrics:
        head += [f"{METRIC_NAMES[m]} (μ ± 95% CI)", f"Δ {METRIC_NAMES[m]} [95% CI]", "p bs / ar"]
    head.append("off-target")
    rows = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label in systems:
        r = block["systems"][label]
        cells = [f"**{label}**" if label == baseline else label]
        for m in metrics:
            x = r[m]
            cells.append(f"{x['score']:.1f} ({x['mean']:.1f} ± {x['ci']:.1f})")
            if label == baseline:
                cells += ["baseline", ""]
            else:
                lo, hi = x["delta_ci"]
                star = "*" if x["p_bs"] is not None and x["p_bs"] < 0.05 else ""
                cells += [f"{x['delta']:+.1f}{star} [{lo:+.1f}, {hi:+.1f}]", f"{_p(x['p_bs'])} / {_p(x['p_ar'])}"]
        ot = r.get("off_target")
        cells.append("-" if ot is None else f"{100 * ot:.0f}%")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown(result: dict[str, Any]) -> str:
    systems = [s["label"] for s in result["systems"]]
    metrics, base = result["metrics"], result["baseline"]
    st = result["settings"]
    out = [
        f"# Comparison against {base}",
        "",
        f"Paired bootstrap ({st['bootstrap_samples']} resamples) and approximate randomisation "
        f"({st['ar_trials']} trials), seed {st['seed']}, sacreBLEU {st['sacrebleu']}. Scores: corpus score "
        "(bootstrap mean ± 95% CI half-width); Δ: difference to the baseline with the 95% interval of the paired "
        "resampled differences, * = p < 0.05 (paired bootstrap); p: paired bootstrap / approximate "
        "randomisation. Averages resample each direction (stratified).",
        "",
    ]
    if result.get("seen_directions") is not None:
        out += [f"Seen (trained) directions: {', '.join(result['seen_directions']) or 'none'}.", ""]
    for note in result["notes"]:
        out.append(f"- {note}")
    if result["notes"]:
        out.append("")
    for g, block in result["groups"].items():
        n = sum(result["directions"][d]["n"] for d in block["directions"])
        out += [f"## Average: {g} ({', '.join(block['directions'])}; {n} sentences)", ""]
        out += _table(block, systems, metrics, base) + [""]
    for d, block in result["directions"].items():
        out += [f"## {d} ({block['n']} sentences)", ""]
        out += _table(block, systems, metrics, base) + [""]
    return "\n".join(out)


def plot_deltas(result: dict[str, Any], path: str | Path) -> Path:
    """Δ to the baseline with 95% intervals, per averaged group and system; one panel per metric."""
    from mmt.plots import _plt, save_figure

    plt = _plt()
    metrics, base = result["metrics"], result["baseline"]
    others = [s["label"] for s in result["systems"] if s["label"] != base]
    groups = list(result["groups"])
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.8 * len(metrics), 1.2 + 0.32 * len(groups) * len(others)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], metrics):
        y, ticks = 0, []
        for g in groups:
            for k, label in enumerate(others):
                x = result["groups"][g]["systems"][label][m]
                lo, hi = x["delta_ci"]
                ax.errorbar(
                    x["delta"],
                    y,
                    xerr=[[x["delta"] - lo], [hi - x["delta"]]],
                    fmt="o",
                    capsize=3,
                    color=colors[k % len(colors)],
                    label=label if g == groups[0] else None,
                )
                ticks.append((y, g if k == 0 else ""))
                y -= 1
            y -= 0.6
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks([t for t, _ in ticks], [n for _, n in ticks])
        ax.set_xlabel(f"Δ {METRIC_NAMES[m]} vs {base}")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"paired differences to {base} (95% intervals)")
    return save_figure(fig, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(result: dict[str, Any], out_dir: str | Path, plot: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "compare.json", json.dumps(result, indent=1, ensure_ascii=False))
    _atomic_write(out / "compare.md", markdown(result) + "\n")
    if plot:
        tmp = plot_deltas(result, out / ".compare_deltas.tmp.png")
        os.replace(tmp, out / "compare_deltas.png")
    return out


def system_sources(system: System, data_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Source sentences of every direction (for COMET), read from the test set the result names."""
    from mmt.data import load_flores

    settings = system.settings
    if not settings.get("test_set"):
        raise DataError(f"{system.source}: no settings.test_set to read the COMET sources from")
    folder = _resolve_test_set(settings["test_set"], data_dir)
    first = int(settings.get("first_line") or 0)
    out = {}
    for d, hyps in system.hypotheses.items():
        s, t = d.split("-")
        out[d] = load_flores(folder, (s, t))[s][first : first + len(hyps)]
    return out


def run_comparison(
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    seen: Sequence[str] | None = None,
    samples: int = 1000,
    ar_trials: int = 10000,
    seed: int = DEFAULT_SEED,
    comet_model: str | None = None,
    data_dir: str | Path | None = None,
    plot: bool = True,
    log: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Load, compare, write: what ``mmt compare`` and ``mmt experiment`` run."""
    systems = load_systems(inputs, data_dir=data_dir)
    scorer, sources = None, None
    if comet_model:
        scorer = comet_segment_scorer(comet_model)
        sources = system_sources(systems[0], data_dir)
    result = compare(
        systems,
        baseline=baseline,
        seen=seen,
        samples=samples,
        ar_trials=ar_trials,
        seed=seed,
        comet_scorer=scorer,
        sources=sources,
        log=log,
    )
    write_outputs(result, out_dir, plot=plot)
    return result


# --------------------------------------------------------------------------------------------
# CLI


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt compare runs/demo                                   # before/after/fewshot of mmt demo
  mmt compare base=runs/eval/gemma3-270m.json runs/mfti/eval runs/lander/eval -o runs/cmp
  mmt compare runs/exp/test --baseline 8-shot --seen de-en en-de

Each input is a result file (<label>.json next to <label>_hyps/) or a folder holding such files
(also in its eval/ or test/ subfolder); label=path renames. Writes compare.json, compare.md and
compare_deltas.png to --output-dir."""
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_RESULT", help="result files or run folders (baseline first)")
    p.add_argument("--output-dir", "-o", default="runs/compare", help="where to write (default runs/compare)")
    p.add_argument("--baseline", help="label of the system every other is tested against (default: the first)")
    p.add_argument(
        "--seen",
        nargs="+",
        metavar="DIRECTION",
        help="trained directions (default: read from the runs' configs, if any)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--ar-trials", type=int, default=10000, help="approximate randomisation trials (default 10000)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"resampling seed >= 1 (default {DEFAULT_SEED})")
    p.add_argument("--comet-model", help="local COMET checkpoint (folder or .ckpt; needs unbabel-comet)")
    p.add_argument("--data-dir", help="data root for references named by the result files (default $MMT_DATA_DIR)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run_compare(args: argparse.Namespace) -> int:
    result = run_comparison(
        args.inputs,
        args.output_dir,
        baseline=args.baseline,
        seen=args.seen,
        samples=args.bootstrap,
        ar_trials=args.ar_trials,
        seed=args.seed,
        comet_model=args.comet_model,
        data_dir=args.data_dir,
        plot=not args.no_plot,
    )
    first = next(iter(result["groups"]))
    systems = [s["label"] for s in result["systems"]]
    print("\n".join(_table(result["groups"][first], systems, result["metrics"], result["baseline"])))
    print(f"results written to {args.output_dir}/compare.md (and .json, compare_deltas.png)")
    return 0
