"""Dense FFN -> :class:`mmt_kernels.MoEFFN` (LM experts sliced from the FFN, silent MT experts), stage masks and
the auxiliary losses."""

from __future__ import annotations

import torch
from torch import nn

from mmt.errors import ConfigError, MethodError
from mmt.models import find_ffn
from mmt_kernels import MoEFFN

from .config import _ACT_ALIASES, Config

def _activation_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu"
    if name not in _ACT_ALIASES:
        raise MethodError(f"mixmoe: unsupported FFN activation {name!r}; supported: {sorted(_ACT_ALIASES)}")
    return _ACT_ALIASES[name]


def partition_neurons(d_ff: int, num_experts: int, how: str = "random", seed: int = 0) -> torch.Tensor:
    """``[E, d_ff / E]`` neuron indices per LM expert (sorted inside each expert)."""
    if d_ff % num_experts:
        raise MethodError(f"mixmoe: d_ff={d_ff} is not divisible by num_lm_experts={num_experts}")
    order = (torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed)) if how == "random"
             else torch.arange(d_ff))
    return order.view(num_experts, -1).sort(dim=1).values


def moe_from_dense(gate: nn.Linear, up: nn.Linear, down: nn.Linear, config: Config, act: str, layer: int):
    """A :class:`MoEFFN` whose LM experts are slices of the dense FFN and whose MT experts start silent."""
    d_ff, d = gate.weight.shape
    E_lm, E_mt = config.num_lm_experts, config.num_mt_experts
    parts = partition_neurons(d_ff, E_lm, config.partition, config.seed + layer)
    f = d_ff // E_lm
    n_freq = 0 if config.fft_variant == "none" else min(config.n_freq, d // 2 + 1)
    w = gate.weight
    moe = MoEFFN(d, f, E_lm + E_mt, k=config.top_k, act=act, n_freq=n_freq, fft_proj_dim=config.fft_proj_dim,
                 router_input=config.router_input, fft_layernorm=config.fft_layernorm,
                 scale=float(config.combine_scale if config.combine_scale is not None else E_lm),
                 dtype=w.dtype, device=w.device, backend=config.backend)
    gen = torch.Generator().manual_seed(config.seed * 1000 + layer)
    with torch.no_grad():
        moe.w_gate[:E_lm] = gate.weight.detach()[parts]
        moe.w_up[:E_lm] = up.weight.detach()[parts]
        moe.w_down[:E_lm] = down.weight.detach()[:, parts].permute(1, 0, 2)
        if E_mt:
            moe.w_gate[E_lm:] = (torch.randn(E_mt, f, d, generator=gen) * config.mt_init_std).to(w)
            moe.w_up[E_lm:] = (torch.randn(E_mt, f, d, generator=gen) * config.mt_init_std).to(w)
            moe.w_down[E_lm:] = 0.0
        for lin in (moe.router, moe.fft_proj):
            if lin is not None:
                lin.weight.copy_((torch.randn(lin.weight.shape, generator=gen) * config.router_init_std).to(w))
    moe.lm_experts = E_lm  # plain attribute: which experts are the LM group
    if config.routing == "grouped":
        moe.set_groups(E_lm, config.top_k_mt if config.top_k_mt is not None else min(config.top_k, E_mt))
    return moe


def convert(model: nn.Module, config: Config) -> list[nn.Module]:
    """Replace the chosen FFNs of ``model`` in place; returns the MoE modules in layer order."""
    act = _activation_name(model)
    out = []
    for info in find_ffn(model):
        if config.layers is not None and info.layer not in config.layers:
            continue
        if info.kind != "swiglu" or info.gate is None:
            raise MethodError(f"mixmoe: layer {info.layer} has a {info.kind} FFN; Mix-MoE needs gate/up/down "
                             "(Llama, Qwen2, Gemma 3, Mistral ...)")
        moe = moe_from_dense(info.gate, info.up, info.down, config, act, info.layer)
        parent = model.get_submodule(info.name.rsplit(".", 1)[0])
        setattr(parent, info.name.rsplit(".", 1)[1], moe)
        out.append(moe)
    if not out:
        raise ConfigError(f"mixmoe: no layer converted (layers={config.layers})")
    return out


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def set_stage(model: nn.Module, stage: int) -> None:
    """Routing and weight-gradient masks for a stage: stage 1 routes to LM experts only and trains them;
    stage 2 routes to every expert and trains only the MT experts."""
    for moe in moe_layers(model):
        lm = torch.zeros(moe.num_experts, dtype=torch.bool, device=moe.expert_mask.device)
        lm[: moe.lm_experts] = True
        moe.set_masks(expert_mask=lm if stage == 1 else torch.ones_like(lm), train_mask=lm if stage == 1 else ~lm)


def aux_losses(model: nn.Module, aux_weight: float, z_weight: float) -> torch.Tensor:
    total = None
    for moe in moe_layers(model):
        if moe.last_aux_loss is None:
            continue
        term = aux_weight * moe.last_aux_loss + z_weight * moe.last_z_loss
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
