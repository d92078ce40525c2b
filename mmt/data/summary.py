"""The data summary printed before training: examples per direction (or language), and what was skipped."""

from __future__ import annotations

from typing import Any, Mapping


def summarize(train_set: Any, skipped: Mapping[str, Mapping[str, int]] | None = None) -> str:
    """A few lines: examples and target tokens per direction, the total, and skipped lines per file and reason.

    ``skipped``: {file: {reason: count}}; defaults to ``train_set.skipped`` when the set carries one."""
    skipped = skipped if skipped is not None else getattr(train_set, "skipped", None)
    what = "language" if train_set.mono else "direction"
    rows = []
    for key, idx in sorted(train_set.streams.items(), key=lambda kv: str(kv[0])):
        name = "-".join(key) if isinstance(key, tuple) else str(key)
        tokens = sum(train_set.label_tokens(i) for i in idx)
        rows.append((name, len(idx), tokens))
    width = max([len(what)] + [len(r[0]) for r in rows])
    lines = [
        f"data summary: {len(train_set):,} examples in {len(rows)} {what}s",
        f"  {what:<{width}}  {'examples':>9}  {'loss tokens':>11}",
    ]
    lines += [f"  {name:<{width}}  {n:>9,}  {tok:>11,}" for name, n, tok in rows]
    total = sum(r[2] for r in rows)
    lines.append(f"  {'total':<{width}}  {len(train_set):>9,}  {total:>11,}")
    if skipped:
        n_skipped = sum(sum(r.values()) for r in skipped.values())
        lines.append(f"  skipped {n_skipped:,} lines:")
        for where, reasons in skipped.items():
            detail = ", ".join(f"{n:,} {why}" for why, n in reasons.items())
            lines.append(f"    {where}: {detail}")
    else:
        lines.append("  skipped: none")
    return "\n".join(lines)
