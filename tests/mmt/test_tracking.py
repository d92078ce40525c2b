"""Trackers (train.report_to): TensorBoard events written and read back, config checks, missing packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmt.config import load_config
from mmt.errors import ConfigError, MissingDependencyError
from mmt.tracking import accelerator_kwargs, end_trackers, flat_config, init_trackers, log_metrics, tracker_names

REPO = Path(__file__).resolve().parents[2]

READ_EVENTS = """
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
"""


def test_tensorboard_scalars_reread_in_a_fresh_process(tmp_path):
    pytest.importorskip("tensorboard")
    import json

    from accelerate import Accelerator

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "train.report_to=tensorboard"])
    kwargs = accelerator_kwargs(cfg.train)
    assert kwargs == {"log_with": ["tensorboard"], "project_dir": str(tmp_path / "run" / "tracking")}
    acc = Accelerator(cpu=True, **kwargs)
    assert init_trackers(acc, cfg.train, cfg.to_dict())
    for step, loss in [(1, 2.5), (2, 2.0), (3, 1.25)]:
        log_metrics(acc, {"step": step, "loss": loss, "lr": 1e-5 * step, "note": "text is not a metric"}, step)
    end_trackers(acc)
    events = list((tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    assert events
    res = subprocess.run(
        [sys.executable, "-c", READ_EVENTS, str(events[0].parent)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    scalars = json.loads(res.stdout)
    assert scalars["loss"] == [[1, 2.5], [2, 2.0], [3, 1.25]]
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3] and "note" not in scalars and "step" not in scalars


def test_no_tracker_is_a_no_op(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    assert tracker_names(cfg.train) == [] and accelerator_kwargs(cfg.train) == {}
    cfg.train.report_to = "none"
    assert tracker_names(cfg.train) == []

    class Bare:  # an accelerator built without log_with
        log_with, trackers = [], []

    assert not init_trackers(Bare(), cfg.train, cfg.to_dict())
    log_metrics(Bare(), {"loss": 1.0}, 1)
    end_trackers(Bare())
    assert not (tmp_path / "tracking").exists()


def test_report_to_checks(tmp_path, monkeypatch):
    cfg = load_config(None, ["train.report_to=[tensorboard, tensorbord]"])
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        tracker_names(cfg.train)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError, match=r"mmt\[track\]"):
        tracker_names(load_config(None, ["train.report_to=tensorboard"]).train)


def test_flat_config_is_scalars():
    flat = flat_config(load_config(None, []).to_dict())
    assert flat["train.lr"] == 5e-6 and flat["data.template"] == "T1"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
