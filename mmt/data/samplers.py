"""The tokenised training set and the step samplers (mixed, one language pair per step, monolingual).

Samplers are pure functions of (seed, step, cursors), so a checkpoint only stores a small state dict and a
resumed run sees exactly the same batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmt import languages as L
from mmt.errors import CheckpointError, ConfigError, DataError, MethodError

from .batching import IGNORE_INDEX, encode_mono, encode_pair
from .prompts import PromptBuilder
from .readers import Example, load_source, resolve_data_dir, stable_hash

# --------------------------------------------------------------------------------------------
# training set and samplers


@dataclass
class TrainSet:
    """Tokenised training examples grouped into streams (a direction, or a language for mono)."""

    ids: list[list[int]]
    labels: list[list[int]]
    keys: list[Any]  # per example: direction tuple or language
    streams: dict[Any, list[int]] = field(default_factory=dict)  # key -> example indices
    mono: bool = False

    def __post_init__(self) -> None:
        if not self.streams:
            for i, k in enumerate(self.keys):
                self.streams.setdefault(k, []).append(i)

    def __len__(self) -> int:
        return len(self.ids)

    def label_tokens(self, index: int) -> int:
        """Tokens that carry loss after the causal shift (the first position predicts nothing)."""
        return sum(1 for x in self.labels[index][1:] if x != IGNORE_INDEX)


def filter_directions(
    items: list[Example],
    directions: Sequence[tuple[str, str]] | None = None,
    languages: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
) -> list[Example]:
    """Keep examples whose direction is listed / whose languages are allowed / whose X-ALMA group matches."""
    dset = {(L.normalize(s), L.normalize(t)) for s, t in directions} if directions else None
    lset = {L.normalize(x) for x in languages} if languages else None
    gset = set(groups) if groups else None
    out = []
    for ex in items:
        if dset is not None and ex.direction not in dset:
            continue
        if lset is not None and not (ex.src_lang in lset and ex.tgt_lang in lset):
            continue
        if gset is not None and L.direction_group(ex.src_lang, ex.tgt_lang) not in gset:
            continue
        out.append(ex)
    return out


def build_train_set(data_cfg: Any, tokenizer, *, plan: Any = None, data_dir: Path | None = None) -> TrainSet:
    """Load every source of ``data_cfg.train``, filter, and tokenise with the configured template."""
    if not data_cfg.train:
        raise DataError("data.train is empty: list at least one source (kind, directions, ...)")
    if data_dir is None:
        data_dir = resolve_data_dir(
            data_cfg.data_dir,
            required=any(s.kind != "hf" and not (s.path and Path(s.path).is_absolute()) for s in data_cfg.train),
        )
    mono = plan is not None and plan.sampler == "mono"
    loss_on = plan.loss_on if plan is not None and plan.loss_on else data_cfg.loss_on
    ids, labels, keys = [], [], []
    prompt_of = PromptBuilder(data_cfg.templates or data_cfg.template, tokenizer, seed=data_cfg.seed)
    for src in data_cfg.train:
        if (src.kind == "mono") != mono:
            raise DataError(
                f"data source kind {src.kind!r} does not fit the {'mono' if mono else 'translation'} "
                f"sampler of method {getattr(plan, 'method', '?')!r}"
            )
        items = load_source(
            src, data_dir, max_chars=data_cfg.max_chars, on_bad_line=data_cfg.on_bad_line, seed=data_cfg.seed
        )
        if mono:
            langs = {L.normalize(x) for x in data_cfg.languages} if data_cfg.languages else None
            for ex in items:
                if langs is None or ex.lang in langs:
                    a, b = encode_mono(tokenizer, ex.text, max_length=data_cfg.max_length)
                    ids.append(a), labels.append(b), keys.append(ex.lang)
            continue
        items = filter_directions(
            items, plan.directions if plan is not None else None, data_cfg.languages, data_cfg.groups
        )
        for ex in items:
            prompt = prompt_of(ex.src_lang, ex.tgt_lang, ex.src)
            a, b = encode_pair(tokenizer, prompt, ex.tgt, max_length=data_cfg.max_length, loss_on=loss_on)
            ids.append(a), labels.append(b), keys.append(ex.direction)
    if not ids:
        raise DataError(
            "no training examples left after loading and filtering "
            "(check data.train directions, data.languages, data.groups and the method's directions)"
        )
    return TrainSet(ids, labels, keys, mono=mono)


class _Stream:
    """Endless reshuffled pass over n items; item c is perm(epoch = c // n)[c % n]."""

    def __init__(self, n: int, seed: int, key: int):
        self.n, self.seed, self.key = n, seed, key
        self._epoch, self._perm = -1, None

    def at(self, c: int) -> int:
        epoch = c // self.n
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.key, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[c % self.n])


class StepSampler:
    """Chooses the global batch (example indices) of each optimizer step, deterministically.

    * ``mixed``: temperature 1 walks one shuffled pass over all examples per epoch; other
      temperatures draw a stream per example with p(stream) ~ n^(1/T), then its next example.
    * ``pair``: one stream (direction) per step, ``round_robin`` or by temperature; all examples of
      the step come from it.
    * ``mono``: like ``mixed`` over languages.

    State = step + per-stream cursors; :meth:`state_dict` / :meth:`load_state_dict` for resume.
    """

    def __init__(
        self,
        train_set: TrainSet,
        batch_size: int,
        *,
        mode: str = "mixed",
        seed: int = 0,
        temperature: float = 1.0,
        pair_order: str = "round_robin",
    ):
        if mode not in ("mixed", "pair", "mono"):
            raise MethodError(f"sampler mode must be mixed, pair or mono, got {mode!r}")
        self.ts, self.batch_size, self.mode, self.seed = train_set, batch_size, mode, seed
        self.temperature, self.pair_order = float(temperature), pair_order
        self.keys = sorted(train_set.streams, key=lambda k: str(k))
        sizes = np.array([len(train_set.streams[k]) for k in self.keys], dtype=np.float64)
        w = sizes ** (1.0 / self.temperature)
        self.probs = w / w.sum()
        self.streams = {k: _Stream(len(train_set.streams[k]), seed, stable_hash(str(k))) for k in self.keys}
        self.all_stream = _Stream(len(train_set), seed, 7919)
        self.step = 0
        self.cursors: dict[str, int] = {str(k): 0 for k in self.keys}
        self.cursors["*"] = 0

    def _take(self, key: Any) -> int:
        c = self.cursors[str(key)]
        self.cursors[str(key)] = c + 1
        return self.ts.streams[key][self.streams[key].at(c)]

    def next(self) -> tuple[list[int], Any]:
        """(example indices of the step's global batch, pair or None)."""
        rng = np.random.default_rng([self.seed, 104729, self.step])
        pair = None
        if self.mode == "pair":
            if self.pair_order == "round_robin":
                key = self.keys[self.step % len(self.keys)]
            else:
                key = self.keys[int(rng.choice(len(self.keys), p=self.probs))]
            batch = [self._take(key) for _ in range(self.batch_size)]
            pair = key
        elif self.temperature == 1.0:
            batch = []
            for _ in range(self.batch_size):
                c = self.cursors["*"]
                self.cursors["*"] = c + 1
                batch.append(self.all_stream.at(c))
        else:
            picks = rng.choice(len(self.keys), size=self.batch_size, p=self.probs)
            batch = [self._take(self.keys[int(i)]) for i in picks]
        self.step += 1
        return batch, pair

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "cursors": dict(self.cursors),
            "mode": self.mode,
            "seed": self.seed,
            "n": len(self.ts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n") != len(self.ts) or state.get("mode") != self.mode:
            raise CheckpointError(
                f"sampler state does not match the data (checkpoint: {state.get('n')} examples, "
                f"mode {state.get('mode')!r}; now: {len(self.ts)} examples, mode {self.mode!r}); "
                "resume with the same data config"
            )
        self.step = int(state["step"])
        self.cursors = {k: int(v) for k, v in state["cursors"].items()}


def shard_micro_batches(batch: Sequence[int], rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This process's contiguous share of the global batch, cut into micro-batches."""
    if len(batch) % world:
        raise ConfigError(f"global batch {len(batch)} is not divisible by {world} processes")
    per = len(batch) // world
    mine = list(batch[rank * per : (rank + 1) * per])
    if per % micro_batch_size:
        raise ConfigError(f"per-process batch {per} is not a multiple of micro_batch_size {micro_batch_size}")
    return [mine[i : i + micro_batch_size] for i in range(0, per, micro_batch_size)]


def temperature_probs(sizes: Sequence[int], temperature: float) -> list[float]:
    w = [max(s, 0) ** (1.0 / temperature) for s in sizes]
    total = sum(w)
    if total <= 0 or not math.isfinite(total):
        raise DataError("temperature_probs: sizes must include a positive value")
    return [x / total for x in w]
