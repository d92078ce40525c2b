"""LANDeRMT options."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config import MethodConfig
from mmt.errors import ConfigError

# the detection languages of the original code (FLORES-200 dev, monolingual); zho_Hant has no ISO 639-1 code here
PAPER_LANGUAGES = ["ar", "fr", "es", "en", "de", "it", "ja", "ru", "zh"]


@dataclass
class Config(MethodConfig):
    """LANDeRMT options (defaults from the original code unless docs/methods.md marks them as a choice).

    neurons_file: a detection result written by ``mmt detect`` (safetensors). None: detect at prepare time
        (needs the tokenizer and the FLORES dev data) and save to ``detect_output`` if set.
    layers: explicit 0-based block indices to fine-tune; None selects ``n_layers`` by representation change.
    n_layers: blocks to select (the paper's scripts train 4).
    layer_metric: "mean_abs_change" (|mean activation of block output - of block input|, the notebook's
        scalar) or "relative_l2" (mean over tokens of ||h_out - h_in|| / ||h_in||).
    layer_sentences: FLORES dev pairs per direction for layer selection (the notebook: 500).
    neuron_kind: "ffn" (FFN intermediate units: rows of gate/up, columns of down; the paper's focus) or
        "output" (every output channel of every module with parameters in the selected layers: the code).
    languages: detection languages (ISO 639-1); None = the languages of the training directions (the paper's
        ten are listed in PAPER_LANGUAGES).
    detect_split: FLORES folder for detection text ("flores200/dev": 997 sentences per language).
    detect_sentences: sentences per language (None = all).
    detect_batch_size, detect_max_length: detection batches (per-sentence means, so the batch size does
        not change the scores; the code ran batch 1, max length 256).
    specific_ratio: fraction rho of each module's neurons that are language-specific (top variance).
    neurons_used: "general+specific" (default), "specific" (LANDeRMT-LS ablation), "general".
    scaled: importance-scaled gradients: c = 1/2 (I^G_s + I^G_t) + I^S_s + I^S_t (raw sums).
    scale_normalise: divide c by its mean over selected neurons [our choice] (the original code uses raw sums,
        an arbitrary lr multiplier; False reproduces it).
    strict: strict sparse AdamW (unselected neurons do not move); False = torch AdamW on masked gradients.
    sparse_weight_grad: with strict, the backward of the selected gate/up/down projections computes only the
        selected neurons' weight gradient (compact, never the dense dW) [speed only: same training]. "auto": per
        weight and step, when at most 75% of its neurons are selected (above that the dense dW is as fast);
        true: always; false: never. Used in single-process runs without fp16 loss scaling.
    train_other: in "ffn" mode, also train the other parameters of the selected layers (attention, norms)
        densely (the code trains every module of a selected block).
    car: add the CAR routing gate to the FFN of the selected layers.
    car_specific_gate: "one_minus" (general neurons see 2g·x, specific ones 2(1-g)·x) or "none" (specific ones
        see x ungated). With the gate's zero init both factors are 1: step 0 is the pretrained model.
    car_other_languages_off: neurons specific to languages outside the current pair are inactive (in training
        and, per direction, at evaluation). Off by default so that step 0 is the pretrained model exactly.
    car_bias_init: initial gate bias (0 gives g = 0.5, i.e. factors of exactly 1).
    detect_output: where prepare() writes a detection it ran itself (None: not saved).
    """

    neurons_file: str | None = None
    layers: list[int] | None = None
    n_layers: int = 4
    layer_metric: str = "mean_abs_change"
    layer_sentences: int = 500
    neuron_kind: str = "ffn"
    languages: list[str] | None = None
    detect_split: str = "flores200/dev"
    detect_sentences: int | None = None
    detect_batch_size: int = 8
    detect_max_length: int = 256
    specific_ratio: float = 0.10
    neurons_used: str = "general+specific"
    scaled: bool = False
    scale_normalise: bool = False
    strict: bool = True
    sparse_weight_grad: bool | str = "auto"
    train_other: bool = True
    car: bool = False
    car_specific_gate: str = "one_minus"
    car_other_languages_off: bool = False
    car_bias_init: float = 0.0
    detect_output: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.neuron_kind in ("ffn", "output"), f"neuron_kind must be 'ffn' or 'output', got {self.neuron_kind!r}"),
            (
                self.layer_metric in ("mean_abs_change", "relative_l2"),
                f"layer_metric must be 'mean_abs_change' or 'relative_l2', got {self.layer_metric!r}",
            ),
            (0.0 <= self.specific_ratio <= 1.0, f"specific_ratio must be in [0, 1], got {self.specific_ratio}"),
            (
                self.neurons_used in ("general+specific", "specific", "general"),
                f"neurons_used must be general+specific, specific or general, got {self.neurons_used!r}",
            ),
            (
                self.car_specific_gate in ("one_minus", "none"),
                f"car_specific_gate must be 'one_minus' or 'none', got {self.car_specific_gate!r}",
            ),
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
            (
                self.sparse_weight_grad in (True, False, "auto"),
                f"sparse_weight_grad must be true, false or 'auto', got {self.sparse_weight_grad!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"landermt: {msg}")
