"""Figures: before/after scores, training loss, score and neuron/expert heatmaps.

matplotlib runs headless (Agg); every function writes a PNG and returns its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _plt():
    # matplotlib is imported on first plot (slow to import) and set to the file-only Agg backend first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_before_after(
    before: Any, after: Any, path: str | Path, metrics: Sequence[str] = ("chrf", "bleu"), title: str | None = None
) -> Path:
    """Grouped bars per direction for two :class:`mmt.evaluate.EvalReport` objects."""
    plt = _plt()
    dirs = [r.direction for r in before.results]
    amap = {r.direction: r for r in after.results}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    names = {"chrf": "chrF++", "bleu": "BLEU", "off_target": "off-target rate", "comet": "COMET"}
    x = np.arange(len(dirs))
    for ax, m in zip(axes[0], metrics):
        b = [getattr(r, m) or 0.0 for r in before.results]
        a = [getattr(amap[d], m) or 0.0 if d in amap else 0.0 for d in dirs]
        ax.bar(x - 0.2, b, 0.4, label=before.label, color="#9aa5b1")
        ax.bar(x + 0.2, a, 0.4, label=after.label, color="#2f6fb0")
        for xi, (bv, av) in enumerate(zip(b, a)):
            ax.text(xi + 0.2, av, f"{av - bv:+.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, dirs)
        ax.set_ylabel(names.get(m, m))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{before.label} vs {after.label}")
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; every mmt plot ends here."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss(log_jsonl: str | Path, path: str | Path, losses: Sequence[float] | None = None) -> Path:
    """Training loss per optimizer step, from a list or the trainer's log.jsonl."""
    plt = _plt()
    if losses is None:
        recs = [json.loads(x) for x in Path(log_jsonl).read_text().splitlines() if x.strip()]
        steps, vals = [r["step"] for r in recs], [r["loss"] for r in recs]
    else:
        steps, vals = list(range(1, len(losses) + 1)), list(losses)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, vals, marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per label token)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_heatmap(
    matrix: Any,
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    cmap: str = "viridis",
    annotate: bool | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """Generic heatmap (score matrix src x tgt, neurons per layer x language, expert load per layer)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    h, w = m.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.6 * w, 16), min(1.5 + 0.45 * h, 12)))
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax)
    if col_labels is not None:
        ax.set_xticks(range(w), col_labels, rotation=45, ha="right")
    if row_labels is not None:
        ax.set_yticks(range(h), row_labels)
    if annotate is None:
        annotate = h * w <= 400
    if annotate:
        lo, hi = np.nanmin(m), np.nanmax(m)
        for i in range(h):
            for j in range(w):
                if np.isfinite(m[i, j]):
                    # dark text on the bright end of the colormap, white on the dark end
                    bright = hi > lo and (m[i, j] - lo) / (hi - lo) > 0.6
                    ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, path)


def plot_score_matrix(report: Any, path: str | Path, metric: str = "chrf") -> Path:
    """Source x target heatmap of one metric from an :class:`mmt.evaluate.EvalReport`."""
    pairs = [(r.direction.split("-")[0], r.direction.split("-")[1], getattr(r, metric)) for r in report.results]
    srcs = sorted({p[0] for p in pairs})
    tgts = sorted({p[1] for p in pairs})
    m = np.full((len(srcs), len(tgts)), np.nan)
    for s, t, v in pairs:
        m[srcs.index(s), tgts.index(t)] = v if v is not None else np.nan
    return plot_heatmap(
        m, path, row_labels=srcs, col_labels=tgts, title=f"{report.label}: {metric}", xlabel="target", ylabel="source"
    )
