"""mFTI: multilingual finetuning with translation instructions (Li et al., TACL 2024).

Plain instruction SFT over many directions at once (METHODS.md section 1): full fine-tuning by
default, LoRA through ``peft`` as an option. The paper's optimisation defaults (lr 5e-6, constant,
global batch 80, 2000 steps, max length 256, template T1) live in the train/data sections of
``examples/configs/mfti_7b.yaml``; this Config holds only what is specific to the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

from torch import nn

from .base import MethodConfig, TrainingPlan


@dataclass
class Config(MethodConfig):
    """mFTI options.

    freeze_embeddings: freeze input (and tied output) embeddings; saves most of the optimizer memory
        and time for small models with a large vocabulary (the paper trains them).
    freeze_patterns: substrings of parameter names to freeze in addition.
    lora: train LoRA adapters instead of all weights (the ALMA stage-2 variant: r 16, alpha 32,
        dropout 0.05 on all linear layers).
    sampler: "mixed" (the paper: all directions shuffled together) or "pair".
    directions: optional list like ["de-en", "en-de"] restricting the training directions.
    """

    freeze_embeddings: bool = False
    freeze_patterns: list[str] = field(default_factory=list)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    sampler: str = "mixed"
    directions: list[str] | None = None


def _parse_directions(items: list[str] | None) -> list[tuple[str, str]] | None:
    if items is None:
        return None
    out = []
    for item in items:
        parts = item.replace("->", "-").split("-")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"mfti: direction {item!r} must look like 'de-en'")
        out.append((parts[0], parts[1]))
    return out


def freeze_embeddings(model: nn.Module) -> int:
    """Freeze input and output embeddings (tied or not); returns the number of frozen parameters."""
    frozen = 0
    mods = [model.get_input_embeddings()]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        mods.append(out)
    seen: set[int] = set()
    for mod in mods:
        for p in mod.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def make_trainable(model: nn.Module, config) -> tuple[nn.Module, dict, Callable | None]:
    """LoRA adapters (``config.lora``) or full fine-tuning minus frozen embeddings/patterns.

    Shared by every method that fine-tunes whole models (mfti, directional). Returns the model, facts
    for the plan's ``info`` and, for LoRA, a ``save_artifacts`` hook that writes the adapter alone.
    """
    info: dict = {}
    if config.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ImportError("lora=true needs peft: pip install peft") from exc
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        info["lora"] = f"r={config.lora_r} alpha={config.lora_alpha} targets={config.lora_target_modules}"

        def save_artifacts(path, _model=model):  # adapters alone are small and reusable
            _model.save_pretrained(str(Path(path) / "adapter"))

        return model, info, save_artifacts
    for p in model.parameters():
        p.requires_grad_(True)
    if config.freeze_embeddings:
        info["frozen embedding parameters"] = f"{freeze_embeddings(model):,}"
    patterns = getattr(config, "freeze_patterns", None)
    if patterns:
        n = 0
        for name, p in model.named_parameters():
            if any(pat in name for pat in patterns):
                p.requires_grad_(False)
                n += p.numel()
        info["frozen by pattern"] = f"{n:,}"
    return model, info, None


def prepare(model: nn.Module, config: Config, tokenizer=None) -> tuple[nn.Module, TrainingPlan]:
    if config.sampler not in ("mixed", "pair"):
        raise ValueError(f"mfti: sampler must be 'mixed' or 'pair', got {config.sampler!r}")
    model, info, save_artifacts = make_trainable(model, config)
    plan = TrainingPlan(method="mfti", sampler=config.sampler, directions=_parse_directions(config.directions),
                        save_artifacts=save_artifacts, info=info, model=model)
    return model, plan
