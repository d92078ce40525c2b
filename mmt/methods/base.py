"""The contract between a post-training method and the trainer.

A method package ``mmt/methods/<name>/`` registers (:func:`mmt.registry.register_method`)

* ``Config``: a dataclass subclassing :class:`mmt.config.MethodConfig`, every field with a documented default;
* ``prepare(model, config, tokenizer=None) -> (model, TrainingPlan)``: freezes/wraps the model and
  says how to train it.

:class:`mmt.train.Trainer` runs any :class:`TrainingPlan`; a method never writes its own loop.
Hooks are plain callables so that methods stay testable without the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmt.config import MethodConfig, TrainConfig
from mmt.errors import ConfigError, MethodError

__all__ = [
    "SAMPLERS",
    "MethodConfig",
    "StepInfo",
    "TrainingPlan",
    "count_parameters",
    "default_optimizer",
    "param_groups",
    "parse_directions",
]

SAMPLERS = ("mixed", "pair", "mono")


@dataclass
class StepInfo:
    """What the trainer tells hooks about the current optimizer step.

    ``step`` counts optimizer steps from 0 (it continues across a resume). ``pair`` is the
    (src, tgt) direction shared by every micro-batch of the step when the sampler is ``"pair"``,
    else None. ``micro_step``/``num_micro_steps`` locate the current micro-batch inside the step;
    ``batch_directions`` lists the direction of each example of the current micro-batch (None for
    monolingual batches).
    """

    step: int
    pair: tuple[str, str] | None = None
    micro_step: int = 0
    num_micro_steps: int = 1
    batch_directions: list[tuple[str, str]] | None = None
    max_steps: int | None = None


@dataclass
class TrainingPlan:
    """How to train a prepared model.

    Every hook is optional; a plan with only ``method`` set is plain full fine-tuning with AdamW
    over the parameters that have ``requires_grad``.

    * ``sampler``: ``"mixed"`` (all directions shuffled together), ``"pair"`` (every micro-batch of
      one optimizer step shares one (src, tgt) pair; pairs visited round-robin or by temperature),
      ``"mono"`` (monolingual LM text batches).
    * ``directions``: keep only these (src, tgt) directions (ISO 639-1 codes); None keeps all.
    * ``build_optimizer(model, train_config)``: custom optimizer; None means AdamW over trainable params.
    * ``on_step_start(info, model, optimizer)``: before the first micro-batch of each optimizer step.
    * ``after_backward(model, info)``: after each micro-batch's backward, before the optimizer step.
    * ``on_step_end(info, model, optimizer)``: after the optimizer step (and scheduler step).
    * ``on_parameters_replaced({old: new})``: after ``accelerate.prepare``, when the engine replaced parameter
      objects (FSDP2: DTensor shards); a method that keys anything by parameter identity re-keys it here.
    * ``extra_loss(model)``: added to the LM loss of each micro-batch (e.g. MoE auxiliary losses).
    * ``save_artifacts(dir)``: write method-specific files (neuron maps, adapters) next to a checkpoint; runs on
      the main process only. A hook that reads weights takes ``save_artifacts(dir, state_dict=None)``: under
      FSDP2 / ZeRO-3, where the model holds only shards, it gets the consolidated state dict (the model's names).
    * ``state_dict()`` / ``load_state_dict(state)``: method state that must survive a resume.
    * ``pair_temperature``: temperature over directions for the ``"pair"``/``"mixed"`` samplers
      (1.0 = proportional to data size, larger flattens; None uses the data config's value).
    * ``loss_on``: ``"target"`` or ``"full"`` to override the data config; None keeps it.
    * ``ddp_find_unused_parameters``: set when some trainable parameters get no gradient in a step
      (e.g. routed experts) so that multi-process DDP does not wait for them.
    * ``info``: free-form facts for :meth:`describe` (e.g. number of selected neurons).
    """

    method: str
    sampler: str = "mixed"
    directions: list[tuple[str, str]] | None = None
    build_optimizer: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] | None = None
    on_step_start: Callable[[StepInfo, nn.Module, torch.optim.Optimizer], None] | None = None
    after_backward: Callable[[nn.Module, StepInfo], None] | None = None
    on_step_end: Callable[[StepInfo, nn.Module, torch.optim.Optimizer], None] | None = None
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    on_parameters_replaced: Callable[[dict[torch.Tensor, torch.Tensor]], None] | None = None
    save_artifacts: Callable[..., None] | None = None
    state_dict: Callable[[], dict[str, Any]] | None = None
    load_state_dict: Callable[[dict[str, Any]], None] | None = None
    pair_temperature: float | None = None
    loss_on: str | None = None
    ddp_find_unused_parameters: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise MethodError(f"TrainingPlan.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.loss_on not in (None, "target", "full"):
            raise MethodError(f"TrainingPlan.loss_on must be 'target', 'full' or None, got {self.loss_on!r}")
        if self.directions is not None:
            self.directions = [tuple(d) for d in self.directions]  # type: ignore[misc]

    def describe(self, model: nn.Module | None = None) -> str:
        """One human-readable block: method, sampler, directions, trainable parameters, info."""
        model = model if model is not None else self.model
        lines = [f"method: {self.method}", f"sampler: {self.sampler}"]
        if self.directions is not None:
            shown = ", ".join(f"{s}->{t}" for s, t in self.directions[:12])
            more = f" (+{len(self.directions) - 12} more)" if len(self.directions) > 12 else ""
            lines.append(f"directions: {shown}{more}")
        if model is not None:
            trainable, total = count_parameters(model)
            pct = 100.0 * trainable / max(total, 1)
            lines.append(f"trainable parameters: {trainable:,} / {total:,} ({pct:.2f}%)")
        hooks = [
            n
            for n in (
                "build_optimizer",
                "on_step_start",
                "after_backward",
                "on_step_end",
                "extra_loss",
                "save_artifacts",
            )
            if getattr(self, n) is not None
        ]
        if hooks:
            lines.append("hooks: " + ", ".join(hooks))
        for key, value in self.info.items():
            lines.append(f"{key}: {value}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Callable[[nn.Parameter], bool] | None = None
) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters: ``weight_decay`` for matrices, none for biases and norm
    weights (1-D tensors) nor for the parameters ``no_decay`` selects; empty groups are left out."""
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (rest if p.ndim < 2 or (no_decay is not None and no_decay(p)) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def default_optimizer(model: nn.Module, train_config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    groups = param_groups(model, train_config.weight_decay)
    if not groups:
        raise MethodError("no trainable parameters: every parameter has requires_grad=False")
    return torch.optim.AdamW(
        groups, lr=train_config.lr, betas=tuple(train_config.adam_betas), eps=train_config.adam_eps
    )


def parse_directions(items: list[str] | None, method: str) -> list[tuple[str, str]] | None:
    """``["de-en", "en->fr"]`` -> ``[("de", "en"), ("en", "fr")]`` (codes as written); None stays None."""
    if items is None:
        return None
    out = []
    for item in items:
        parts = item.replace("->", "-").split("-")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{method}: direction {item!r} must look like 'de-en'")
        out.append((parts[0], parts[1]))
    return out
