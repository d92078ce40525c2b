"""Training one unit: LoRA or full fine-tuning over the unit's directions (the same recipe as mFTI)."""

from __future__ import annotations

from torch import nn

from mmt.errors import ConfigError
from mmt.methods.base import TrainingPlan
from mmt.methods.mfti import make_trainable

from .config import Config
from .units import parse_direction_list


def prepare(model: nn.Module, config: Config, tokenizer=None) -> tuple[nn.Module, TrainingPlan]:
    """Prepare ``model`` to train the unit ``config.unit`` (whose directions the orchestrator fills in)."""
    if config.unit is None or config.directions is None:
        raise ConfigError(
            "directional trains one model per unit; run every unit and the merge with "
            "`mmt train --method directional -c <config.yaml>` (mmt.methods.directional.run_directional), "
            "or set method.unit and method.directions to train a single unit"
        )
    model, info, save_artifacts = make_trainable(model, config)
    info = {"unit": config.unit, **info}

    plan = TrainingPlan(
        method="directional",
        sampler=config.sampler,
        directions=parse_direction_list(config.directions),
        save_artifacts=save_artifacts,
        info=info,
        model=model,
    )
    return model, plan
