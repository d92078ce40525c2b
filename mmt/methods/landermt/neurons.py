"""Language-aware neurons: which tensors hold which neurons (:class:`NeuronUnit`), the detection result
(:class:`NeuronMap`: safetensors I/O and its heatmap) and the split into general and specific neurons."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mmt.errors import MethodError
from mmt.models import decoder_layers, find_ffn, is_conv1d
from mmt.plots import plot_heatmap


@dataclass
class NeuronUnit:
    """One scored module: ``name`` (dotted module path), its layer, M neurons, and the parameters whose
    neurons they are: (param name, neuron_dim) pairs (neuron_dim 0 = rows or a 1-D tensor, 1 = columns)."""

    name: str
    layer: int
    size: int
    params: list[tuple[str, int]]
    hook_module: str
    hook_where: str  # "input" | "output"


def _param_name(model: nn.Module, tensor: torch.Tensor) -> str:
    for n, p in model.named_parameters():
        if p is tensor:
            return n
    raise AssertionError("parameter not found in model")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise AssertionError("module not found in model")


def neuron_units(model: nn.Module, layers: Iterable[int], kind: str) -> list[NeuronUnit]:
    """The scored modules of ``layers`` for ``kind`` ("ffn" or "output")."""
    layers = sorted(set(int(x) for x in layers))
    units: list[NeuronUnit] = []
    if kind == "ffn":
        ffns = find_ffn(model)
        for i in layers:
            f = ffns[i]
            params: list[tuple[str, int]] = []
            if f.kind == "swiglu":
                for mod in (f.gate, f.up):
                    params.append((_param_name(model, mod.weight), 0))  # [d_ff, d]: neurons are rows
                    if getattr(mod, "bias", None) is not None:
                        params.append((_param_name(model, mod.bias), 0))
                params.append((_param_name(model, f.down.weight), 1))  # [d, d_ff]: columns
                out_mod = f.down
            else:
                tr = f.transposed  # GPT-2 Conv1D: c_fc [d, d_ff] (columns), c_proj [d_ff, d] (rows)
                params.append((_param_name(model, f.fc_in.weight), 1 if tr else 0))
                if getattr(f.fc_in, "bias", None) is not None:
                    params.append((_param_name(model, f.fc_in.bias), 0))
                params.append((_param_name(model, f.fc_out.weight), 0 if tr else 1))
                out_mod = f.fc_out
            units.append(NeuronUnit(f"{f.name}", i, f.d_ff, params, _module_name(model, out_mod), "input"))
        return units
    prefix, blocks = decoder_layers(model)
    for i in layers:
        for sub, mod in blocks[i].named_modules():
            own = dict(mod.named_parameters(recurse=False))
            if not own or "weight" not in own:
                continue
            w = own["weight"]
            full = f"{prefix}.{i}.{sub}" if sub else f"{prefix}.{i}"
            if w.dim() == 1:
                size, params = w.shape[0], [(f"{full}.weight", 0)]
            elif w.dim() == 2:
                conv = is_conv1d(mod)
                size = w.shape[1] if conv else w.shape[0]
                params = [(f"{full}.weight", 1 if conv else 0)]
            else:
                continue
            if "bias" in own and own["bias"] is not None and own["bias"].shape[0] == size:
                params.append((f"{full}.bias", 0))
            units.append(NeuronUnit(full, i, size, params, full, "output"))
    return units


@dataclass
class NeuronMap:
    """Detection result. ``importance[unit]``: fp32 [L, M] (languages x neurons, raw sums over sentences);
    ``owner[unit]``: int64 [M], -1 for language-general neurons, else the index of the owning language."""

    languages: list[str]
    layers: list[int]
    units: list[NeuronUnit]
    importance: dict[str, torch.Tensor]
    owner: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)

    def unit(self, name: str) -> NeuronUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def keep(self, unit: str, pair: tuple[str, str], used: str = "general+specific") -> torch.Tensor:
        """Sorted neuron indices a step of ``pair`` trains in ``unit``."""
        owner = self.owner[unit]
        mask = torch.zeros_like(owner, dtype=torch.bool)
        if used in ("general+specific", "general"):
            mask |= owner < 0
        if used in ("general+specific", "specific"):
            for lang in set(pair):
                if lang in self.languages:
                    mask |= owner == self.languages.index(lang)
        return torch.nonzero(mask).flatten()

    def scale(self, unit: str, pair: tuple[str, str], used: str = "general+specific") -> torch.Tensor:
        """Per-neuron gradient scale of the scaled variant: 1/2 (I^G_s + I^G_t) + I^S_s + I^S_t (zero elsewhere)."""
        imp, owner = self.importance[unit].float(), self.owner[unit]
        c = torch.zeros(owner.shape[0])
        for lang in pair:  # as written: 1/2 (I^G_s + I^G_t) + I^S_s + I^S_t
            if lang not in self.languages:
                continue
            li = self.languages.index(lang)
            row = imp[li]
            if used in ("general+specific", "general"):
                c += 0.5 * torch.where(owner < 0, row, torch.zeros_like(row))
            if used in ("general+specific", "specific"):
                c += torch.where(owner == li, row, torch.zeros_like(row))
        return c

    def counts(self) -> torch.Tensor:
        """[languages, layers] number of specific neurons each language owns in each layer."""
        out = torch.zeros(len(self.languages), len(self.layers), dtype=torch.int64)
        for u in self.units:
            col = self.layers.index(u.layer)
            own = self.owner[u.name]
            for li in range(len(self.languages)):
                out[li, col] += int((own == li).sum())
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for u in self.units:
            tensors[f"{u.name}::importance"] = self.importance[u.name].float().contiguous()
            tensors[f"{u.name}::owner"] = self.owner[u.name].to(torch.int64).contiguous()
        meta = {
            "languages": self.languages,
            "layers": self.layers,
            "units": [asdict(u) for u in self.units],
            "config": self.config,
            "format": "mmt.landermt.neurons/1",
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata={"landermt": json.dumps(meta)})
        tmp.replace(path)
        summary = {
            "languages": self.languages,
            "layers": self.layers,
            "config": self.config,
            "specific_per_language_per_layer": self.counts().tolist(),
            "neurons_per_layer": {
                str(layer): sum(u.size for u in self.units if u.layer == layer) for layer in self.layers
            },
        }
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NeuronMap":
        path = Path(path)
        if not path.is_file():
            raise MethodError(f"LANDeRMT neuron file not found: {path} (write one with `mmt detect`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("landermt", "{}"))
                if meta.get("format") != "mmt.landermt.neurons/1":
                    raise MethodError(f"{path} is not a LANDeRMT neuron file (no 'landermt' metadata)")
                units = [NeuronUnit(**{**u, "params": [tuple(p) for p in u["params"]]}) for u in meta["units"]]
                imp = {u.name: f.get_tensor(f"{u.name}::importance") for u in units}
                own = {u.name: f.get_tensor(f"{u.name}::owner") for u in units}
            return cls(meta["languages"], meta["layers"], units, imp, own, meta.get("config", {}))
        except MethodError:
            raise
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:  # truncated, edited, not ours
            raise MethodError(f"{path}: damaged or not a LANDeRMT neuron file ({type(exc).__name__}: {exc})") from None

    def plot(self, path: str | Path) -> Path:
        counts = self.counts().float()
        per_layer = torch.tensor([sum(u.size for u in self.units if u.layer == layer) for layer in self.layers])
        pct = 100.0 * counts / per_layer.clamp_min(1).float()
        return plot_heatmap(
            pct.numpy(),
            path,
            row_labels=self.languages,
            col_labels=[str(x) for x in self.layers],
            title="specific neurons, % of layer",
            xlabel="layer",
            ylabel="owner language",
            cmap="magma",
        )


def categorise(importance: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Per unit: top-``ratio`` neurons by cross-language variance (unbiased, as torch.var) are specific, owned by
    the argmax language; the others are general (-1)."""
    owner = {}
    for name, imp in importance.items():
        L, M = imp.shape
        own = torch.full((M,), -1, dtype=torch.int64)
        k = int(round(ratio * M))
        if L >= 2 and k > 0:
            var = imp.double().var(dim=0, unbiased=True)
            top = torch.topk(var, k).indices
            own[top] = imp[:, top].argmax(dim=0)
        owner[name] = own
    return owner
