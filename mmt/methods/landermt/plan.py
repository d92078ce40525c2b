"""LANDeRMT selective fine-tuning: freeze all but the selected layers; each optimizer step trains the general
neurons and the specific neurons of its language pair (``NeuronSparseAdamW``)."""

from __future__ import annotations

import shutil
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from mmt.errors import ConfigError, MethodError
from mmt.methods.base import StepInfo, TrainingPlan, param_groups
from mmt.models import decoder_layers
from mmt_kernels import NeuronSparseAdamW
from mmt_kernels.sparse_grad import SparseWeightGrad, sparse_linear

from .car import add_car, set_car_pair
from .config import Config
from .detect import run_detection
from .neurons import NeuronMap


def _sparse_weight_grads(model: nn.Module, by_tensor: dict) -> SparseWeightGrad | None:
    """Route the selected ``nn.Linear`` weights through ``sparse_linear``: their backward computes only the
    selected neurons' weight gradient, into ``weight.compact_grad``. Off (dense ``.grad``) until the plan's
    ``build_optimizer`` builds the ``NeuronSparseAdamW`` that consumes them and switches it on."""
    if not getattr(NeuronSparseAdamW, "accepts_compact_grad", False):
        return None
    sparse = SparseWeightGrad()
    sparse.enabled = False
    for mod in model.modules():
        # an instance forward is already someone's (CAR's gated in-projections): those keep the dense dW
        if type(mod) is not nn.Linear or mod.weight not in by_tensor or "forward" in mod.__dict__:
            continue
        nd = by_tensor[mod.weight][1]
        sparse.dims[mod.weight] = nd

        def forward(self, x, nd=nd):
            rows = sparse.rows.get(self.weight) if sparse.enabled else None
            if rows is None or not (torch.is_grad_enabled() and self.weight.requires_grad):
                return nn.functional.linear(x, self.weight, self.bias)
            return sparse_linear(x, self.weight, self.bias, rows, nd)

        # a bound method, not a closure over ``mod``: a deep copy of the model then computes with its own weights
        mod.forward = types.MethodType(forward, mod)
    return sparse if sparse.dims else None


# "auto" routes a weight through the compact path when at most this fraction of its neurons is selected: measured
# on CPU (bench/bench_sparse_adamw.py, docs/methods.md), the compact dW costs 0.2-0.7x the dense one at 50%, about
# 0.4-0.95x at 75% and 1.0-1.3x at 95% (its gather of the selected columns stops paying).
AUTO_MAX_FRACTION = 0.75


def _compact_grads_usable(train_cfg) -> bool:
    """Compact gradients bypass DDP's all-reduce and fp16's gradient scaler (both see ``.grad`` only)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    multi = distributed and torch.distributed.get_world_size() > 1
    return not multi and getattr(train_cfg, "mixed_precision", "no") != "fp16"


def prepare(
    model: nn.Module,
    config: Config,
    tokenizer=None,
    *,
    data_dir: str | Path | None = None,
    directions: list[tuple[str, str]] | None = None,
) -> tuple[nn.Module, TrainingPlan]:
    """Freeze all but the selected layers and return a plan that switches neuron selections per language pair."""
    if config.neurons_file:
        nmap = NeuronMap.load(config.neurons_file)
    else:
        if tokenizer is None:
            raise ConfigError(
                "landermt: set method.neurons_file (from `mmt detect`) or pass a tokenizer so that "
                "prepare() can detect neurons itself"
            )
        nmap = run_detection(model, tokenizer, config, data_dir=data_dir, directions=directions)
        if config.detect_output:
            nmap.save(config.detect_output)
            nmap.plot(Path(config.detect_output).with_suffix(".png"))
    if config.layers is not None and sorted(set(config.layers)) != nmap.layers:
        raise ConfigError(
            f"landermt: method.layers {config.layers} differs from the neuron file's layers {nmap.layers}"
        )
    kind = nmap.config.get("method", {}).get("neuron_kind", config.neuron_kind)
    if kind != config.neuron_kind:
        raise ConfigError(
            f"landermt: neuron file was detected with neuron_kind={kind!r}, config says {config.neuron_kind!r}"
        )
    prefix, blocks = decoder_layers(model)
    if max(nmap.layers) >= len(blocks):
        raise MethodError(f"landermt: the neuron file selects layers {nmap.layers} but the model has {len(blocks)}")
    names = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    neuron_params: dict[str, tuple[str, int]] = {}  # param name -> (unit, neuron_dim)
    for u in nmap.units:
        for pname, nd in u.params:
            if pname not in names:
                raise MethodError(f"landermt: parameter {pname} of the neuron file is not in this model")
            if names[pname].shape[nd] != u.size:
                raise MethodError(
                    f"landermt: the neuron file has {u.size} neurons for {pname}, the model's tensor "
                    f"has shape {tuple(names[pname].shape)} (a neuron file of another model?)"
                )
            neuron_params[pname] = (u.name, nd)
            names[pname].requires_grad_(True)
    if config.neuron_kind == "ffn" and config.train_other:
        for layer in nmap.layers:
            for p in blocks[layer].parameters():
                p.requires_grad_(True)
    car_mlps: list[nn.Module] = []
    if config.car:
        car_mlps = add_car(model, nmap, config)
        for m in car_mlps:
            for p in m.car_gate.parameters():
                p.requires_grad_(True)
    by_tensor = {names[n]: v for n, v in neuron_params.items()}
    sparse_grads = (
        _sparse_weight_grads(model, by_tensor) if config.strict and config.sparse_weight_grad is not False else None
    )
    cache: dict[tuple[str, str], tuple[dict, dict]] = {}

    def selection_for(pair: tuple[str, str]):
        if pair not in cache:
            for lang in pair:
                if lang not in nmap.languages:
                    warnings.warn(
                        f"landermt: language {lang!r} of pair {pair} was not among the detection languages "
                        f"{nmap.languages}; it has no specific neurons",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            sel, scl = {}, {}
            for p, (unit, _) in by_tensor.items():
                keep = nmap.keep(unit, pair, config.neurons_used)
                sel[p] = keep
                if config.scaled:
                    c = nmap.scale(unit, pair, config.neurons_used)[keep]
                    if config.scale_normalise and c.numel():
                        c = c / c.mean().clamp_min(1e-30)
                    scl[p] = c
            cache[pair] = (sel, scl)
        return cache[pair]

    def build_optimizer(model_: nn.Module, train_cfg) -> torch.optim.Optimizer:
        groups = param_groups(model_, train_cfg.weight_decay)
        dims = {p: nd for p, (_, nd) in by_tensor.items() if p.dim() == 2}
        optimizer = NeuronSparseAdamW(
            groups,
            lr=train_cfg.lr,
            betas=tuple(train_cfg.adam_betas),
            eps=train_cfg.adam_eps,
            neuron_dims=dims,
            strict=config.strict,
        )
        if sparse_grads is not None:
            sparse_grads.enabled = _compact_grads_usable(train_cfg)
        return optimizer

    def on_step_start(info: StepInfo, model_: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        assert info.pair is not None, "landermt plans ask for language-pair-homogeneous steps (sampler 'pair')"
        pair = tuple(info.pair)
        sel, scl = selection_for(pair)
        if isinstance(optimizer, NeuronSparseAdamW):
            optimizer.set_selection(sel, scl or None)
        if sparse_grads is not None and sparse_grads.enabled:
            for p, nd in sparse_grads.dims.items():
                if config.sparse_weight_grad == "auto" and len(sel[p]) > AUTO_MAX_FRACTION * p.shape[nd]:
                    sparse_grads.clear(p)  # the dense dW this step
                else:
                    sparse_grads.set_rows(p, sel[p], nd)
        if car_mlps:
            set_car_pair(car_mlps, nmap, pair)

    def on_parameters_replaced(mapping: dict) -> None:
        """After accelerate's FSDP2 prepare: the selections follow the DTensor shards (the optimizer translates
        their global indices to each shard's). The compact weight-gradient path is off there: FSDP2 runs the
        forward on gathered weights and reduce-scatters the dense ``.grad``; a compact gradient on the gathered
        weight would be neither reduced nor sharded."""
        nonlocal by_tensor, sparse_grads
        by_tensor = {mapping.get(p, p): v for p, v in by_tensor.items()}
        cache.clear()
        if sparse_grads is not None and any(hasattr(p, "device_mesh") for p in mapping.values()):
            sparse_grads.rows.clear()
            sparse_grads = None
        elif sparse_grads is not None:
            sparse_grads.dims = {mapping.get(p, p): d for p, d in sparse_grads.dims.items()}

    neurons_path = Path(config.neurons_file) if config.neurons_file else None

    def save_artifacts(path: Path) -> None:
        out = Path(path) / "landermt_neurons.safetensors"
        if neurons_path is not None and neurons_path.is_file():
            shutil.copyfile(neurons_path, out)
        else:
            nmap.save(out)

    n_spec = sum(int((o >= 0).sum()) for o in nmap.owner.values())
    n_all = sum(o.numel() for o in nmap.owner.values())
    info = {
        "layers": nmap.layers,
        "languages": nmap.languages,
        "neuron_kind": config.neuron_kind,
        "specific neurons": f"{n_spec:,} / {n_all:,}",
        "neurons_used": config.neurons_used,
        "optimizer": f"NeuronSparseAdamW(strict={config.strict}{', scaled' if config.scaled else ''})",
        "sparse weight gradients": config.sparse_weight_grad if sparse_grads is not None else False,
        "car": config.car,
    }
    plan = TrainingPlan(
        method="landermt",
        sampler="pair",
        build_optimizer=build_optimizer,
        on_step_start=on_step_start,
        on_parameters_replaced=on_parameters_replaced,
        save_artifacts=save_artifacts,
        info=info,
        model=model,
    )
    plan.selection_for = selection_for  # type: ignore[attr-defined]
    plan.sparse_grads = sparse_grads  # type: ignore[attr-defined]
    return model, plan
