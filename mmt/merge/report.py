"""What a merge reports: the summary printed by ``mmt merge``, ``merge_report.json`` and the conflict plot."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import commit


@dataclass
class MergeReport:
    output: str
    method: str
    num_models: int
    tensors_merged: int = 0
    tensors_copied: int = 0
    parameters: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        gbps = self.bytes_read / max(self.seconds, 1e-9) / 1e9
        lines = [f"merged {self.num_models} models with {self.method}: {self.tensors_merged} tensors merged, "
                 f"{self.tensors_copied} copied from the base, {self.parameters:,} parameters",
                 f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in "
                 f"{self.seconds:.1f} s ({gbps:.2f} GB/s read), peak RSS {self.peak_rss_mb:.0f} MB",
                 f"output: {self.output}"]
        if self.stats:
            rates = [s["sign_conflict"] for s in self.stats.values()]
            lines.append(f"sign conflict (elements where the kept task values disagree in sign): mean "
                         f"{sum(rates) / len(rates):.3f}, max {max(rates):.3f} over {len(rates)} tensors")
        lines += self.notes
        return "\n".join(lines)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_report_and_commit(tmp: Path, output: Path, config: dict[str, Any], report: MergeReport) -> None:
    """The last file of a merge, then the atomic rename that makes the output visible."""
    (tmp / "merge_report.json").write_text(json.dumps(
        {"config": config, **{k: v for k, v in report.__dict__.items() if k != "stats"}}, indent=2))
    commit(tmp, output)


def plot_stats(stats: dict[str, dict[str, float]], path: Path, report: MergeReport) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.notes.append("matplotlib is not installed: no conflict plot")
        return
    from mmt.plots import save_figure

    names = list(stats)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12), 3.5))
    ax.bar(range(len(names)), [stats[n]["sign_conflict"] for n in names])
    ax.set_ylabel("sign conflict rate")
    ax.set_xlabel("tensor (checkpoint order)")
    ax.set_title(f"{report.method}: sign disagreement among active task values")
    save_figure(fig, path)
