"""Translation data: loaders, prompt templates, tokenisation with loss masks, collation, samplers.

Everything is keyed by ISO 639-1 codes internally (see :mod:`mmt.languages`). Loaders check what
silently ruins a run (misaligned files, empty or over-long lines, unknown language codes, broken
JSONL) and raise :class:`DataError` naming the file and the 1-based line.

Samplers are pure functions of (seed, step, cursors), so a checkpoint only stores a small state
dict and a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from mmt import languages as L
from mmt.errors import DataError, require

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# locating data


def resolve_data_dir(data_dir: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """The data root: explicit argument, else ``$MMT_DATA_DIR``, else ``../shared/data`` relative to
    the repository (resolved from the package location), else relative to the working directory."""
    tried: list[Path] = []
    if data_dir:
        p = Path(data_dir).expanduser()
        if p.is_dir():
            return p.resolve()
        tried.append(p)
    else:
        env = os.environ.get("MMT_DATA_DIR")
        candidates = [Path(env).expanduser()] if env else []
        repo = Path(__file__).resolve().parent.parent
        candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                       Path.cwd() / "shared" / "data", Path.cwd() / "data"]
        for p in candidates:
            if p.is_dir():
                return p.resolve()
            tried.append(p)
    if required:
        raise DataError("data directory not found; set MMT_DATA_DIR or data.data_dir. Tried: "
                        + ", ".join(str(t) for t in tried))
    return None


def _under(root: Path | None, path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or root is None:
        return p
    return root / p


# --------------------------------------------------------------------------------------------
# reading files


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, "rt", encoding="utf-8", newline="\n")


def read_lines(path: str | os.PathLike, *, max_chars: int | None = 2000, check_empty: bool = True,
               on_bad_line: str = "error") -> tuple[list[str], list[int]]:
    """Read one segment per line (gzip or plain UTF-8); keeps leading/trailing spaces.

    Returns (lines, bad) where ``bad`` lists 0-based indices of empty/over-long lines when
    ``on_bad_line == "skip"``; with ``"error"`` the first bad line raises :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        line = text_line_of_byte(path, exc.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first segment
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not any(ln.strip() for ln in lines):
        raise DataError(f"{path}: empty file (no non-blank lines)")
    bad: list[int] = []
    reasons: dict[str, int] = {}
    for i, ln in enumerate(lines):
        problem = reason = None
        if check_empty and not ln.strip():
            problem = reason = "empty line"
        elif max_chars is not None and len(ln) > max_chars:
            problem, reason = f"over-long line ({len(ln)} characters > max_chars={max_chars})", "over-long line"
        if problem:
            if on_bad_line == "error":
                raise DataError(f"{path}:{i + 1}: {problem} (set data.on_bad_line=skip to drop such lines)")
            bad.append(i)
            reasons[reason] = reasons.get(reason, 0) + 1
    report_skipped(path, reasons, len(lines), first=bad[0] + 1 if bad else None)
    return lines, bad


def report_skipped(path: Path | str, reasons: dict[str, int], total: int, first: int | None = None) -> None:
    """Say on stderr how many lines of ``path`` were skipped, per reason (``data.on_bad_line=skip``)."""
    if not reasons:
        return
    import sys

    detail = ", ".join(f"{n} {reason}{'s' if n > 1 else ''}" for reason, n in sorted(reasons.items()))
    print(f"data: skipped {sum(reasons.values())} of {total} lines of {path} ({detail}; first at line {first})",
          file=sys.stderr, flush=True)


def text_line_of_byte(path: Path, offset: int) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return fh.read()[:offset].count(b"\n") + 1


def _find_lang_file(folder: Path, lang: str, stem_prefix: str = "") -> Path:
    """``<folder>/<prefix><code>[.txt][.gz]`` for the FLORES-200 or ISO code of ``lang``."""
    names = [L.to_flores(lang), L.normalize(lang)]
    for code in names:
        for suffix in (".txt.gz", ".txt", ".gz", ""):
            p = folder / f"{stem_prefix}{code}{suffix}"
            if p.is_file():
                return p
    raise DataError(f"{folder}: no file for language {lang!r} (looked for {stem_prefix}{names[0]}.txt[.gz] "
                    f"and {stem_prefix}{names[1]}.txt[.gz])")


# --------------------------------------------------------------------------------------------
# examples and loaders


@dataclass
class Example:
    """One translation pair; ``where`` is 'file:line' for error messages and debugging."""

    src_lang: str
    tgt_lang: str
    src: str
    tgt: str
    where: str = ""

    @property
    def direction(self) -> tuple[str, str]:
        return (self.src_lang, self.tgt_lang)


@dataclass
class MonoExample:
    lang: str
    text: str
    where: str = ""


def load_flores(folder: str | os.PathLike, langs: Iterable[str], *, max_chars: int | None = None) -> dict[str, list[str]]:
    """Line-aligned FLORES-style folder -> {iso: lines}; all files must have the same line count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: FLORES folder not found")
    out: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for lang in langs:
        iso = L.normalize(lang)
        files[iso] = _find_lang_file(folder, iso)
        out[iso], _ = read_lines(files[iso], max_chars=max_chars, check_empty=True, on_bad_line="error")
    counts = {iso: len(v) for iso, v in out.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{files[i].name}: {n}" for i, n in counts.items())
        raise DataError(f"{folder}: files are not line-aligned ({detail} lines)")
    return out


def flores_examples(folder: str | os.PathLike, directions: Sequence[tuple[str, str]], *,
                    first: int = 0, count: int | None = None) -> list[Example]:
    langs = sorted({x for d in directions for x in d})
    data = load_flores(folder, langs)
    n = len(next(iter(data.values()))) if data else 0
    stop = n if count is None else min(n, first + count)
    out = []
    for s, t in directions:
        for i in range(first, stop):
            out.append(Example(s, t, data[s][i], data[t][i], f"{folder}:{i + 1}"))
    return out


def load_parallel(root: str | os.PathLike, direction: tuple[str, str], split: str = "train", *,
                  max_chars: int | None = 2000, on_bad_line: str = "error") -> list[Example]:
    """``<root>/<s>-<t>/<split>.<s>[.gz]`` + ``.<t>`` (or the ``<t>-<s>`` folder), line-aligned."""
    root = Path(root)
    s, t = L.normalize(direction[0]), L.normalize(direction[1])
    folders = [root / f"{s}-{t}", root / f"{t}-{s}"]
    for folder in folders:
        fs = _maybe(folder, f"{split}.{s}")
        ft = _maybe(folder, f"{split}.{t}")
        if fs and ft:
            break
    else:
        raise DataError(f"no parallel files for {s}-{t} split {split!r}: looked for "
                        f"{folders[0]}/{split}.{s}[.gz] and .{t}[.gz] (and in {folders[1].name}/)")
    src, bad_s = read_lines(fs, max_chars=max_chars, on_bad_line=on_bad_line)
    tgt, bad_t = read_lines(ft, max_chars=max_chars, on_bad_line=on_bad_line)
    if len(src) != len(tgt):
        raise DataError(f"misaligned parallel files: {fs} has {len(src)} lines, {ft} has {len(tgt)} lines")
    bad = set(bad_s) | set(bad_t)
    return [Example(s, t, a, b, f"{fs}:{i + 1}") for i, (a, b) in enumerate(zip(src, tgt)) if i not in bad]


def _maybe(folder: Path, stem: str) -> Path | None:
    for suffix in (".gz", ""):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def load_jsonl(path: str | os.PathLike, *, max_chars: int | None = 2000, on_bad_line: str = "error",
               src_field: str = "src", tgt_field: str = "tgt") -> list[Example]:
    """JSON lines with ``src_lang``, ``tgt_lang``, ``src``, ``tgt`` (field names for texts configurable)."""
    path = Path(path)
    lines, _ = read_lines(path, max_chars=None, check_empty=False)
    out = []
    reasons: dict[str, int] = {}
    first = None
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("src_lang", "tgt_lang", src_field, tgt_field) if k not in obj]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        try:
            s, t = L.normalize(str(obj["src_lang"])), L.normalize(str(obj["tgt_lang"]))
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        src, tgt = obj[src_field], obj[tgt_field]
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise DataError(f"{where}: {src_field!r} and {tgt_field!r} must be strings")
        problem = None
        if not src.strip() or not tgt.strip():
            problem = "empty source or target"
        elif max_chars is not None and max(len(src), len(tgt)) > max_chars:
            problem = "over-long text"
        if problem:
            if on_bad_line == "error":
                limit = f" (> max_chars={max_chars})" if problem == "over-long text" else ""
                raise DataError(f"{where}: {problem}{limit} (set data.on_bad_line=skip to drop such lines)")
            reasons[problem] = reasons.get(problem, 0) + 1
            first = first or i + 1
            continue
        out.append(Example(s, t, src, tgt, where))
    report_skipped(path, reasons, len(lines), first)
    return out


def load_mono(folder: str | os.PathLike, langs: Iterable[str], *, max_chars: int | None = 2000,
              on_bad_line: str = "error") -> list[MonoExample]:
    folder = Path(folder)
    out = []
    for lang in langs:
        iso = L.normalize(lang)
        path = _find_lang_file(folder, iso)
        lines, bad = read_lines(path, max_chars=max_chars, on_bad_line=on_bad_line)
        badset = set(bad)
        out += [MonoExample(iso, ln, f"{path}:{i + 1}") for i, ln in enumerate(lines) if i not in badset]
    return out


def load_hf(name: str, direction: tuple[str, str], split: str = "train", config: str | None = None,
            src_field: str | None = None, tgt_field: str | None = None) -> list[Example]:
    """A Hugging Face dataset. Supports the ALMA/WMT layout (``{"translation": {"de": .., "en": ..}}``,
    config ``"de-en"``) and flat columns named by ``src_field``/``tgt_field``."""
    load_dataset = require("datasets", purpose=f"loading the hub dataset {name!r}").load_dataset  # optional
    s, t = L.normalize(direction[0]), L.normalize(direction[1])
    cfg = config if config is not None else None
    try:
        ds = load_dataset(name, cfg, split=split)
    except Exception as exc:  # offline, missing config, ...: say which dataset and why
        raise DataError(f"hub dataset {name!r} (config {cfg!r}, split {split!r}) could not be loaded: {exc}") from exc
    out = []
    for i, row in enumerate(ds):
        where = f"{name}[{split}]:{i + 1}"
        if "translation" in row and isinstance(row["translation"], dict):
            tr = row["translation"]
            if s not in tr or t not in tr:
                raise DataError(f"{where}: 'translation' has keys {sorted(tr)}, need {s!r} and {t!r}")
            a, b = tr[s], tr[t]
        else:
            sf, tf = src_field or "src", tgt_field or "tgt"
            if sf not in row or tf not in row:
                raise DataError(f"{where}: columns {sorted(row)} lack {sf!r}/{tf!r}; set src_field/tgt_field")
            a, b = row[sf], row[tf]
        if a and b and str(a).strip() and str(b).strip():
            out.append(Example(s, t, str(a), str(b), where))
    return out


DEFAULT_PATHS = {"parallel": "parallel", "tatoeba": "tatoeba", "flores": "flores200/dev", "mono": "mono"}


def load_source(source: Any, data_dir: Path | None, *, max_chars: int | None = 2000,
                on_bad_line: str = "error", seed: int = 0) -> list[Example] | list[MonoExample]:
    """Load one :class:`mmt.config.DataSource`; ``max_examples``/``skip`` apply per direction after
    a seeded shuffle (so a small subset is a random sample, not the first lines of a file)."""
    kind = source.kind
    if kind == "mono":
        folder = _under(data_dir, source.path or DEFAULT_PATHS["mono"])
        items: list = load_mono(folder, source.directions, max_chars=max_chars, on_bad_line=on_bad_line)
        groups: dict[Any, list] = {}
        for ex in items:
            groups.setdefault(ex.lang, []).append(ex)
        return [ex for key in sorted(groups) for ex in _subset(groups[key], source, seed, key)]
    if kind == "jsonl":
        if not source.path:
            raise DataError("data source kind 'jsonl' needs 'path'")
        items = load_jsonl(_under(data_dir, source.path), max_chars=max_chars, on_bad_line=on_bad_line,
                           src_field=source.src_field, tgt_field=source.tgt_field)
        wanted = {L.parse_direction(d) for d in source.directions} if source.directions else None
        items = [ex for ex in items if wanted is None or ex.direction in wanted]
    else:
        if not source.directions:
            raise DataError(f"data source kind {kind!r} needs 'directions', e.g. ['de-en', 'en-de']")
        dirs = [L.parse_direction(d) for d in source.directions]
        items = []
        if kind in ("parallel", "tatoeba"):
            root = _under(data_dir, source.path or DEFAULT_PATHS[kind])
            split = "sample" if kind == "tatoeba" and source.split == "train" else source.split
            for d in dirs:
                items += load_parallel(root, d, split, max_chars=max_chars, on_bad_line=on_bad_line)
        elif kind == "flores":
            items = flores_examples(_under(data_dir, source.path or DEFAULT_PATHS["flores"]), dirs)
        elif kind == "hf":
            if not source.path:
                raise DataError("data source kind 'hf' needs 'path' (the hub dataset name)")
            for d in dirs:
                items += load_hf(source.path, d, source.split, source.hf_config or f"{d[0]}-{d[1]}",
                                 source.src_field if source.src_field != "src" else None,
                                 source.tgt_field if source.tgt_field != "tgt" else None)
        else:
            raise DataError(f"unknown data source kind {kind!r}")
    groups = {}
    for ex in items:
        groups.setdefault(ex.direction, []).append(ex)
    return [ex for key in sorted(groups) for ex in _subset(groups[key], source, seed, "-".join(key))]


def _subset(items: list, source: Any, seed: int, key: Any) -> list:
    if source.max_examples is None and not source.skip:
        return items
    order = np.random.default_rng([seed, _stable_hash(str(key))]).permutation(len(items))
    stop = None if source.max_examples is None else source.skip + source.max_examples
    return [items[i] for i in order[source.skip:stop]]


def _stable_hash(text: str) -> int:
    h = 2166136261
    for ch in text.encode("utf-8"):
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h


# --------------------------------------------------------------------------------------------
# templates

TEMPLATES: dict[str, str] = {
    # mFTI (METHODS.md 1(b)); brackets are literal
    "T1": "Translation: [<srclang>]: <input> [<tgtlang>]:",
    "T2": "Translation: <input> [<tgtlang>]:",
    "T3": "<input> Translate from [<srclang>] to [<tgtlang>]:",
    "T4": "<input> Translate to [<tgtlang>]:",
    "T5": "The <tgtlang> translation of <srclang> sentence '<input>' is:",
    "T6": "The <tgtlang> translation of the sentence '<input>' is:",
    # ALMA (utils.get_prompt) and X-ALMA (ALMA prompt in the Llama-2 chat format; BOS comes from the tokenizer)
    "alma": "Translate this from <srclang> to <tgtlang>:\n<srclang>: <input>\n<tgtlang>:",
    "xalma": "[INST] Translate this from <srclang> to <tgtlang>:\n<srclang>: <input>\n<tgtlang>: [/INST]",
}


def template_text(template: str) -> str:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "<input>" in template:  # a custom template string
        return template
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)} "
                     "(or a custom string containing <input>, <srclang>, <tgtlang>)")


def build_prompt(template: str, src_lang: str, tgt_lang: str, src: str) -> str:
    """The prompt up to (not including) the translation; the target follows after one space."""
    text = template_text(template)
    return (text.replace("<srclang>", L.name(src_lang)).replace("<tgtlang>", L.name(tgt_lang))
            .replace("<input>", src))


def fewshot_separator(template: str) -> str:
    return "\n\n" if "\n" in template_text(template) else "\n"


def build_fewshot_prompt(template: str, shots: Sequence[Example], src_lang: str, tgt_lang: str, src: str) -> str:
    """k solved examples, then the query prompt; examples are separated like separate documents."""
    sep = fewshot_separator(template)
    parts = [build_prompt(template, ex.src_lang, ex.tgt_lang, ex.src) + " " + ex.tgt.strip() for ex in shots]
    parts.append(build_prompt(template, src_lang, tgt_lang, src))
    return sep.join(parts)


# --------------------------------------------------------------------------------------------
# tokenisation and collation


def encode_pair(tokenizer, prompt: str, target: str, *, max_length: int, loss_on: str = "target",
                add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels for ``prompt + " " + target + EOS``.

    The prompt is encoded with the tokenizer's special tokens (BOS), the target without; labels are
    -100 on the prompt when ``loss_on == "target"``. Sequences longer than ``max_length`` are cut on
    the right (the EOS is lost then, as in the mFTI code).
    """
    if loss_on not in ("target", "full"):
        raise ValueError(f"loss_on must be 'target' or 'full', got {loss_on!r}")
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        t_ids = t_ids + [tokenizer.eos_token_id]
    ids = (p_ids + t_ids)[:max_length]
    if loss_on == "full":
        labels = list(ids)
        if tokenizer.bos_token_id is not None and labels and labels[0] == tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX  # BOS is never predicted
    else:
        labels = ([IGNORE_INDEX] * len(p_ids) + t_ids)[:max_length]
    return ids, labels


def encode_mono(tokenizer, text: str, *, max_length: int) -> tuple[list[int], list[int]]:
    ids = tokenizer(text.strip(), add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    labels = list(ids)
    if tokenizer.bos_token_id is not None and labels and labels[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE_INDEX
    return ids, labels


def collate(features: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad (ids, labels) pairs into input_ids / attention_mask / labels (labels padded with -100)."""
    if not features:
        raise ValueError("collate: empty batch")
    width = max(len(ids) for ids, _ in features)
    n = len(features)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(features):
        k = len(ids)
        sl = slice(width - k, width) if padding_side == "left" else slice(0, k)
        input_ids[i, sl] = torch.as_tensor(list(ids), dtype=torch.long)
        labels[i, sl] = torch.as_tensor(list(lab), dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation (new tokens then start at the same column)."""
    rows = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]  # keep the end: the query sits there in few-shot prompts
        rows.append((ids, ids))
    batch = collate(rows, pad_token_id(tokenizer), padding_side="left")
    batch.pop("labels")
    return batch


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


# --------------------------------------------------------------------------------------------
# training set and samplers


@dataclass
class TrainSet:
    """Tokenised training examples grouped into streams (a direction, or a language for mono)."""

    ids: list[list[int]]
    labels: list[list[int]]
    keys: list[Any]                          # per example: direction tuple or language
    streams: dict[Any, list[int]] = field(default_factory=dict)  # key -> example indices
    mono: bool = False

    def __post_init__(self) -> None:
        if not self.streams:
            for i, k in enumerate(self.keys):
                self.streams.setdefault(k, []).append(i)

    def __len__(self) -> int:
        return len(self.ids)

    def label_tokens(self, index: int) -> int:
        """Tokens that carry loss after the causal shift (the first position predicts nothing)."""
        return sum(1 for x in self.labels[index][1:] if x != IGNORE_INDEX)


def filter_directions(items: list[Example], directions: Sequence[tuple[str, str]] | None = None,
                      languages: Sequence[str] | None = None, groups: Sequence[int] | None = None) -> list[Example]:
    """Keep examples whose direction is listed / whose languages are allowed / whose X-ALMA group matches."""
    dset = {(L.normalize(s), L.normalize(t)) for s, t in directions} if directions else None
    lset = {L.normalize(x) for x in languages} if languages else None
    gset = set(groups) if groups else None
    out = []
    for ex in items:
        if dset is not None and ex.direction not in dset:
            continue
        if lset is not None and not (ex.src_lang in lset and ex.tgt_lang in lset):
            continue
        if gset is not None and L.direction_group(ex.src_lang, ex.tgt_lang) not in gset:
            continue
        out.append(ex)
    return out


def build_train_set(data_cfg: Any, tokenizer, *, plan: Any = None, data_dir: Path | None = None) -> TrainSet:
    """Load every source of ``data_cfg.train``, filter, and tokenise with the configured template."""
    if not data_cfg.train:
        raise DataError("data.train is empty: list at least one source (kind, directions, ...)")
    if data_dir is None:
        data_dir = resolve_data_dir(data_cfg.data_dir, required=any(
            s.kind != "hf" and not (s.path and Path(s.path).is_absolute()) for s in data_cfg.train))
    mono = plan is not None and plan.sampler == "mono"
    loss_on = (plan.loss_on if plan is not None and plan.loss_on else data_cfg.loss_on)
    ids, labels, keys = [], [], []
    for src in data_cfg.train:
        if (src.kind == "mono") != mono:
            raise DataError(f"data source kind {src.kind!r} does not fit the {'mono' if mono else 'translation'} "
                            f"sampler of method {getattr(plan, 'method', '?')!r}")
        items = load_source(src, data_dir, max_chars=data_cfg.max_chars, on_bad_line=data_cfg.on_bad_line,
                            seed=data_cfg.seed)
        if mono:
            langs = {L.normalize(x) for x in data_cfg.languages} if data_cfg.languages else None
            for ex in items:
                if langs is None or ex.lang in langs:
                    a, b = encode_mono(tokenizer, ex.text, max_length=data_cfg.max_length)
                    ids.append(a), labels.append(b), keys.append(ex.lang)
            continue
        items = filter_directions(items, plan.directions if plan is not None else None,
                                  data_cfg.languages, data_cfg.groups)
        for ex in items:
            prompt = build_prompt(data_cfg.template, ex.src_lang, ex.tgt_lang, ex.src)
            a, b = encode_pair(tokenizer, prompt, ex.tgt, max_length=data_cfg.max_length, loss_on=loss_on)
            ids.append(a), labels.append(b), keys.append(ex.direction)
    if not ids:
        raise DataError("no training examples left after loading and filtering "
                        "(check data.train directions, data.languages, data.groups and the method's directions)")
    return TrainSet(ids, labels, keys, mono=mono)


class _Stream:
    """Endless reshuffled pass over n items; item c is perm(epoch = c // n)[c % n]."""

    def __init__(self, n: int, seed: int, key: int):
        self.n, self.seed, self.key = n, seed, key
        self._epoch, self._perm = -1, None

    def at(self, c: int) -> int:
        epoch = c // self.n
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.key, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[c % self.n])


class StepSampler:
    """Chooses the global batch (example indices) of each optimizer step, deterministically.

    * ``mixed``: temperature 1 walks one shuffled pass over all examples per epoch; other
      temperatures draw a stream per example with p(stream) ~ n^(1/T), then its next example.
    * ``pair``: one stream (direction) per step, ``round_robin`` or by temperature; all examples of
      the step come from it.
    * ``mono``: like ``mixed`` over languages.

    State = step + per-stream cursors; :meth:`state_dict` / :meth:`load_state_dict` for resume.
    """

    def __init__(self, train_set: TrainSet, batch_size: int, *, mode: str = "mixed", seed: int = 0,
                 temperature: float = 1.0, pair_order: str = "round_robin"):
        if mode not in ("mixed", "pair", "mono"):
            raise ValueError(f"sampler mode must be mixed, pair or mono, got {mode!r}")
        self.ts, self.batch_size, self.mode, self.seed = train_set, batch_size, mode, seed
        self.temperature, self.pair_order = float(temperature), pair_order
        self.keys = sorted(train_set.streams, key=lambda k: str(k))
        sizes = np.array([len(train_set.streams[k]) for k in self.keys], dtype=np.float64)
        w = sizes ** (1.0 / self.temperature)
        self.probs = w / w.sum()
        self.streams = {k: _Stream(len(train_set.streams[k]), seed, _stable_hash(str(k))) for k in self.keys}
        self.all_stream = _Stream(len(train_set), seed, 7919)
        self.step = 0
        self.cursors: dict[str, int] = {str(k): 0 for k in self.keys}
        self.cursors["*"] = 0

    def _take(self, key: Any) -> int:
        c = self.cursors[str(key)]
        self.cursors[str(key)] = c + 1
        return self.ts.streams[key][self.streams[key].at(c)]

    def next(self) -> tuple[list[int], Any]:
        """(example indices of the step's global batch, pair or None)."""
        rng = np.random.default_rng([self.seed, 104729, self.step])
        pair = None
        if self.mode == "pair":
            if self.pair_order == "round_robin":
                key = self.keys[self.step % len(self.keys)]
            else:
                key = self.keys[int(rng.choice(len(self.keys), p=self.probs))]
            batch = [self._take(key) for _ in range(self.batch_size)]
            pair = key
        elif self.temperature == 1.0:
            batch = []
            for _ in range(self.batch_size):
                c = self.cursors["*"]
                self.cursors["*"] = c + 1
                batch.append(self.all_stream.at(c))
        else:
            picks = rng.choice(len(self.keys), size=self.batch_size, p=self.probs)
            batch = [self._take(self.keys[int(i)]) for i in picks]
        self.step += 1
        return batch, pair

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "cursors": dict(self.cursors), "mode": self.mode, "seed": self.seed,
                "n": len(self.ts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n") != len(self.ts) or state.get("mode") != self.mode:
            raise ValueError(f"sampler state does not match the data (checkpoint: {state.get('n')} examples, "
                             f"mode {state.get('mode')!r}; now: {len(self.ts)} examples, mode {self.mode!r}); "
                             "resume with the same data config")
        self.step = int(state["step"])
        self.cursors = {k: int(v) for k, v in state["cursors"].items()}


def shard_micro_batches(batch: Sequence[int], rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This process's contiguous share of the global batch, cut into micro-batches."""
    if len(batch) % world:
        raise ValueError(f"global batch {len(batch)} is not divisible by {world} processes")
    per = len(batch) // world
    mine = list(batch[rank * per:(rank + 1) * per])
    if per % micro_batch_size:
        raise ValueError(f"per-process batch {per} is not a multiple of micro_batch_size {micro_batch_size}")
    return [mine[i:i + micro_batch_size] for i in range(0, per, micro_batch_size)]


def temperature_probs(sizes: Sequence[int], temperature: float) -> list[float]:
    w = [max(s, 0) ** (1.0 / temperature) for s in sizes]
    total = sum(w)
    if total <= 0 or not math.isfinite(total):
        raise ValueError("temperature_probs: sizes must include a positive value")
    return [x / total for x in w]
