"""Model cards: a Hugging Face style ``README.md`` written next to every saved model and merge output.

The YAML front matter holds what the Hub indexes (``base_model``, ``tags``, ``language``, ``library_name``,
``pipeline_tag``); the body states the method and its settings, the training data with counts per direction,
the number of steps and the scores when known. Everything in it comes from the arguments; nothing is guessed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from mmt import __version__
from mmt import languages as L
from mmt.errors import ConfigError

CARD = "README.md"


def _languages(data_counts: Mapping[str, int] | None, extra: Sequence[str] = ()) -> list[str]:
    langs: set[str] = set()
    for key in list(data_counts or {}) + list(extra):
        for part in str(key).replace("->", "-").split("-"):
            try:
                langs.add(L.normalize(part))
            except ConfigError:
                continue  # a key that is not a direction (e.g. a corpus name) names no language
    return sorted(langs)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) if v else "[]"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items()) if v else "{}"
    return "`None`" if v is None else str(v)


def render_model_card(
    *,
    base_model: str | None,
    method: str,
    method_settings: Mapping[str, Any] | None = None,
    data_counts: Mapping[str, int] | None = None,
    steps: int | None = None,
    scores: Mapping[str, Any] | None = None,
    title: str | None = None,
    tags: Sequence[str] = (),
    languages: Sequence[str] = (),
    notes: str | None = None,
) -> str:
    """The card's text. ``data_counts``: examples per direction ("de-en": 1200) or per corpus;
    ``scores``: {"de-en": {"bleu": 30.1, "chrf": 55.0}} or {"bleu": 30.1}."""
    if not method:
        raise ConfigError("model card: 'method' is required")
    front: dict[str, Any] = {}
    if base_model:
        front["base_model"] = str(base_model)
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "translation"
    front["tags"] = list(dict.fromkeys(["mmt", "translation", str(method), *map(str, tags)]))
    langs = sorted(set(_languages(data_counts, tuple(scores or ()))) | {L.normalize(x) for x in languages})
    if langs:
        front["language"] = langs
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {title or f'{method} translation model'}", ""]
    what = f"Fine-tuned from `{base_model}`" if base_model else "Produced"
    lines += [f"{what} for machine translation with mmt {__version__}, method **{method}**.", ""]
    lines += ["## Method settings", ""]
    settings = dict(method_settings or {})
    lines += [f"- `{k}`: {_value(v)}" for k, v in settings.items()] if settings else ["- (defaults)"]
    lines += ["", "## Training data", ""]
    if data_counts:
        lines += ["| direction | examples |", "|---|---:|"]
        lines += [f"| {k} | {int(n)} |" for k, n in data_counts.items()]
        lines += [f"| **total** | {sum(int(n) for n in data_counts.values())} |"]
    else:
        lines += ["Not recorded."]
    lines += ["", "## Training", "", f"- optimizer steps: {steps if steps is not None else 'not recorded'}", ""]
    lines += ["## Scores", ""]
    if scores:
        nested = {k: v for k, v in scores.items() if isinstance(v, Mapping)}
        flat = {k: v for k, v in scores.items() if not isinstance(v, Mapping)}
        if nested:
            metrics = list(dict.fromkeys(m for v in nested.values() for m in v))
            lines += ["| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
            lines += [
                f"| {k} | " + " | ".join(_value(v.get(m, "-")) for m in metrics) + " |" for k, v in nested.items()
            ]
        lines += [f"- {k}: {_value(v)}" for k, v in flat.items()]
    else:
        lines += ["Not evaluated."]
    if notes:
        lines += ["", notes.rstrip()]
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | None,
    method: str,
    method_settings: Mapping[str, Any] | None = None,
    data_counts: Mapping[str, int] | None = None,
    steps: int | None = None,
    scores: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``<folder>/README.md`` atomically (the folder must exist); returns its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model card: {folder} is not a folder")
    text = render_model_card(
        base_model=base_model,
        method=method,
        method_settings=method_settings,
        data_counts=data_counts,
        steps=steps,
        scores=scores,
        **extra,
    )
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, folder / CARD)
    return folder / CARD


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of ``<folder>/README.md`` (empty when there is none)."""
    text = (Path(folder) / CARD).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---\n", 1)[0]
    return yaml.safe_load(head) or {}


def direction_counts(train_set: Any) -> dict[str, int]:
    """Examples per direction ("de-en") or language of a :class:`mmt.data.TrainSet`, sorted by key."""
    out = {}
    for key, idx in sorted(train_set.streams.items(), key=lambda kv: str(kv[0])):
        out["-".join(key) if isinstance(key, tuple) else str(key)] = len(idx)
    return out


def write_run_card(
    folder: str | os.PathLike,
    cfg: Any,
    *,
    train_set: Any = None,
    steps: int | None = None,
    scores: Mapping[str, Any] | None = None,
) -> Path:
    """The card of a model saved by a training run (a :class:`mmt.config.RunConfig`)."""
    settings = cfg.method.to_dict() if cfg.method is not None else {}
    notes = (
        f"Prompt template: `{cfg.data.template}` (use the same with `mmt translate`, which reads it from the "
        f"run's config.yaml). Loss on: {cfg.data.loss_on}; max length {cfg.data.max_length} tokens."
    )
    return write_model_card(
        folder,
        base_model=cfg.model.name_or_path,
        method=cfg.method_name,
        method_settings=settings,
        data_counts=direction_counts(train_set) if train_set else None,
        steps=steps,
        scores=scores,
        notes=notes,
    )
