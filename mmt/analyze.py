"""Conflict and synergy between translation directions, and the direction-aware grouping they suggest.

Direction-aware training (Zheng et al., "Asymmetric Conflict and Synergy in Post-training for LLM-based
Multilingual Machine Translation", Findings of ACL 2025) rests on one observation: XX->En directions
mostly hurt each other (conflict), En->XX directions mostly help each other (synergy). ``mmt analyze``
measures this for a given model, set of directions and data, in the trainable space of a run (LoRA by
default, or a subset of decoder layers):

* **gradient alignment**: cosine of the per-direction gradients, per batch round, mean and spread over
  rounds (D x D, symmetric);
* **transfer**: T[i, j] = (held-out loss drop of i after one optimizer step on j's gradient) / (the drop
  after a step on i's own gradient). Positive = synergy, negative = conflict; asymmetric. The weights
  are restored bit for bit after every step, so memory stays one model plus one set of gradients
  (plus the D flat gradients the alignment needs);
* a suggested XX->En grouping (clusters whose members all transfer positively to each other) as a
  ``method.groups`` snippet for direction-aware training.

Outputs, written atomically to the output folder: ``analysis.json``, ``alignment.png``, ``transfer.png``,
``report.md`` and ``grouping.yaml``. See ``docs/analyze.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmt.errors import ConfigError, DataError, MmtError

PIVOT = "en"
SPACES = ("lora", "layers")
OPTIMIZERS = ("adamw", "sgd")
IGNORE_INDEX = -100


@dataclass
class AnalyzeOptions:
    """What ``mmt analyze`` measures; the model, data, LoRA shape and lr come from the run config.

    directions: directions to compare (e.g. ["de-en", "en-de"]); None = method.directions, else data.train's.
    rounds: gradient batches per direction; alignment is averaged over them (mean and std over rounds) and
        the transfer step uses their mean gradient (one step with gradient accumulation over the rounds).
    batch_size: examples per gradient batch; None = train.micro_batch_size.
    heldout_size: held-out examples per direction (disjoint from the gradient batches).
    space: "lora" (adapters shaped by the method's lora_* fields, or r=16/alpha=32/all-linear) or "layers"
        (all weights of the decoder layers listed in ``layers``).
    optimizer: "adamw" (train.lr, adam_betas, adam_eps, weight_decay; a first AdamW step) or "sgd" (train.lr).
    threshold: two XX->En directions share a group only if both transfers between them exceed this.
    warmup_steps: joint optimizer steps (mixed batches of every analysed direction, train.lr, persistent
        AdamW state) before measuring, to look past the first steps, where every direction learns the
        shared output format and everything transfers to everything.
    """

    directions: list[str] | None = None
    rounds: int = 3
    batch_size: int | None = None
    heldout_size: int = 12
    space: str = "lora"
    layers: list[int] | None = None
    optimizer: str = "adamw"
    threshold: float = 0.0
    warmup_steps: int = 0
    output_dir: str | None = None  # default: <train.output_dir>/analyze
    progress: bool = True

    def validate(self) -> None:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"analyze: {key}: {msg}")

        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.heldout_size >= 2, "heldout_size", f"must be >= 2 (the spread needs two), got {self.heldout_size}")
        check(self.space in SPACES, "space", f"must be one of {SPACES}, got {self.space!r}")
        check(self.space != "layers" or bool(self.layers), "layers", "space 'layers' needs layer indices, e.g. 10 11")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(math.isfinite(self.threshold), "threshold", "must be a finite number")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class StepRule:
    """One optimizer step from a fresh state (the first step of a training run)."""

    kind: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def make(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


# ------------------------------------------------------------------------------------------
# losses, gradients and the exact restore


def _needs_full_logits(model: nn.Module) -> bool:
    """Architectures whose logits are more than ``lm_head(hidden)`` take the model's own forward."""
    cfg = getattr(model, "config", None)
    scaled = any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling"))
    split = (
        hasattr(model, "get_decoder") and model.get_decoder() is not None and model.get_output_embeddings() is not None
    )
    return scaled or not split


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every label token and the example each belongs to: (losses [T], example ids [T]).

    Only the positions that carry a label go through the output layer: with a large vocabulary that layer
    is most of the cost, and translation prompts are most of the tokens.
    """
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(target)[keep]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _needs_full_logits(base):
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][keep]
    else:
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        cap = getattr(base.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    losses = nn.functional.cross_entropy(logits.float(), target[keep], reduction="none")
    return losses, rows


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean label-token loss of each example (no gradient)."""
    with torch.no_grad():
        losses, rows = token_losses(model, batch)
    n = batch["labels"].shape[0]
    total = torch.zeros(n).index_add_(0, rows, losses.detach())
    count = torch.zeros(n).index_add_(0, rows, torch.ones_like(losses))
    if bool((count == 0).any()):
        raise DataError("analyze: a held-out example has no target tokens (raise data.max_length)")
    return total / count


def flat_gradient(model: nn.Module, params: Sequence[nn.Parameter], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gradient of the batch's mean label-token loss (what the trainer minimises) as one fp32 vector."""
    for p in params:
        p.grad = None
    losses, _ = token_losses(model, batch)
    loss = losses.mean()
    if not torch.isfinite(loss):
        raise MmtError(f"analyze: the loss is {loss.item()} on a gradient batch; check the model and data")
    loss.backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    for p in params:
        p.grad = None
    return flat


class Snapshot:
    """A copy of the trainable tensors; ``restore()`` writes them back bit for bit."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)
        self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        for p, s in zip(self.params, self.saved):
            p.copy_(s)


def take_step(params: Sequence[nn.Parameter], flat_grad: torch.Tensor, rule: StepRule) -> None:
    """One optimizer step of ``rule`` (fresh state) along ``flat_grad``."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat_grad[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    rule.make(list(params)).step()
    for p in params:
        p.grad = None


def warm_up(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[dict[str, torch.Tensor]],
    rule: StepRule,
    max_grad_norm: float = 0.0,
    progress: bool = False,
) -> list[float]:
    """Joint training steps (one optimizer, its state kept across steps); returns the loss of each step."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()  # no dropout, like the measurement that follows
    optimizer = rule.make(list(params))
    losses = []
    try:
        for batch in tqdm(batches, desc="warm-up", unit="step", disable=not progress, dynamic_ncols=True):
            optimizer.zero_grad(set_to_none=True)
            token, _ = token_losses(model, batch)
            loss = token.mean()
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return losses


@dataclass
class Measurement:
    """Raw measurements over D directions (index order = ``directions``).

    cos: [R, D, D] cosine of the round-r gradients; cos_mean_grad: [D, D] cosine of the mean gradients;
    base: D arrays of per-example held-out losses; delta: [D, D] arrays (row i, column j) of per-example
    loss drops of i's held-out examples after a step on j (positive = the loss went down).
    """

    directions: list[str]
    cos: np.ndarray
    cos_mean_grad: np.ndarray
    grad_norms: np.ndarray
    base: list[np.ndarray]
    delta: list[list[np.ndarray]]


def _cosines(grads: torch.Tensor) -> np.ndarray:
    g = grads.double()
    norms = g.norm(dim=1)
    if bool((norms == 0).any()):
        raise MmtError("analyze: a direction has an all-zero gradient in the chosen parameter space")
    return ((g @ g.T) / (norms[:, None] * norms[None, :])).numpy()


def measure(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    directions: Sequence[str],
    grad_batches: dict[str, list[dict[str, torch.Tensor]]],
    heldout: dict[str, dict[str, torch.Tensor]],
    rule: StepRule,
    progress: bool = False,
) -> Measurement:
    """Gradient alignment per round and one-step transfer between every pair of ``directions``.

    The model is put in eval mode (no dropout: the numbers are deterministic) and left with exactly the
    weights it came with.
    """
    from tqdm.auto import tqdm

    dirs = list(directions)
    d, rounds = len(dirs), len(grad_batches[dirs[0]])
    was_training = model.training
    model.eval()
    snap = Snapshot(params)
    bar = tqdm(total=d * rounds + d + d * d, desc="analyze", unit="pass", disable=not progress, dynamic_ncols=True)
    try:
        cos = np.zeros((rounds, d, d))
        norms = np.zeros((rounds, d))
        mean_grads: torch.Tensor | None = None
        for r in range(rounds):
            bar.set_postfix_str(f"gradients, round {r + 1}/{rounds}")
            grads = []
            for name in dirs:
                grads.append(flat_gradient(model, params, grad_batches[name][r]))
                bar.update()
            stacked = torch.stack(grads)
            del grads
            cos[r] = _cosines(stacked)
            norms[r] = stacked.norm(dim=1).numpy()
            mean_grads = stacked / rounds if mean_grads is None else mean_grads.add_(stacked / rounds)
            del stacked
        assert mean_grads is not None
        bar.set_postfix_str("held-out losses")
        base = []
        for name in dirs:
            base.append(example_losses(model, heldout[name]).numpy())
            bar.update()
        delta: list[list[np.ndarray]] = [[np.zeros(0)] * d for _ in range(d)]
        for j, name in enumerate(dirs):
            bar.set_postfix_str(f"step on {name}")
            take_step(params, mean_grads[j], rule)
            for i, other in enumerate(dirs):
                delta[i][j] = base[i] - example_losses(model, heldout[other]).numpy()
                bar.update()
            snap.restore()
        return Measurement(dirs, cos, _cosines(mean_grads), norms, base, delta)
    finally:
        snap.restore()
        bar.close()
        model.train(was_training)


# ------------------------------------------------------------------------------------------
# matrices, blocks, grouping


def side(direction: str) -> str:
    """ "xx-en", "en-xx" or "other" for a direction like "de-en"."""
    src, tgt = direction.split("-")
    if tgt == PIVOT and src != PIVOT:
        return "xx-en"
    if src == PIVOT and tgt != PIVOT:
        return "en-xx"
    return "other"


def ordered(directions: Sequence[str]) -> list[str]:
    """XX->En first, then En->XX, then the rest; input order kept within each block."""
    rank = {"xx-en": 0, "en-xx": 1, "other": 2}
    return sorted(dict.fromkeys(directions), key=lambda x: rank[side(x)])


def transfer_matrix(m: Measurement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, standard error of T, raw mean loss drop) with T[i, j] = drop_i(step j) / drop_i(step i).

    The standard error is over held-out examples. A row whose own step does not lower its held-out loss by
    more than two standard errors cannot be normalised (dividing by a drop near zero blows the row up) and
    is NaN; its raw drops stay in ``loss_drop``.
    """
    d = len(m.directions)
    raw = np.array([[m.delta[i][j].mean() for j in range(d)] for i in range(d)])
    t, se = np.full((d, d), np.nan), np.full((d, d), np.nan)
    for i in range(d):
        own = raw[i, i]
        own_se = m.delta[i][i].std(ddof=1) / math.sqrt(len(m.delta[i][i]))
        if not own > 2 * own_se:
            continue
        for j in range(d):
            x = m.delta[i][j]
            t[i, j] = x.mean() / own
            se[i, j] = x.std(ddof=1) / math.sqrt(len(x)) / own
    return t, se, raw


def block_summary(matrix: np.ndarray, directions: Sequence[str], se: np.ndarray | None = None) -> dict[str, Any]:
    """Mean, min, max and share of negative off-diagonal entries within and between the XX->En / En->XX blocks."""
    sides = [side(x) for x in directions]
    out: dict[str, Any] = {}
    for a in ("xx-en", "en-xx"):
        for b in ("xx-en", "en-xx"):
            cells = [
                (i, j)
                for i in range(len(sides))
                for j in range(len(sides))
                if i != j and sides[i] == a and sides[j] == b and np.isfinite(matrix[i, j])
            ]
            key = a if a == b else f"{a} <- {b}"
            if not cells:
                out[key] = None
                continue
            vals = np.array([matrix[i, j] for i, j in cells])
            entry = {
                "mean": float(vals.mean()),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "negative_share": float((vals < 0).mean()),
                "n": len(cells),
            }
            if se is not None:  # standard error of the block mean, treating entries as independent
                entry["se"] = float(math.sqrt(sum(se[i, j] ** 2 for i, j in cells)) / len(cells))
            out[key] = entry
    return out


def suggest_groups(transfer: np.ndarray, directions: Sequence[str], threshold: float = 0.0) -> dict[str, list[str]]:
    """Cluster XX->En directions so that every pair inside a cluster transfers positively both ways.

    Complete-linkage agglomeration on the mutual score min(T[a, b], T[b, a]): the two clusters whose
    weakest cross pair is strongest merge while that pair exceeds ``threshold``. Returns {name: [codes]}
    with every XX->En source language in exactly one group (singletons included), as ``method.groups``
    of direction-aware training takes it.
    """
    idx = [i for i, x in enumerate(directions) if side(x) == "xx-en"]
    mutual = np.minimum(transfer, transfer.T)
    mutual = np.where(np.isfinite(mutual), mutual, -np.inf)
    clusters = [[i] for i in idx]
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = min(mutual[i, j] for i in clusters[a] for j in clusters[b])
                if link > best:
                    best, pair = link, (a, b)
        if pair is None or not best > threshold:
            break
        a, b = pair
        clusters[a] = clusters[a] + clusters.pop(b)
    groups = {}
    for cl in sorted(clusters, key=lambda c: min(c)):
        langs = [directions[i].split("-")[0] for i in sorted(cl)]
        groups["_".join(langs)] = langs
    return groups


def grouping_yaml(groups: dict[str, list[str]], threshold: float) -> str:
    import yaml

    head = (
        "# XX->En grouping suggested by `mmt analyze`: languages in one group transfer positively to each\n"
        f"# other (both ways, above {threshold:g}). Paste into a direction-aware config\n"
        "# (method.name: directional).\n"
    )
    body = {"method": {"name": "directional", "separate_unit": "group", "groups": groups}}
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------------
# data and model


def _directions(cfg: Any, options: AnalyzeOptions, in_data: Sequence[str]) -> list[str]:
    """--directions, else method.directions, else data.train's listed directions, else those found in the data."""
    from mmt import languages as L

    items = options.directions or getattr(cfg.method, "directions", None)
    if not items:
        items = [x for src in cfg.data.train if src.kind != "mono" for x in src.directions] or list(in_data)
    dirs = []
    for x in items:
        try:
            dirs.append("-".join(L.parse_direction(x)))
        except ValueError as exc:
            raise ConfigError(f"analyze: direction {x!r}: {exc}") from None
    dirs = ordered(dirs)
    if len(dirs) < 2:
        raise ConfigError(
            f"analyze: needs at least two directions, got {dirs}; list them in "
            "data.train[*].directions or pass --directions"
        )
    return dirs


def load_examples(cfg: Any, options: AnalyzeOptions, batch_size: int) -> dict[str, list[Any]]:
    """The examples each analysed direction needs (held-out, gradient rounds, its share of the warm-up
    batches) from the sources of data.train, in a seeded random order."""
    from mmt.data import load_source, resolve_data_dir

    if not cfg.data.train:
        raise ConfigError("analyze: data.train is empty: list at least one source (kind, directions, ...)")
    data_dir = resolve_data_dir(
        cfg.data.data_dir,
        required=any(s.kind != "hf" and not (s.path and Path(s.path).is_absolute()) for s in cfg.data.train),
    )
    found: dict[str, list[Any]] = {}
    for src in cfg.data.train:
        if src.kind == "mono":
            continue
        for ex in load_source(
            src, data_dir, max_chars=cfg.data.max_chars, on_bad_line=cfg.data.on_bad_line, seed=cfg.data.seed
        ):
            found.setdefault(f"{ex.src_lang}-{ex.tgt_lang}", []).append(ex)
    directions = _directions(cfg, options, found)
    needed = (
        options.heldout_size
        + options.rounds * batch_size
        + math.ceil(options.warmup_steps * batch_size / len(directions))
    )
    short = {k: len(found.get(k, [])) for k in directions if len(found.get(k, [])) < needed}
    if short:
        raise DataError(
            f"analyze: too few examples in data.train for {short} (need {needed} per direction: "
            "heldout_size + rounds x batch_size + warm-up share); add data or lower "
            "--rounds/--batch-size/--heldout-size/--warmup-steps"
        )
    rng = np.random.default_rng(cfg.data.seed)
    return {k: [found[k][i] for i in rng.permutation(len(found[k]))[:needed]] for k in directions}


def encode_batches(
    cfg: Any, tokenizer: Any, examples: dict[str, list[Any]], options: AnalyzeOptions, batch_size: int
) -> tuple[dict[str, list[dict]], dict[str, dict], list[dict]]:
    """(gradient batches per direction, held-out batch per direction, mixed warm-up batches), tokenised like
    training data. The examples of a direction are used in this order: held-out, gradient rounds, warm-up."""
    from mmt.data import build_prompt, collate, encode_pair, pad_token_id

    pad = pad_token_id(tokenizer)

    def batch(items: list[Any]) -> dict[str, torch.Tensor]:
        feats = [
            encode_pair(
                tokenizer,
                build_prompt(cfg.data.template, ex.src_lang, ex.tgt_lang, ex.src),
                ex.tgt,
                max_length=cfg.data.max_length,
                loss_on=cfg.data.loss_on,
            )
            for ex in items
        ]
        return collate(feats, pad)

    grads, held = {}, {}
    pool: list[list[Any]] = []
    for name, items in examples.items():
        h = options.heldout_size
        held[name] = batch(items[:h])
        grads[name] = [batch(items[h + r * batch_size : h + (r + 1) * batch_size]) for r in range(options.rounds)]
        pool.append(items[h + options.rounds * batch_size :])
    mixed = [ex for group in zip(*pool) for ex in group]  # round-robin over directions
    warm = [batch(mixed[s * batch_size : (s + 1) * batch_size]) for s in range(options.warmup_steps)]
    return grads, held, warm


def trainable_space(model: nn.Module, cfg: Any, options: AnalyzeOptions) -> tuple[nn.Module, list[nn.Parameter], str]:
    """Make the analysed parameters trainable: LoRA adapters (peft, as direction-aware training builds them)
    or every weight of the chosen decoder layers. Returns (model, parameters, description)."""
    if options.space == "lora":
        from peft import LoraConfig, get_peft_model

        m = cfg.method
        r, alpha = getattr(m, "lora_r", 16), getattr(m, "lora_alpha", 32)
        targets = getattr(m, "lora_target_modules", "all-linear")
        torch.manual_seed(cfg.train.seed)  # the LoRA A initialisation, reproducibly
        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
        )
        what = f"LoRA r={r} alpha={alpha} targets={targets}"
    else:
        from mmt.models import decoder_layers

        _, layers = decoder_layers(model)
        bad = [i for i in options.layers or [] if not -len(layers) <= i < len(layers)]
        if bad:
            raise ConfigError(f"analyze: layers {bad} out of range; the model has {len(layers)} decoder layers")
        for p in model.parameters():
            p.requires_grad_(False)
        for i in options.layers or []:
            for p in layers[i].parameters():
                p.requires_grad_(True)
        what = f"all weights of decoder layers {sorted(options.layers or [])}"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"analyze: no trainable parameters in space {options.space!r}")
    return model, params, what


# ------------------------------------------------------------------------------------------
# the whole analysis


@dataclass
class Analysis:
    directions: list[str]
    settings: dict[str, Any]
    alignment: np.ndarray
    alignment_std: np.ndarray
    alignment_mean_grad: np.ndarray
    transfer: np.ndarray
    transfer_se: np.ndarray
    loss_drop: np.ndarray
    heldout_loss: list[float]
    grad_norms: np.ndarray
    groups: dict[str, list[str]]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def blocks(self) -> dict[str, Any]:
        return {
            "transfer": block_summary(self.transfer, self.directions, self.transfer_se),
            "loss_drop": block_summary(self.loss_drop, self.directions),
            "alignment": block_summary(self.alignment, self.directions),
        }

    def verdict(self) -> dict[str, Any]:
        """Does XX->En show more conflict (lower mean off-diagonal transfer) than En->XX?"""
        t = self.blocks["transfer"]
        xx, ex = t.get("xx-en"), t.get("en-xx")
        if not xx or not ex:
            return {"answer": None, "text": "needs at least two XX->En and two En->XX directions to compare"}
        diff = ex["mean"] - xx["mean"]
        se = math.sqrt(xx["se"] ** 2 + ex["se"] ** 2)
        answer = bool(diff > 0)
        clear = abs(diff) > 2 * se
        text = (
            f"XX->En {'shows more' if answer else 'does not show more'} conflict than En->XX: mean off-diagonal "
            f"transfer {xx['mean']:+.3f} within XX->En vs {ex['mean']:+.3f} within En->XX "
            f"(difference {diff:+.3f} +- {se:.3f}, {'beyond' if clear else 'within'} two standard errors); "
            f"negative entries {xx['negative_share']:.0%} of {xx['n']} within XX->En vs "
            f"{ex['negative_share']:.0%} of {ex['n']} within En->XX"
        )
        align = self.blocks["alignment"]
        if align.get("xx-en") and align.get("en-xx"):
            text += (
                f"; mean gradient cosine {align['xx-en']['mean']:+.3f} within XX->En vs "
                f"{align['en-xx']['mean']:+.3f} within En->XX"
            )
        return {"answer": answer, "clear": clear, "difference": diff, "se": se, "text": text}

    @property
    def unnormalised(self) -> list[str]:
        """Directions whose own step did not clearly lower their held-out loss (NaN rows of ``transfer``)."""
        return [x for i, x in enumerate(self.directions) if not np.isfinite(self.transfer[i, i])]

    def to_dict(self) -> dict[str, Any]:
        def arr(x: np.ndarray) -> Any:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(x)]

        return {
            "directions": self.directions,
            "settings": self.settings,
            "alignment": {
                "mean": arr(self.alignment),
                "std_over_rounds": arr(self.alignment_std),
                "of_mean_gradients": arr(self.alignment_mean_grad),
            },
            "transfer": {
                "normalised": arr(self.transfer),
                "se": arr(self.transfer_se),
                "loss_drop": arr(self.loss_drop),
            },
            "unnormalised_rows": self.unnormalised,
            "heldout_loss": self.heldout_loss,
            "grad_norms": arr(self.grad_norms),
            "blocks": self.blocks,
            "verdict": self.verdict(),
            "groups": self.groups,
            "seconds": self.seconds,
        }


def summarise(m: Measurement, settings: dict[str, Any], threshold: float = 0.0) -> Analysis:
    t, se, raw = transfer_matrix(m)
    std = m.cos.std(axis=0, ddof=1) if m.cos.shape[0] > 1 else np.zeros_like(m.cos[0])
    return Analysis(
        directions=list(m.directions),
        settings=settings,
        alignment=m.cos.mean(axis=0),
        alignment_std=std,
        alignment_mean_grad=m.cos_mean_grad,
        transfer=t,
        transfer_se=se,
        loss_drop=raw,
        heldout_loss=[float(b.mean()) for b in m.base],
        grad_norms=m.grad_norms,
        groups=suggest_groups(t, m.directions, threshold),
    )


def analyze(
    cfg: Any, options: AnalyzeOptions | None = None, *, model: nn.Module | None = None, tokenizer: Any = None
) -> Analysis:
    """Measure alignment and transfer for the directions of ``cfg`` (a :class:`mmt.config.RunConfig`).

    ``model``/``tokenizer`` default to ``cfg.model``; a given model gets LoRA adapters injected (space
    "lora") or its requires_grad flags changed (space "layers"); its weights are left as they were.
    """
    options = options or AnalyzeOptions()
    options.validate()
    t0 = time.perf_counter()
    batch_size = options.batch_size or cfg.train.micro_batch_size
    examples = load_examples(cfg, options, batch_size)
    directions = list(examples)
    if model is None:
        from mmt.models import load_model

        model, tokenizer = load_model(cfg.model)
    if tokenizer is None:
        raise ConfigError("analyze: a model passed in needs its tokenizer")
    t_load = time.perf_counter()
    grad_batches, heldout, warm_batches = encode_batches(cfg, tokenizer, examples, options, batch_size)
    model, params, space = trainable_space(model, cfg, options)
    rule = StepRule(
        kind=options.optimizer,
        lr=float(cfg.train.lr),
        betas=tuple(cfg.train.adam_betas),
        eps=float(cfg.train.adam_eps),
        weight_decay=float(cfg.train.weight_decay),
    )
    _check_loss_path(model, heldout[directions[0]])
    warm_losses = []
    t_warm = time.perf_counter()
    if warm_batches:
        adamw = StepRule("adamw", rule.lr, rule.betas, rule.eps, rule.weight_decay)  # what training uses
        warm_losses = warm_up(model, params, warm_batches, adamw, float(cfg.train.max_grad_norm), options.progress)
    t_measure = time.perf_counter()
    m = measure(model, params, directions, grad_batches, heldout, rule, progress=options.progress)
    t_end = time.perf_counter()
    settings = {
        "model": cfg.model.name_or_path,
        "config": getattr(cfg, "source", None),
        "space": space,
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "rounds": options.rounds,
        "batch_size": batch_size,
        "heldout_size": options.heldout_size,
        "step": asdict(rule),
        "template": cfg.data.template,
        "loss_on": cfg.data.loss_on,
        "threshold": options.threshold,
        "seed": cfg.data.seed,
        "warmup_steps": options.warmup_steps,
        "warmup_losses": warm_losses,
    }
    result = summarise(m, settings, options.threshold)
    result.seconds = {
        "load": round(t_load - t0, 1),
        "warmup": round(t_measure - t_warm, 1),
        "measure": round(t_end - t_measure, 1),
        "total": round(t_end - t0, 1),
    }
    return result


def _check_loss_path(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The label-only loss must equal the model's own loss; refuse to report numbers from a wrong one."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        mine, _ = token_losses(model, batch)
        theirs = model(**batch).loss
    model.train(was_training)
    if not torch.allclose(mine.mean(), theirs.float(), rtol=1e-4, atol=1e-5):
        raise MmtError(
            f"analyze: the label-token loss ({mine.mean().item():.6f}) differs from the model's own loss "
            f"({theirs.item():.6f}) for {type(model).__name__}; this architecture is not supported"
        )


# ------------------------------------------------------------------------------------------
# outputs


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_matrix(
    matrix: np.ndarray,
    directions: Sequence[str],
    path: Path,
    *,
    title: str,
    spread: np.ndarray | None = None,
    colorbar: str = "",
) -> Path:
    """Diverging heatmap (0 = white) with the XX->En and En->XX blocks outlined and their labels coloured.

    The colour scale spans the off-diagonal entries (the diagonal is 1 by definition and saturates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmt.plots import save_figure

    m = np.asarray(matrix, dtype=float)
    d = len(directions)
    off = m[~np.eye(d, dtype=bool) & np.isfinite(m)]
    finite = np.abs(off) if off.size else np.abs(m[np.isfinite(m)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig, ax = plt.subplots(figsize=(2.4 + 0.95 * d, 2.0 + 0.8 * d))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu", vmin=-vmax, vmax=vmax)
    fig.colorbar(im, ax=ax, label=colorbar)
    ax.set_xticks(range(d), directions, rotation=45, ha="right")
    ax.set_yticks(range(d), directions)
    for i in range(d):
        for j in range(d):
            if not np.isfinite(m[i, j]):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7)
                continue
            label = f"{m[i, j]:.2f}" + (f"\n±{spread[i, j]:.2f}" if spread is not None and i != j else "")
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="w" if abs(m[i, j]) > 0.6 * vmax else "k")
    sides = [side(x) for x in directions]
    colors = {"xx-en": "#c45a00", "en-xx": "#1b7a3a"}
    present = []
    for name, color in colors.items():
        idx = [i for i, s in enumerate(sides) if s == name]
        if idx:
            lo, hi = min(idx) - 0.5, max(idx) + 0.5
            ax.add_patch(matplotlib.patches.Rectangle((lo, lo), hi - lo, hi - lo, fill=False, lw=2.5, ec=color))
            present.append("XX→En (orange)" if name == "xx-en" else "En→XX (green)")
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, s in zip(ticks, sides):
            tick.set_color(colors.get(s, "k"))
    ax.set_title(title + ("\nblocks: " + ", ".join(present) if present else ""), fontsize=10)
    ax.set_xlabel("step / gradient of direction (column)")
    ax.set_ylabel("measured on direction (row)")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_figure(fig, tmp)
    os.replace(tmp, path)
    return path


def _table(matrix: np.ndarray, directions: Sequence[str], spread: np.ndarray | None = None) -> str:
    lines = ["| row \\ column | " + " | ".join(directions) + " |", "|---" * (len(directions) + 1) + "|"]
    for i, name in enumerate(directions):
        cells = []
        for j in range(len(directions)):
            v = matrix[i, j]
            cell = "n/a" if not np.isfinite(v) else f"{v:+.3f}"
            if spread is not None and i != j and np.isfinite(spread[i, j]):
                cell += f" ± {spread[i, j]:.3f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(a: Analysis) -> str:
    s = a.settings
    blocks = a.blocks
    lines = [
        "# Conflict and synergy between directions",
        "",
        (
            f"Model `{s['model']}`, trainable space: {s['space']} ({s['trainable_parameters']:,} parameters). "
            f"{s['rounds']} gradient batches of {s['batch_size']} per direction, {s['heldout_size']} held-out "
            f"examples per direction, one {s['step']['kind']} step at lr {s['step']['lr']:g}"
            + (
                f", after {s['warmup_steps']} joint warm-up steps (loss {s['warmup_losses'][0]:.3f} -> "
                f"{s['warmup_losses'][-1]:.3f})."
                if s.get("warmup_steps")
                else ", from the start of training."
            )
        ),
        "",
        "## Verdict",
        "",
        a.verdict()["text"] + ".",
        "",
        "## Transfer",
        "",
        (
            "T[row, column] = drop of the row direction's held-out loss after one step on the column direction's "
            "gradient, divided by the drop after a step on its own (positive = synergy, negative = conflict); "
            "± is the standard error over held-out examples."
        ),
        "",
        _table(a.transfer, a.directions, a.transfer_se),
        "",
        *(
            [
                (
                    f"Rows not normalised (their own step did not lower their held-out loss by two standard errors): "
                    f"{', '.join(a.unnormalised)}; see the raw drops below."
                ),
                "",
            ]
            if a.unnormalised
            else []
        ),
        "Raw held-out loss drop (nats) of the row after a step on the column:",
        "",
        _table(a.loss_drop, a.directions),
        "",
        "## Gradient alignment",
        "",
        "Cosine of the per-direction gradients, mean ± standard deviation over gradient batches.",
        "",
        _table(a.alignment, a.directions, a.alignment_std),
        "",
        "## Blocks (off-diagonal entries)",
        "",
        "| matrix | block | mean | min | max | negative share |",
        "|---|---|---|---|---|---|",
    ]
    for matrix in ("transfer", "loss_drop", "alignment"):
        for block, e in blocks[matrix].items():
            if e:
                lines.append(
                    f"| {matrix} | {block} | {e['mean']:+.3f} | {e['min']:+.3f} | {e['max']:+.3f} | "
                    f"{e['negative_share']:.0%} |"
                )
    lines += [
        "",
        "## Suggested XX->En grouping",
        "",
        (
            "Groups whose members all transfer positively to each other (both ways); `grouping.yaml` holds "
            "the `method.groups` snippet for direction-aware training."
        ),
        "",
    ]
    lines += [f"- `{name}`: {', '.join(langs)}" for name, langs in a.groups.items()] or ["- (no XX->En directions)"]
    lines += [
        "",
        (
            f"Time: {a.seconds.get('total', 0):.0f} s ({a.seconds.get('warmup', 0):.0f} s warm-up, "
            f"{a.seconds.get('measure', 0):.0f} s measuring)."
        ),
        "",
    ]
    return "\n".join(lines)


def write_outputs(a: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """Write analysis.json, alignment.png, transfer.png, report.md and grouping.yaml; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "analysis.json",
        "alignment": out / "alignment.png",
        "transfer": out / "transfer.png",
        "report": out / "report.md",
        "grouping": out / "grouping.yaml",
    }
    _atomic_write(files["json"], json.dumps(a.to_dict(), indent=1))
    plot_matrix(
        a.alignment,
        a.directions,
        files["alignment"],
        spread=a.alignment_std,
        colorbar="cosine",
        title="gradient alignment (cosine, mean ± std over batches)",
    )
    plot_matrix(
        a.transfer,
        a.directions,
        files["transfer"],
        spread=a.transfer_se,
        colorbar="normalised transfer",
        title="transfer: held-out loss drop of row after a step on column / own step",
    )
    _atomic_write(files["report"], report_markdown(a))
    _atomic_write(files["grouping"], grouping_yaml(a.groups, a.settings.get("threshold", 0.0)))
    return files


# ------------------------------------------------------------------------------------------
# command line


def add_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt analyze -c examples/configs/analyze_demo.yaml
  mmt analyze -c my_directional.yaml --directions de-en fr-en tr-en en-de en-fr en-tr --rounds 4
  mmt analyze -c my.yaml --space layers --layers 10 11 train.lr=1e-4

Writes analysis.json, alignment.png, transfer.png, report.md and grouping.yaml (a method.groups snippet
for direction-aware training) to --output-dir (default <train.output_dir>/analyze)."""
    p.add_argument("--config", "-c", help="YAML run config (model, data.train, train.lr, method.lora_*)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    d = AnalyzeOptions()
    p.add_argument("--directions", nargs="+", help="directions to compare (default: those of data.train)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"gradient batches per direction ({d.rounds})")
    p.add_argument("--batch-size", type=int, help="examples per gradient batch (default train.micro_batch_size)")
    p.add_argument(
        "--heldout-size", type=int, default=d.heldout_size, help=f"held-out examples per direction ({d.heldout_size})"
    )
    p.add_argument("--space", choices=SPACES, default=d.space, help="parameters analysed (default lora)")
    p.add_argument("--layers", type=int, nargs="+", help="decoder layer indices for --space layers")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="the probe step (default adamw)")
    p.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        help="minimum mutual transfer for two XX->En directions to share a group (0)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="joint AdamW steps over all directions before measuring (0: measure at the start)",
    )
    p.add_argument("--output-dir", help="where to write the results (default <train.output_dir>/analyze)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_analyze(args: argparse.Namespace) -> int:
    from mmt.config import load_config

    cfg = load_config(args.config, args.overrides)
    options = AnalyzeOptions(
        directions=args.directions,
        rounds=args.rounds,
        batch_size=args.batch_size,
        heldout_size=args.heldout_size,
        space=args.space,
        layers=args.layers,
        optimizer=args.optimizer,
        threshold=args.threshold,
        warmup_steps=args.warmup_steps,
        output_dir=args.output_dir,
        progress=not args.no_progress,
    )
    result = analyze(cfg, options)
    out = Path(options.output_dir or Path(cfg.train.output_dir) / "analyze")
    files = write_outputs(result, out)
    print(result.verdict()["text"])
    print("suggested XX->En groups: " + "; ".join(f"{k}: {v}" for k, v in result.groups.items()))
    print(f"written to {out}: " + ", ".join(p.name for p in files.values()) + f" ({result.seconds['total']:.0f} s)")
    return 0
