"""Direction-aware training options."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config import MethodConfig
from mmt.errors import ConfigError

PIVOT = "en"


@dataclass
class Config(MethodConfig):
    """Direction-aware training options (defaults: docs/methods.md, "Direction-aware training").

    groups: language groups as {name: [codes]}; None = X-ALMA's eight groups (mmt.languages.GROUPS).
    separate_unit: "group" (one XX->En model per group) or "language" (one per language).
    en_xx_unit: "all" (one joint En->XX model, the paper's reading) or "group".
    directions: restrict to these directions (e.g. ["de-en", "en-de"]); None = every direction of data.train.
    unit: the unit this prepare() trains (set by run_directional); None is an error for prepare().
    lora, lora_*: LoRA through peft (default; X-ALMA uses rank 512 at 13B, scaled down here);
        lora=false trains all weights (then merging streams full checkpoints).
    merge: merge the XX->En unit models with merge_method (ties), density, lam, sign.
    lora_merge_mode: "dense" (exact: the merge of the adapters' dense updates is added to the base weights and
        written as a full model), "svd" (dense merge truncated back to rank ``merge_rank``; the merge report gives
        the relative error of the truncation) or "factor" (peft-style merge of the factors, not the TIES of the
        updates).
    merge_rank: rank kept by lora_merge_mode "svd" (None: lora_r).
    freeze_embeddings: full fine-tuning only: keep (tied) embeddings frozen (a large share of a small model).
    """

    groups: dict[str, list[str]] | None = None
    separate_unit: str = "group"
    en_xx_unit: str = "all"
    directions: list[str] | None = None
    unit: str | None = None
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    freeze_embeddings: bool = True
    merge: bool = True
    merge_method: str = "ties"
    merge_density: float = 0.2
    merge_lam: float = 1.0
    merge_sign: str = "total"
    lora_merge_mode: str = "dense"
    merge_rank: int | None = None
    sampler: str = "mixed"

    def __post_init__(self) -> None:
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ConfigError(
                f"directional: lora_r and lora_alpha must be >= 1, got {self.lora_r} and {self.lora_alpha}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"directional: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.sampler not in ("mixed", "pair"):
            raise ConfigError(f"directional: sampler must be 'mixed' or 'pair', got {self.sampler!r}")
        if not 0.0 < self.merge_density <= 1.0:
            raise ConfigError(f"directional: merge_density must be in (0, 1], got {self.merge_density!r}")
        if self.merge_rank is not None and self.merge_rank < 1:
            raise ConfigError(f"directional: merge_rank must be >= 1, got {self.merge_rank!r}")
        if self.lora_merge_mode not in ("dense", "svd", "factor"):
            raise ConfigError(
                f"directional: lora_merge_mode must be 'dense', 'svd' or 'factor', got {self.lora_merge_mode!r}"
            )
