"""mFTI training: full fine-tuning (optionally minus embeddings) or LoRA adapters, over every direction."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from mmt.errors import ConfigError, require
from mmt.methods.base import TrainingPlan, parse_directions

from .config import Config


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
        peft = require("peft", purpose="method.lora=true")  # optional dependency
        lcfg = peft.LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lcfg)
        info["lora"] = f"r={config.lora_r} alpha={config.lora_alpha} targets={config.lora_target_modules}"

        def save_artifacts(path, state_dict=None, _model=model):  # adapters alone are small and reusable
            # state_dict: the consolidated weights when the model is sharded (FSDP2); peft keeps the adapters'
            _model.save_pretrained(str(Path(path) / "adapter"), state_dict=state_dict)

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
        raise ConfigError(f"mfti: sampler must be 'mixed' or 'pair', got {config.sampler!r}")
    model, info, save_artifacts = make_trainable(model, config)
    plan = TrainingPlan(
        method="mfti",
        sampler=config.sampler,
        directions=parse_directions(config.directions, "mfti"),
        save_artifacts=save_artifacts,
        info=info,
        model=model,
    )
    return model, plan
