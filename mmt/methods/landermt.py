"""LANDeRMT: language-aware neuron detecting and routing (Zhu, Pan, Li, Xiong; ACL 2024), METHODS.md section 2.

Pipeline:

1. **Layers** (:func:`select_layers`): run the frozen model over translation prompts and keep the ``n_layers``
   blocks whose output changes most from their input (or an explicit ``layers`` list).
2. **Detection** (:func:`detect`): first-order Taylor importance ``sum_sentences mean_t |a * dL/da|`` per language
   on monolingual FLORES dev text, for FFN neurons (default) or every output channel of every module with
   parameters (the original code's semantics; ``neuron_kind="output"``). Hooks feed the fused
   ``mmt_kernels.taylor_accumulate_`` during backward, so no activation is stored.
3. **Categorisation**: per module, the top ``specific_ratio`` neurons by cross-language variance are
   language-specific, owned by the argmax language; the rest are language-general. :class:`NeuronMap` is
   saved as safetensors (tensors + JSON config in the metadata) and plotted.
4. **Selective fine-tuning** (:func:`prepare`): only the selected layers train; batches are homogeneous in
   language pair and each optimizer step switches ``NeuronSparseAdamW``'s selection to
   ``general ∪ specific(src) ∪ specific(tgt)`` (strict: other neurons get no update and no decay).
5. **CAR** (optional): a per-token gate ``g = sigmoid(w·x + b)`` scaling the input of the general sub-FFN (and
   ``1 - g`` for the specific one), trained with the neurons. Its exact form is unknown [UNV]; every choice is
   a Config switch.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .base import MethodConfig, StepInfo, TrainingPlan

# the detection languages of the original code (FLORES-200 dev, monolingual); zho_Hant has no ISO 639-1 code here
PAPER_LANGUAGES = ["ar", "fr", "es", "en", "de", "it", "ja", "ru", "zh"]


@dataclass
class Config(MethodConfig):
    """LANDeRMT options (defaults from the original code unless marked [UNV]/[INF] in METHODS.md 2).

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
    scale_normalise: divide c by its mean over selected neurons [INF] (the code uses raw sums, an arbitrary
        lr multiplier; False reproduces it).
    strict: strict sparse AdamW (unselected neurons do not move); False = torch AdamW on masked gradients.
    train_other: in "ffn" mode, also train the other parameters of the selected layers (attention, norms)
        densely (the code trains every module of a selected block).
    car: add the CAR routing gate to the FFN of the selected layers.
    car_specific_gate: "one_minus" (the specific sub-FFN gets (1-g)·x [INF]) or "none" (ungated).
    car_other_languages_off: neurons specific to languages outside the current pair are inactive [UNV].
    car_bias_init: initial gate bias (0 gives g = 0.5) [INF].
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
    train_other: bool = True
    car: bool = False
    car_specific_gate: str = "one_minus"
    car_other_languages_off: bool = True
    car_bias_init: float = 0.0
    detect_output: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.neuron_kind in ("ffn", "output"), f"neuron_kind must be 'ffn' or 'output', got {self.neuron_kind!r}"),
            (self.layer_metric in ("mean_abs_change", "relative_l2"),
             f"layer_metric must be 'mean_abs_change' or 'relative_l2', got {self.layer_metric!r}"),
            (0.0 <= self.specific_ratio <= 1.0, f"specific_ratio must be in [0, 1], got {self.specific_ratio}"),
            (self.neurons_used in ("general+specific", "specific", "general"),
             f"neurons_used must be general+specific, specific or general, got {self.neurons_used!r}"),
            (self.car_specific_gate in ("one_minus", "none"),
             f"car_specific_gate must be 'one_minus' or 'none', got {self.car_specific_gate!r}"),
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"landermt: {msg}")


# ------------------------------------------------------------------------------------------------------------------
# neuron units: which tensors hold which neurons


@dataclass
class Unit:
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
    raise KeyError("parameter not found in model")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise KeyError("module not found in model")


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def neuron_units(model: nn.Module, layers: Iterable[int], kind: str) -> list[Unit]:
    """The scored modules of ``layers`` for ``kind`` ("ffn" or "output")."""
    from mmt.models import decoder_layers, find_ffn

    layers = sorted(set(int(x) for x in layers))
    units: list[Unit] = []
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
            units.append(Unit(f"{f.name}", i, f.d_ff, params, _module_name(model, out_mod), "input"))
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
                conv = _is_conv1d(mod)
                size = w.shape[1] if conv else w.shape[0]
                params = [(f"{full}.weight", 1 if conv else 0)]
            else:
                continue
            if "bias" in own and own["bias"] is not None and own["bias"].shape[0] == size:
                params.append((f"{full}.bias", 0))
            units.append(Unit(full, i, size, params, full, "output"))
    return units


# ------------------------------------------------------------------------------------------------------------------
# the neuron map


@dataclass
class NeuronMap:
    """Detection result. ``importance[unit]``: fp32 [L, M] (languages x neurons, raw sums over sentences);
    ``owner[unit]``: int64 [M], -1 for language-general neurons, else the index of the owning language."""

    languages: list[str]
    layers: list[int]
    units: list[Unit]
    importance: dict[str, torch.Tensor]
    owner: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)

    def unit(self, name: str) -> Unit:
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
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for u in self.units:
            tensors[f"{u.name}::importance"] = self.importance[u.name].float().contiguous()
            tensors[f"{u.name}::owner"] = self.owner[u.name].to(torch.int64).contiguous()
        meta = {"languages": self.languages, "layers": self.layers, "units": [asdict(u) for u in self.units],
                "config": self.config, "format": "mmt.landermt.neurons/1"}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata={"landermt": json.dumps(meta)})
        tmp.replace(path)
        summary = {"languages": self.languages, "layers": self.layers, "config": self.config,
                   "specific_per_language_per_layer": self.counts().tolist(),
                   "neurons_per_layer": {str(layer): sum(u.size for u in self.units if u.layer == layer)
                                         for layer in self.layers}}
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NeuronMap":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LANDeRMT neuron file not found: {path} (write one with `mmt detect`)")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("landermt", "{}"))
            if meta.get("format") != "mmt.landermt.neurons/1":
                raise ValueError(f"{path} is not a LANDeRMT neuron file (no 'landermt' metadata)")
            units = [Unit(**{**u, "params": [tuple(p) for p in u["params"]]}) for u in meta["units"]]
            imp = {u.name: f.get_tensor(f"{u.name}::importance") for u in units}
            own = {u.name: f.get_tensor(f"{u.name}::owner") for u in units}
        return cls(meta["languages"], meta["layers"], units, imp, own, meta.get("config", {}))

    def plot(self, path: str | Path) -> Path:
        from mmt.plots import plot_heatmap

        counts = self.counts().float()
        per_layer = torch.tensor([sum(u.size for u in self.units if u.layer == layer) for layer in self.layers])
        pct = 100.0 * counts / per_layer.clamp_min(1).float()
        return plot_heatmap(pct.numpy(), path, row_labels=self.languages, col_labels=[str(x) for x in self.layers],
                            title="specific neurons, % of layer", xlabel="layer",
                            ylabel="owner language", cmap="magma")


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


# ------------------------------------------------------------------------------------------------------------------
# detection


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _encode(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    from mmt.data import collate, encode_mono, pad_token_id

    feats = [encode_mono(tokenizer, t, max_length=max_length) for t in texts]
    batch = collate(feats, pad_token_id(tokenizer))
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def select_layers(model: nn.Module, tokenizer, prompts: list[str], n_layers: int, metric: str = "mean_abs_change",
                  batch_size: int = 8, max_length: int = 256) -> tuple[list[int], list[float]]:
    """Blocks with the largest representation change across them on ``prompts``: (sorted top-n, change per block)."""
    from mmt.models import decoder_layers

    _, blocks = decoder_layers(model)
    n = len(blocks)
    device = next(model.parameters()).device
    sums_in, sums_out, rel = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), \
        torch.zeros(n, dtype=torch.float64)
    count = 0
    state: dict[int, torch.Tensor] = {}
    mask_box: dict[str, torch.Tensor] = {}

    def pre(i):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            state[i] = x
        return hook

    def post(i):
        def hook(mod, args, out):
            y = out[0] if isinstance(out, tuple) else out
            x = state.pop(i)
            m = mask_box["m"].unsqueeze(-1).to(y.dtype)
            sums_in[i] += float((x.float() * m).sum()) / x.shape[-1]
            sums_out[i] += float((y.float() * m).sum()) / y.shape[-1]
            r = (y.float() - x.float()).norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-6)
            rel[i] += float((r * mask_box["m"]).sum())
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for chunk in _batches(prompts, batch_size):
            batch = _encode(tokenizer, chunk, max_length, device)
            mask_box["m"] = batch["attention_mask"].float()
            count += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if metric == "mean_abs_change":
        change = ((sums_out - sums_in) / max(count, 1)).abs()
    else:
        change = rel / max(count, 1)
    top = torch.topk(change, min(n_layers, n)).indices.tolist()
    return sorted(top), change.tolist()


def detect(model: nn.Module, tokenizer, texts: dict[str, list[str]], layers: list[int], kind: str = "ffn",
           batch_size: int = 8, max_length: int = 256, ratio: float = 0.10, backend: str | None = None,
           progress: bool = True) -> NeuronMap:
    """Taylor importance per language over ``texts`` ({iso: sentences}), then categorisation."""
    from mmt_kernels import TaylorHook, token_weights

    from tqdm.auto import tqdm

    units = neuron_units(model, layers, kind)
    if not units:
        raise ValueError(f"landermt: no neuron units in layers {layers} for neuron_kind={kind!r}")
    modules = dict(model.named_modules())
    hooks = {u.name: TaylorHook(modules[u.hook_module], where=u.hook_where, backend=backend) for u in units}
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to activations only
    emb = model.get_input_embeddings()
    h_emb = emb.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
    was_training = model.training
    model.eval()
    langs = list(texts)
    total = sum(math.ceil(len(v) / batch_size) for v in texts.values())
    bar = tqdm(total=total, desc="detect neurons", disable=not progress, dynamic_ncols=True)
    try:
        for lang in langs:
            for chunk in _batches(texts[lang], batch_size):
                batch = _encode(tokenizer, chunk, max_length, device)
                w = token_weights(attention_mask=batch["attention_mask"]).to(device)
                for h in hooks.values():
                    h.bucket, h.token_weight = lang, w
                with torch.enable_grad():
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    logits = out.logits[:, :-1].float()
                    labels = batch["labels"][:, 1:]
                    tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                      ignore_index=-100, reduction="none").view(labels.shape)
                    n = (labels != -100).sum(1).clamp_min(1)
                    loss = (tok.sum(1) / n).sum()  # per-sentence mean loss: batch 1 gradients, batched
                    loss.backward()
                bar.update(1)
    finally:
        bar.close()
        h_emb.remove()
        for h in hooks.values():
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    importance = {}
    for u in units:
        rows = []
        for lang in langs:
            acc = hooks[u.name].acc.get(lang)
            rows.append(acc.cpu() if acc is not None else torch.zeros(u.size))
        importance[u.name] = torch.stack(rows)
    owner = categorise(importance, ratio)
    return NeuronMap(langs, sorted(set(layers)), units, importance, owner)


def _texts(cfg: Config, data_dir: Path, languages: list[str]) -> dict[str, list[str]]:
    from mmt.data import load_flores

    folder = data_dir / cfg.detect_split
    out = {}
    for lang in languages:
        lines = load_flores(folder, [lang])[lang]
        out[lang] = lines[: cfg.detect_sentences] if cfg.detect_sentences else lines
    return out


def _layer_prompts(cfg: Config, data_dir: Path, directions: list[tuple[str, str]], template: str) -> list[str]:
    from mmt.data import build_prompt, load_flores

    langs = sorted({x for d in directions for x in d})
    data = load_flores(data_dir / cfg.detect_split, langs)
    prompts = []
    for s, t in directions:
        for i in range(min(cfg.layer_sentences, len(data[s]))):
            prompts.append(build_prompt(template, s, t, data[s][i]) + " " + data[t][i])
    return prompts


def run_detection(model: nn.Module, tokenizer, cfg: Config, *, data_dir: str | Path | None = None,
                  directions: list[tuple[str, str]] | None = None, template: str = "T1",
                  progress: bool = True) -> NeuronMap:
    """Layer selection (unless ``cfg.layers``) + detection on the FLORES dev data under ``data_dir``."""
    from mmt import languages as L
    from mmt.data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    langs = [L.normalize(x) for x in (cfg.languages or sorted({x for d in (directions or []) for x in d}))]
    if len(langs) < 2:
        raise ValueError("landermt: detection needs at least two languages (method.languages or the training "
                         "directions)")
    t0 = time.time()
    layer_change = None
    if cfg.layers is not None:
        layers = sorted(set(int(x) for x in cfg.layers))
    else:
        dirs = directions or [(a, b) for a in langs for b in langs if a != b]
        prompts = _layer_prompts(cfg, root, dirs, template)
        layers, layer_change = select_layers(model, tokenizer, prompts, cfg.n_layers, cfg.layer_metric,
                                             cfg.detect_batch_size, cfg.detect_max_length)
    nmap = detect(model, tokenizer, _texts(cfg, root, langs), layers, cfg.neuron_kind, cfg.detect_batch_size,
                  cfg.detect_max_length, cfg.specific_ratio, progress=progress)
    nmap.config = {"method": cfg.to_dict(), "layer_change": layer_change, "seconds": round(time.time() - t0, 1),
                   "model": getattr(getattr(model, "config", None), "_name_or_path", "")}
    return nmap


# ------------------------------------------------------------------------------------------------------------------
# CAR: conditional awareness-based routing


class _CARState:
    def __init__(self, general: torch.Tensor, specific: dict[int, torch.Tensor], all_specific: torch.Tensor):
        self.general, self.specific, self.all_specific = general, specific, all_specific
        self.pair_langs: list[int] | None = None


def _ffn_parts(mlp: nn.Module):
    for g, u, d in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if hasattr(mlp, u) and hasattr(mlp, d):
            return "swiglu", getattr(mlp, g, None), getattr(mlp, u), getattr(mlp, d)
    for a, b in (("c_fc", "c_proj"), ("fc_in", "fc_out"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h")):
        if hasattr(mlp, a) and hasattr(mlp, b):
            return "gelu", None, getattr(mlp, a), getattr(mlp, b)
    raise ValueError(f"CAR: unknown FFN layout {type(mlp).__name__}")


def _car_forward(self, x):
    """FFN(x) = W_out[:, G] act(W_in[G] (g x)) + W_out[:, S] act(W_in[S] ((1-g) x)), g = sigmoid(w.x + b)."""
    kind, gate, up, down = _ffn_parts(self)
    st: _CARState = self._car_state
    cfg = self._car_cfg
    act = getattr(self, "act_fn", None) or getattr(self, "act", None)
    g = torch.sigmoid(self.car_gate(x))

    def inner(z):
        return act(gate(z)) * up(z) if kind == "swiglu" else act(up(z))

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
    from mmt.models import find_ffn

    ffns = find_ffn(model)
    wrapped = []
    for layer in nmap.layers:
        f = ffns[layer]
        unit = next((u for u in nmap.units if u.layer == layer and u.name == f.name), None)
        if unit is None:
            raise ValueError("CAR needs an FFN neuron map (neuron_kind='ffn')")
        owner = nmap.owner[unit.name]
        dev = next(f.module.parameters()).device
        general = (owner < 0).to(dev)
        specific = {li: (owner == li).to(dev) for li in range(len(nmap.languages))}
        mlp = f.module
        mlp.car_gate = nn.Linear(f.d_model, 1).to(device=dev, dtype=next(mlp.parameters()).dtype)
        nn.init.zeros_(mlp.car_gate.weight)
        nn.init.constant_(mlp.car_gate.bias, cfg.car_bias_init)
        mlp._car_state = _CARState(general, specific, owner >= 0)
        mlp._car_state.all_specific = (owner >= 0).to(dev)
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


# ------------------------------------------------------------------------------------------------------------------
# prepare


def prepare(model: nn.Module, config: Config, tokenizer=None, *, data_dir: str | Path | None = None,
            directions: list[tuple[str, str]] | None = None) -> tuple[nn.Module, TrainingPlan]:
    """Freeze all but the selected layers and return a plan that switches neuron selections per language pair."""
    from mmt_kernels import NeuronSparseAdamW

    if config.neurons_file:
        nmap = NeuronMap.load(config.neurons_file)
    else:
        if tokenizer is None:
            raise ValueError("landermt: set method.neurons_file (from `mmt detect`) or pass a tokenizer so that "
                             "prepare() can detect neurons itself")
        nmap = run_detection(model, tokenizer, config, data_dir=data_dir, directions=directions)
        if config.detect_output:
            nmap.save(config.detect_output)
            nmap.plot(Path(config.detect_output).with_suffix(".png"))
    if config.layers is not None and sorted(set(config.layers)) != nmap.layers:
        raise ValueError(f"landermt: method.layers {config.layers} differs from the neuron file's layers "
                         f"{nmap.layers}")
    kind = nmap.config.get("method", {}).get("neuron_kind", config.neuron_kind)
    if kind != config.neuron_kind:
        raise ValueError(f"landermt: neuron file was detected with neuron_kind={kind!r}, config says "
                         f"{config.neuron_kind!r}")
    from mmt.models import decoder_layers

    prefix, blocks = decoder_layers(model)
    if max(nmap.layers) >= len(blocks):
        raise ValueError(f"landermt: the neuron file selects layers {nmap.layers} but the model has {len(blocks)}")
    names = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    neuron_params: dict[str, tuple[str, int]] = {}  # param name -> (unit, neuron_dim)
    for u in nmap.units:
        for pname, nd in u.params:
            if pname not in names:
                raise ValueError(f"landermt: parameter {pname} of the neuron file is not in this model")
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
    cache: dict[tuple[str, str], tuple[dict, dict]] = {}

    def selection_for(pair: tuple[str, str]):
        if pair not in cache:
            for lang in pair:
                if lang not in nmap.languages:
                    warnings.warn(f"landermt: language {lang!r} of pair {pair} was not among the detection languages "
                                  f"{nmap.languages}; it has no specific neurons", RuntimeWarning, stacklevel=3)
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
        decay, no_decay = [], []
        for p in model_.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": train_cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        dims = {p: nd for p, (_, nd) in by_tensor.items() if p.dim() == 2}
        return NeuronSparseAdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
                                 neuron_dims=dims, strict=config.strict)

    def on_step_start(info: StepInfo, model_: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if info.pair is None:
            raise RuntimeError("landermt needs language-pair-homogeneous steps (sampler 'pair')")
        pair = tuple(info.pair)
        sel, scl = selection_for(pair)
        if isinstance(optimizer, NeuronSparseAdamW):
            optimizer.set_selection(sel, scl or None)
        if car_mlps:
            set_car_pair(car_mlps, nmap, pair)

    neurons_path = Path(config.neurons_file) if config.neurons_file else None

    def save_artifacts(path: Path) -> None:
        out = Path(path) / "landermt_neurons.safetensors"
        if neurons_path is not None and neurons_path.is_file():
            import shutil
            shutil.copyfile(neurons_path, out)
        else:
            nmap.save(out)

    n_spec = sum(int((o >= 0).sum()) for o in nmap.owner.values())
    n_all = sum(o.numel() for o in nmap.owner.values())
    info = {"layers": nmap.layers, "languages": nmap.languages, "neuron_kind": config.neuron_kind,
            "specific neurons": f"{n_spec:,} / {n_all:,}", "neurons_used": config.neurons_used,
            "optimizer": f"NeuronSparseAdamW(strict={config.strict}{', scaled' if config.scaled else ''})",
            "car": config.car}
    plan = TrainingPlan(method="landermt", sampler="pair", build_optimizer=build_optimizer,
                        on_step_start=on_step_start, save_artifacts=save_artifacts, info=info, model=model)
    plan.neuron_map = nmap  # type: ignore[attr-defined]  (for tests and tools)
    plan.selection_for = selection_for  # type: ignore[attr-defined]
    return model, plan


# ------------------------------------------------------------------------------------------------------------------
# CLI: mmt detect


def add_detect_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt detect -c examples/configs/landermt_demo.yaml --output runs/landermt/neurons.safetensors
  mmt detect --model gemma3-270m --languages de en fr --layers 10 11 14 15 --sentences 100
  mmt detect -c my.yaml method.neuron_kind=output method.specific_ratio=0.05

Writes <output> (safetensors: per-module importance [languages, neurons] and owner per neuron), <output>.json
(summary) and <output>.png (heatmap of specific neurons per language and layer). Use it with
method.neurons_file=<output> in `mmt train --method landermt`."""
    p.add_argument("--config", "-c", help="YAML run config (model, data and method sections are used)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. method.n_layers=2")
    p.add_argument("--model", help="model (directory, hub id, .gguf or alias); overrides model.name_or_path")
    p.add_argument("--languages", nargs="+", help="detection languages (ISO 639-1), e.g. de en fr")
    p.add_argument("--layers", nargs="+", type=int, help="explicit layers (0-based); default: select by change")
    p.add_argument("--sentences", type=int, help="FLORES dev sentences per language (default: all)")
    p.add_argument("--neuron-kind", choices=["ffn", "output"], help="FFN neurons or every output channel")
    p.add_argument("--ratio", type=float, help="fraction of language-specific neurons per module (default 0.10)")
    p.add_argument("--output", "-o", default=None, help="neuron file (default <train.output_dir>/neurons.safetensors)")


def run_detect(args: argparse.Namespace) -> int:
    from mmt import languages as L
    from mmt.config import load_config
    from mmt.models import load_model

    ov = list(args.overrides)
    if args.model:
        ov.append(f"model.name_or_path={args.model}")
    if args.languages:
        ov.append("method.languages=[" + ",".join(args.languages) + "]")
    if args.layers:
        ov.append("method.layers=[" + ",".join(str(x) for x in args.layers) + "]")
    if args.sentences is not None:
        ov.append(f"method.detect_sentences={args.sentences}")
    if args.neuron_kind:
        ov.append(f"method.neuron_kind={args.neuron_kind}")
    if args.ratio is not None:
        ov.append(f"method.specific_ratio={args.ratio}")
    cfg = load_config(args.config, ov, method="landermt")
    mcfg: Config = cfg.method  # type: ignore[assignment]
    directions = []
    for src in cfg.data.train:
        for d in src.directions:
            directions.append(L.parse_direction(d))
    model, tokenizer = load_model(cfg.model)
    nmap = run_detection(model, tokenizer, mcfg, data_dir=cfg.data.data_dir, directions=directions or None,
                         template=cfg.data.template)
    out = Path(args.output or Path(cfg.train.output_dir) / "neurons.safetensors")
    nmap.save(out)
    png = nmap.plot(out.with_suffix(".png"))
    counts = nmap.counts()
    print(f"layers {nmap.layers}; languages {nmap.languages}; detection took {nmap.config.get('seconds')}s")
    for li, lang in enumerate(nmap.languages):
        print(f"  {lang}: specific neurons per layer {counts[li].tolist()}")
    print(f"neurons written to {out} (+ {out.with_suffix('.json').name}, {png.name})")
    return 0
