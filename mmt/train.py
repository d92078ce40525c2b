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
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mmt import checkpoint as ckpt
from mmt.cards import write_run_card
from mmt.config import dump_config
from mmt.data import IGNORE_INDEX, StepSampler, TrainSet, build_train_set, collate, pad_token_id, shard_micro_batches
from mmt.data.summary import summarize
from mmt.errors import CheckpointError, ConfigError, MethodError
from mmt.methods.base import StepInfo, TrainingPlan, default_optimizer
from mmt.models import load_model, write_model
from mmt.precision import resolve as resolve_precision
from mmt.registry import get_method
from mmt.tracking import accelerator_kwargs, end_trackers, init_trackers, log_metrics
from mmt_kernels.loss import gather_loss_positions, linear_cross_entropy


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
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


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


def lm_loss_sum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    use_logits_to_keep: bool,
    fused: tuple[nn.Module, nn.Linear] | None = None,
) -> tuple[torch.Tensor, Any]:
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
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            return loss, out
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return token_loss_sum(out.logits, labels), out


# engine -> {method: why it does not run there}; docs/scaling.md has the engine x method table
REFUSED = {
    DistributedType.DEEPSPEED: {
        "landermt": "its neuron-sparse AdamW must own the optimizer step (per-neuron selection, strictness, compact "
        "state), and DeepSpeed replaces the torch optimizer with its ZeRO optimizer",
        "mixmoe": "on 2 CPU processes its ZeRO-2 run drifts from the 1-process run (weights 1e-2 apart after 3 "
        "steps, not float noise; cause not found yet), and under ZeRO-3 upcycling slices dense FFN weights that "
        "transformers partitioned at load time",
    },
}
SUPPORTED_ENGINES = "FSDP2 (examples/accelerate/fsdp2.yaml) or DDP (examples/accelerate/ddp.yaml)"


def _as_float(value: Any) -> float | None:
    """A gradient norm as a float: DeepSpeed may return None, FSDP2 a DTensor."""
    if value is None:
        return None
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` into ``param``, or into this process's shard when ``param`` is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements).to_local()
        param.to_local().copy_(shard)
    else:
        param.copy_(full.to(param.dtype))


def _restore_dtensor_state(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state read back for DTensor parameters arrives as plain local shards: wrap them again (unless the
    optimizer keeps its state as plain local tensors itself, e.g. ``NeuronSparseAdamW``)."""
    if getattr(optimizer, "shard_local_state", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh") or p not in optimizer.state:
                continue
            from torch.distributed.tensor import DTensor

            local_shape = p.to_local().shape
            for k, v in list(optimizer.state[p].items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == local_shape:
                    optimizer.state[p][k] = DTensor.from_local(
                        v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )


def _leaf_differences(old: Any, new: Any, where: str) -> list[tuple[str, Any, Any]]:
    """(key path, old, new) for every leaf where two config trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in _leaf_differences(old.get(k), new.get(k), f"{where}.{k}")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _leaf_differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [(where, old, new)]


class RunMismatchError(CheckpointError):
    """The checkpoint is intact but belongs to a run with other data, another model or method."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float]
    seconds: float
    tokens: int
    output_dir: str
    resumed_from: str | None = None


def _accelerator_device() -> str:
    """The device type ``Accelerator()`` will pick (what ``mixed_precision: auto`` is resolved for)."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


class Trainer:
    """Runs ``plan`` on ``model`` with the examples of ``train_set``.

    ``accelerator`` defaults to a new ``accelerate.Accelerator`` (works under ``accelerate launch``).
    Hooks receive the unwrapped model and the underlying torch optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        plan: TrainingPlan,
        train_set: TrainSet,
        train_cfg: Any,
        *,
        data_cfg: Any = None,
        accelerator: Any = None,
        run_config: dict | None = None,
    ):
        self.cfg, self.plan, self.train_set, self.tokenizer = train_cfg, plan, train_set, tokenizer
        self.run_config = run_config
        if accelerator is None:
            kwargs = [DistributedDataParallelKwargs(find_unused_parameters=plan.ddp_find_unused_parameters)]
            # accumulation is done here (no_sync + our own loss scaling), so accelerate sees 1
            accelerator = Accelerator(
                mixed_precision=resolve_precision(train_cfg.mixed_precision, _accelerator_device()),
                gradient_accumulation_steps=1,
                kwargs_handlers=kwargs,
                **accelerator_kwargs(train_cfg),
            )
        self.acc = accelerator
        init_trackers(self.acc, train_cfg, run_config)
        engine = self.acc.distributed_type
        why = REFUSED.get(engine, {}).get(plan.method)
        if why is not None:
            raise MethodError(
                f"method {plan.method!r} does not run under {engine.value}: {why}. Launch it with "
                f"{SUPPORTED_ENGINES} or on one process; see docs/scaling.md"
            )
        world = self.acc.num_processes
        if train_cfg.batch_size % (world * train_cfg.micro_batch_size):
            raise ConfigError(
                f"train.batch_size={train_cfg.batch_size} must be a multiple of micro_batch_size "
                f"({train_cfg.micro_batch_size}) x processes ({world})"
            )
        self.accum = train_cfg.batch_size // (world * train_cfg.micro_batch_size)
        self.out = Path(train_cfg.output_dir)
        temperature = (
            plan.pair_temperature
            if plan.pair_temperature is not None
            else (data_cfg.temperature if data_cfg is not None else 1.0)
        )
        self.sampler = StepSampler(
            train_set,
            train_cfg.batch_size,
            mode=plan.sampler,
            seed=train_cfg.seed,
            temperature=temperature,
            pair_order=data_cfg.pair_order if data_cfg is not None else "round_robin",
        )
        self.pad_id = pad_token_id(tokenizer) if tokenizer is not None else 0

        if train_cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.raw_model = model
        self.use_logits_to_keep = _accepts_logits_to_keep(model)
        # the fused loss calls the decoder directly, past a DDP wrapper's forward: single process only
        self.fused = (
            fused_loss_parts(model) if getattr(train_cfg, "fused_loss", True) and self.acc.num_processes == 1 else None
        )
        builder = plan.build_optimizer or default_optimizer
        optimizer = builder(model, train_cfg)
        self.deepspeed = engine == DistributedType.DEEPSPEED
        if self.deepspeed and train_cfg.save_every:
            raise ConfigError(
                "train.save_every: resumable checkpoints are not written under DeepSpeed yet (its ZeRO "
                "optimizer state lives outside the torch optimizer); set train.save_every=0, or use "
                "FSDP2 (examples/accelerate/fsdp2.yaml) for resumable sharded training"
            )
        if self.deepspeed:  # no dataloader goes through prepare: say the batch geometry so that "auto" resolves
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = train_cfg.micro_batch_size
            ds["gradient_accumulation_steps"] = self.accum
            ds["train_batch_size"] = train_cfg.batch_size
            ds["gradient_clipping"] = float(train_cfg.max_grad_norm or 0.0)
        # the schedule drives the torch optimizer itself (DeepSpeed's ZeRO wrapper is not a torch Optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))
        before = dict(model.named_parameters())
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.torch_optimizer = optimizer
        # FSDP2 replaces every parameter by a DTensor shard (accelerate switches the optimizer's param_groups);
        # whatever else is keyed by parameter identity (an optimizer's per-parameter settings, a method's
        # selections) follows the mapping
        after = dict(model.named_parameters())
        replaced = {p: after[n] for n, p in before.items() if n in after and after[n] is not p}
        if replaced:
            if hasattr(optimizer, "remap_parameters"):
                optimizer.remap_parameters(replaced)
            if plan.on_parameters_replaced is not None:
                plan.on_parameters_replaced(replaced)
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: str | None = None
        self._fingerprints: dict[str, Any] | None = None
        self._resume_checked = False

    # ---------------------------------------------------------------- checkpoints

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Completely written checkpoints, oldest first."""
        return ckpt.list_checkpoints(self.ckpt_root)

    def _sharded(self) -> bool:
        """Whether each process holds only a shard of the parameters / optimizer state (FSDP, DeepSpeed)."""
        return self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) or any(
            hasattr(p, "device_mesh") for p in self.raw_model.parameters()
        )

    def fingerprints(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint: the tokenised examples and
        the model's parameter names, shapes and dtypes."""
        if self._fingerprints is None:
            h = hashlib.sha256()
            for ids, labels in zip(self.train_set.ids, self.train_set.labels):
                h.update(np.asarray(ids, dtype=np.int64).tobytes())
                h.update(np.asarray(labels, dtype=np.int64).tobytes())
                h.update(b"|")
            m = hashlib.sha256()
            for n, p in self.raw_model.named_parameters():
                m.update(f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
            self._fingerprints = {
                "data": {"examples": len(self.train_set), "sha256": h.hexdigest()},
                "model": {"parameters": sum(1 for _ in self.raw_model.parameters()), "sha256": m.hexdigest()},
            }
        return self._fingerprints

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on the main process (a collective under FSDP / DeepSpeed ZeRO-3)."""
        state_dict = self.acc.get_state_dict(self.model)
        if state_dict is None:  # DeepSpeed ZeRO-3 consolidates on the main process only
            return {}
        if not any(hasattr(t, "full_tensor") for t in state_dict.values()):
            return state_dict
        # FSDP2 on CPU: torch's full-state-dict gather skips CPU shards; gather them tensor by tensor, in the same
        # order on every process, keeping the result on the main process only
        full = {}
        for name, t in state_dict.items():
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            if self.acc.is_main_process:
                full[name] = t.detach().cpu()
        return full

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>``: a full HF model + tokenizer, then the resume state, then the
        manifest; built in a hidden folder and renamed, so a kill leaves the previous checkpoint intact."""
        root = self.ckpt_root
        final = root / f"{ckpt.PREFIX}{self.step}"
        tmp = root / f"{ckpt.TMP_PREFIX}{ckpt.PREFIX}{self.step}"
        if self.acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        rank = self.acc.process_index
        ckpt.save_state(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            tmp,
            f"rng_{rank}",
        )
        if self._sharded():  # every process writes its own shard of the optimizer state, never gathered
            ckpt.save_state(self.torch_optimizer.state_dict(), tmp, f"optimizer_{rank}")
        state_dict = self._full_state_dict()
        if self.acc.is_main_process:
            trainable = {n for n, p in self.raw_model.named_parameters() if p.requires_grad}
            save_file(
                {n: t.detach().cpu().contiguous().clone() for n, t in state_dict.items() if n in trainable},
                str(tmp / "trainable.safetensors"),
            )
            self._save_model(tmp, state_dict, strict=False)
            if not self._sharded():
                ckpt.save_state(self.torch_optimizer.state_dict(), tmp, "optimizer")
            ckpt.save_state(self.scheduler.state_dict(), tmp, "scheduler")
            if self.plan.state_dict is not None:
                ckpt.save_state(self.plan.state_dict(), tmp, "method_state")
            if self.plan.save_artifacts is not None:
                self._save_artifacts(tmp, state_dict)
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "sampler": self.sampler.state_dict(),
                "world_size": self.acc.num_processes,
                "sharded": self._sharded(),
                "method": self.plan.method,
                **self.fingerprints(),
                "config": self.run_config,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            ckpt.write_manifest(tmp, {"step": self.step})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpt.prune(root, self.cfg.keep_last)
        self.acc.wait_for_everyone()
        return final

    def _save_model(
        self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None, *, strict: bool = True
    ) -> None:
        """A standalone model (config, safetensors, tokenizer) through :func:`mmt.models.write_model`, so that
        architectures changed by a method reload as themselves and ``mmt eval --model <checkpoint>`` works.
        ``strict=False`` (checkpoints): a model that would not reload as itself is left out with one warning,
        and the checkpoint still resumes; ``final/`` refuses it."""
        rng = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):  # the reload check must not move the run's RNG
                write_model(self.acc.unwrap_model(self.model), self.tokenizer, directory, state_dict=state_dict)
        except CheckpointError as exc:
            if strict:
                raise
            if not getattr(self, "_warned_unloadable", False):
                print(f"[mmt] warning: checkpoints hold no standalone model: {exc}", flush=True)
                self._warned_unloadable = True
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])

    def _check_matches(self, path: Path, state: dict[str, Any]) -> None:
        """A clear error when the checkpoint was written by a run with another method, data or model."""

        def differences(section: str) -> str:
            old = (state.get("config") or {}).get(section)
            new = (self.run_config or {}).get(section)
            diff = [
                f"{key}: {a!r} then, {b!r} now"
                for key, a, b in _leaf_differences(old, new, section)
                if not key.endswith(".data_dir")
            ]
            return (" (" + "; ".join(diff[:5]) + ")") if diff else ""

        advice = "resume with the same config, or start over with train.resume=never or another train.output_dir"
        if state.get("method") != self.plan.method:
            raise RunMismatchError(
                f"{path}: written by method {state.get('method')!r}, this run is {self.plan.method!r}; {advice}"
            )
        now = self.fingerprints()
        old_data, old_model = state.get("data") or {}, state.get("model") or {}
        if old_data != now["data"]:
            raise RunMismatchError(
                f"{path}: the training data differ from the run that wrote this checkpoint "
                f"({old_data.get('examples')} examples then, {now['data']['examples']} now"
                f"{'' if old_data.get('examples') != now['data']['examples'] else ', same count, other content'})"
                f"{differences('data')}; {advice}"
            )
        if old_model != now["model"]:
            raise RunMismatchError(
                f"{path}: the model differs from the one that wrote this checkpoint (parameter names, shapes, "
                f"dtypes or trainable set: {old_model.get('parameters')} parameters then, "
                f"{now['model']['parameters']} now){differences('model')}{differences('method')}; {advice}"
            )

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from ``path`` after verifying its manifest; reads no pickle."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"train.resume={str(path)!r}: not a checkpoint folder")
        ckpt.verify(path)
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({exc})") from None
        self._check_matches(path, state)
        if state.get("sharded") and state.get("world_size") != self.acc.num_processes:
            raise CheckpointError(
                f"{path}: written by {state.get('world_size')} processes with sharded optimizer "
                f"state; resume it with the same number of processes, not {self.acc.num_processes}"
            )
        params = dict(self.raw_model.named_parameters())
        try:
            saved = load_file(str(path / "trainable.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path / 'trainable.safetensors'}: unreadable ({exc})") from None
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks trainable parameters {missing[:5]}")
        with torch.no_grad():
            for n, t in saved.items():
                if n not in params:
                    raise CheckpointError(f"{path}: checkpoint has parameter {n!r} that the model does not")
                _copy_into(params[n], t)
        rank = self.acc.process_index
        opt_state = ckpt.load_state(path, f"optimizer_{rank}" if state.get("sharded") else "optimizer")
        self.torch_optimizer.load_state_dict(opt_state)
        _restore_dtensor_state(self.torch_optimizer)
        self.scheduler.load_state_dict(ckpt.load_state(path, "scheduler"))
        if self.plan.load_state_dict is not None and (path / "method_state.json").is_file():
            self.plan.load_state_dict(ckpt.load_state(path, "method_state"))
        try:
            self.sampler.load_state_dict(state["sampler"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path / 'trainer_state.json'}: sampler state: {exc}") from None
        if state.get("world_size") == self.acc.num_processes and (path / f"rng_{rank}.json").is_file():
            rng = ckpt.load_state(path, f"rng_{rank}")
            try:
                random.setstate(rng["python"])
                np.random.set_state(rng["numpy"])
                torch.set_rng_state(rng["torch"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path / f'rng_{rank}.json'}: bad RNG state ({exc})") from None
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.resumed_from = str(path)

    def maybe_resume(self) -> None:
        """``train.resume``: ``never``; ``auto`` (the newest intact checkpoint, falling back past damaged ones
        and saying why); or a checkpoint folder (an error if it is damaged)."""
        self._resume_checked = True
        mode = str(self.cfg.resume)
        if mode == "never":
            return
        if mode != "auto":
            self.load_checkpoint(mode)
        else:
            problems: list[str] = []
            for path in reversed(self.checkpoints()):
                try:
                    self.load_checkpoint(path)
                    break
                except CheckpointError as exc:
                    if isinstance(exc, RunMismatchError):
                        raise  # another run's checkpoint: falling back to an older one would not help
                    problems.append(str(exc))
                    self._say(f"warning: cannot resume from {path.name}: {exc}")
            if problems and self.resumed_from is None:
                raise CheckpointError(
                    f"no intact checkpoint in {self.ckpt_root}: "
                    + "; ".join(problems)
                    + ". Set train.resume=never to start over"
                )
            if problems:
                self._say(f"falling back to the newest intact checkpoint, {Path(self.resumed_from).name}")
        if self.resumed_from is not None:
            self._say(f"resumed from {self.resumed_from} (step {self.step} of {self.cfg.max_steps})")

    def _say(self, message: str) -> None:
        if self.acc.is_main_process:
            print(message, file=sys.stderr, flush=True)

    def _trim_log(self) -> None:
        """Drop log records after the step training (re)starts from, so a resumed run does not repeat steps."""
        log = self.out / "log.jsonl"
        if not self.acc.is_main_process or not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= self.step:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError):
                continue  # a line cut by a kill
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in kept), encoding="utf-8")
        os.replace(tmp, log)

    # ---------------------------------------------------------------- loop

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        log_metrics(self.acc, record, self.step)

    def train(self) -> TrainResult:
        torch.manual_seed(self.cfg.seed + self.acc.process_index)
        if not self._resume_checked:
            self.maybe_resume()
        self._trim_log()
        if self.acc.is_main_process:
            ckpt.prune(self.ckpt_root, self.cfg.keep_last)  # leftovers of a killed run
        self.acc.wait_for_everyone()
        self.model.train()
        cfg, ts = self.cfg, self.train_set
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {self.plan.method}",
            dynamic_ncols=True,
            disable=not (cfg.progress and self.acc.is_main_process),
        )
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
            if self.deepspeed:
                scale *= self.accum  # DeepSpeed divides each micro-batch loss by its accumulation steps
            for j, idx in enumerate(micro):
                info.micro_step = j
                info.batch_directions = None if ts.mono else [ts.keys[i] for i in idx]
                feats = collate([(ts.ids[i], ts.labels[i]) for i in idx], self.pad_id)
                feats = {k: v.to(self.acc.device) for k, v in feats.items()}
                last = j == len(micro) - 1
                ctx = contextlib.nullcontext() if last or self.acc.num_processes == 1 else self.acc.no_sync(self.model)
                if self.deepspeed:  # accelerate tells DeepSpeed's engine where the accumulation boundary is
                    self.acc.gradient_state._set_sync_gradients(last)
                with ctx:
                    with self.acc.autocast():
                        loss_sum, _ = lm_loss_sum(self.model, feats, self.use_logits_to_keep, self.fused)
                        loss = loss_sum * scale
                        if self.plan.extra_loss is not None:
                            loss = loss + self.plan.extra_loss(self.raw_model) / len(micro)
                    self.acc.backward(loss)
                local_loss += loss_sum.detach().double()
                if self.plan.after_backward is not None:
                    self.plan.after_backward(self.raw_model, info)
            grad_norm = None
            if cfg.max_grad_norm and cfg.max_grad_norm > 0 and trainable:
                # an optimizer that clips what it applies (NeuronSparseAdamW: selected neurons, compact grads)
                own_clip = getattr(self.torch_optimizer, "clip_grad_norm_", None)
                if own_clip is not None and not self.deepspeed:
                    self.acc.unscale_gradients()
                    grad_norm = _as_float(own_clip(cfg.max_grad_norm))
                else:
                    grad_norm = _as_float(self.acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.plan.on_step_end is not None:
                self.plan.on_step_end(info, self.raw_model, self.torch_optimizer)
            total = (
                self.acc.reduce(local_loss.to(self.acc.device), reduction="sum")
                if self.acc.num_processes > 1
                else local_loss
            )
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
                rec = {
                    "step": self.step,
                    "loss": step_loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens": self.tokens_seen,
                    "tokens_per_s": tps,
                    "elapsed_s": now - t_start,
                }
                if pair is not None:
                    rec["pair"] = "-".join(pair) if isinstance(pair, tuple) else str(pair)
                self._log(rec)
                window_tokens, window_t = 0, now
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        end_trackers(self.acc)
        if cfg.save_every:
            self.save_checkpoint()
        return TrainResult(
            steps=self.step,
            final_loss=losses[-1] if losses else float("nan"),
            losses=losses,
            seconds=time.time() - t_start,
            tokens=self.tokens_seen,
            output_dir=str(self.out),
            resumed_from=self.resumed_from,
        )

    def save_final(self) -> Path | None:
        """Write the trained model (+ tokenizer, method artifacts) to ``output_dir/final``, once, from the
        consolidated state dict (gathered from every process's shard under FSDP / DeepSpeed ZeRO-3)."""
        state_dict = self._full_state_dict()
        path = None
        if self.acc.is_main_process:
            path = self.out / "final"
            tmp = self.out / f"{ckpt.TMP_PREFIX}final"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(tmp, state_dict)
            if self.plan.save_artifacts is not None:
                self._save_artifacts(tmp, state_dict)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        self.acc.wait_for_everyone()
        return path

    def save_method_artifacts(self) -> Path | None:
        """Method artifacts alone (e.g. Mix-MoE's expert weights) in ``output_dir``, when the model is not
        saved: a later stage must find them whatever the checkpoint settings."""
        if self.plan.save_artifacts is None:
            return None
        state_dict = self._full_state_dict() if self._sharded() and self._artifacts_take_weights() else None
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self._save_artifacts(self.out, state_dict)
        self.acc.wait_for_everyone()
        return self.out

    def _artifacts_take_weights(self) -> bool:
        try:
            return "state_dict" in inspect.signature(self.plan.save_artifacts).parameters
        except (TypeError, ValueError):
            return False

    def _save_artifacts(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """The plan's ``save_artifacts`` hook (main process). Under FSDP / ZeRO-3 the model holds only shards: a
        hook with a ``state_dict`` parameter gets the consolidated weights (the model's state-dict names)."""
        if self._sharded() and self._artifacts_take_weights():
            self.plan.save_artifacts(directory, state_dict=state_dict)
        else:
            self.plan.save_artifacts(directory)


def run(cfg: Any, model: nn.Module | None = None, tokenizer: Any = None, *, print_plan: bool = True):
    """Load (unless given) the model, prepare the method, build the data, train.

    Returns (model, tokenizer, plan, TrainResult).
    """
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # checked before the (slow) model load
        raise ConfigError(f"train.output_dir={str(out)!r}: {blocking} is a file, not a folder")
    if model is None:
        model, tokenizer = load_model(cfg.model)
    prepare = get_method(cfg.method_name).prepare
    # a method that reads data while preparing (LANDeRMT's detection) reads it from the run's data folder
    extra = {"data_dir": cfg.data.data_dir} if "data_dir" in inspect.signature(prepare).parameters else {}
    model, plan = prepare(model, cfg.method, tokenizer=tokenizer, **extra)
    plan.model = model
    train_set = build_train_set(cfg.data, tokenizer, plan=plan)
    trainer = Trainer(model, tokenizer, plan, train_set, cfg.train, data_cfg=cfg.data, run_config=cfg.to_dict())
    trainer.maybe_resume()  # before anything is written: a run that cannot resume leaves the folder as it was
    if trainer.acc.is_main_process:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
        if print_plan:
            n_dirs = len(train_set.streams)
            print(plan.describe(model))
            print(summarize(train_set, getattr(train_set, "skipped", None)), flush=True)
            print(
                f"data: {len(train_set):,} examples in {n_dirs} {'languages' if train_set.mono else 'directions'}; "
                f"global batch {cfg.train.batch_size} = {trainer.acc.num_processes} process(es) x "
                f"{trainer.accum} accumulation x {cfg.train.micro_batch_size}",
                flush=True,
            )
    result = trainer.train()
    if cfg.train.save_model:
        final = trainer.save_final()
        if final is not None:
            write_run_card(final, cfg, train_set=train_set, steps=result.steps)
    else:
        trainer.save_method_artifacts()
    return trainer.acc.unwrap_model(trainer.model), tokenizer, plan, result
