"""Detection of language-aware neurons: layer selection by representation change, first-order Taylor
importance per language (fused ``mmt_kernels.TaylorHook``), categorisation; and the ``mmt detect`` command."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mmt import languages as L
from mmt.config import load_config, overrides_from_args
from mmt.data import build_prompt, collate, encode_mono, load_flores, pad_token_id, resolve_data_dir
from mmt.errors import ConfigError, MethodError
from mmt.models import decoder_layers, load_model
from mmt_kernels import TaylorHook, token_weights

from .config import Config
from .neurons import NeuronMap, categorise, neuron_units


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _encode(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    feats = [encode_mono(tokenizer, t, max_length=max_length) for t in texts]
    batch = collate(feats, pad_token_id(tokenizer))
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def select_layers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    n_layers: int,
    metric: str = "mean_abs_change",
    batch_size: int = 8,
    max_length: int = 256,
) -> tuple[list[int], list[float]]:
    """Blocks with the largest representation change across them on ``prompts``: (sorted top-n, change per block)."""
    _, blocks = decoder_layers(model)
    n = len(blocks)
    device = next(model.parameters()).device
    sums_in, sums_out, rel = (
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
    )
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


class _HeadAwareTaylorHook(TaylorHook):
    """A TaylorHook that also scores per-head activations: a ``[B, H, T, D]`` output (Gemma 3's q_norm/k_norm
    after the heads are split off) or ``[B, T, H, D]`` counts each of the D channels over every head and token,
    each token's weight repeated for its H rows."""

    def _attach(self, t):
        if isinstance(t, tuple):
            t = t[0]
        w = self.token_weight
        if not (isinstance(t, torch.Tensor) and t.dim() == 4 and w is not None):
            return super()._attach(t)
        if t.shape[0] * t.shape[2] == w.numel():  # [B, H, T, D]: tokens second to last
            self.transform, heads = (lambda x: x.transpose(1, 2)), t.shape[1]
        elif t.shape[0] * t.shape[1] == w.numel():  # [B, T, H, D]
            self.transform, heads = None, t.shape[2]
        else:
            raise MethodError(f"landermt: cannot align a {tuple(t.shape)} activation with {w.numel()} tokens")
        self.token_weight = w.repeat_interleave(heads)
        try:
            return super()._attach(t)
        finally:
            self.token_weight = w


def detect(
    model: nn.Module,
    tokenizer,
    texts: dict[str, list[str]],
    layers: list[int],
    kind: str = "ffn",
    batch_size: int = 8,
    max_length: int = 256,
    ratio: float = 0.10,
    backend: str | None = None,
    progress: bool = True,
) -> NeuronMap:
    """Taylor importance per language over ``texts`` ({iso: sentences}), then categorisation."""
    units = neuron_units(model, layers, kind)
    if not units:
        raise MethodError(f"landermt: no neuron units in layers {layers} for neuron_kind={kind!r}")
    modules = dict(model.named_modules())
    hooks = {u.name: _HeadAwareTaylorHook(modules[u.hook_module], where=u.hook_where, backend=backend) for u in units}
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
                    tok = nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
                    ).view(labels.shape)
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
    folder = data_dir / cfg.detect_split
    out = {}
    for lang in languages:
        lines = load_flores(folder, [lang])[lang]
        out[lang] = lines[: cfg.detect_sentences] if cfg.detect_sentences else lines
    return out


def _layer_prompts(cfg: Config, data_dir: Path, directions: list[tuple[str, str]], template: str) -> list[str]:
    langs = sorted({x for d in directions for x in d})
    data = load_flores(data_dir / cfg.detect_split, langs)
    prompts = []
    for s, t in directions:
        for i in range(min(cfg.layer_sentences, len(data[s]))):
            prompts.append(build_prompt(template, s, t, data[s][i]) + " " + data[t][i])
    return prompts


def run_detection(
    model: nn.Module,
    tokenizer,
    cfg: Config,
    *,
    data_dir: str | Path | None = None,
    directions: list[tuple[str, str]] | None = None,
    template: str = "T1",
    progress: bool = True,
) -> NeuronMap:
    """Layer selection (unless ``cfg.layers``) + detection on the FLORES dev data under ``data_dir``."""
    root = resolve_data_dir(data_dir)
    langs = [L.normalize(x) for x in (cfg.languages or sorted({x for d in (directions or []) for x in d}))]
    if len(langs) < 2:
        raise ConfigError(
            "landermt: detection needs at least two languages (method.languages or the training directions)"
        )
    t0 = time.time()
    layer_change = None
    if cfg.layers is not None:
        layers = sorted(set(int(x) for x in cfg.layers))
    else:
        dirs = directions or [(a, b) for a in langs for b in langs if a != b]
        prompts = _layer_prompts(cfg, root, dirs, template)
        layers, layer_change = select_layers(
            model, tokenizer, prompts, cfg.n_layers, cfg.layer_metric, cfg.detect_batch_size, cfg.detect_max_length
        )
    nmap = detect(
        model,
        tokenizer,
        _texts(cfg, root, langs),
        layers,
        cfg.neuron_kind,
        cfg.detect_batch_size,
        cfg.detect_max_length,
        cfg.specific_ratio,
        progress=progress,
    )
    nmap.config = {
        "method": cfg.to_dict(),
        "layer_change": layer_change,
        "seconds": round(time.time() - t0, 1),
        "model": getattr(getattr(model, "config", None), "_name_or_path", ""),
    }
    return nmap


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
    ov = overrides_from_args(
        args,
        {
            "model": "model.name_or_path",
            "languages": "method.languages",
            "layers": "method.layers",
            "sentences": "method.detect_sentences",
            "neuron_kind": "method.neuron_kind",
            "ratio": "method.specific_ratio",
        },
    )
    cfg = load_config(args.config, ov, method="landermt")
    mcfg: Config = cfg.method  # type: ignore[assignment]
    directions = []
    for src in cfg.data.train:
        for d in src.directions:
            directions.append(L.parse_direction(d))
    model, tokenizer = load_model(cfg.model)
    nmap = run_detection(
        model, tokenizer, mcfg, data_dir=cfg.data.data_dir, directions=directions or None, template=cfg.data.template
    )
    out = Path(args.output or Path(cfg.train.output_dir) / "neurons.safetensors")
    nmap.save(out)
    png = nmap.plot(out.with_suffix(".png"))
    counts = nmap.counts()
    print(f"layers {nmap.layers}; languages {nmap.languages}; detection took {nmap.config.get('seconds')}s")
    for li, lang in enumerate(nmap.languages):
        print(f"  {lang}: specific neurons per layer {counts[li].tolist()}")
    print(f"neurons written to {out} (+ {out.with_suffix('.json').name}, {png.name})")
    return 0
