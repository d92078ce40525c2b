"""LANDeRMT: language-aware neuron detecting and routing (Zhu, Pan, Li, Xiong; ACL 2024).

See docs/methods.md, "LANDeRMT", for the paper's reference and the choices made where it is silent.

Pipeline:

1. **Layers** (:func:`select_layers`): run the frozen model over translation prompts and keep the ``n_layers``
   blocks whose output changes most from their input (or an explicit ``layers`` list).
2. **Detection** (:func:`detect`): first-order Taylor importance ``sum_sentences mean_t |a * dL/da|`` per language
   on monolingual FLORES dev text, for FFN neurons (default) or every output channel of every module with
   parameters (the original code's semantics; ``neuron_kind="output"``). Hooks feed the fused
   ``mmt_kernels.taylor_accumulate_`` during backward, so no activation is stored.
3. **Categorisation**: per module, the top ``specific_ratio`` neurons by cross-language variance are
   language-specific, owned by the argmax language; the rest are language-general. :class:`NeuronMap` is
   saved as safetensors (tensors + JSON config in the metadata) and plotted.
4. **Selective fine-tuning** (:func:`prepare`): only the selected layers train; batches are homogeneous in
   language pair and each optimizer step switches ``NeuronSparseAdamW``'s selection to
   ``general ∪ specific(src) ∪ specific(tgt)`` (strict: other neurons get no update and no decay).
5. **CAR** (optional): a per-token gate ``g = sigmoid(w·x + b)`` scaling the input of the general sub-FFN (and
   ``1 - g`` for the specific one), trained with the neurons. Its exact form is not published; every choice is
   a Config switch.
"""

from __future__ import annotations

from mmt.registry import register_method

from .car import add_car, set_car_pair
from .config import PAPER_LANGUAGES, Config
from .detect import _encode, add_detect_args, detect, run_detect, run_detection, select_layers  # noqa: F401
from .neurons import NeuronMap, NeuronUnit, categorise, neuron_units
from .plan import prepare

__all__ = [
    "PAPER_LANGUAGES",
    "Config",
    "NeuronMap",
    "NeuronUnit",
    "add_car",
    "add_detect_args",
    "categorise",
    "detect",
    "neuron_units",
    "prepare",
    "run_detect",
    "run_detection",
    "select_layers",
    "set_car_pair",
]

register_method("landermt", module=__name__, config=Config, prepare=prepare)
