"""Locating the data folder and reading corpora (FLORES folders, parallel files, JSONL, Hugging Face datasets,
monolingual text) into :class:`Example` lists, with errors naming the file and the 1-based line."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mmt import languages as L
from mmt.errors import DataError, require

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
        candidates += [
            repo.parent / "shared" / "data",
            Path.cwd().parent / "shared" / "data",
            Path.cwd() / "shared" / "data",
            Path.cwd() / "data",
        ]
        for p in candidates:
            if p.is_dir():
                return p.resolve()
            tried.append(p)
    if required:
        raise DataError(
            "data directory not found; set MMT_DATA_DIR or data.data_dir. Tried: " + ", ".join(str(t) for t in tried)
        )
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


def read_lines(
    path: str | os.PathLike, *, max_chars: int | None = 2000, check_empty: bool = True, on_bad_line: str = "error"
) -> tuple[list[str], list[int]]:
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
    print(
        f"data: skipped {sum(reasons.values())} of {total} lines of {path} ({detail}; first at line {first})",
        file=sys.stderr,
        flush=True,
    )


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
    raise DataError(
        f"{folder}: no file for language {lang!r} (looked for {stem_prefix}{names[0]}.txt[.gz] "
        f"and {stem_prefix}{names[1]}.txt[.gz])"
    )


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


def load_flores(
    folder: str | os.PathLike, langs: Iterable[str], *, max_chars: int | None = None
) -> dict[str, list[str]]:
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


def flores_examples(
    folder: str | os.PathLike, directions: Sequence[tuple[str, str]], *, first: int = 0, count: int | None = None
) -> list[Example]:
    langs = sorted({x for d in directions for x in d})
    data = load_flores(folder, langs)
    n = len(next(iter(data.values()))) if data else 0
    stop = n if count is None else min(n, first + count)
    out = []
    for s, t in directions:
        for i in range(first, stop):
            out.append(Example(s, t, data[s][i], data[t][i], f"{folder}:{i + 1}"))
    return out


def load_parallel(
    root: str | os.PathLike,
    direction: tuple[str, str],
    split: str = "train",
    *,
    max_chars: int | None = 2000,
    on_bad_line: str = "error",
) -> list[Example]:
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
        raise DataError(
            f"no parallel files for {s}-{t} split {split!r}: looked for "
            f"{folders[0]}/{split}.{s}[.gz] and .{t}[.gz] (and in {folders[1].name}/)"
        )
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


def load_jsonl(
    path: str | os.PathLike,
    *,
    max_chars: int | None = 2000,
    on_bad_line: str = "error",
    src_field: str = "src",
    tgt_field: str = "tgt",
) -> list[Example]:
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


def load_mono(
    folder: str | os.PathLike, langs: Iterable[str], *, max_chars: int | None = 2000, on_bad_line: str = "error"
) -> list[MonoExample]:
    folder = Path(folder)
    out = []
    for lang in langs:
        iso = L.normalize(lang)
        path = _find_lang_file(folder, iso)
        lines, bad = read_lines(path, max_chars=max_chars, on_bad_line=on_bad_line)
        badset = set(bad)
        out += [MonoExample(iso, ln, f"{path}:{i + 1}") for i, ln in enumerate(lines) if i not in badset]
    return out


def load_hf(
    name: str,
    direction: tuple[str, str],
    split: str = "train",
    config: str | None = None,
    src_field: str | None = None,
    tgt_field: str | None = None,
) -> list[Example]:
    """A Hugging Face dataset. Supports the ALMA/WMT layout (``{"translation": {"de": .., "en": ..}}``,
    config ``"de-en"``) and flat columns named by ``src_field``/``tgt_field``."""
    load_dataset = require("datasets", extra="hf", purpose=f"loading the hub dataset {name!r}").load_dataset  # optional
    s, t = L.normalize(direction[0]), L.normalize(direction[1])
    cfg = config if config is not None else None
    try:
        ds = load_dataset(name, cfg, split=split)
    except Exception as exc:  # offline, missing config, ...: say which dataset and why
        raise DataError(f"hub dataset {name!r} (config {cfg!r}, split {split!r}) could not be loaded: {exc}") from exc
    return hf_examples(ds, f"{name}[{split}]", (s, t), src_field, tgt_field)


def hf_examples(
    rows: Iterable[dict],
    name: str,
    direction: tuple[str, str],
    src_field: str | None = None,
    tgt_field: str | None = None,
) -> list[Example]:
    """Rows of a Hugging Face dataset as examples of ``direction``: the ALMA/WMT ``translation`` dict (either
    direction from the same rows) or flat columns named by ``src_field``/``tgt_field``."""
    s, t = direction
    out = []
    for i, row in enumerate(rows):
        where = f"{name}:{i + 1}"
        if "translation" in row and isinstance(row["translation"], dict):
            try:  # keys may be FLORES-200 codes; Arrow fills keys of other rows' languages with None
                tr = {L.normalize(str(k)): v for k, v in row["translation"].items() if v is not None}
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
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


def load_alma_json(
    path: str | os.PathLike,
    directions: Sequence[tuple[str, str]] | None = None,
    *,
    max_chars: int | None = 2000,
    on_bad_line: str = "error",
) -> list[Example]:
    """ALMA / X-ALMA JSON: records ``{"translation": {"de": "...", "en": "..."}}``, one per line (JSON Lines)
    or one JSON array. Each record gives both directions between its two languages, or the ``directions``
    asked for whose languages it holds. Language keys may be ISO 639-1/3 or FLORES-200 codes."""
    path = Path(path)
    lines, _ = read_lines(path, max_chars=None, check_empty=False)
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the JSON
    records: list[tuple[str, Any]] = []
    text = "\n".join(lines)
    if text.lstrip().startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        records = [(f"{path}[{i}]", obj) for i, obj in enumerate(arr)]
    else:
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    records.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i + 1}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    wanted = [(L.normalize(s), L.normalize(t)) for s, t in directions] if directions else None
    out: list[Example] = []
    skipped: dict[str, int] = {}
    for where, obj in records:
        tr = obj.get("translation") if isinstance(obj, dict) else None
        if not isinstance(tr, dict):
            raise DataError(
                f"{where}: expected an object with a 'translation' mapping, e.g. "
                '{"translation": {"de": "...", "en": "..."}}'
            )
        texts: dict[str, str] = {}
        for key, value in tr.items():
            try:
                iso = L.normalize(str(key))
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
            if not isinstance(value, str):
                raise DataError(f"{where}: translation[{key!r}] must be a string")
            texts[iso] = value
        if wanted is None:
            if len(texts) != 2:
                raise DataError(
                    f"{where}: 'translation' has {len(texts)} languages {sorted(texts)}; with more "
                    "or fewer than two, list the source's directions"
                )
            a, b = sorted(texts)
            pairs = [(a, b), (b, a)]
        else:
            pairs = [d for d in wanted if d[0] in texts and d[1] in texts]
        problem = None
        used = [texts[x] for d in pairs for x in d]
        if any(not x.strip() for x in used):
            problem = "empty text"
        elif max_chars is not None and used and max(len(x) for x in used) > max_chars:
            problem = f"over-long text (> max_chars={max_chars})"
        if problem:
            if on_bad_line == "error":
                raise DataError(f"{where}: {problem} (set data.on_bad_line=skip to drop such records)")
            skipped[problem] = skipped.get(problem, 0) + 1
            continue
        out += [Example(s, t, texts[s], texts[t], where) for s, t in pairs]
    if skipped:
        detail = ", ".join(f"{n} {why}" for why, n in skipped.items())
        print(f"data: skipped {sum(skipped.values())} of {len(records)} records of {path} ({detail})", flush=True)
    return out


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


def load_hf_local(
    path: str | os.PathLike,
    direction: tuple[str, str],
    split: str = "train",
    src_field: str | None = None,
    tgt_field: str | None = None,
) -> list[Example]:
    """A local Hugging Face dataset: a folder saved with ``save_to_disk`` (``load_from_disk``), or data files
    (``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet``, a file or a folder of them) read with their builder."""
    datasets = require("datasets", extra="hf", purpose=f"reading the dataset {path}")
    path = Path(path)
    s, t = L.normalize(direction[0]), L.normalize(direction[1])
    try:
        if is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: saved dataset has splits {sorted(ds)}, not {split!r}")
                ds = ds[split]
        else:
            files = sorted(p for p in path.iterdir() if p.suffix in _HF_BUILDERS) if path.is_dir() else [path]
            if not files or not path.exists():
                raise DataError(
                    f"{path}: no dataset here (a save_to_disk folder, or .json/.jsonl/.csv/.tsv/.parquet data files)"
                )
            kinds = {_HF_BUILDERS.get(p.suffix) for p in files}
            if None in kinds or len(kinds) != 1:
                raise DataError(f"{path}: data files must share one of the types {sorted(_HF_BUILDERS)}")
            kw = {"delimiter": "\t"} if files[0].suffix == ".tsv" else {}
            ds = datasets.load_dataset(kinds.pop(), data_files={split: [str(p) for p in files]}, split=split, **kw)
    except DataError:
        raise
    except Exception as exc:  # a damaged or unreadable dataset: say which and why
        raise DataError(f"{path}: the dataset could not be read: {type(exc).__name__}: {exc}") from exc
    return hf_examples(ds, f"{path}[{split}]", (s, t), src_field, tgt_field)


DEFAULT_PATHS = {"parallel": "parallel", "tatoeba": "tatoeba", "flores": "flores200/dev", "mono": "mono"}


def load_source(
    source: Any, data_dir: Path | None, *, max_chars: int | None = 2000, on_bad_line: str = "error", seed: int = 0
) -> list[Example] | list[MonoExample]:
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
    if kind == "alma":
        if not source.path:
            raise DataError("data source kind 'alma' needs 'path' (a JSON file of {\"translation\": {...}} records)")
        dirs = [L.parse_direction(d) for d in source.directions] or None
        items = load_alma_json(_under(data_dir, source.path), dirs, max_chars=max_chars, on_bad_line=on_bad_line)
    elif kind == "jsonl":
        if not source.path:
            raise DataError("data source kind 'jsonl' needs 'path'")
        items = load_jsonl(
            _under(data_dir, source.path),
            max_chars=max_chars,
            on_bad_line=on_bad_line,
            src_field=source.src_field,
            tgt_field=source.tgt_field,
        )
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
            # a save_to_disk folder or data files on disk, else a hub name
            local = next(
                (p for p in (Path(source.path).expanduser(), _under(data_dir, source.path)) if p.exists()), None
            )
            sf = source.src_field if source.src_field != "src" else None
            tf = source.tgt_field if source.tgt_field != "tgt" else None
            for d in dirs:
                if local is not None:
                    items += load_hf_local(local, d, source.split, sf, tf)
                else:
                    items += load_hf(source.path, d, source.split, source.hf_config or f"{d[0]}-{d[1]}", sf, tf)
        else:
            raise DataError(f"unknown data source kind {kind!r}")
    groups = {}
    for ex in items:
        groups.setdefault(ex.direction, []).append(ex)
    return [ex for key in sorted(groups) for ex in _subset(groups[key], source, seed, "-".join(key))]


def _subset(items: list, source: Any, seed: int, key: Any) -> list:
    if source.max_examples is None and not source.skip:
        return items
    order = np.random.default_rng([seed, stable_hash(str(key))]).permutation(len(items))
    stop = None if source.max_examples is None else source.skip + source.max_examples
    return [items[i] for i in order[source.skip : stop]]


def stable_hash(text: str) -> int:
    h = 2166136261
    for ch in text.encode("utf-8"):
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h
