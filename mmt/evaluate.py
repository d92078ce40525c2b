"""Translation evaluation: batched generation, sacreBLEU BLEU / chrF++, off-target rate, COMET.

Generation is left-padded so every prompt ends at the same column; the translation is the text
generated after the prompt, cut at the first newline (the prompts put the translation on one
line), at the template's next field marker (an untuned model goes on with ``[Korean]: <next source>``
on the same line), or EOS, for every model alike. Each direction is scored with the model routed for
it (:func:`mmt.arch.set_direction`; e.g. CAR switches to the pair's language-specific neurons).
Reports average seen and unseen (zero-shot) directions separately when the training directions are
known. BLEU tokenisation follows sacreBLEU conventions: ``zh`` for Chinese, ``ja-mecab``
for Japanese when MeCab is importable (else ``char``), ``13a`` otherwise.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import sacrebleu
import torch
from sacrebleu.metrics import CHRF
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from mmt import languages as L
from mmt.data import (
    Example,
    build_fewshot_prompt,
    collate_prompts,
    load_flores,
    pad_token_id,
    resolve_data_dir,
    template_text,
)
from mmt.data.prompts import CHAT_USER_TEMPLATE, PromptBuilder
from mmt.errors import CheckpointError, ConfigError, require
from mmt.precision import autocast, resolve_for
from mmt.scorers import describe as describe_scorers
from mmt.scorers import scorer_status

# --------------------------------------------------------------------------------------------
# generation

_NEWLINE_IDS: dict[int, torch.Tensor] = {}


def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of vocabulary entries that contain a newline (byte-level 'Ċ', SentencePiece '<0x0A>' or '\\n')."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        ids = [i for i, t in enumerate(toks) if t is not None and ("\n" in t or "Ċ" in t or t == "<0x0A>")]
        _NEWLINE_IDS[key] = torch.tensor(ids, dtype=torch.long)
    return _NEWLINE_IDS[key]


class _StopAtNewline:
    """Per-sequence stopping criterion: done once a newline token was generated."""

    def __init__(self, newline_ids: torch.Tensor):
        self.newline_ids = newline_ids

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs) -> torch.BoolTensor:
        return torch.isin(input_ids[:, -1], self.newline_ids.to(input_ids.device))


_BRACKET_FIELD = re.compile(r"\s*\[[^\[\]\n]{1,40}\]:")


def field_markers(template: str) -> list[str]:
    """The template's literal pieces (at least 4 characters with a letter) that open its next field, e.g.
    ``Translation: [`` for T1 or ``Translate this from`` for ALMA."""
    pieces = re.split(r"<srclang>|<tgtlang>|<input>", template_text(template))
    out = []
    for piece in pieces:
        for line in piece.split("\n"):
            s = line.strip()
            if len(s) >= 4 and any(c.isalpha() for c in s):
                out.append(s)
    return out


def postprocess(text: str, template: str | None = None) -> str:
    """The first line of ``text``, cut before the template's next field marker (and, for templates with
    bracketed fields, before any ``[Language]:``)."""
    text = text.split("\n", 1)[0]
    if template is not None:
        cut = len(text)
        if "[" in template_text(template):
            m = _BRACKET_FIELD.search(text)
            if m:
                cut = m.start()
        for marker in field_markers(template):
            i = text.find(marker)
            if i >= 0:
                cut = min(cut, i)
        text = text[:cut]
    return text.strip()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 150,
    max_prompt_tokens: int | None = 1024,
    progress: bool = False,
    template: str | None = None,
    direction: tuple[str, str] | None = None,
    precision: str = "auto",
) -> list[str]:
    """Translate each prompt (greedy or beam search); returns cleaned hypotheses in input order.

    ``template``: cut each hypothesis at that template's next field marker (see :func:`postprocess`).
    ``direction``: (src, tgt) to route a direction-dependent model for (CAR); set before generating.
    ``precision``: the maths of an fp32 model (``auto``: bf16 where native, see :mod:`mmt.precision`)."""
    from mmt.arch import set_direction

    if direction is not None:
        set_direction(model, *direction)
    model.eval()
    device = next(model.parameters()).device
    stop = StoppingCriteriaList([_StopAtNewline(newline_token_ids(tokenizer))])
    eos = tokenizer.eos_token_id
    # sort by length so batches hold similar lengths (less padding), restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    it = range(0, len(order), batch_size)
    if progress:
        it = tqdm(it, desc="generate", leave=False)
    for start in it:
        idx = order[start : start + batch_size]
        batch = collate_prompts(tokenizer, [prompts[i] for i in idx], max_length=max_prompt_tokens)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, model):
            gen = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                early_stopping=True if num_beams > 1 else False,
                stopping_criteria=stop,
                pad_token_id=pad_token_id(tokenizer),
                eos_token_id=eos,
                use_cache=True,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new = gen[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = postprocess(t, template)
    return [t or "" for t in out]


# --------------------------------------------------------------------------------------------
# metrics


def bleu_tokenizer(lang: str) -> str:
    iso = L.normalize(lang)
    if iso == "zh":
        return "zh"
    if iso == "ja":
        try:
            import ipadic  # noqa: F401
            import MeCab  # noqa: F401

            return "ja-mecab"
        except ImportError:
            return "char"
    if iso in ("th", "lo", "km", "my"):
        return "char"
    return "13a"


def bleu(hyps: Sequence[str], refs: Sequence[str], tgt_lang: str) -> float:
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize=bleu_tokenizer(tgt_lang)).score)


def spbleu(hyps: Sequence[str], refs: Sequence[str]) -> float | None:
    """spBLEU (FLORES-200 SentencePiece tokenisation, the mFTI paper's metric). sacrebleu downloads
    the SentencePiece model on first use; offline without a cached copy this returns None."""
    try:
        return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize="flores200").score)
    except Exception as exc:  # missing sentencepiece package or model file
        global _SPBLEU_WARNED
        if not _SPBLEU_WARNED:
            print(f"[mmt] spBLEU unavailable ({type(exc).__name__}: {exc}); reporting BLEU/chrF++ only")
            _SPBLEU_WARNED = True
        return None


_SPBLEU_WARNED = False


def chrf_pp(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return float(CHRF(word_order=2).corpus_score(list(hyps), [list(refs)]).score)


def off_target_rate(hyps: Sequence[str], tgt_lang: str) -> float:
    """Share of non-empty hypotheses that py3langid assigns to a language other than ``tgt_lang``
    (empty outputs count as off-target)."""
    try:
        import py3langid  # imported on use: loading its model takes a while
    except ImportError:
        return float("nan")
    want = L.normalize(tgt_lang)
    bad = 0
    for h in hyps:
        if not h.strip():
            bad += 1
            continue
        code, _ = py3langid.classify(h)
        try:
            got = L.normalize(code)
        except ValueError:
            got = code
        bad += got != want
    return bad / max(len(hyps), 1)


def comet(model_path: str, srcs: Sequence[str], hyps: Sequence[str], refs: Sequence[str], batch_size: int = 8) -> float:
    """COMET system score with a local checkpoint (``pip install unbabel-comet``; hub downloads are not used)."""
    load_from_checkpoint = require("comet", "unbabel-comet", purpose="eval.comet_model").load_from_checkpoint
    p = Path(model_path)
    ckpt = p if p.is_file() else next(iter(sorted(p.rglob("*.ckpt"))), None)
    if ckpt is None:
        raise ConfigError(f"no COMET checkpoint (*.ckpt) under {model_path}")
    m = load_from_checkpoint(str(ckpt))
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
    out = m.predict(data, batch_size=batch_size, gpus=1 if torch.cuda.is_available() else 0, progress_bar=False)
    return float(out.system_score) * 100


# --------------------------------------------------------------------------------------------
# evaluation runs


@dataclass
class DirectionResult:
    direction: str
    n: int
    bleu: float
    chrf: float
    off_target: float | None = None
    comet: float | None = None
    spbleu: float | None = None
    seconds: float = 0.0
    bleu_tokenize: str = "13a"
    seen: bool | None = None  # trained on this direction (None: unknown)


@dataclass
class EvalReport:
    label: str
    results: list[DirectionResult]
    hypotheses: dict[str, list[str]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def averages(self) -> dict[str, dict[str, float]]:
        groups = {
            "xx->en": [r for r in self.results if r.direction.endswith("-en")],
            "en->xx": [r for r in self.results if r.direction.startswith("en-")],
            "seen": [r for r in self.results if r.seen is True],
            "unseen": [r for r in self.results if r.seen is False],
            "all": list(self.results),
        }
        out = {}
        for name, rs in groups.items():
            if not rs:
                continue
            row = {"bleu": float(np.mean([r.bleu for r in rs])), "chrf": float(np.mean([r.chrf for r in rs]))}
            ots = [r.off_target for r in rs if r.off_target is not None and not np.isnan(r.off_target)]
            if ots:
                row["off_target"] = float(np.mean(ots))
            for key in ("comet", "spbleu"):
                vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
                if vals:
                    row[key] = float(np.mean(vals))
            out[name] = row
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "settings": self.settings,
            "results": [asdict(r) for r in self.results],
            "averages": self.averages(),
        }

    def markdown(self) -> str:
        has_comet = any(r.comet is not None for r in self.results)
        head = "| direction | n | BLEU | chrF++ | off-target |" + (" COMET |" if has_comet else "")
        sep = "|---|---:|---:|---:|---:|" + ("---:|" if has_comet else "")
        rows = [f"**{self.label}**", "", head, sep]

        def fmt_ot(v):
            return "-" if v is None or np.isnan(v) else f"{100 * v:.0f}%"

        for r in self.results:
            rows.append(
                f"| {r.direction} | {r.n} | {r.bleu:.2f} | {r.chrf:.2f} | {fmt_ot(r.off_target)} |"
                + (f" {r.comet:.2f} |" if has_comet and r.comet is not None else (" - |" if has_comet else ""))
            )
        for name, a in self.averages().items():
            rows.append(
                f"| *avg {name}* | | {a['bleu']:.2f} | {a['chrf']:.2f} | {fmt_ot(a.get('off_target'))} |"
                + (f" {a['comet']:.2f} |" if has_comet and "comet" in a else (" - |" if has_comet else ""))
            )
        return "\n".join(rows)


def draw_shots(
    dev_folder: Path, direction: tuple[str, str], k: int, seed: int, exclude_sources: set[str] | None = None
) -> list[Example]:
    """k examples from a dev split (never the test set); shorter lines preferred to save context."""
    data = load_flores(dev_folder, direction)
    s, t = direction
    rng = np.random.default_rng([seed, 31337])
    cand = [
        i
        for i in range(len(data[s]))
        if len(data[s][i]) < 200 and (exclude_sources is None or data[s][i] not in exclude_sources)
    ]
    if len(cand) < k:
        cand = list(range(len(data[s])))
    picks = rng.choice(cand, size=k, replace=False)
    return [Example(s, t, data[s][i], data[t][i], f"{dev_folder}:{i + 1}") for i in picks]


def evaluate(
    model,
    tokenizer,
    eval_cfg: Any,
    *,
    template: str = "T1",
    data_dir: str | Path | None = None,
    label: str = "model",
    shots: int | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
    seen: Sequence[str] | None = None,
) -> EvalReport:
    """Score ``model`` on each direction of ``eval_cfg`` (a :class:`mmt.config.EvalConfig`).

    ``seen``: the training directions ("de-en", ...); the report then averages seen and unseen directions
    separately (mFTI's second claim is about directions never trained on)."""
    root = resolve_data_dir(data_dir)
    test_folder = Path(eval_cfg.test_set)
    test_folder = test_folder if test_folder.is_absolute() else root / test_folder
    k = eval_cfg.shots if shots is None else shots
    tpl = eval_cfg.template or template
    directions = [L.parse_direction(d) for d in eval_cfg.directions]
    scorers = scorer_status(eval_cfg)
    if log:
        log("\n".join(f"[{label}] {line}" for line in describe_scorers(scorers).splitlines()))
    results, hyps_all = [], {}
    for s, t in directions:
        t0 = time.time()
        data = load_flores(test_folder, (s, t))
        stop = None if eval_cfg.max_sentences is None else eval_cfg.first_line + eval_cfg.max_sentences
        srcs, refs = data[s][eval_cfg.first_line : stop], data[t][eval_cfg.first_line : stop]
        if k > 0:
            shot_folder = Path(eval_cfg.shots_from)
            shot_folder = shot_folder if shot_folder.is_absolute() else root / shot_folder
            if shot_folder.resolve() == test_folder.resolve():
                raise ConfigError("eval.shots_from must not be the test set (few-shot examples would leak test lines)")
            ex = draw_shots(shot_folder, (s, t), k, seed, exclude_sources=set(srcs))
            prompts = [build_fewshot_prompt(tpl, ex, s, t, x) for x in srcs]
        else:  # as in training: chat templates through the tokenizer, others as plain text
            build = PromptBuilder(tpl, tokenizer)
            prompts = [build(s, t, x) for x in srcs]
        hyps = generate(
            model,
            tokenizer,
            prompts,
            batch_size=eval_cfg.batch_size,
            num_beams=eval_cfg.num_beams,
            max_new_tokens=eval_cfg.max_new_tokens,
            progress=progress,
            template=CHAT_USER_TEMPLATE.get(tpl, tpl),
            direction=(s, t),
            precision=eval_cfg.precision,
        )
        r = DirectionResult(
            direction=f"{s}-{t}",
            n=len(srcs),
            bleu=bleu(hyps, refs, t),
            chrf=chrf_pp(hyps, refs),
            bleu_tokenize=bleu_tokenizer(t),
            seen=None if seen is None else f"{s}-{t}" in {_norm_direction(d) for d in seen},
        )
        if eval_cfg.off_target:
            r.off_target = off_target_rate(hyps, t)
        if scorers["spBLEU"] == "on":
            r.spbleu = spbleu(hyps, refs)
        if eval_cfg.comet_model:
            r.comet = comet(eval_cfg.comet_model, srcs, hyps, refs)
        r.seconds = time.time() - t0
        results.append(r)
        hyps_all[r.direction] = hyps
        if log:
            log(f"[{label}] {r.direction}: BLEU {r.bleu:.2f} chrF++ {r.chrf:.2f} ({r.n} sentences, {r.seconds:.0f}s)")
    settings = {
        "template": tpl,
        "shots": k,
        "num_beams": eval_cfg.num_beams,
        "max_new_tokens": eval_cfg.max_new_tokens,
        "precision": resolve_for(eval_cfg.precision, model),
        "test_set": str(test_folder),
        "first_line": eval_cfg.first_line,
        "max_sentences": eval_cfg.max_sentences,
        "scorers": scorers,
        "seen_directions": None if seen is None else sorted(_norm_direction(d) for d in seen),
    }
    return EvalReport(label=label, results=results, hypotheses=hyps_all, settings=settings)


def _norm_direction(d: str) -> str:
    s, t = L.parse_direction(d)
    return f"{s}-{t}"


def write_report(report: EvalReport, out_dir: str | Path, name: str | None = None) -> Path:
    """results JSON + markdown table + one hypothesis file per direction."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or report.label.replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    (out / f"{stem}.md").write_text(report.markdown() + "\n", encoding="utf-8")
    hyp_dir = out / f"{stem}_hyps"
    hyp_dir.mkdir(exist_ok=True)
    for d, hyps in report.hypotheses.items():
        (hyp_dir / f"{d}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    return out


def compare_markdown(before: EvalReport, after: EvalReport) -> str:
    """Before/after table with deltas (directions matched by name)."""
    rows = [
        f"| direction | BLEU {before.label} | BLEU {after.label} | chrF++ {before.label} | chrF++ {after.label} | Δ chrF++ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    amap = {r.direction: r for r in after.results}
    for b in before.results:
        a = amap.get(b.direction)
        if a is None:
            continue
        rows.append(
            f"| {b.direction} | {b.bleu:.2f} | {a.bleu:.2f} | {b.chrf:.2f} | {a.chrf:.2f} | {a.chrf - b.chrf:+.2f} |"
        )
    ba, aa = before.averages(), after.averages()
    for k in ba:
        if k in aa:
            rows.append(
                f"| *avg {k}* | {ba[k]['bleu']:.2f} | {aa[k]['bleu']:.2f} | {ba[k]['chrf']:.2f} | "
                f"{aa[k]['chrf']:.2f} | {aa[k]['chrf'] - ba[k]['chrf']:+.2f} |"
            )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# runs: the directions a model was trained on, and mFTI's best-checkpoint protocol


def training_directions_of(model_path: str | Path) -> list[str] | None:
    """The directions a model written by ``mmt train`` was trained on, read from its run's ``config.yaml``
    (``final/`` and ``checkpoints/checkpoint-N/`` sit inside the run directory); None when unknown."""
    import yaml

    p = Path(model_path)
    if not p.exists():
        return None
    for d in (p, p.parent, p.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            raw = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            listed = (raw.get("method") or {}).get("directions")
            if listed:
                return list(listed)
            dirs = [
                x
                for src in (raw.get("data") or {}).get("train") or []
                if src.get("kind") != "mono"
                for x in src.get("directions") or []
            ]
            return dirs or None
    return None


def select_best_checkpoint(
    cfg: Any, *, metric: str = "chrf", split: str = "flores200/dev", max_sentences: int | None = None, log=print
) -> dict[str, Any]:
    """Score every checkpoint and ``final/`` of the run ``cfg.train.output_dir`` on a dev split (never the test
    set) over ``cfg.eval.directions``; copy the best to ``<run>/best/`` and write ``<run>/selection.json``."""
    import copy
    import os
    import shutil

    from mmt.checkpoint import list_checkpoints
    from mmt.models import load_model

    run = Path(cfg.train.output_dir)
    candidates = [p for p in list_checkpoints(run / "checkpoints") if (p / "config.json").is_file()]
    if (run / "final" / "config.json").is_file():
        candidates.append(run / "final")
    if not candidates:
        raise CheckpointError(f"{run}: no checkpoint or final/ model to select from")
    ecfg = copy.deepcopy(cfg.eval)
    ecfg.test_set, ecfg.shots, ecfg.first_line = split, 0, 0
    if max_sentences is not None:
        ecfg.max_sentences = max_sentences
    if Path(ecfg.test_set) == Path(cfg.eval.test_set):
        raise ValueError(f"checkpoint selection split {split!r} is the test set; use a dev split")
    scores = {}
    for cand in candidates:
        model, tok = load_model(cfg.model, name_or_path=str(cand), verbose=False)
        rep = evaluate(
            model,
            tok,
            ecfg,
            template=cfg.data.template,
            data_dir=cfg.data.data_dir,
            label=cand.name,
            progress=False,
            log=None,
        )
        scores[cand.name] = rep.averages()["all"][metric]
        if log:
            log(f"[select] {cand.name}: dev {metric} {scores[cand.name]:.2f}")
        del model
    best = max(scores, key=lambda k: (scores[k], k == "final"))
    src = run / "checkpoints" / best if best != "final" else run / "final"
    tmp = run / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_*.pt"))
    shutil.rmtree(run / "best", ignore_errors=True)
    os.replace(tmp, run / "best")
    result = {"metric": metric, "split": split, "max_sentences": ecfg.max_sentences, "scores": scores, "best": best}
    (run / "selection.json").write_text(json.dumps(result, indent=1))
    return result
