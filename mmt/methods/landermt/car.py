"""CAR (conditional awareness-based routing): a per-token gate between the language-general and the
language-specific neurons of an FFN. Its exact form is not published; every choice is a Config field
(docs/methods.md, "LANDeRMT").

For FFN input x, ``g = sigmoid(w·x + b)``; the general neurons see ``2g·x`` and the specific ones ``2(1-g)·x``
(``car_specific_gate: none``: ``x``). With w = 0 and b = 0 both factors are exactly 1, so at step 0 the gated
model is the pretrained model, bit for bit. With ``car_other_languages_off``, neurons specific to languages
outside the current pair are switched off (:func:`set_car_pair`; at evaluation and generation
:func:`mmt.arch.set_direction` sets the pair of each direction).

The gate works on every FFN layout :func:`mmt.models.find_ffn` finds (SwiGLU gate/up/down, GELU fc_in/fc_out,
GPT-2's Conv1D, BLOOM's MLP with its residual argument, XGLM's fc1/fc2 on the decoder layer) because it never
replaces the FFN's forward: each in-projection is evaluated on the two gated inputs and every neuron takes its
group's value; a pre-hook on the out-projection zeroes inactive neurons. Weight names stay the same; each gated
FFN gains ``car_gate`` (Linear(d, 1)) and the buffer ``car_owner`` (-1 = general, else the owning language's
index). The model is the changed architecture ``landermt_car`` of :mod:`mmt.arch`: it saves and reloads with its
gates and routing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from mmt import arch
from mmt.errors import ConfigError
from mmt.models import find_ffn

from .config import Config
from .neurons import NeuronMap

ARCH = "landermt_car"


def _gated_in_forward(proj: nn.Module, ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    forward = type(proj).forward  # the projection's own forward (this function replaces it on the instance)
    g = torch.sigmoid(ffn.car_gate(x))
    general = ffn.car_owner < 0
    y_general = forward(proj, (2.0 * g) * x)
    if ffn._car_settings["specific_gate"] == "one_minus":
        y_specific = forward(proj, (2.0 * (1.0 - g)) * x)
    else:
        y_specific = forward(proj, x)
    return torch.where(general, y_general, y_specific)


def _mask_inactive(ffn: nn.Module, proj: nn.Module, args: tuple):
    pair = ffn._car_pair
    if pair is None or not ffn._car_settings["other_languages_off"]:
        return None
    owner = ffn.car_owner
    keep = owner < 0
    for li in pair:
        keep = keep | (owner == li)
    return (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])


def attach(model: nn.Module, owners: dict[int, torch.Tensor] | None, settings: dict) -> list[nn.Module]:
    """Gate the FFN of every layer in ``settings["layers"]``. ``owners[layer]``: its owner vector (None: zeros,
    which a checkpoint's ``car_owner`` buffers overwrite). Returns the gated FFN modules."""
    ffns = find_ffn(model)
    gated = []
    for layer in settings["layers"]:
        f = ffns[layer]
        mod = f.module
        ref = f.out_projection.weight
        owner = torch.zeros(f.d_ff, dtype=torch.int64) if owners is None else owners[layer].to(torch.int64)
        if tuple(owner.shape) != (f.d_ff,):
            raise ConfigError(f"CAR: layer {layer} has {f.d_ff} FFN neurons, the neuron map {tuple(owner.shape)}")
        mod.car_gate = nn.Linear(f.d_model, 1).to(device=ref.device, dtype=ref.dtype)
        if ref.device.type != "meta":
            with torch.no_grad():
                mod.car_gate.weight.zero_()
                mod.car_gate.bias.fill_(settings.get("bias_init", 0.0))
        mod.register_buffer("car_owner", owner.to(ref.device))
        mod._car_settings = {k: settings[k] for k in ("specific_gate", "other_languages_off")}
        mod._car_pair = None
        for proj in f.in_projections:
            proj.forward = functools.partial(_gated_in_forward, proj, mod)
        f.out_projection.register_forward_pre_hook(functools.partial(_mask_inactive, mod))
        gated.append(mod)
    return gated


def add_car(model: nn.Module, nmap: NeuronMap, cfg: Config) -> list[nn.Module]:
    """Gate the FFN of every layer of ``nmap`` and tag ``model`` as the changed architecture ``landermt_car``."""
    ffns = find_ffn(model)
    owners = {}
    for layer in nmap.layers:
        unit = next((u for u in nmap.units if u.layer == layer and u.name == ffns[layer].name), None)
        if unit is None:
            raise ConfigError("CAR needs an FFN neuron map (neuron_kind='ffn')")
        owners[layer] = nmap.owner[unit.name]
    settings = {
        "languages": list(nmap.languages),
        "layers": list(nmap.layers),
        "specific_gate": cfg.car_specific_gate,
        "other_languages_off": cfg.car_other_languages_off,
        "bias_init": cfg.car_bias_init,
    }
    gated = attach(model, owners, settings)
    arch.mark(model, ARCH, settings)
    return gated


def set_car_pair(model_or_mlps, languages: NeuronMap | list[str], pair: tuple[str, str] | None) -> None:
    """Route CAR for ``pair`` (None: every specific neuron active, e.g. for a language outside the map)."""
    langs = languages.languages if isinstance(languages, NeuronMap) else list(languages)
    mlps = (
        model_or_mlps
        if isinstance(model_or_mlps, list)
        else [m for m in model_or_mlps.modules() if hasattr(m, "_car_settings")]
    )
    idx = None if pair is None else [langs.index(x) for x in dict.fromkeys(pair) if x in langs]
    for m in mlps:
        m._car_pair = idx


@arch.register_arch(ARCH)
def _build(model: nn.Module, settings: dict) -> None:
    attach(model, None, settings)


def _set_direction(model: nn.Module, settings: dict, src: str, tgt: str) -> None:
    set_car_pair(model, settings["languages"], (src, tgt))


arch.register_direction_setter(ARCH, _set_direction)
