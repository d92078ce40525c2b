"""Mix-MoE training plan for one stage: upcycle (or take a saved Mix-MoE model), load stage 1 for stage 2, freeze."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmt.arch import mark, spec_of
from mmt.errors import CheckpointError, ConfigError, MethodError
from mmt.methods.base import TrainingPlan, count_parameters, parse_directions
from mmt.models import find_attention

from .config import ARTIFACT, STRUCTURAL, Config
from .layer import (
    FORMAT,
    aux_losses,
    expert_tensors,
    ffn_slots,
    moe_layers,
    set_stage,
    shared_lm_tensors,
    upcycle,
)


def _stage1_file(path: str | Path) -> Path:
    p = Path(path)
    candidates = [p] if p.is_file() else [p / ARTIFACT, p / "final" / ARTIFACT]
    if p.is_dir():  # newest checkpoint first (Trainer: checkpoints/<prefix><step:07d>/)
        candidates += sorted(p.glob(f"checkpoints/*/{ARTIFACT}"), key=lambda q: q.parent.name, reverse=True)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"mixmoe: no {ARTIFACT} under {path} (tried {[str(c) for c in candidates]}); "
        "point stage1_path at the stage-1 output directory"
    )


def upcycle_model(model: nn.Module, config: Config) -> nn.Module:
    """Convert the chosen FFNs of a dense causal LM in place and tag it (:func:`mmt.arch.mark`) so that its
    ``save_pretrained`` output reloads as this Mix-MoE model through ``AutoModelForCausalLM``."""
    if is_mixmoe(model):
        raise MethodError("mixmoe: the model is already a Mix-MoE model")
    specs = []
    for slot in ffn_slots(model, config.layers):
        moe, spec = upcycle(slot, config)
        slot.install(moe)
        specs.append(spec)
    mark(model, "mixmoe", {"format": FORMAT, "method": config.to_dict(), "layers": specs})
    return model


def is_mixmoe(model: nn.Module) -> bool:
    spec = spec_of(model)
    return spec is not None and spec["arch"] == "mixmoe"


def _check_compatible(saved: dict[str, Any], config: Config, where: str) -> None:
    for key in STRUCTURAL:
        if key in saved and saved[key] != getattr(config, key):
            raise ConfigError(
                f"mixmoe: {where} was made with {key}={saved[key]!r}, this config has "
                f"{key}={getattr(config, key)!r}; the method sections of both stages must agree"
            )


def _load_stage1(model: nn.Module, config: Config) -> str:
    src = _stage1_file(config.stage1_path)
    saved = torch.load(src, map_location="cpu", weights_only=True)
    _check_compatible(saved.get("config", {}), config, str(src))
    state = saved["state"]
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = [n for n in state if n not in params]
    if missing:
        raise CheckpointError(
            f"mixmoe: {src} holds tensors this model lacks ({missing[:3]} ...); was stage 1 run "
            "with the same model and layer/expert settings?"
        )
    with torch.no_grad():
        for name, t in state.items():
            if params[name].shape != t.shape:
                raise CheckpointError(f"mixmoe: {name} is {tuple(t.shape)} in {src}, {tuple(params[name].shape)} here")
            params[name].copy_(t)
    return f"{src} ({len(state)} tensors)"


def prepare(model: nn.Module, config: Config, tokenizer=None) -> tuple[nn.Module, TrainingPlan]:
    config.validate()
    loaded = is_mixmoe(model)  # e.g. stage 2 started from a saved stage-1 model
    if loaded:
        _check_compatible(spec_of(model)["settings"]["method"], config, "the loaded Mix-MoE model")
    else:
        model = upcycle_model(model, config)
    layers = moe_layers(model)
    info: dict[str, Any] = {
        "stage": config.stage,
        "moe layers": len(layers),
        "experts": f"{config.num_lm_experts} LM + {config.num_mt_experts} MT, top-{config.top_k}, "
        f"{layers[0].d_expert} neurons each, {spec_of(model)['settings']['layers'][0]['kind']} "
        f"({layers[0].act})",
        "router": f"fft={config.fft_variant} n_freq={layers[0].n_freq} input={config.router_input} "
        f"scale={layers[0].scale} routing={config.routing}",
        "exact upcycling": config.exact_upcycling(),
    }
    if config.stage == 2 and config.stage1_path:
        info["loaded stage 1"] = _load_stage1(model, config)
    elif config.stage == 2 and not loaded:
        raise ConfigError(
            "mixmoe: stage 2 needs stage1_path (the stage-1 output directory or its mixmoe.pt), or a "
            "saved Mix-MoE model as model.name_or_path"
        )
    set_stage(model, config.stage)
    # the saved config records this stage's settings
    mark(model, "mixmoe", dict(spec_of(model)["settings"], method=config.to_dict()))

    for p in model.parameters():
        p.requires_grad_(False)
    expert_ids = set()
    for moe in layers:
        if config.stage == 2 or config.stage1_train == "experts+router":
            for w in expert_tensors(moe):
                w.requires_grad_(True)
                expert_ids.add(id(w))
            if config.stage == 1:
                for w in shared_lm_tensors(moe):
                    w.requires_grad_(True)
        moe.router.weight.requires_grad_(True)
        if config.stage == 1 or config.train_fft_proj_stage2:
            for m in (moe.fft_proj, moe.fft_norm):
                if m is not None:
                    for p in m.parameters():
                        p.requires_grad_(True)
    if config.train_attention:
        for a in find_attention(model):
            for p in a.module.parameters():
                p.requires_grad_(True)
    if config.train_embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(True)

    router_ids = {
        id(p)
        for moe in layers
        for mod in (moe.router, moe.fft_proj, moe.fft_norm)
        if mod is not None
        for p in mod.parameters()
    }

    def build_optimizer(m: nn.Module, train_config):
        # Frozen experts live inside the same [E, ...] tensors as trained ones and get exactly zero
        # gradients; AdamW then leaves them unchanged only without weight decay, so expert tensors get none.
        # The router gets its own learning rate (router_lr_scale): Adam moves every router weight by about
        # the learning rate per step, so its logits move by about lr * |router input|_1, which is large.
        decay, no_decay, router = [], [], []
        for p in m.parameters():
            if p.requires_grad:
                if id(p) in router_ids:
                    router.append(p)
                else:
                    (no_decay if (p.ndim < 2 or id(p) in expert_ids) else decay).append(p)
        lr = train_config.lr
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": train_config.weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr},
                {"params": router, "weight_decay": 0.0, "lr": lr * config.router_lr_scale},
            )
            if g["params"]
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(train_config.adam_betas), eps=train_config.adam_eps)

    def extra_loss(m: nn.Module) -> torch.Tensor:
        return aux_losses(m, config.aux_loss_weight, config.z_loss_weight)

    def save_artifacts(path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # every MoE tensor (not only the trained ones): stage 2 must not depend on re-slicing the dense model.
        # state_dict: the consolidated weights when the model is sharded (FSDP2: its own tensors are shards)
        state = {}
        for name, mod in model.named_modules():
            if mod in layers:
                for n, t in mod.state_dict().items():
                    t = state_dict.get(f"{name}.{n}", t) if state_dict is not None else t
                    if hasattr(t, "device_mesh"):
                        raise MethodError(f"mixmoe: {name}.{n} is a shard; save_artifacts needs the gathered weights")
                    state[f"{name}.{n}"] = t.detach().cpu()
        Path(path).mkdir(parents=True, exist_ok=True)
        tmp = Path(path) / f".{ARTIFACT}.tmp"
        torch.save({"config": config.to_dict(), "state": state}, tmp)
        tmp.replace(Path(path) / ARTIFACT)

    trainable, total = count_parameters(model)
    info["trainable (incl. frozen expert slices)"] = f"{trainable:,} / {total:,}"
    plan = TrainingPlan(
        method="mixmoe",
        sampler="mono" if config.stage == 1 else "mixed",
        directions=parse_directions(config.directions, "mixmoe") if config.stage == 2 else None,
        build_optimizer=build_optimizer,
        extra_loss=extra_loss,
        save_artifacts=save_artifacts,
        loss_on="full" if config.stage == 1 else "target",
        ddp_find_unused_parameters=True,
        info=info,
        model=model,
    )
    return model, plan
