"""CAR (conditional awareness-based routing): a per-token gate ``g = sigmoid(w.x + b)`` scaling the input of the
general sub-FFN (and ``1 - g`` for the specific one). Its exact form is not published; every choice is a Config
field (docs/methods.md, "LANDeRMT")."""

from __future__ import annotations

import types

import torch
from torch import nn

from mmt.errors import ConfigError
from mmt.models import FFNInfo, find_ffn

from .config import Config
from .neurons import NeuronMap

class _CARState:
    """Masks of one FFN's general / per-language specific neurons, its projections, and the current pair."""

    def __init__(self, ffn: FFNInfo, general: torch.Tensor, specific: dict[int, torch.Tensor],
                 all_specific: torch.Tensor):
        self.ffn = ffn
        self.general, self.specific, self.all_specific = general, specific, all_specific
        self.pair_langs: list[int] | None = None


def _car_forward(self, x):
    """FFN(x) = W_out[:, G] act(W_in[G] (g x)) + W_out[:, S] act(W_in[S] ((1-g) x)), g = sigmoid(w.x + b)."""
    st: _CARState = self._car_state
    f = st.ffn
    swiglu = f.kind == "swiglu"
    up, down = (f.up, f.down) if swiglu else (f.fc_in, f.fc_out)
    cfg = self._car_cfg
    act = getattr(self, "act_fn", None) or getattr(self, "act", None)
    g = torch.sigmoid(self.car_gate(x))

    def inner(z):
        return act(f.gate(z)) * up(z) if swiglu else act(up(z))

    d_ff = st.general.shape[0]
    spec = st.all_specific.clone() if (st.pair_langs is None or not cfg["other_off"]) else \
        torch.zeros(d_ff, dtype=torch.bool, device=st.general.device)
    if st.pair_langs is not None and cfg["other_off"]:
        for li in st.pair_langs:
            spec |= st.specific[li]
    h_general = inner(g * x) * st.general.to(x.dtype)
    xs = (1.0 - g) * x if cfg["specific_gate"] == "one_minus" else x
    h_spec = inner(xs) * spec.to(x.dtype)
    out = down(h_general + h_spec)  # one down projection: its bias is added once
    drop = getattr(self, "dropout", None)
    return drop(out) if isinstance(drop, nn.Module) else out


def add_car(model: nn.Module, nmap: NeuronMap, cfg: Config) -> list[nn.Module]:
    """Attach a CAR gate (``mlp.car_gate``, a Linear(d, 1)) to the FFN of every selected layer and route its
    forward through :func:`_car_forward`. HF weight names of the FFN stay unchanged."""
    ffns = find_ffn(model)
    wrapped = []
    for layer in nmap.layers:
        f = ffns[layer]
        unit = next((u for u in nmap.units if u.layer == layer and u.name == f.name), None)
        if unit is None:
            raise ConfigError("CAR needs an FFN neuron map (neuron_kind='ffn')")
        owner = nmap.owner[unit.name]
        dev = next(f.module.parameters()).device
        general = (owner < 0).to(dev)
        specific = {li: (owner == li).to(dev) for li in range(len(nmap.languages))}
        mlp = f.module
        mlp.car_gate = nn.Linear(f.d_model, 1).to(device=dev, dtype=next(mlp.parameters()).dtype)
        nn.init.zeros_(mlp.car_gate.weight)
        nn.init.constant_(mlp.car_gate.bias, cfg.car_bias_init)
        mlp._car_state = _CARState(f, general, specific, (owner >= 0).to(dev))
        mlp._car_cfg = {"other_off": cfg.car_other_languages_off, "specific_gate": cfg.car_specific_gate}
        mlp.forward = types.MethodType(_car_forward, mlp)
        wrapped.append(mlp)
    return wrapped


def set_car_pair(model_or_mlps, nmap: NeuronMap, pair: tuple[str, str] | None) -> None:
    """Route CAR for ``pair`` (None: every specific neuron active, e.g. for unknown directions)."""
    mlps = model_or_mlps if isinstance(model_or_mlps, list) else [
        m for m in model_or_mlps.modules() if hasattr(m, "_car_state")]
    langs = None if pair is None else [nmap.languages.index(x) for x in dict.fromkeys(pair) if x in nmap.languages]
    for m in mlps:
        m._car_state.pair_langs = langs
