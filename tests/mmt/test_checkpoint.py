"""Checkpoints: no pickle, self-verifying (manifest), fallback past damaged ones, clear mismatch errors,
full HF models that reload in a fresh process."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmt import checkpoint as ckpt
from mmt.config import load_config
from mmt.data import build_train_set
from mmt.errors import CheckpointError
from mmt.methods.base import TrainingPlan
from mmt.testing import tiny_model
from mmt.train import Trainer

REPO = Path(__file__).resolve().parents[2]


def _trainer(tok, jsonl, out, *extra, seed=0):
    cfg = load_config(
        None,
        [
            f"data.train=[{{kind: jsonl, path: {jsonl}}}]",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.lr=3e-3",
            "train.batch_size=4",
            "train.micro_batch_size=2",
            "train.save_every=2",
            "train.keep_last=3",
            "train.log_every=1",
            "train.max_steps=6",
            *extra,
        ],
    )
    plan = TrainingPlan(method="mfti")
    model = tiny_model("llama", vocab=len(tok), seed=seed)
    return Trainer(
        model,
        tok,
        plan,
        build_train_set(cfg.data, tok, plan=plan),
        cfg.train,
        data_cfg=cfg.data,
        run_config=cfg.to_dict(),
    )


class _Payload:
    """Unpickling this writes a marker file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture
def run4(tok, jsonl_data, tmp_path):
    """A run stopped after step 4 (checkpoints 2 and 4)."""
    out = tmp_path / "run"
    _trainer(tok, jsonl_data, out, "train.max_steps=4").train()
    return out


def test_crafted_pickles_are_never_loaded(tok, jsonl_data, run4, tmp_path):
    marker = tmp_path / "marker"
    last = run4 / "checkpoints" / "checkpoint-4"
    for name in (
        "rng_0.pt",
        "optimizer.pt",
        "scheduler.pt",
        "method_state.pt",
        "pytorch_model.bin",
        "training_args.bin",
    ):
        (last / name).write_bytes(pickle.dumps(_Payload(marker)))
    # an old-style folder made only of pickles, passed explicitly
    fake = run4 / "checkpoints" / "step-0000005"
    fake.mkdir()
    (fake / "trainer_state.json").write_text(json.dumps({"step": 5, "method": "mfti"}))
    for name in ("rng_0.pt", "optimizer.pt", "trainable.safetensors"):
        (fake / name).write_bytes(pickle.dumps(_Payload(marker)))

    resumed = _trainer(tok, jsonl_data, run4, "train.max_steps=6")
    resumed.train()
    assert resumed.resumed_from == str(last)  # extra files outside the manifest are ignored, not read
    with pytest.raises(CheckpointError, match="manifest"):
        _trainer(tok, jsonl_data, run4, f"train.resume={fake}").train()
    assert not marker.exists()
    # and nothing in the package unpickles: every torch.load is weights_only
    for py in (REPO / "mmt").rglob("*.py"):
        text = py.read_text()
        assert "weights_only=False" not in text, py
        assert "pickle.load" not in text, py


def test_damaged_last_checkpoint_falls_back_and_names_the_file(tok, jsonl_data, run4, capsys):
    last = run4 / "checkpoints" / "checkpoint-4"
    weights = last / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # zeroed tail, header intact, same size
    weights.write_bytes(bytes(data))
    trainer = _trainer(tok, jsonl_data, run4, "train.max_steps=6")
    trainer.train()
    err = capsys.readouterr().err
    assert "trainable.safetensors" in err and "SHA-256" in err
    assert "falling back" in err and "checkpoint-2" in err
    assert trainer.resumed_from.endswith("checkpoint-2")
    # the resumed run redid steps 3..6: the log has each step once
    steps = [json.loads(x)["step"] for x in (run4 / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_truncated_file_and_explicit_resume(tok, jsonl_data, run4):
    last = run4 / "checkpoints" / "checkpoint-4"
    opt = last / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: damaged \(size 100"):
        _trainer(tok, jsonl_data, run4, f"train.resume={last}").train()
    for p in (run4 / "checkpoints").iterdir():
        (p / "scheduler.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*scheduler.json"):
        _trainer(tok, jsonl_data, run4, "train.max_steps=6").train()


def test_resume_with_other_data_or_model_says_what_differs(tok, jsonl_data, run4, tmp_path):
    with pytest.raises(CheckpointError, match=r"training data differ.*48 examples then, 20 now.*max_examples"):
        _trainer(tok, jsonl_data, run4, "train.max_steps=6", "data.train.0.max_examples=5").train()
    with pytest.raises(CheckpointError, match=r"training data differ.*template: 'T1' then, 'T2' now"):
        _trainer(tok, jsonl_data, run4, "train.max_steps=6", "data.template=T2").train()
    other = _trainer(tok, jsonl_data, run4, "train.max_steps=6")
    other.raw_model.model.embed_tokens.weight.requires_grad_(False)
    other._fingerprints = None
    with pytest.raises(CheckpointError, match="the model differs"):
        other.train()


def test_keep_last_holds_after_a_kill(tok, jsonl_data, run4):
    root = run4 / "checkpoints"
    (root / ".tmp-checkpoint-5").mkdir()  # a write cut by a kill
    (root / "checkpoint-5").mkdir()  # renamed without manifest: cannot happen by us, but is not a checkpoint
    _trainer(tok, jsonl_data, run4, "train.max_steps=8", "train.keep_last=2").train()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_checkpoint_is_a_full_model_reloaded_in_a_fresh_process(tok, jsonl_data, run4, tmp_path):
    last = run4 / "checkpoints" / "checkpoint-4"
    ckpt.verify(last)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    trained = tiny_model("llama", vocab=len(tok), seed=0)
    from safetensors.torch import load_file

    trained.load_state_dict(load_file(str(last / "trainable.safetensors")), strict=False)
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); AutoTokenizer.from_pretrained(sys.argv[1]);"
        "ids = torch.tensor([[1, 5, 9, 33, 70, 2]]);"
        "torch.save(m(input_ids=ids).logits.detach(), sys.argv[2])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(last), str(tmp_path / "logits.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # eager vs sdpa attention may differ in ulps


def test_state_encoding_round_trips_exactly():
    import random

    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "opt": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0], "foreign": None}],
        },
    }
    tensors: dict = {}
    tree = json.loads(json.dumps(ckpt.encode(state, tensors)))
    back = ckpt.decode(tree, tensors, "x")
    assert back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and (back["numpy"][1] == state["numpy"][1]).all()
    assert torch.equal(back["torch"], state["torch"])
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.encode({"f": object()}, {})
