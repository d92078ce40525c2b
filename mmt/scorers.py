"""Which optional scorers an evaluation can use, and why the others are off.

BLEU and chrF++ are always computed. spBLEU (sacreBLEU's ``flores200`` tokenisation) needs the ``sentencepiece``
package and the FLORES-200 SentencePiece model file in sacreBLEU's folder; mmt never lets sacreBLEU download it
in the middle of an evaluation. COMET needs ``unbabel-comet`` and a local checkpoint (``eval.comet_model``).
Each scorer is either on, or off with a reason a user can act on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

SPBLEU_FILE = "flores200sacrebleuspm"  # the name sacreBLEU stores the FLORES-200 SentencePiece model under


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def spbleu_model_file() -> Path:
    """Where sacreBLEU looks for the FLORES-200 SentencePiece model (``$SACREBLEU``, default ``~/.sacrebleu``)."""
    root = os.environ.get("SACREBLEU", os.path.join(os.path.expanduser("~"), ".sacrebleu"))
    return Path(root) / "models" / SPBLEU_FILE


def spbleu_off_reason() -> str | None:
    """None when spBLEU can be computed offline, else why not."""
    if not _installed("sentencepiece"):
        return "the sentencepiece package is not installed (pip install sentencepiece)"
    f = spbleu_model_file()
    if not f.is_file():
        return (
            f"no FLORES-200 SentencePiece model at {f} (download it from sacreBLEU's flores200 URL to that "
            "path, or set $SACREBLEU to a folder holding models/" + SPBLEU_FILE + ")"
        )
    return None


def comet_off_reason(model_path: str | None) -> str | None:
    """None when COMET can score with ``model_path``, else why not."""
    if not model_path:
        return "no eval.comet_model given (a local COMET checkpoint folder or .ckpt file)"
    if not _installed("comet"):
        return "the unbabel-comet package is not installed (pip install unbabel-comet)"
    p = Path(model_path)
    if not (p.is_file() or (p.is_dir() and any(p.rglob("*.ckpt")))):
        return f"no COMET checkpoint (*.ckpt) at {p}"
    return None


def scorer_status(eval_cfg: Any) -> dict[str, str]:
    """{"BLEU": "on", "chrF++": "on", "spBLEU": "on" | "off: <reason>", "COMET": ...} for an eval config."""
    out = {"BLEU": "on", "chrF++": "on"}
    if not getattr(eval_cfg, "spbleu", False):
        out["spBLEU"] = "off: eval.spbleu is false"
    else:
        why = spbleu_off_reason()
        out["spBLEU"] = "on" if why is None else f"off: {why}"
    why = comet_off_reason(getattr(eval_cfg, "comet_model", None))
    out["COMET"] = "on" if why is None else f"off: {why}"
    return out


def describe(status: dict[str, str]) -> str:
    """One line per scorer, e.g. for the start of an evaluation log."""
    return "\n".join(f"scorer {name}: {state}" for name, state in status.items())
