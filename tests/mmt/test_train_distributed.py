"""Multi-process training on CPU (gloo): DDP and FSDP2 equal the single-process run; FSDP2 resumes exactly after
a kill; the engine x method cells that do not run are refused. (Every method under FSDP2 through ``mmt train``:
test_fsdp2_methods.py.)

The processes are started with ``torch.distributed.run`` and ``ACCELERATE_USE_CPU=true``: on a machine without
accelerators, ``accelerate launch --num_processes 2 --cpu`` starts a single process unless MPI is set up, and
accelerate enables FSDP only on accelerator devices, so the worker switches its state to FSDP2 itself. Every
test checks the engine and process count the worker really ran with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from mmt import checkpoint as ckpt
from mmt.config import load_config
from mmt.data import build_train_set
from mmt.errors import MethodError
from mmt.methods.base import TrainingPlan
from mmt.testing import tiny_model
from mmt.train import Trainer

WORKER = Path(__file__).with_name("_train_worker.py")
# Adam's per-element normalisation turns last-bit differences of summation order (reduce-scatter over 2 processes
# vs accumulation in 1; fused loss in 1 process only) into up to ~2e-5 on near-zero-gradient elements with lr 3e-3
WEIGHT_ATOL = 5e-5
REPO = Path(__file__).resolve().parents[2]
_PORT = iter(range(29641, 29700))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}


def _worker(args, out: Path, nproc: int = 1):
    cmd = [sys.executable, str(WORKER), *args, "--out", str(out), "--params-out", f"{out}.st"]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(next(_PORT))]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)


def _result(out: Path):
    losses = [float(x) for x in Path(f"{out}.st.losses").read_text().split()]
    return load_file(f"{out}.st"), losses, Path(f"{out}.st.engine").read_text().split()


def _common(tok_dir, jsonl_data, steps=3, save_every=0):
    return [
        "--tok",
        str(tok_dir),
        "--data",
        str(jsonl_data),
        "--steps",
        str(steps),
        "--batch",
        "8",
        "--micro",
        "2",
        "--save-every",
        str(save_every),
        "--schedule",
        "constant",
    ]


@pytest.fixture(scope="module")
def single(tok_dir, jsonl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "s"
    r = _worker(_common(tok_dir, jsonl_data), out)
    assert r.returncode == 0, r.stderr[-3000:]
    return _result(out)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tok_dir, jsonl_data, tmp_path, single):
    r = _worker(_common(tok_dir, jsonl_data), tmp_path / "d", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    params, losses, engine = _result(tmp_path / "d")
    assert engine == ["MULTI_CPU", "2"]
    assert losses == pytest.approx(single[1], rel=1e-5)
    for k, v in single[0].items():
        torch.testing.assert_close(params[k], v, atol=WEIGHT_ATOL, rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_two_processes_match_single_process(tok_dir, jsonl_data, tmp_path, single):
    out = tmp_path / "f"
    r = _worker([*_common(tok_dir, jsonl_data, save_every=2), "--fsdp2-on-cpu", "--save-final"], out, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    params, losses, engine = _result(out)
    assert engine == ["FSDP", "2"]
    assert losses == pytest.approx(single[1], rel=1e-5)
    for k, v in single[0].items():
        torch.testing.assert_close(params[k], v, atol=WEIGHT_ATOL, rtol=1e-4)
    # one consolidated final model, equal to the gathered weights; checkpoints hold one optimizer shard per process
    final = load_file(str(out / "final" / "model.safetensors"))
    for k, v in final.items():
        assert torch.equal(v, params[k]), k
    last = out / "checkpoints" / "checkpoint-3"
    ckpt.verify(last)
    assert {p.name for p in last.glob("optimizer_*.safetensors")} == {
        "optimizer_0.safetensors",
        "optimizer_1.safetensors",
    }
    shard = load_file(str(last / "optimizer_0.safetensors"))
    emb = single[0]["model.embed_tokens.weight"]
    assert any(t.shape[0] == emb.shape[0] // 2 for t in shard.values())  # a row shard, never the gathered state


@pytest.mark.slow
def test_fsdp2_kill_and_resume_is_exact(tok_dir, jsonl_data, tmp_path):
    common = [*_common(tok_dir, jsonl_data, steps=4, save_every=2), "--fsdp2-on-cpu"]
    straight = _worker(common, tmp_path / "a", nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _worker([*common, "--kill-at", "3"], tmp_path / "b", nproc=2)
    assert killed.returncode != 0
    resumed = _worker(common, tmp_path / "b", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    a, la, _ = _result(tmp_path / "a")
    b, lb, engine = _result(tmp_path / "b")
    assert engine == ["FSDP", "2"]
    assert lb == la[2:]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_methods_are_refused_where_they_do_not_run(tok, jsonl_data, tmp_path):
    """The cells of the engine x method table that are refused (docs/scaling.md) stop with a message naming the
    engines that do run the method."""
    cfg = load_config(
        None,
        [
            f"data.train=[{{kind: jsonl, path: {jsonl_data}}}]",
            f"train.output_dir={tmp_path}",
            "train.batch_size=4",
            "train.micro_batch_size=2",
        ],
    )
    model = tiny_model("llama", vocab=len(tok))
    supported = r"FSDP2 \(examples/accelerate/fsdp2\.yaml\) or DDP"
    for method, engine in [("landermt", DistributedType.DEEPSPEED), ("mixmoe", DistributedType.DEEPSPEED)]:
        plan = TrainingPlan(method=method)
        fake = SimpleNamespace(distributed_type=engine, num_processes=2)
        with pytest.raises(
            MethodError, match=rf"{method}.*does not run under {engine.value}.*Launch it with {supported}"
        ):
            Trainer(
                model,
                tok,
                plan,
                build_train_set(cfg.data, tok, plan=plan),
                cfg.train,
                data_cfg=cfg.data,
                accelerator=fake,
            )
