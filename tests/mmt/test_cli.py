import os
import subprocess
import sys
from pathlib import Path

from mmt import cli

REPO = Path(__file__).resolve().parents[2]


def _mmt(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mmt.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_help_teaches():
    out = _mmt("--help").stdout
    for word in ("train", "eval", "demo", "detect", "merge", "examples:", "train.lr=1e-5"):
        assert word in out
    tr = _mmt("train", "--help").stdout
    assert "--config" in tr and "--method" in tr and "accelerate launch" in tr
    assert "--shots" in _mmt("eval", "--help").stdout
    assert "--steps" in _mmt("demo", "--help").stdout


def test_unavailable_subcommand(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "detect", ("mmt.no_such_module", "add", "run", "x"))
    assert cli.main(["detect", "--anything"]) == 2
    assert "not available yet" in capsys.readouterr().err
    monkeypatch.setitem(cli.SUBCOMMANDS, "merge", ("mmt.config", "add_args", "run", "x"))
    assert cli.main(["merge"]) == 2
    assert "does not define add_args, run" in capsys.readouterr().err


def test_config_error_is_reported(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lrr: 1\n", encoding="utf-8")
    assert cli.main(["train", "--config", str(f)]) == 2
    assert "bad.yaml: train: unknown key 'lrr'" in capsys.readouterr().err


def test_train_and_eval_end_to_end(tmp_path, tok, jsonl_data):
    from mmt.models import save_model
    from mmt.testing import tiny_model

    save_model(tiny_model("llama", vocab=len(tok)), tok, tmp_path / "tiny")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "deu_Latn.txt").write_text("Hallo Welt.\nGuten Tag.\n", encoding="utf-8")
    (tmp_path / "test" / "eng_Latn.txt").write_text("Hello world.\nGood day.\n", encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""
model: {{name_or_path: {tmp_path / "tiny"}}}
data:
  data_dir: {tmp_path}
  train: [{{kind: jsonl, path: {jsonl_data}}}]
method: {{name: mfti}}
train: {{output_dir: {tmp_path / "run"}, max_steps: 2, batch_size: 4, micro_batch_size: 2, save_every: 1, progress: false}}
eval: {{test_set: test, directions: [de-en], max_new_tokens: 4, off_target: false}}
""",
        encoding="utf-8",
    )
    r = _mmt("train", "-c", str(cfg), "train.lr=1e-3", "--eval")
    assert "trained 2 steps" in r.stdout and "| de-en | 2 |" in r.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "eval" / "mfti.json").is_file()
    r2 = _mmt("eval", "-c", str(cfg), "--model", str(tmp_path / "run" / "final"), "--label", "ft")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (tmp_path / "run" / "eval" / "ft.md").is_file()


def test_bad_override_value_is_a_clean_error(capsys):
    assert cli.main(["train", "train.max_steps=ten", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "mmt train: error: <defaults>: train.max_steps: expected an integer, got 'ten'"
    assert "Traceback" not in err
