import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmt.config import load_config
from mmt.data import build_train_set
from mmt.methods.base import TrainingPlan
from mmt.testing import tiny_model
from mmt.train import Trainer, lr_lambda

WORKER = Path(__file__).with_name("_train_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _cfg(jsonl, out, *extra):
    return load_config(
        None,
        [
            f"data.train=[{{kind: jsonl, path: {jsonl}}}]",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.lr=3e-3",
            "train.save_every=0",
            *extra,
        ],
    )


def _train(tok, jsonl, out, *extra, plan=None):
    cfg = _cfg(jsonl, out, *extra)
    model = tiny_model("llama", vocab=len(tok), seed=0)
    plan = plan or TrainingPlan(method="mfti")
    trainer = Trainer(model, tok, plan, build_train_set(cfg.data, tok, plan=plan), cfg.train, data_cfg=cfg.data)
    return trainer, trainer.train()


def test_loss_decreases_and_logs(tok, jsonl_data, tmp_path):
    trainer, res = _train(
        tok,
        jsonl_data,
        tmp_path,
        "train.max_steps=12",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=4",
    )
    assert res.steps == 12
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.5
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"tokens_per_s"' in lines[0]


def test_grad_accumulation_matches_full_batch(tok, jsonl_data, tmp_path):
    _, a = _train(
        tok, jsonl_data, tmp_path / "a", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=8"
    )
    _, b = _train(
        tok, jsonl_data, tmp_path / "b", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=2"
    )
    for x, y in zip(a.losses, b.losses):
        assert x == pytest.approx(y, rel=1e-5)


def test_hooks_called_with_pair(tok, jsonl_data, tmp_path):
    calls = []
    plan = TrainingPlan(
        method="mfti",
        sampler="pair",
        on_step_start=lambda info, m, opt: calls.append(("start", info.step, info.pair)),
        after_backward=lambda m, info: calls.append(("bwd", info.micro_step, info.batch_directions)),
        extra_loss=lambda m: torch.zeros(()),
    )
    _train(tok, jsonl_data, tmp_path, "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2", plan=plan)
    starts = [c for c in calls if c[0] == "start"]
    assert [c[1] for c in starts] == [0, 1] and all(c[2] is not None for c in starts)
    bwd = [c for c in calls if c[0] == "bwd"]
    assert len(bwd) == 4
    assert all(set(d) == {starts[0][2]} for _, _, d in bwd[:2])


def test_lr_schedules():
    cfg = load_config(None, ["train.max_steps=10", "train.warmup_steps=2", "train.lr_schedule=cosine"]).train
    f = lr_lambda(cfg)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == pytest.approx(1.0) and f(9) < 0.05
    cfg.lr_schedule = "inverse_sqrt"
    assert lr_lambda(cfg)(7) == pytest.approx((2 / 8) ** 0.5)
    cfg.lr_schedule = "constant"
    assert lr_lambda(cfg)(9) == 1.0


def test_checkpoints_atomic_keep_last(tok, jsonl_data, tmp_path):
    trainer, _ = _train(
        tok,
        jsonl_data,
        tmp_path,
        "train.max_steps=6",
        "train.batch_size=4",
        "train.micro_batch_size=4",
        "train.save_every=2",
        "train.keep_last=2",
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]
    ck = tmp_path / "checkpoints" / "checkpoint-6"
    for f in (
        "trainable.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "scheduler.json",
        "rng_0.json",
        "trainer_state.json",
        "manifest.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ):
        assert (ck / f).is_file(), f
    assert not list(ck.glob("*.pt")) and not list(ck.glob("*.bin"))


def _run_worker(args, env=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, check=False, timeout=300
    )


def _params(path):
    return load_file(str(path))


def test_resume_after_kill_is_exact(tok_dir, jsonl_data, tmp_path):
    common = [
        "--tok",
        str(tok_dir),
        "--data",
        str(jsonl_data),
        "--steps",
        "6",
        "--batch",
        "8",
        "--micro",
        "4",
        "--save-every",
        "2",
    ]
    straight = _run_worker([*common, "--out", str(tmp_path / "a"), "--params-out", str(tmp_path / "a.st")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run_worker([*common, "--out", str(tmp_path / "b"), "--kill-at", "5"])
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after step 5: last checkpoint is step 4
    assert not (tmp_path / "b.st").exists()
    resumed = _run_worker([*common, "--out", str(tmp_path / "b"), "--params-out", str(tmp_path / "b.st")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _params(tmp_path / "a.st"), _params(tmp_path / "b.st")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [float(x) for x in (tmp_path / "a.st.losses").read_text().split()]
    lb = [float(x) for x in (tmp_path / "b.st.losses").read_text().split()]
    assert lb == la[4:]  # the resumed run did steps 5 and 6, with the same batches
