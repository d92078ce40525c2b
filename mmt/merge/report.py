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
        lines = [
            f"merged {self.num_models} model{'s' if self.num_models != 1 else ''} with {self.method}: {self.tensors_merged} tensors merged, "
            f"{self.tensors_copied} copied as they are, {self.parameters:,} parameters",
            f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in "
            f"{self.seconds:.1f} s ({gbps:.2f} GB/s read), peak RSS {self.peak_rss_mb:.0f} MB",
            f"output: {self.output}",
        ]
        if self.stats:
            rates = [s["sign_conflict"] for s in self.stats.values()]
            lines.append(
                f"sign conflict (elements where the kept task values disagree in sign): mean "
                f"{sum(rates) / len(rates):.3f}, max {max(rates):.3f} over {len(rates)} tensors"
            )
        lines += self.notes
        return "\n".join(lines)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM is preferred: ru_maxrss keeps the peak of a parent
    that forked this process, so a merge started from a large process would report that process's size."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_report_and_commit(tmp: Path, output: Path, config: dict[str, Any], report: MergeReport) -> None:
    """The last file of a merge, then the atomic rename that makes the output visible."""
    (tmp / "merge_report.json").write_text(
        json.dumps({"config": config, **{k: v for k, v in report.__dict__.items() if k != "stats"}}, indent=2)
    )
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


REFERENCES = {
    "linear": "weight averaging (Wortsman et al., 2022, Model soups, arXiv:2203.05482)",
    "task_arithmetic": "task arithmetic (Ilharco et al., 2023, arXiv:2212.04089)",
    "ties": "TIES-Merging (Yadav et al., 2023, arXiv:2306.01708)",
    "dare_linear": "DARE (Yu et al., 2024, arXiv:2311.03099) with task arithmetic",
    "dare_ties": "DARE (Yu et al., 2024, arXiv:2311.03099) with TIES sign election",
    "breadcrumbs": "Model Breadcrumbs (Davari & Belilovsky, 2023, arXiv:2312.06795)",
    "breadcrumbs_ties": "Model Breadcrumbs (Davari & Belilovsky, 2023, arXiv:2312.06795) with TIES sign election",
    "della": "DELLA-Merging (Deep et al., 2024, arXiv:2406.11617)",
    "della_linear": "DELLA-Merging's MagPrune (Deep et al., 2024, arXiv:2406.11617) with task arithmetic",
    "slerp": "spherical linear interpolation (Shoemake, 1985)",
    "model_stock": "Model Stock (Jang et al., 2024, arXiv:2403.19522)",
    "nuslerp": "NuSLERP, mergekit's spherical interpolation of two models or of their task vectors",
    "sce": "SCE, select, calculate, erase (Wan et al., 2024, FuseChat, arXiv:2408.07990)",
    "passthrough": "passthrough: layers copied unchanged (frankenmerge, as mergekit's passthrough)",
}
# The settings each method reads, for the card.
_USES = {
    "ties": ("density", "lam", "sign", "tie_break"),
    "dare_ties": ("density", "lam", "sign", "seed"),
    "dare_linear": ("density", "lam", "seed"),
    "task_arithmetic": ("lam",),
    "linear": (),
    "breadcrumbs": ("density", "gamma", "lam", "tie_break"),
    "breadcrumbs_ties": ("density", "gamma", "lam", "sign", "tie_break"),
    "della": ("density", "epsilon", "lam", "sign", "seed"),
    "della_linear": ("density", "epsilon", "lam", "seed"),
    "slerp": ("t",),
    "model_stock": ("filter_wise",),
    "nuslerp": ("nuslerp_flatten", "nuslerp_row_wise"),
    "sce": ("select_topk", "lam", "sign"),
    "passthrough": (),
}


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def model_card(cfg: Any, report: MergeReport, config_yaml: str) -> str:
    """A Hugging Face style README.md for a merge output: base model, method and settings, inputs, result."""
    import yaml

    specs = cfg.models or cfg.adapters
    first = specs[0].path if specs else cfg.slices[0].sources[0].path
    front = {
        "base_model": cfg.base_model or first,
        "library_name": "peft" if cfg.adapters else "transformers",
        "tags": ["mmt", "merge", cfg.method],
    }
    what = "LoRA adapters" if cfg.adapters else "checkpoints"
    base = f" of `{cfg.base_model}`" if cfg.base_model else ""
    if cfg.slices:
        what = f"{len(cfg.slices)} slices of checkpoints"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(cfg.output).name}",
        "",
        f"Merged from {len(specs)} {what}{base} with `mmt merge`, method `{cfg.method}`: "
        f"{REFERENCES.get(cfg.method, cfg.method)}.",
        "",
        "## Inputs",
        "",
        "| model | weight | density |",
        "|---|---|---|",
    ]
    for s in specs:
        density = cfg.density if s.density is None else s.density
        lines.append(f"| `{s.path}` | {_fmt(s.weight)} | {_fmt(density)} |")
    if cfg.slices:  # one row per source, in output order
        lines[-2:] = ["| slice | output layers | model | layers | weight | density |", "|---|---|---|---|---|---|"]
        start = 0
        for i, sl in enumerate(cfg.slices):
            a, b = sl.sources[0].layer_range
            for src in sl.sources:
                weight = next((v for v in (src.weight, sl.weight) if v is not None), 1.0)
                density = next((v for v in (src.density, sl.density) if v is not None), cfg.density)
                lines.append(
                    f"| {i} | {start}-{start + b - a - 1} | `{src.path}` | {src.layer_range[0]}-{src.layer_range[1] - 1}"
                    f" | {_fmt(weight)} | {_fmt(density)} |"
                )
            start += b - a
    lines += ["", "## Method and settings", ""]
    for key in _USES.get(cfg.method, ()):
        lines.append(f"- {key}: {_fmt(getattr(cfg, key))}")
    if cfg.adapters:
        lines.append(f"- LoRA merge: {cfg.lora_mode}" + (f", rank {cfg.rank}" if cfg.rank else ""))
    same = "that of the inputs"
    lines += [
        f"- compute dtype: {cfg.dtype or same}; output dtype: {cfg.out_dtype or cfg.dtype or same}",
        f"- conventions: {cfg.semantics}"
        + (" (weights, normalisation and rescaling as mergekit)" if cfg.semantics == "mergekit" else ""),
        f"- tokenizer: from `{cfg.tokenizer_source or cfg.base_model or first}`"
        + (", chat template replaced" if cfg.chat_template else ""),
    ]
    lines += [
        "",
        "## Result",
        "",
        report.summary(),
        "",
        "## Configuration",
        "",
        "Saved next to this card as `merge_config.yaml`; `mmt merge merge_config.yaml` repeats the merge.",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card_and_config(out: Path, cfg: Any, report: MergeReport) -> None:
    """``merge_config.yaml`` (the resolved config, loadable by ``mmt merge``) and the ``README.md`` model card."""
    import yaml

    data = cfg.to_dict()
    data["overwrite"] = False
    key = "models" if cfg.models else "adapters" if cfg.adapters else "slices"
    for other in {"models", "adapters", "slices"} - {key}:
        data.pop(other)
    if key == "slices":
        data[key] = [
            {
                **{k: v for k, v in sl.items() if v is not None and k != "sources"},
                "sources": [{k: v for k, v in src.items() if v is not None} for src in sl["sources"]],
            }
            for sl in data[key]
        ]
    else:
        data[key] = [{k: v for k, v in spec.items() if v is not None} for spec in data[key]]
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    (out / "merge_config.yaml").write_text(text, encoding="utf-8")
    (out / "README.md").write_text(model_card(cfg, report, text), encoding="utf-8")
