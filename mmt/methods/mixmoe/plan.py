"""Mix-MoE training plan for one stage (stage 2 loads the stage-1 result)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmt.errors import CheckpointError, ConfigError
from mmt.methods.base import TrainingPlan, count_parameters, param_groups, parse_directions
from mmt.models import find_attention

from .config import ARTIFACT, Config
from .layer import aux_losses, convert, set_stage

def _stage1_file(path: str | Path) -> Path:
    p = Path(path)
    candidates = [p] if p.is_file() else [p / ARTIFACT, p / "final" / ARTIFACT]
    if p.is_dir():  # newest checkpoint first (Trainer: checkpoints/<prefix><step:07d>/)
        candidates += sorted(p.glob(f"checkpoints/*/{ARTIFACT}"), key=lambda q: q.parent.name, reverse=True)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"mixmoe: no {ARTIFACT} under {path} (tried {[str(c) for c in candidates]}); "
                            "point stage1_path at the stage-1 output directory")


def prepare(model: nn.Module, config: Config, tokenizer=None) -> tuple[nn.Module, TrainingPlan]:
    config.validate()
    layers = convert(model, config)
    info: dict[str, Any] = {"stage": config.stage, "moe layers": len(layers),
                            "experts": f"{config.num_lm_experts} LM + {config.num_mt_experts} MT, top-{config.top_k}, "
                                       f"{layers[0].d_expert} neurons each",
                            "router": f"fft={config.fft_variant} n_freq={layers[0].n_freq} "
                                      f"input={config.router_input} scale={layers[0].scale} "
                                      f"routing={config.routing}"}
    if config.stage == 2:
        src = _stage1_file(config.stage1_path)
        saved = torch.load(src, map_location="cpu", weights_only=True)
        state = saved["state"]
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        missing = [n for n in state if n not in params]
        if missing:
            raise CheckpointError(f"mixmoe: {src} holds tensors this model lacks ({missing[:3]} ...); was stage 1 run "
                             "with the same model and layer/expert settings?")
        with torch.no_grad():
            for name, t in state.items():
                if params[name].shape != t.shape:
                    raise CheckpointError(f"mixmoe: {name} is {tuple(t.shape)} in {src}, "
                                          f"{tuple(params[name].shape)} here")
                params[name].copy_(t)
        info["loaded stage 1"] = f"{src} ({len(state)} tensors)"
    set_stage(model, config.stage)

    for p in model.parameters():
        p.requires_grad_(False)
    expert_params = []
    for moe in layers:
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.requires_grad_(True)
            expert_params.append(w)
        moe.router.weight.requires_grad_(True)
        fft_mods = [m for m in (moe.fft_proj, moe.fft_norm) if m is not None]
        if config.stage == 1 or config.train_fft_proj_stage2:
            for m in fft_mods:
                for p in m.parameters():
                    p.requires_grad_(True)
    if config.train_attention:
        for a in find_attention(model):
            for p in a.module.parameters():
                p.requires_grad_(True)
    if config.train_embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(True)

    expert_ids = {id(p) for p in expert_params}

    def build_optimizer(m: nn.Module, train_config):
        # Frozen experts live inside the same [E, f, d] tensors as trained ones and get exactly zero
        # gradients; AdamW then leaves them unchanged only without weight decay, so expert tensors get none.
        groups = param_groups(m, train_config.weight_decay, no_decay=lambda p: id(p) in expert_ids)
        return torch.optim.AdamW(groups, lr=train_config.lr, betas=tuple(train_config.adam_betas),
                                 eps=train_config.adam_eps)

    def extra_loss(m: nn.Module) -> torch.Tensor:
        return aux_losses(m, config.aux_loss_weight, config.z_loss_weight)

    def save_artifacts(path: Path) -> None:
        state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        state.update({n: b.detach().cpu() for n, b in model.named_buffers() if n.endswith(("expert_mask", "train_mask"))})
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save({"config": config.to_dict(), "state": state}, Path(path) / ARTIFACT)

    trainable, total = count_parameters(model)
    info["trainable (incl. frozen expert slices)"] = f"{trainable:,} / {total:,}"
    plan = TrainingPlan(method="mixmoe", sampler="mono" if config.stage == 1 else "mixed",
                        directions=parse_directions(config.directions, "mixmoe") if config.stage == 2 else None,
                        build_optimizer=build_optimizer, extra_loss=extra_loss, save_artifacts=save_artifacts,
                        loss_on="full" if config.stage == 1 else "target", ddp_find_unused_parameters=True,
                        info=info, model=model)
    return model, plan
