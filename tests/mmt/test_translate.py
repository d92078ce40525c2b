"""mmt translate: the run's template, batching, stdin/stdout, direction gates, and bad input (exit 2)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmt import cli
from mmt.config import dump_config, load_config
from mmt.data import build_prompt
from mmt.evaluate import generate
from mmt.translate import one_line

LINES = ["Das Wetter ist heute schön.", "Wo ist der Bahnhof?", "", "Ich lese ein Buch."]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "translate", ("mmt.translate", "add_translate_args", "run_translate", "x"))


def _save(folder: Path, tok_dir: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    from mmt.models import save_model
    from mmt.testing import tiny_model

    save_model(tiny_model("llama", vocab=384, seed=seed), AutoTokenizer.from_pretrained(tok_dir), folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok_dir) -> Path:
    """A run folder as mmt train leaves it: config.yaml (template T3) and final/."""
    run = tmp_path_factory.mktemp("run")
    _save(run / "final", tok_dir, seed=0)
    dump_config(load_config(None, ["data.template=T3"]), run / "config.yaml")
    return run


def _expected(model_dir: Path, direction, template: str, lines=LINES) -> list[str]:
    from mmt.models import load_model

    model, tok = load_model(name_or_path=str(model_dir), verbose=False)
    keep = [ln for ln in lines if ln.strip()]
    hyps = iter(generate(model, tok, [build_prompt(template, *direction, ln) for ln in keep], max_new_tokens=6))
    return [one_line(next(hyps)) if ln.strip() else "" for ln in lines]


def test_translates_a_file_with_the_runs_template(run_dir, tmp_path):
    src = tmp_path / "in.de"
    src.write_text("\ufeff" + "\n".join(LINES) + "\n", encoding="utf-8")  # a BOM is accepted
    out = tmp_path / "out" / "hyp.en"
    rc = cli.main(
        [
            "translate",
            "--model",
            str(run_dir),
            "--src",
            "de",
            "--tgt",
            "English",
            "--input",
            str(src),
            "--output",
            str(out),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0
    got = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert got == _expected(run_dir / "final", ("de", "en"), "T3")
    assert got != _expected(run_dir / "final", ("de", "en"), "T1")  # the run's template, not the default
    assert got[2] == ""  # a blank line stays blank, lines stay aligned
    assert not list(out.parent.glob("*.tmp"))


def test_stdin_to_stdout_in_a_fresh_process(run_dir):
    code = (
        "import sys; from mmt import cli; cli.SUBCOMMANDS['translate'] = "
        "('mmt.translate', 'add_translate_args', 'run_translate', 'x'); sys.exit(cli.main(sys.argv[1:]))"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "translate",
            "-m",
            str(run_dir / "final"),
            "--src",
            "de",
            "--tgt",
            "en",
            "--max-new-tokens",
            "6",
            "--template",
            "T1",
        ],
        input="\n".join(LINES),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:-1] == _expected(run_dir / "final", ("de", "en"), "T1")


def test_direction_gate_routes_each_direction(tmp_path, tok_dir, monkeypatch):
    a, b = _save(tmp_path / "xx_en", tok_dir, seed=1), _save(tmp_path / "en_xx", tok_dir, seed=2)
    gate = tmp_path / "gated"
    gate.mkdir()
    (gate / "directional.json").write_text(
        json.dumps(
            {
                "lora": False,
                "gate": {"de-en": str(a), "en-de": str(b)},
                "units": {"xx-en": {"side": "xx-en", "weights": str(a)}, "en-xx": {"side": "en-xx", "weights": str(b)}},
            }
        )
    )
    rc = cli.main(
        [
            "translate",
            "--model",
            str(gate),
            "--directions",
            "de-en",
            "en-de",
            "--input",
            str(_write(tmp_path / "in.txt")),
            "--output",
            str(tmp_path / "out"),
            "--max-new-tokens",
            "6",
            "--no-progress",
        ]
    )
    assert rc == 0
    de_en = (tmp_path / "out" / "de-en.txt").read_text(encoding="utf-8").split("\n")[:-1]
    en_de = (tmp_path / "out" / "en-de.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert de_en == _expected(a, ("de", "en"), "T1")
    assert en_de == _expected(b, ("en", "de"), "T1")
    assert en_de != _expected(a, ("en", "de"), "T1")  # the two models differ, so routing is observable


def _write(p: Path) -> Path:
    p.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--src", "de", "--tgt", "en", "--input", "missing.txt"], "input file not found"),
        (["--src", "de", "--tgt", "klingon"], "unknown language code"),
        (["--src", "de"], "--src de --tgt en"),
        (["--directions", "de-en", "en-de"], "--output <folder>"),
        (["--src", "de", "--tgt", "en", "--template", "NOPE"], "unknown template"),
    ],
)
def test_bad_arguments_exit_2(run_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hallo\n"))
    assert cli.main(["translate", "--model", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_not_a_model_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "nowhere"):
        assert cli.main(["translate", "--model", str(bad), "--src", "de", "--tgt", "en"]) == 2
        err = capsys.readouterr().err
        assert ("not a model" in err or "no such model" in err) and str(bad) in err


def test_chat_template_model(tmp_path, tok_dir):
    """A model whose tokenizer has a chat template is prompted through it (data.template: chat)."""
    from transformers import AutoTokenizer

    from mmt.data import PromptBuilder
    from mmt.models import load_model, save_model
    from mmt.testing import tiny_model

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    save_model(tiny_model("llama", vocab=384, seed=3), tok, tmp_path / "chat")
    src = _write(tmp_path / "in.txt")
    assert (
        cli.main(
            [
                "translate",
                "-m",
                str(tmp_path / "chat"),
                "--src",
                "de",
                "--tgt",
                "en",
                "--template",
                "chat",
                "-i",
                str(src),
                "-o",
                str(tmp_path / "out.txt"),
                "--max-new-tokens",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    model, tok2 = load_model(name_or_path=str(tmp_path / "chat"), verbose=False)
    builder = PromptBuilder("chat", tok2)
    keep = [ln for ln in LINES if ln.strip()]
    hyps = iter(generate(model, tok2, [builder("de", "en", ln) for ln in keep], max_new_tokens=6))
    want = [one_line(next(hyps)) if ln.strip() else "" for ln in LINES]
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")[:-1] == want
