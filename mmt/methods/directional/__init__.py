"""Direction-aware training (DAT) with group-wise merging (DATM): Zheng et al., Findings of ACL 2025.

See docs/methods.md, "Direction-aware training". XX->En suffers from conflict between languages,
En->XX profits from synergy, so:

* XX->En is trained **separately** per unit (an X-ALMA language group by default, or per language with
  ``separate_unit: language``), each unit from the same base;
* En->XX is trained **jointly** (``en_xx_unit: all``; or per group with ``en_xx_unit: group``);
* the XX->En unit models are combined by **TIES** (``merge_method``) through :mod:`mmt.merge`
  (LoRA adapters: dense delta, merge, SVD back to the rank; full fine-tuning: streamed checkpoints);
  En->XX is never merged;
* inference is **direction-gated**: :class:`DirectionGate` says, for a (src, tgt) pair, which weights or
  adapter to use (tgt == en -> the merged XX->En model, else the En->XX model of that language's unit).

One ``prepare()`` trains one unit (``Config.unit``); :func:`run_directional` trains every unit with the
pipeline's Trainer, merges, and writes ``directional.json`` (the gate's manifest) in ``train.output_dir``.
From the shell: ``mmt train -c examples/configs/directional_demo.yaml [--eval]`` (the registry's ``run``
entry, :func:`train_and_report`).
"""

from __future__ import annotations

from mmt.registry import register_method

from .config import PIVOT, Config
from .gate import DirectionGate, evaluate_gated
from .plan import prepare
from .run import run_directional, train_and_report, training_directions
from .units import TrainingUnit, plan_units

__all__ = [
    "PIVOT",
    "Config",
    "DirectionGate",
    "TrainingUnit",
    "evaluate_gated",
    "plan_units",
    "prepare",
    "run_directional",
    "train_and_report",
    "training_directions",
]


def _run(cfg, *, with_eval: bool = False) -> int:
    # looked up at call time, so that the package attribute is the one entry point (and can be replaced in tests)
    return train_and_report(cfg, with_eval=with_eval)


register_method("directional", module=__name__, config=Config, prepare=prepare, run=_run)
