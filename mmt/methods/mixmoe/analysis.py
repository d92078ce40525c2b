"""Expert load per language (which experts each language's tokens are routed to) and its heatmap."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmt.plots import _plt, save_figure

from .layer import moe_layers


@torch.no_grad()
def expert_load(
    model: nn.Module, tokenizer, texts_by_lang: dict[str, list[str]], *, batch_size: int = 8, max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Fraction of routed slots per expert (``[layers, E]``, rows sum to 1) for each language's texts."""
    layers = moe_layers(model)
    device = next(model.parameters()).device
    out = {}
    was_training = model.training
    model.eval()
    for lang, texts in texts_by_lang.items():
        for m in layers:
            m.load_counts.zero_()
            m.track_load = True
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        loads = torch.stack([m.load_counts.clone() for m in layers])
        out[lang] = loads / loads.sum(1, keepdim=True).clamp_min(1)
        for m in layers:
            m.track_load = False
    model.train(was_training)
    return out


def plot_expert_load(
    loads_by_stage: dict[str, dict[str, torch.Tensor]], path: str | Path, lm_experts: int | None = None
) -> Path:
    """One heatmap panel per stage: languages x experts, load averaged over layers (PNG)."""
    plt = _plt()
    stages = list(loads_by_stage)
    fig, axes = plt.subplots(
        1,
        len(stages),
        figsize=(4 + 3.5 * len(stages), 1.5 + 0.5 * max(len(v) for v in loads_by_stage.values())),
        squeeze=False,
    )
    for ax, stage in zip(axes[0], stages):
        langs = list(loads_by_stage[stage])
        m = torch.stack([loads_by_stage[stage][lang].float().mean(0) for lang in langs]).numpy()
        im = ax.imshow(m, vmin=0, vmax=max(float(m.max()), 1e-6), cmap="viridis", aspect="auto")
        E = m.shape[1]
        names = [("LM" if lm_experts is None or e < lm_experts else "MT") + str(e) for e in range(E)]
        ax.set_xticks(range(E), names)
        ax.set_yticks(range(len(langs)), langs)
        for i in range(m.shape[0]):
            for j in range(E):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"expert load, {stage}")
        fig.colorbar(im, ax=ax)
    return save_figure(fig, path)
