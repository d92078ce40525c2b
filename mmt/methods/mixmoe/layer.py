"""Upcycling: dense FFNs -> MoE layers whose LM experts are slices of the dense FFN and whose MT experts
start silent; and the same layer structure rebuilt empty when a saved Mix-MoE model is loaded.

Gated FFNs (``down(act(gate x) * up x)``: Llama, Qwen2, Gemma 3, Mistral) become
:class:`mmt_kernels.MoEFFN` (whole MLP module replaced). GELU FFNs (``fc_out(act(fc_in x))``: GPT-2,
BLOOM, XGLM) become :class:`GeluMoEFFN`, installed as ``fc_in`` with the activation and ``fc_out``
replaced by identities, so that model code around the FFN (BLOOM's residual argument, XGLM's FFN
living on the decoder layer) keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmt.arch import register_arch
from mmt.errors import CheckpointError, MethodError
from mmt.models import find_ffn
from mmt_kernels import MoEFFN

from .gelu import GeluMoEFFN

_ACT_ATTRS = ("act_fn", "act", "activation_fn", "gelu_impl", "activation")
_PROBE = torch.linspace(-6.0, 6.0, 481)


def _probe_activation(fn: Any, allowed: tuple[str, ...], where: str) -> str:
    """Name the activation ``fn`` computes by evaluating it, among ``allowed`` ('silu', 'gelu', 'gelu_tanh')."""
    refs = {"silu": F.silu(_PROBE), "gelu": F.gelu(_PROBE), "gelu_tanh": F.gelu(_PROBE, approximate="tanh")}
    try:
        with torch.no_grad():
            got = fn(_PROBE.clone()).float()
    except Exception as exc:  # any failure means "not a plain elementwise activation"
        raise MethodError(f"mixmoe: cannot evaluate the activation of {where} ({type(fn).__name__}): {exc}") from exc
    for name in allowed:
        if got.shape == _PROBE.shape and float((got - refs[name]).abs().max()) < 1e-5:
            return name
    raise MethodError(
        f"mixmoe: the FFN activation of {where} ({type(fn).__name__}) is none of {list(allowed)}; "
        "Mix-MoE upcycles SwiGLU/GeGLU (silu, gelu_tanh) and GELU (gelu, gelu_tanh) FFNs"
    )


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for n, m in parent.named_children():
        if m is child:
            return n
    raise MethodError(f"mixmoe: {type(child).__name__} is not a direct child of {type(parent).__name__}")


@dataclass
class FFNSlot:
    """Where a layer's FFN lives and what it computes."""

    layer: int
    kind: str  # "glu" or "gelu"
    act: str
    parent: nn.Module  # module holding the attributes below
    names: tuple[str, ...]  # glu: (mlp attribute,); gelu: (fc_in, activation, fc_out) attributes
    info: Any  # mmt.models.FFNInfo

    def install(self, moe: nn.Module) -> None:
        if self.kind == "glu":
            setattr(self.parent, self.names[0], moe)
        else:
            fc_in, act, fc_out = self.names
            setattr(self.parent, fc_in, moe)
            setattr(self.parent, act, nn.Identity())
            setattr(self.parent, fc_out, nn.Identity())


def ffn_slots(model: nn.Module, layers: list[int] | None) -> list[FFNSlot]:
    slots = []
    for info in find_ffn(model):
        if layers is not None and info.layer not in layers:
            continue
        where = f"layer {info.layer} ({info.name or type(info.module).__name__})"
        if info.kind == "swiglu":
            if info.gate is None:
                raise MethodError(f"mixmoe: {where} has up/down projections but no gate; not a gated FFN")
            act_fn = next(
                (getattr(info.module, a) for a in _ACT_ATTRS if callable(getattr(info.module, a, None))), None
            )
            if act_fn is None:
                raise MethodError(f"mixmoe: {where}: no activation attribute among {_ACT_ATTRS}")
            act = _probe_activation(act_fn, ("silu", "gelu_tanh"), where)
            parent_name, attr = info.name.rsplit(".", 1)
            slots.append(FFNSlot(info.layer, "glu", act, model.get_submodule(parent_name), (attr,), info))
        else:
            parent = info.module
            if getattr(parent, "pretraining_tp", 1) > 1 and getattr(parent, "slow_but_exact", False):
                raise MethodError(
                    f"mixmoe: {where} uses BLOOM's slow_but_exact tensor-parallel FFN; set "
                    "slow_but_exact=False in the model config"
                )
            act_attr = next((a for a in _ACT_ATTRS if callable(getattr(parent, a, None))), None)
            if act_attr is None:
                raise MethodError(f"mixmoe: {where}: no activation attribute among {_ACT_ATTRS}")
            act = _probe_activation(getattr(parent, act_attr), ("gelu", "gelu_tanh"), where)
            names = (_child_name(parent, info.fc_in), act_attr, _child_name(parent, info.fc_out))
            slots.append(FFNSlot(info.layer, "gelu", act, parent, names, info))
    if not slots:
        raise MethodError(f"mixmoe: no layer converted (layers={layers})")
    return slots


def partition_neurons(d_ff: int, num_experts: int, how: str = "random", seed: int = 0) -> torch.Tensor:
    """``[E, d_ff / E]`` neuron indices per LM expert (sorted inside each expert)."""
    if d_ff % num_experts:
        raise MethodError(f"mixmoe: d_ff={d_ff} is not divisible by num_lm_experts={num_experts}")
    order = (
        torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed)) if how == "random" else torch.arange(d_ff)
    )
    return order.view(num_experts, -1).sort(dim=1).values


def _dense_weights(slot: FFNSlot) -> dict[str, torch.Tensor | None]:
    """The dense FFN in ``nn.Linear`` layout ([out, in]); GPT-2's Conv1D stores [in, out]."""
    info = slot.info
    if slot.kind == "glu":
        return {"gate": info.gate.weight, "up": info.up.weight, "down": info.down.weight}

    def lin(m):
        w = m.weight.t() if info.transposed else m.weight
        return w, getattr(m, "bias", None)

    (w_in, b_in), (w_out, b_out) = lin(info.fc_in), lin(info.fc_out)
    return {"w_in": w_in, "b_in": b_in, "w_out": w_out, "b_out": b_out}


def empty_moe(slot: FFNSlot, spec: dict[str, Any], *, dtype=None, device=None) -> nn.Module:
    """A MoE layer of the shape ``spec`` describes (see :func:`layer_spec`), weights uninitialised."""
    common = {
        "k": spec["top_k"],
        "act": slot.act,
        "n_freq": spec["n_freq"],
        "fft_proj_dim": spec["fft_proj_dim"],
        "router_input": spec["router_input"],
        "fft_layernorm": spec["fft_layernorm"],
        "scale": spec["scale"],
        "dtype": dtype,
        "device": device,
        "backend": spec.get("backend"),
    }
    E = spec["num_lm_experts"] + spec["num_mt_experts"]
    if slot.kind == "glu":
        moe = MoEFFN(spec["d_model"], spec["d_expert"], E, **common)
    else:
        moe = GeluMoEFFN(spec["d_model"], spec["d_expert"], E, bias=spec["bias"], **common)
    moe.lm_experts = spec["num_lm_experts"]  # plain attribute: experts [0, lm_experts) are the LM group
    if spec["routing"] == "grouped":
        if moe.expert_mask.is_meta:  # built to be loaded into: masks are checked once loaded (MoEFFN.set_masks)
            moe.group_split, moe.k_second = spec["num_lm_experts"], spec["top_k_mt"]
        else:
            moe.set_groups(spec["num_lm_experts"], spec["top_k_mt"])
    return moe


def layer_spec(slot: FFNSlot, config: Any) -> dict[str, Any]:
    """Everything needed to rebuild the MoE layer of ``slot`` empty (recorded in saved configs)."""
    info = slot.info
    d, d_ff = info.d_model, info.d_ff
    E_lm, E_mt = config.num_lm_experts, config.num_mt_experts
    if d_ff % E_lm:
        raise MethodError(f"mixmoe: d_ff={d_ff} of layer {slot.layer} is not divisible by num_lm_experts={E_lm}")
    bias = slot.kind == "gelu" and getattr(info.fc_in, "bias", None) is not None
    if slot.kind == "gelu" and (getattr(info.fc_out, "bias", None) is not None) != bias:
        raise MethodError(f"mixmoe: layer {slot.layer}: fc_in and fc_out must both have a bias or both not")
    return {
        "layer": slot.layer,
        "kind": slot.kind,
        "act": slot.act,
        "bias": bias,
        "d_model": d,
        "d_expert": d_ff // E_lm,
        "num_lm_experts": E_lm,
        "num_mt_experts": E_mt,
        "top_k": config.top_k,
        "routing": config.routing,
        "top_k_mt": config.resolved_top_k_mt(),
        "n_freq": 0 if config.fft_variant == "none" else min(config.n_freq, d // 2 + 1),
        "fft_proj_dim": config.fft_proj_dim,
        "router_input": config.router_input,
        "fft_layernorm": config.fft_layernorm,
        "scale": float(config.resolved_combine_scale()),
        "backend": config.backend,
    }


def upcycle(slot: FFNSlot, config: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The MoE layer for ``slot``: LM experts are a partition of the dense FFN's neurons (their sum is the
    dense FFN), MT experts have random input projections and a zero output projection (silent)."""
    spec = layer_spec(slot, config)
    dense = _dense_weights(slot)
    ref = next(iter(dense.values()))
    moe = empty_moe(slot, spec, dtype=ref.dtype, device=ref.device)
    E_lm, E_mt, f, d = spec["num_lm_experts"], spec["num_mt_experts"], spec["d_expert"], spec["d_model"]
    parts = partition_neurons(slot.info.d_ff, E_lm, config.partition, config.seed + slot.layer)
    gen = torch.Generator().manual_seed(config.seed * 1000 + slot.layer)

    def rand(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(ref)

    with torch.no_grad():
        if slot.kind == "glu":
            moe.w_gate[:E_lm] = dense["gate"].detach()[parts]
            moe.w_up[:E_lm] = dense["up"].detach()[parts]
            moe.w_down[:E_lm] = dense["down"].detach()[:, parts].permute(1, 0, 2)
            if E_mt:
                moe.w_gate[E_lm:] = rand(E_mt, f, d, std=config.mt_init_std)
                moe.w_up[E_lm:] = rand(E_mt, f, d, std=config.mt_init_std)
                moe.w_down[E_lm:] = 0.0
        else:
            moe.w_in[:E_lm] = dense["w_in"].detach()[parts]
            moe.w_out[:E_lm] = dense["w_out"].detach()[:, parts].permute(1, 0, 2)
            if moe.b_in is not None:
                moe.b_in[:E_lm] = dense["b_in"].detach()[parts]
                moe.b_in[E_lm:] = 0.0
                moe.b_out.copy_(dense["b_out"].detach())
            if E_mt:
                moe.w_in[E_lm:] = rand(E_mt, f, d, std=config.mt_init_std)
                moe.w_out[E_lm:] = 0.0
        # Zero router: uniform LM weights, so with top_k == num_lm_experts the layer IS the dense FFN.
        moe.router.weight.copy_(rand(*moe.router.weight.shape, std=config.router_init_std))
        if moe.fft_proj is not None:
            moe.fft_proj.weight.copy_(rand(*moe.fft_proj.weight.shape, std=config.fft_proj_init_std))
    return moe, spec


def expert_tensors(moe: nn.Module) -> list[torch.Tensor]:
    """A MoE layer's parameters whose first dim indexes experts."""
    if isinstance(moe, GeluMoEFFN):
        return moe.expert_tensors()
    return [moe.w_gate, moe.w_up, moe.w_down]


def shared_lm_tensors(moe: nn.Module) -> list[torch.Tensor]:
    """Parameters of the dense FFN that are no expert's (GELU output bias): they train with the LM experts."""
    return [moe.b_out] if isinstance(moe, GeluMoEFFN) and moe.b_out is not None else []


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
    return torch.zeros(()) if total is None else total


FORMAT = 1  # layout of the settings recorded in saved models


@register_arch("mixmoe")
def build(model: nn.Module, settings: dict[str, Any]) -> None:
    """Turn a freshly built base model into the saved Mix-MoE structure (empty MoE layers of the recorded
    shapes); its weights are loaded afterwards. Used when a saved Mix-MoE model is loaded."""
    if settings.get("format") != FORMAT:
        raise CheckpointError(
            f"mixmoe: saved settings have format {settings.get('format')!r}; this mmt reads format {FORMAT}"
        )
    specs = settings["layers"]
    slots = {s.layer: s for s in ffn_slots(model, [sp["layer"] for sp in specs])}
    w = next(model.parameters())
    for sp in specs:
        slot = slots.get(sp["layer"])
        if slot is None or (slot.kind, slot.act) != (sp["kind"], sp["act"]):
            found = None if slot is None else f"{slot.kind}/{slot.act}"
            raise CheckpointError(
                f"mixmoe: layer {sp['layer']} was saved as a {sp['kind']}/{sp['act']} FFN; the base "
                f"model has {found} there"
            )
        moe = empty_moe(slot, sp, dtype=w.dtype, device=w.device)
        moe.needs_refresh = True
        moe.register_forward_pre_hook(_refresh_after_load)
        slot.install(moe)


def _refresh_after_load(moe: nn.Module, _args) -> None:
    # from_pretrained assigns the loaded tensors without load_state_dict hooks: recompute MoEFFN's host-side
    # summaries of the loaded expert/train masks, and re-create the never-saved load counters, once.
    if not moe.needs_refresh:
        return
    moe.needs_refresh = False
    moe.load_counts = torch.zeros(moe.num_experts, dtype=torch.float64, device=moe.expert_mask.device)
    moe.set_masks()
