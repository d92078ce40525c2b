"""mmt experiment on a tiny model: matched budget, checkpoint selection on dev, resume after a kill, bad files."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
import torch

from mmt import experiment as X
from mmt.errors import MmtError

LANGS = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn"}
ROWS = [
    ("The cat sleeps.", "Die Katze schläft.", "Le chat dort."),
    ("We are going home.", "Wir gehen nach Hause.", "Nous rentrons à la maison."),
    ("It is raining again.", "Es regnet wieder.", "Il pleut encore."),
    ("I am reading a book.", "Ich lese ein Buch.", "Je lis un livre."),
    ("The weather is nice today.", "Das Wetter ist heute schön.", "Il fait beau aujourd'hui."),
    ("Where is the station?", "Wo ist der Bahnhof?", "Où est la gare ?"),
]


def _flores(folder: Path, rows) -> None:
    folder.mkdir(parents=True)
    for k, (lang, code) in enumerate(LANGS.items()):
        with gzip.open(folder / f"{code}.txt.gz", "wt", encoding="utf-8") as fh:
            fh.write("".join(r[k] + "\n" for r in rows))


@pytest.fixture()
def setup(tmp_path, tok, jsonl_data):
    from mmt.testing import tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model("llama", vocab=len(tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data"
    _flores(data / "flores" / "dev", ROWS[:4])
    _flores(data / "flores" / "devtest", ROWS[2:] + ROWS[:2])
    common = f"""
model: {{name_or_path: {model_dir}}}
data:
  data_dir: {data}
  train: [{{kind: jsonl, path: {jsonl_data}}}]
  languages: [de, en]              # the fixture's fr-en/en-fr examples are left out: fr-en stays unseen
  max_length: 48
train: {{lr: 3.0e-3, max_steps: 100, batch_size: 8, micro_batch_size: 8, progress: false, log_every: 1}}
eval: {{test_set: flores/devtest, directions: [de-en, en-de], max_sentences: 3, batch_size: 4,
       max_new_tokens: 4, shots_from: flores/dev, off_target: false}}
"""
    (tmp_path / "full.yaml").write_text(common + "method: {name: mfti}\n")
    (tmp_path / "lora.yaml").write_text(common + "method: {name: mfti, lora: true, lora_r: 4}\n")
    return tmp_path


def _experiment(root: Path, extra: str = "", budget: str = "{steps: 4, batch_size: 4}") -> Path:
    p = root / "exp.yaml"
    p.write_text(f"""
output_dir: {root / "out"}
budget: {budget}
selection: {{dev_set: flores/dev, max_sentences: 2, every: 2, metric: chrf}}
eval: {{directions: [de-en, en-de, fr-en]}}   # fr-en is not trained: unseen
baselines:
  - {{label: zero-shot, shots: 0}}
  - {{label: 1-shot, shots: 1}}
runs:
  - {{label: full, config: full.yaml}}
  - {{label: lora, config: lora.yaml, overrides: ["train.lr=1.0e-2"]}}
compare: {{baseline: zero-shot, bootstrap: 50, ar_trials: 50, seed: 3}}
{extra}""")
    return p


class Killed(BaseException):
    pass


def test_experiment_resumes_without_redoing_finished_runs(setup, monkeypatch):
    exp_file = _experiment(setup)
    calls: list[str] = []
    real_train = X._train

    def counting_train(cfg, *a, **k):
        calls.append(Path(cfg.train.output_dir).parent.name)
        out = real_train(cfg, *a, **k)
        if kill_after == len(calls):
            raise Killed()  # killed after training, before the run's dev scoring and done marker
        return out

    monkeypatch.setattr(X, "_train", counting_train)
    kill_after = 2
    with pytest.raises(Killed):
        X.Runner(X.load_experiment(exp_file)).run_all()
    out = setup / "out"
    assert calls == ["full", "lora"]
    assert (out / "runs" / "full" / "done.json").is_file() and not (out / "runs" / "lora" / "done.json").exists()
    assert (out / "baselines" / "1-shot" / "done.json").is_file()

    kill_after = 0
    runner = X.Runner(X.load_experiment(exp_file))
    res = runner.run_all()
    assert calls == ["full", "lora", "lora"]  # the finished run is not trained again
    assert runner.calls["evaluate"] == 2 + 1  # lora: dev at steps 2 and 4, then the test; baselines not redone
    # the resumed run did not train again: its trainer log has each step once
    steps = [json.loads(x)["step"] for x in (out / "runs" / "lora" / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    summary = json.loads((out / "experiment.json").read_text())
    for r in summary["runs"]:
        assert r["budget"]["optimizer_steps"] == 4 and r["budget"]["batch_size"] == 4
        assert set(r["dev"]) == {"checkpoint-2", "checkpoint-4"}
        best = max(r["dev"].values(), key=lambda v: (v["chrf"], -v["step"]))
        assert r["best_step"] == best["step"]
    cmp = res["compare"]
    assert [s["label"] for s in cmp["systems"]] == ["zero-shot", "1-shot", "full", "lora"]
    assert cmp["seen_directions"] == ["de-en", "en-de"] and cmp["groups"]["unseen"]["directions"] == ["fr-en"]
    assert (out / "compare" / "compare.md").is_file() and (out / "compare" / "compare_deltas.png").is_file()
    md = (out / "experiment.md").read_text()
    assert "| full | mfti | 4 x 4 |" in md and "| run | 0 | 2 | 4 |" in md and "- lora: chrF++" in md
    zero = json.loads((out / "baselines" / "zero-shot" / "done.json").read_text())["dev"]["chrf"]
    assert f"| full | {zero:.1f} | " in md  # step 0 of the dev curve: the untuned model on the same dev lines

    # a third call redoes nothing
    runner = X.Runner(X.load_experiment(exp_file))
    runner.run_all()
    assert calls == ["full", "lora", "lora"] and runner.calls == {"train": 0, "evaluate": 0}


def test_selected_checkpoint_is_what_was_scored(setup, tmp_path):
    """The test hypotheses come from the selected checkpoint: re-scoring it in a fresh model gives them again."""
    from mmt.config import load_config
    from mmt.evaluate import evaluate
    from mmt.methods import get
    from mmt.models import load_model

    exp_file = _experiment(setup)
    exp = X.load_experiment(exp_file)
    exp.runs, exp.baselines, exp.compare = exp.runs[:1], [("zero-shot", 0)], {"bootstrap": 50, "ar_trials": 50}
    X.Runner(exp).run_all()
    out = setup / "out"
    done = json.loads((out / "runs" / "full" / "done.json").read_text())
    cfg = load_config(setup / "full.yaml")
    model, tok = load_model(cfg.model)
    model, _ = get("mfti").prepare(model, cfg.method, tokenizer=tok)
    X.load_checkpoint_weights(model, out / "runs" / "full" / "train" / "checkpoints" / done["best_checkpoint"])
    cfg.eval.directions = ["de-en", "en-de", "fr-en"]
    rep = evaluate(model, tok, cfg.eval, template=cfg.data.template, data_dir=cfg.data.data_dir, progress=False)
    for d, hyps in rep.hypotheses.items():
        assert (out / "test" / "full_hyps" / f"{d}.txt").read_text().splitlines() == hyps


def test_budget_force_and_check(setup):
    exp = X.load_experiment(_experiment(setup, budget="{steps: 6, batch_size: 4}"))
    cfg, b = X.Runner(exp).run_config(0, exp.runs[0])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.micro_batch_size) == (6, 4, 4)
    assert cfg.train.save_every == 2 and cfg.train.keep_last >= 4 and b["examples"] == 24
    exp = X.load_experiment(_experiment(setup, budget="{steps: 6, batch_size: 4, enforce: check}"))
    with pytest.raises(
        MmtError,
        match=r"does not match the budget: train.batch_size=8 \(budget 4\); "
        r"train.max_steps=100 \(budget 6 steps\)",
    ):
        X.Runner(exp).run_config(0, exp.runs[0])


def test_tokens_budget_picks_steps_from_example_length(setup, tok):
    from mmt.config import load_config
    from mmt.data import build_train_set

    exp = X.load_experiment(_experiment(setup, budget="{tokens: 600, batch_size: 4}"))
    cfg, b = X.Runner(exp, log=None).run_config(0, exp.runs[0])
    ts = build_train_set(load_config(setup / "full.yaml").data, tok)
    mean_len = sum(len(x) for x in ts.ids) / len(ts.ids)
    assert cfg.train.max_steps == max(1, round(600 / (4 * mean_len))) and b["kind"] == "tokens"


def test_checkpoint_loader_refuses_a_foreign_checkpoint(tmp_path, tok):
    from safetensors.torch import save_file

    from mmt.testing import tiny_model

    m = tiny_model("llama", vocab=len(tok), seed=0)
    (tmp_path / "ck").mkdir()
    save_file({"not.a.param": torch.zeros(2)}, str(tmp_path / "ck" / "trainable.safetensors"))
    with pytest.raises(MmtError, match="do not match the model"):
        X.load_checkpoint_weights(m, tmp_path / "ck")
    with pytest.raises(MmtError, match="no trainable.safetensors"):
        X.load_checkpoint_weights(m, tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("budget: {batch_size: 4}\nruns: [{label: a, config: full.yaml}]", "exactly one of 'steps'"),
        ("budget: {steps: 4}\nruns: [{label: a, config: full.yaml}]", "budget.batch_size: required"),
        (
            "budget: {steps: 0, batch_size: 4}\nruns: [{label: a, config: full.yaml}]",
            "budget.steps: must be an integer",
        ),
        ("budget: {steps: 4, batch_size: 4}\nrunz: []", "unknown key 'runz'"),
        ("budget: {steps: 4, batch_size: 4}\nruns: [{label: a, config: nope.yaml}]", "nope.yaml not found"),
        (
            "budget: {steps: 4, batch_size: 4}\nruns: [{label: a, config: full.yaml}, {label: a, config: lora.yaml}]",
            "labels must be unique",
        ),
        ("budget: {steps: 4, batch_size: 4}\nruns: [{label: 'a b', config: full.yaml}]", "it names files"),
        (
            "budget: {steps: 4, batch_size: 4}\nruns: [{label: a, config: full.yaml}]\ncompare: {baseline: zz}",
            "compare.baseline 'zz'",
        ),
        (
            "budget: {steps: 4, batch_size: 4}\nselection: {metric: ter}\nruns: [{label: a, config: full.yaml}]",
            "selection.metric",
        ),
        ("budget: [", "invalid YAML"),
    ],
)
def test_bad_experiment_files(setup, text, match):
    p = setup / "bad.yaml"
    p.write_text(text)
    with pytest.raises(MmtError, match=match):
        X.load_experiment(p)


def test_bad_run_override_and_changed_config(setup):
    exp = X.load_experiment(_experiment(setup))
    exp.runs[0].overrides = ["train.nope=1"]
    with pytest.raises(MmtError, match="unknown key 'nope'"):
        X.Runner(exp).run_config(0, exp.runs[0])
    # a finished run whose config changed is refused, not silently reused
    marker = setup / "out" / "runs" / "full" / "done.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"config_hash": "something-else"}))
    exp = X.load_experiment(_experiment(setup))
    with pytest.raises(MmtError, match="another configuration"):
        X.Runner(exp).run(0, exp.runs[0])


def test_cli_functions(setup, monkeypatch, capsys):
    p = argparse.ArgumentParser()
    X.add_experiment_args(p)
    args = p.parse_args([str(setup / "missing.yaml")])
    with pytest.raises(MmtError, match="experiment file not found"):
        X.run_experiment(args)
    exp_file = _experiment(setup)
    args = p.parse_args([str(exp_file), "-o", str(setup / "elsewhere")])
    exp = X.load_experiment(args.experiment, output_dir=args.output_dir)
    assert exp.output_dir == setup / "elsewhere"


def test_shipped_example_parses():
    repo = Path(__file__).resolve().parents[2]
    exp = X.load_experiment(repo / "examples" / "experiments" / "four_methods_demo.yaml")
    assert {r.label for r in exp.runs} >= {"mfti", "landermt", "mixmoe", "datm"}
    assert [b[1] for b in exp.baselines] == [0, 8]
    assert exp.budget.kind == "steps" and exp.budget.enforce == "force"
