"""A corpus of user mistakes: every one ends with exit code 2, a message naming the place, no traceback, and
nothing already written changed.

Add a case by appending a :class:`Case` to :data:`CASES`: ``argv`` is the command line after ``mmt`` with
``{w}`` standing for the shared folder built by the ``world`` fixture (a tiny model, data files, a finished run);
``setup`` (optional) writes the bad input under ``{w}``; ``expect`` is a regex the error message must match.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmt import cli
from mmt.errors import MmtError


@dataclass
class Case:
    name: str
    argv: str
    expect: str
    setup: Callable[[Path], None] | None = None


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        p = w / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)

    return setup


def _copy_run(name: str, damage: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        shutil.copytree(w / "run", w / name)
        if damage is not None:
            damage(w / name / "checkpoints")

    return setup


def _truncate(rel: str, keep: int = 50) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        for ck in root.iterdir():
            f = ck / rel
            f.write_bytes(f.read_bytes()[:keep])

    return damage


TRAIN = "train -c {w}/run.yaml train.progress=false"
CASES = [
    # config: types, values, keys
    Case(
        "override of the wrong type",
        f"{TRAIN} train.max_steps=ten",
        r"train\.max_steps: expected an integer, got 'ten'",
    ),
    Case(
        "yaml value of the wrong type",
        "train -c {w}/lr_text.yaml",
        r"lr_text\.yaml: train\.lr: expected a number",
        _write("lr_text.yaml", "train:\n  lr: fast\n"),
    ),
    Case("negative lr", f"{TRAIN} train.lr=-1e-3", r"train\.lr: must be >= 0"),
    Case("unknown template", f"{TRAIN} data.template=T9", r"data\.template: unknown template 'T9'"),
    Case(
        "unknown language in directions",
        f"{TRAIN} 'data.train=[{{kind: parallel, directions: [xx-en]}}]'",
        r"data\.train\[0\]\.directions\[0\]: unknown language code 'xx'",
    ),
    Case(
        "malformed direction",
        f"{TRAIN} 'data.train=[{{kind: parallel, directions: [deen]}}]'",
        r"directions\[0\]: direction 'deen' must look like 'de-en'",
    ),
    Case("unknown key", f"{TRAIN} train.lrr=1", r"train: unknown key 'lrr'"),
    Case("unknown method", f"{TRAIN} --method nope", r"method\.name: .*nope"),
    Case(
        "batch not a multiple of micro batch",
        f"{TRAIN} train.batch_size=5 train.micro_batch_size=2",
        r"train\.batch_size: global batch 5 is not a multiple",
    ),
    Case(
        "invalid yaml", "train -c {w}/broken.yaml", r"broken\.yaml: invalid YAML", _write("broken.yaml", "train: [\n")
    ),
    Case("missing config file", "train -c {w}/nope.yaml", r"config file not found: .*nope\.yaml"),
    Case("override without =", f"{TRAIN} train.lr", r"override 'train\.lr': expected section\.key=value"),
    Case(
        "output_dir is a file",
        f"{TRAIN} train.output_dir={{w}}/afile/out",
        r"train\.output_dir=.*afile is a file",
        _write("afile", "x"),
    ),
    Case(
        "eval: malformed --directions",
        "eval -c {w}/run.yaml --model {w}/model --directions deen",
        r"eval\.directions\[0\]: direction 'deen'",
    ),
    Case(
        "eval: unknown language",
        "eval -c {w}/run.yaml --model {w}/model --directions de-xx",
        r"eval\.directions\[0\]: unknown language code 'xx'",
    ),
    # data files
    Case(
        "empty jsonl",
        f"{TRAIN} 'data.train=[{{kind: jsonl, path: {{w}}/empty.jsonl}}]'",
        r"empty\.jsonl: empty file",
        _write("empty.jsonl", "\n\n"),
    ),
    Case(
        "invalid json line",
        f"{TRAIN} 'data.train=[{{kind: jsonl, path: {{w}}/bad.jsonl}}]'",
        r"bad\.jsonl:2: invalid JSON",
        _write("bad.jsonl", '{"src_lang": "de", "tgt_lang": "en", "src": "a", "tgt": "b"}\n{"src_lang": \n'),
    ),
    Case(
        "unknown language in a jsonl line",
        f"{TRAIN} 'data.train=[{{kind: jsonl, path: {{w}}/lang.jsonl}}]'",
        r"lang\.jsonl:1: unknown language code 'klingon'",
        _write("lang.jsonl", '{"src_lang": "klingon", "tgt_lang": "en", "src": "a", "tgt": "b"}\n'),
    ),
    Case(
        "jsonl line without a field",
        f"{TRAIN} 'data.train=[{{kind: jsonl, path: {{w}}/nokey.jsonl}}]'",
        r"nokey\.jsonl:1: missing key\(s\) \['tgt'\]",
        _write("nokey.jsonl", '{"src_lang": "de", "tgt_lang": "en", "src": "a"}\n'),
    ),
    Case(
        "empty text in jsonl",
        f"{TRAIN} 'data.train=[{{kind: jsonl, path: {{w}}/blank.jsonl}}]'",
        r"blank\.jsonl:1: empty source or target",
        _write("blank.jsonl", '{"src_lang": "de", "tgt_lang": "en", "src": " ", "tgt": "b"}\n'),
    ),
    Case(
        "missing data file",
        f"{TRAIN} 'data.train=[{{kind: jsonl, path: {{w}}/none.jsonl}}]'",
        r"none\.jsonl: file not found",
    ),
    Case(
        "empty parallel file",
        f"{TRAIN} 'data.train=[{{kind: parallel, path: {{w}}/par, directions: [de-en]}}]'",
        r"train\.de: empty file",
        lambda w: (_write("par/de-en/train.de", "")(w), _write("par/de-en/train.en", "a\n")(w)),
    ),
    Case(
        "misaligned parallel files",
        f"{TRAIN} 'data.train=[{{kind: parallel, path: {{w}}/mis, directions: [de-en]}}]'",
        r"misaligned parallel files: .*train\.de has 2 lines",
        lambda w: (_write("mis/de-en/train.de", "a\nb\n")(w), _write("mis/de-en/train.en", "a\n")(w)),
    ),
    Case("all examples filtered away", f"{TRAIN} data.languages=[ja]", r"no training examples left"),
    # models
    Case(
        "eval: folder that is not a model",
        "eval -c {w}/run.yaml --model {w}/notamodel",
        r"notamodel",
        _write("notamodel/readme.txt", "hello"),
    ),
    Case("eval: model path that does not exist", "eval -c {w}/run.yaml --model {w}/missing", r"missing"),
    Case("eval: the checkpoints folder of a run", "eval -c {w}/run.yaml --model {w}/run/checkpoints", r"checkpoints"),
    # LANDeRMT neuron files
    Case(
        "landermt: corrupt neuron file",
        f"{TRAIN} --method landermt method.neurons_file={{w}}/neurons.safetensors",
        r"neurons\.safetensors: damaged or not a LANDeRMT neuron file",
        _write("neurons.safetensors", b"\x10\x00garbage"),
    ),
    Case(
        "landermt: a model file as neuron file",
        f"{TRAIN} --method landermt method.neurons_file={{w}}/model/model.safetensors",
        r"model\.safetensors is not a LANDeRMT neuron file",
    ),
    Case(
        "detect: unknown language", "detect -c {w}/run.yaml --languages de xx --layers 0", r"unknown language code 'xx'"
    ),
    # checkpoints and resume
    Case(
        "resume: damaged optimizer in every checkpoint",
        f"{TRAIN} train.output_dir={{w}}/dmg train.max_steps=4",
        r"no intact checkpoint.*optimizer\.safetensors: damaged",
        _copy_run("dmg", _truncate("optimizer.safetensors")),
    ),
    Case(
        "resume: truncated weights, explicit",
        f"{TRAIN} train.output_dir={{w}}/trw train.resume={{w}}/trw/checkpoints/checkpoint-2",
        r"checkpoint-2/trainable\.safetensors: damaged \(size 50",
        _copy_run("trw", _truncate("trainable.safetensors")),
    ),
    Case(
        "resume: damaged RNG state",
        f"{TRAIN} train.output_dir={{w}}/rng train.max_steps=4",
        r"rng_0\.json: damaged",
        _copy_run("rng", _truncate("rng_0.json", 10)),
    ),
    Case(
        "resume: damaged trainer state",
        f"{TRAIN} train.output_dir={{w}}/ts train.max_steps=4",
        r"trainer_state\.json: damaged",
        _copy_run("ts", _truncate("trainer_state.json", 10)),
    ),
    Case(
        "resume: not a checkpoint folder", f"{TRAIN} train.resume={{w}}/model", r"model: not a complete mmt checkpoint"
    ),
    Case(
        "resume: different data",
        f"{TRAIN} train.output_dir={{w}}/dd train.max_steps=4 data.train.0.max_examples=3",
        r"training data differ .*max_examples: None then, 3 now",
        _copy_run("dd"),
    ),
    Case(
        "resume: different model",
        f"{TRAIN} train.output_dir={{w}}/dm train.max_steps=4 model.name_or_path={{w}}/model2",
        r"the model differs.*name_or_path",
        _copy_run("dm"),
    ),
    # merge
    Case(
        "merge: adapters that do not exist, no config file", "merge adapters=[{w}/a1,{w}/a2] output={w}/merged", r"a1"
    ),
    Case("merge: missing config file", "merge {w}/nope.yaml", r"nope\.yaml does not exist"),
]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tok, jsonl_data):
    from mmt.models import save_model
    from mmt.testing import tiny_model

    w = tmp_path_factory.mktemp("world")
    save_model(tiny_model("llama", vocab=len(tok)), tok, w / "model")
    save_model(tiny_model("llama", vocab=len(tok), hidden=32, intermediate=64), tok, w / "model2")
    (w / "test").mkdir()
    (w / "test" / "deu_Latn.txt").write_text("Hallo Welt.\nGuten Tag.\n", encoding="utf-8")
    (w / "test" / "eng_Latn.txt").write_text("Hello world.\nGood day.\n", encoding="utf-8")
    (w / "test" / "fra_Latn.txt").write_text("Bonjour le monde.\nBonne journée.\n", encoding="utf-8")
    (w / "run.yaml").write_text(
        f"""
model: {{name_or_path: {w / "model"}}}
data: {{data_dir: {w}, train: [{{kind: jsonl, path: {jsonl_data}}}]}}
method: {{name: mfti}}
train: {{output_dir: {w / "run"}, max_steps: 2, batch_size: 4, micro_batch_size: 2, save_every: 1, keep_last: 3,
         lr: 1e-3, progress: false}}
eval: {{test_set: test, directions: [de-en], max_new_tokens: 4, off_target: false, output_dir: {w / "eval"}}}
""",
        encoding="utf-8",
    )
    assert cli.main(["train", "-c", str(w / "run.yaml")]) == 0
    return w


def run_case(case: Case, w: Path, capsys) -> tuple[str, str]:
    """('clear' | 'traceback' | 'silent' | 'vague', stderr) for one case."""
    if case.setup is not None:
        case.setup(w)
    before = _tree_digest(w)
    argv = shlex.split(case.argv.replace("{w}", str(w)))
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    except MmtError as exc:  # not reachable through cli.main, but keeps the report honest
        return "traceback", f"escaped: {exc!r}"
    except Exception as exc:  # noqa: BLE001 - exactly what this corpus hunts
        return "traceback", f"{type(exc).__name__}: {exc}"
    err = capsys.readouterr().err
    assert _tree_digest(w) == before, "a failing command changed or added files"
    if rc == 0:
        return "silent", err
    import re

    if rc != 2 or "Traceback" in err or not re.search(case.expect, err, re.DOTALL):
        return "vague", f"rc={rc}: {err[-800:]}"
    return "clear", err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, world, capsys):
    outcome, err = run_case(case, world, capsys)
    assert outcome == "clear", f"{case.name}: {outcome}: {err}"


def test_damaged_last_checkpoint_resumes_from_the_previous_one(world, capsys):
    shutil.copytree(world / "run", world / "fb")
    last = world / "fb" / "checkpoints" / "checkpoint-2"
    w = last / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)  # zeroed in the middle, header intact
    w.write_bytes(bytes(data))
    rc = cli.main(["train", "-c", str(world / "run.yaml"), f"train.output_dir={world / 'fb'}", "train.max_steps=3"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "checkpoint-2/model.safetensors: damaged" in err and "falling back" in err and "checkpoint-1" in err
    assert "resumed from" in err and "checkpoint-1 (step 1 of 3)" in err


def test_bom_and_skipped_lines_are_handled_and_reported(world, tok, capsys):
    from mmt.config import load_config
    from mmt.data import build_train_set, load_parallel

    rows = [{"src_lang": "de", "tgt_lang": "en", "src": f"Hallo {i}", "tgt": f"Hello {i}"} for i in range(4)]
    rows[2]["src"] = ""
    text = "\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n"
    (world / "bom.jsonl").write_text(text, encoding="utf-8")
    cfg = load_config(None, [f"data.train=[{{kind: jsonl, path: {world / 'bom.jsonl'}}}]", "data.on_bad_line=skip"])
    ts = build_train_set(cfg.data, tok)
    assert len(ts) == 3
    assert "skipped 1 of 4 lines of" in capsys.readouterr().err
    (world / "bp" / "de-en").mkdir(parents=True)
    (world / "bp" / "de-en" / "train.de").write_text("\ufeffHallo\n\nWelt\n", encoding="utf-8")
    (world / "bp" / "de-en" / "train.en").write_text("\ufeffHello\nx\nWorld\n", encoding="utf-8")
    ex = load_parallel(world / "bp", ("de", "en"), on_bad_line="skip")
    assert [e.src for e in ex] == ["Hallo", "Welt"] and ex[0].tgt == "Hello"
    err = capsys.readouterr().err
    assert "skipped 1 of 3 lines of" in err and "train.de (1 empty line; first at line 2)" in err


def test_merge_override_after_a_flag(world, capsys):
    from mmt.merge import load_merge_config

    cfg = world / "merge.yaml"
    cfg.write_text(
        f"method: ties\nmodels: [{world / 'model'}, {world / 'model'}]\nbase_model: {world / 'model'}\n"
        f"output: {world / 'merged'}\n"
    )
    rc = cli.main(["merge", str(cfg), "--no-progress", "density=0.3"])
    assert rc == 0, capsys.readouterr().err
    assert load_merge_config(cfg, ["density=0.3"]).density == 0.3
    assert (world / "merged" / "merge_config.yaml").is_file() or any((world / "merged").iterdir())
