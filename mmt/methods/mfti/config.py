"""mFTI options."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmt.config import MethodConfig

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
