"""One trainer for every method: it runs a :class:`mmt.methods.base.TrainingPlan` on ``accelerate``.

Design choices that matter for correctness:

* The sampler picks each step's *global* batch; every process takes its contiguous share and
  cuts it into micro-batches. The loss is the token-level sum divided by the number of label
  tokens in the whole global batch (times the process count, which DDP averages away), so one
  process with gradient accumulation and N processes give the same gradient.
* Checkpoints hold the trainable parameters, optimizer, scheduler, sampler cursors, method state and
  every process's RNG state; they are written to a temp dir and renamed (``os.replace``), so a kill
  mid-write leaves the previous checkpoint intact. Resuming continues exactly.
* The scheduler is stepped by us (accelerate's wrapper would step it once per process).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mmt.config import dump_config
from mmt.data import (IGNORE_INDEX, StepSampler, TrainSet, build_train_set, collate, pad_token_id,
                      shard_micro_batches)
from mmt.errors import CheckpointError, ConfigError
from mmt.methods.base import StepInfo, TrainingPlan, default_optimizer
from mmt.models import load_model, save_model
from mmt.registry import get_method
from mmt_kernels.loss import gather_loss_positions, linear_cross_entropy

CKPT_PREFIX = "step-"


def lr_lambda(cfg: Any):
    """Multiplier on the base LR per optimizer step: linear warmup, then constant / cosine / linear /
    inverse-sqrt decay."""
    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * cfg.max_steps))
    total, floor = cfg.max_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "inverse_sqrt":
            w = max(warmup, 1)
            return math.sqrt(w / max(step + 1, w))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.lr_schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        raise ConfigError(f"unknown lr_schedule {cfg.lr_schedule!r}")

    return f


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (labels == -100 are ignored)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                       shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def fused_loss_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output layer) when the model's logits are exactly ``decoder(...).last_hidden_state @ W.T``.

    Checked once on a few tokens (eval mode, no grad) rather than trusted by architecture: models that scale,
    cap or bias their logits, or whose output layer is wrapped (e.g. an adapter), keep the unfused loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if type(head) is not nn.Linear or head.bias is not None or decoder is None or decoder is base:
        return None
    was_training = model.training
    ids = torch.arange(min(8, head.weight.shape[0]), device=head.weight.device).unsqueeze(0)
    try:
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = (decoder(input_ids=ids).last_hidden_state @ head.weight.t()).float()
    except Exception:  # noqa: BLE001 - any model that cannot be split this way keeps the unfused loss
        return None
    finally:
        model.train(was_training)
    ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    return (decoder, head) if ok else None


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], use_logits_to_keep: bool,
                fused: tuple[nn.Module, nn.Linear] | None = None) -> tuple[torch.Tensor, Any]:
    """Forward + summed LM loss.

    ``fused`` (from :func:`fused_loss_parts`): the decoder runs alone and only the positions that carry a label
    go through the output layer, chunked, so the [tokens, vocab] logits are never built
    (``mmt_kernels.linear_cross_entropy``). Otherwise, with target-only labels the output projection (large
    for multilingual vocabularies) runs only on the sequence positions where some row has a label."""
    labels = batch["labels"]
    if fused is not None:
        decoder, head = fused
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden, targets = gather_loss_positions(out.last_hidden_state, labels, IGNORE_INDEX)
        return linear_cross_entropy(hidden, head.weight, targets, ignore_index=IGNORE_INDEX), out
    if use_logits_to_keep:
        has = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
        pos = torch.nonzero(has, as_tuple=False).flatten()
        if 0 < pos.numel() < labels.shape[1] - 1:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=pos)
            logits = out.logits.float()
            tgt = labels[:, pos + 1]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
            return loss, out
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return token_loss_sum(out.logits, labels), out


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float]
    seconds: float
    tokens: int
    output_dir: str
    resumed_from: str | None = None


class Trainer:
    """Runs ``plan`` on ``model`` with the examples of ``train_set``.

    ``accelerator`` defaults to a new ``accelerate.Accelerator`` (works under ``accelerate launch``).
    Hooks receive the unwrapped model and the underlying torch optimizer.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, plan: TrainingPlan, train_set: TrainSet, train_cfg: Any,
                 *, data_cfg: Any = None, accelerator: Any = None, run_config: dict | None = None):
        self.cfg, self.plan, self.train_set, self.tokenizer = train_cfg, plan, train_set, tokenizer
        self.run_config = run_config
        if accelerator is None:
            kwargs = [DistributedDataParallelKwargs(find_unused_parameters=plan.ddp_find_unused_parameters)]
            # accumulation is done here (no_sync + our own loss scaling), so accelerate sees 1
            accelerator = Accelerator(mixed_precision=train_cfg.mixed_precision, gradient_accumulation_steps=1,
                                      kwargs_handlers=kwargs)
        self.acc = accelerator
        world = self.acc.num_processes
        if train_cfg.batch_size % (world * train_cfg.micro_batch_size):
            raise ConfigError(f"train.batch_size={train_cfg.batch_size} must be a multiple of micro_batch_size "
                             f"({train_cfg.micro_batch_size}) x processes ({world})")
        self.accum = train_cfg.batch_size // (world * train_cfg.micro_batch_size)
        self.out = Path(train_cfg.output_dir)
        temperature = plan.pair_temperature if plan.pair_temperature is not None else (
            data_cfg.temperature if data_cfg is not None else 1.0)
        self.sampler = StepSampler(train_set, train_cfg.batch_size, mode=plan.sampler, seed=train_cfg.seed,
                                   temperature=temperature,
                                   pair_order=data_cfg.pair_order if data_cfg is not None else "round_robin")
        self.pad_id = pad_token_id(tokenizer) if tokenizer is not None else 0

        if train_cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.raw_model = model
        self.use_logits_to_keep = _accepts_logits_to_keep(model)
        # the fused loss calls the decoder directly, past a DDP wrapper's forward: single process only
        self.fused = (fused_loss_parts(model) if getattr(train_cfg, "fused_loss", True)
                      and self.acc.num_processes == 1 else None)
        builder = plan.build_optimizer or default_optimizer
        optimizer = builder(model, train_cfg)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.torch_optimizer, lr_lambda(train_cfg))
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: str | None = None

    # ---------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[Path]:
        root = self.out / "checkpoints"
        if not root.is_dir():
            return []
        done = [p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "trainer_state.json").is_file()]
        return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous().clone() for n, p in self.raw_model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        root = self.out / "checkpoints"
        final = root / f"{CKPT_PREFIX}{self.step:07d}"
        tmp = root / f".tmp-{CKPT_PREFIX}{self.step:07d}"
        if self.acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save(rng, tmp / f"rng_{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save(self.torch_optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.plan.state_dict is not None:
                torch.save(self.plan.state_dict(), tmp / "method_state.pt")
            if self.plan.save_artifacts is not None:
                self.plan.save_artifacts(tmp)
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                     "world_size": self.acc.num_processes, "method": self.plan.method, "config": self.run_config}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-max(1, self.cfg.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("method") != self.plan.method:
            raise CheckpointError(f"{path}: checkpoint of method {state.get('method')!r}, this run is {self.plan.method!r}")
        params = dict(self.raw_model.named_parameters())
        saved = load_file(str(path / "trainable.safetensors"))
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks trainable parameters {missing[:5]} (different method config?)")
        with torch.no_grad():
            for n, t in saved.items():
                if n not in params:
                    raise CheckpointError(f"{path}: checkpoint has parameter {n!r} that the model does not")
                params[n].copy_(t.to(params[n].dtype))
        self.torch_optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if self.plan.load_state_dict is not None and (path / "method_state.pt").is_file():
            self.plan.load_state_dict(torch.load(path / "method_state.pt", weights_only=False))
        self.sampler.load_state_dict(state["sampler"])
        rng_file = path / f"rng_{self.acc.process_index}.pt"
        if rng_file.is_file() and state.get("world_size") == self.acc.num_processes:
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.resumed_from = str(path)

    def maybe_resume(self) -> None:
        mode = str(self.cfg.resume)
        if mode == "never":
            return
        if mode == "auto":
            ckpts = self.checkpoints()
            if ckpts:
                self.load_checkpoint(ckpts[-1])
            return
        self.load_checkpoint(mode)

    # ---------------------------------------------------------------- loop

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def train(self) -> TrainResult:
        torch.manual_seed(self.cfg.seed + self.acc.process_index)
        self.maybe_resume()
        self.model.train()
        cfg, ts = self.cfg, self.train_set
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.plan.method}", dynamic_ncols=True,
                   disable=not (cfg.progress and self.acc.is_main_process))
        losses: list[float] = []
        t_start = time.time()
        window_tokens, window_t = 0, time.time()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        while self.step < cfg.max_steps:
            batch, pair = self.sampler.next()
            micro = shard_micro_batches(batch, self.acc.process_index, self.acc.num_processes, cfg.micro_batch_size)
            global_label_tokens = sum(ts.label_tokens(i) for i in batch)
            global_tokens = sum(len(ts.ids[i]) for i in batch)
            info = StepInfo(step=self.step, pair=pair, num_micro_steps=len(micro), max_steps=cfg.max_steps)
            if self.plan.on_step_start is not None:
                self.plan.on_step_start(info, self.raw_model, self.torch_optimizer)
            local_loss = torch.zeros((), dtype=torch.float64)
            scale = self.acc.num_processes / max(global_label_tokens, 1)
            for j, idx in enumerate(micro):
                info.micro_step = j
                info.batch_directions = None if ts.mono else [ts.keys[i] for i in idx]
                feats = collate([(ts.ids[i], ts.labels[i]) for i in idx], self.pad_id)
                feats = {k: v.to(self.acc.device) for k, v in feats.items()}
                last = j == len(micro) - 1
                ctx = contextlib.nullcontext() if last or self.acc.num_processes == 1 else self.acc.no_sync(self.model)
                with ctx:
                    with self.acc.autocast():
                        loss_sum, out = lm_loss_sum(self.model, feats, self.use_logits_to_keep, self.fused)
                        loss = loss_sum * scale
                        if self.plan.extra_loss is not None:
                            loss = loss + self.plan.extra_loss(self.raw_model) / len(micro)
                    self.acc.backward(loss)
                local_loss += loss_sum.detach().double()
                if self.plan.after_backward is not None:
                    self.plan.after_backward(self.raw_model, info)
            grad_norm = None
            if cfg.max_grad_norm and cfg.max_grad_norm > 0 and trainable:
                grad_norm = float(self.acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.plan.on_step_end is not None:
                self.plan.on_step_end(info, self.raw_model, self.torch_optimizer)
            total = self.acc.reduce(local_loss.to(self.acc.device), reduction="sum") if self.acc.num_processes > 1 else local_loss
            step_loss = float(total) / max(global_label_tokens, 1)
            losses.append(step_loss)
            self.step += 1
            self.tokens_seen += global_tokens
            window_tokens += global_tokens
            now = time.time()
            tps = window_tokens / max(now - window_t, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:.0f}")
            if self.step % max(1, cfg.log_every) == 0 or self.step == cfg.max_steps:
                rec = {"step": self.step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens": self.tokens_seen, "tokens_per_s": tps,
                       "elapsed_s": now - t_start}
                if pair is not None:
                    rec["pair"] = "-".join(pair) if isinstance(pair, tuple) else str(pair)
                self._log(rec)
                window_tokens, window_t = 0, now
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        if cfg.save_every:
            self.save_checkpoint()
        return TrainResult(steps=self.step, final_loss=losses[-1] if losses else float("nan"), losses=losses,
                           seconds=time.time() - t_start, tokens=self.tokens_seen, output_dir=str(self.out),
                           resumed_from=self.resumed_from)

    def save_final(self) -> Path | None:
        """Write the trained model (+ tokenizer, method artifacts) to ``output_dir/final``."""
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            path = save_model(self.acc.unwrap_model(self.model), self.tokenizer, self.out / "final")
            if self.plan.save_artifacts is not None:
                self.plan.save_artifacts(path)
        self.acc.wait_for_everyone()
        return path


    def save_method_artifacts(self) -> Path | None:
        """Method artifacts alone (e.g. Mix-MoE's expert weights) in ``output_dir``, when the model is not
        saved: a later stage must find them whatever the checkpoint settings."""
        if self.plan.save_artifacts is None:
            return None
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.plan.save_artifacts(self.out)
        self.acc.wait_for_everyone()
        return self.out


def run(cfg: Any, model: nn.Module | None = None, tokenizer: Any = None, *, print_plan: bool = True):
    """Load (unless given) the model, prepare the method, build the data, train.

    Returns (model, tokenizer, plan, TrainResult).
    """
    set_seed(cfg.train.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    model, plan = get_method(cfg.method_name).prepare(model, cfg.method, tokenizer=tokenizer)
    plan.model = model
    train_set = build_train_set(cfg.data, tokenizer, plan=plan)
    trainer = Trainer(model, tokenizer, plan, train_set, cfg.train, data_cfg=cfg.data, run_config=cfg.to_dict())
    if trainer.acc.is_main_process:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
        if print_plan:
            n_dirs = len(train_set.streams)
            print(plan.describe(model))
            print(f"data: {len(train_set):,} examples in {n_dirs} {'languages' if train_set.mono else 'directions'}; "
                  f"global batch {cfg.train.batch_size} = {trainer.acc.num_processes} process(es) x "
                  f"{trainer.accum} accumulation x {cfg.train.micro_batch_size}", flush=True)
    result = trainer.train()
    if cfg.train.save_model:
        trainer.save_final()
    else:
        trainer.save_method_artifacts()
    return trainer.acc.unwrap_model(trainer.model), tokenizer, plan, result
