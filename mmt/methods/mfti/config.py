"""mFTI options."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmt.config import MethodConfig
from mmt.errors import ConfigError


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
    select_best: mFTI's protocol: after training (``mmt train``), score ``final/`` and every kept checkpoint
        (``train.save_every``; keep them all with a large ``train.keep_last``) on ``select_split`` over
        ``eval.directions`` and copy the best to ``<output_dir>/best`` (scores in ``selection.json``);
        ``--eval`` then scores that one.
    select_metric: "chrf" or "bleu" (averaged over directions); select_split: a dev folder, never the test set;
    select_sentences: first N dev lines per direction (None: all).
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
    select_best: bool = False
    select_metric: str = "chrf"
    select_split: str = "flores200/dev"
    select_sentences: int | None = 200

    def __post_init__(self) -> None:
        if self.select_metric not in ("chrf", "bleu"):
            raise ConfigError(f"mfti: select_metric must be 'chrf' or 'bleu', got {self.select_metric!r}")
