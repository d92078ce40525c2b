"""mFTI: multilingual finetuning with translation instructions (Li et al., TACL 2024).

Plain instruction SFT over many directions at once (docs/methods.md, "mFTI"): full fine-tuning by
default, LoRA through ``peft`` as an option. The paper's optimisation defaults (lr 5e-6, constant,
global batch 80, 2000 steps, max length 256, template T1) live in the train/data sections of
``examples/configs/mfti_7b.yaml``; this Config holds only what is specific to the method.
"""

from __future__ import annotations

from mmt.registry import register_method

from .config import Config
from .plan import freeze_embeddings, make_trainable, prepare

__all__ = ["Config", "freeze_embeddings", "make_trainable", "prepare"]

register_method("mfti", module=__name__, config=Config, prepare=prepare)
