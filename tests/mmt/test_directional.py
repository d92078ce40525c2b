"""Direction-aware training: unit planning, the one-unit prepare(), the full run with merge, and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmt.config import load_config
from mmt.methods import directional as D
from mmt.testing import tiny_model


def test_units_follow_xalma_groups():
    cfg = D.Config()
    units = D.plan_units(cfg, [("de", "en"), ("nl", "en"), ("fr", "en"), ("en", "de"), ("en", "fr")])
    by = {u.name: u for u in units}
    assert set(by) == {"xx-en.g1", "xx-en.g4", "en-xx.all"}
    assert by["xx-en.g1"].directions == [("de", "en"), ("nl", "en")]
    assert by["en-xx.all"].side == "en-xx" and len(by["en-xx.all"].directions) == 2


def test_unit_switches_and_errors():
    dirs = [("de", "en"), ("nl", "en"), ("en", "de"), ("en", "fr")]
    units = D.plan_units(D.Config(separate_unit="language", en_xx_unit="group"), dirs)
    assert [u.name for u in units] == ["xx-en.de", "xx-en.nl", "en-xx.g1", "en-xx.g4"]
    custom = D.plan_units(D.Config(groups={"west": ["de", "nl"]}), dirs + [("sw", "en")])
    assert {u.name for u in custom} == {"xx-en.west", "xx-en.other-sw", "en-xx.all"}
    with pytest.raises(ValueError, match="not English-centric"):
        D.plan_units(D.Config(), [("de", "fr")])
    with pytest.raises(ValueError, match="separate_unit"):
        D.plan_units(D.Config(separate_unit="pair"), dirs)
    with pytest.raises(ValueError, match="mmt train --method directional"):
        D.prepare(tiny_model(), D.Config())


def test_prepare_one_unit_lora_and_full():
    model, plan = D.prepare(tiny_model(), D.Config(unit="xx-en.g1", directions=["de-en"], lora_r=4))
    assert plan.directions == [("de", "en")] and "lora" in plan.info
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    model, plan = D.prepare(tiny_model(), D.Config(unit="en-xx.all", directions=["en-de"], lora=False))
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad


def _cfg(jsonl, out, *extra):
    return load_config(
        None,
        [
            f"data.train=[{{kind: jsonl, path: {jsonl}}}]",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.lr=3e-3",
            "train.save_every=0",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "method.groups={a: [de], b: [fr]}",
            "method.lora_r=4",
            "method.merge_density=0.5",
            *extra,
        ],
        method="directional",
    )


# save_model=false is what `mmt experiment` passes: the units must still write the final/ the merge reads
@pytest.mark.parametrize("lora, save_model", [(True, True), (False, True), (True, False)])
def test_run_directional_trains_units_merges_and_gates(tok, jsonl_data, tmp_path, lora, save_model):
    cfg = _cfg(
        jsonl_data, tmp_path / "run", f"method.lora={str(lora).lower()}", f"train.save_model={str(save_model).lower()}"
    )
    base = tiny_model("llama", vocab=len(tok), seed=0)
    manifest = D.run_directional(cfg, model=base, tokenizer=tok)
    assert set(manifest["units"]) == {"xx-en.a", "xx-en.b", "en-xx.all"}
    merged = manifest["merged"]["weights"]
    assert manifest["gate"]["de-en"] == merged == manifest["gate"]["fr-en"]
    assert manifest["gate"]["en-de"] == manifest["units"]["en-xx.all"]["weights"] == manifest["gate"]["en-fr"]
    assert json.loads((tmp_path / "run" / "directional.json").read_text()) == manifest
    assert (tmp_path / "run" / merged / "config.json").is_file()  # the exact merge is a full model (LoRA too)
    assert manifest["merged"]["exact"] is True
    gate = D.DirectionGate(tmp_path / "run")
    m = gate.model_for("de", "en", base_model=tiny_model("llama", vocab=len(tok), seed=0))
    assert torch.isfinite(m(torch.tensor([[1, 5, 7]])).logits).all()
    # an unseen XX->En language routes to the merged model, an unseen En->XX one to the joint model
    assert gate.weights_for("sw", "en") == str(tmp_path / "run" / merged)
    assert gate.weights_for("en", "sw") == str(tmp_path / "run" / manifest["units"]["en-xx.all"]["weights"])


def test_cli_train_runs_every_unit_and_merge(tmp_path, monkeypatch):
    """`mmt train --method directional` hands the whole run (units + merge) to train_and_report."""
    import mmt.methods.directional as directional
    from mmt import cli

    seen = {}

    def fake(cfg, *, with_eval=False):
        seen["method"], seen["eval"] = cfg.method_name, with_eval
        return 0

    monkeypatch.setattr(directional, "train_and_report", fake)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: x}\nmethod: {name: directional}\n")
    assert cli.main(["train", "-c", str(cfg), "--eval"]) == 0
    assert seen == {"method": "directional", "eval": True}


def test_single_named_unit_is_a_joint_baseline(tok, jsonl_data, tmp_path):
    """method.unit set: one unit over every direction (same LoRA), no merge; the gate sends all to it."""
    cfg = _cfg(jsonl_data, tmp_path / "joint", "method.unit=joint")
    manifest = D.run_directional(cfg, model=tiny_model("llama", vocab=len(tok), seed=0), tokenizer=tok)
    assert list(manifest["units"]) == ["joint"] and "merged" not in manifest
    assert len(manifest["units"]["joint"]["directions"]) == 4
    assert len(set(manifest["gate"].values())) == 1


def test_evaluate_gated_loads_exactly_the_picked_adapter_and_reuses_scores(tmp_path, monkeypatch):
    """dat scores XX->En with each unit's own adapter (never stacked on the merged one); weights already
    scored by datm (the En->XX unit) are reused, not decoded again."""
    import mmt.evaluate as E

    manifest = {
        "lora": True,
        "units": {
            "xx-en.a": {"side": "xx-en", "directions": ["de-en"], "weights": "A"},
            "xx-en.b": {"side": "xx-en", "directions": ["fr-en"], "weights": "B"},
            "en-xx.all": {"side": "en-xx", "directions": ["en-de", "en-fr"], "weights": "E"},
        },
        "merged": {"weights": "MRG"},
        "gate": {"de-en": "MRG", "fr-en": "MRG", "en-de": "E", "en-fr": "E"},
    }
    (tmp_path / "directional.json").write_text(json.dumps(manifest))
    loaded, decoded = [], []
    monkeypatch.setattr(
        D.DirectionGate,
        "load",
        lambda self, w, base_model=None, model_cfg=None: loaded.append(Path(w).name) or (Path(w).name, None),
    )

    def fake_eval(model, tok, ecfg, **kw):
        decoded.append((model, list(ecfg.directions)))
        return E.EvalReport(
            label=kw["label"],
            results=[E.DirectionResult(d, 1, 1.0, 2.0) for d in ecfg.directions],
            hypotheses={d: [model] for d in ecfg.directions},
        )

    monkeypatch.setattr(E, "evaluate", fake_eval)
    cfg = load_config(None, ["eval.directions=[de-en,fr-en,en-de,en-fr]"], method="directional")
    scored = {}
    datm = D.evaluate_gated(cfg, tmp_path, label="datm", merged=True, done=scored)
    dat = D.evaluate_gated(cfg, tmp_path, label="dat", merged=False, skip=dict(scored))
    assert loaded == ["MRG", "E", "A", "B"]
    assert decoded == [("MRG", ["de-en", "fr-en"]), ("E", ["en-de", "en-fr"]), ("A", ["de-en"]), ("B", ["fr-en"])]
    assert (
        [r.direction for r in dat.results]
        == ["de-en", "fr-en", "en-de", "en-fr"]
        == [r.direction for r in datm.results]
    )
    assert dat.hypotheses == {"de-en": ["A"], "fr-en": ["B"], "en-de": ["E"], "en-fr": ["E"]}


def test_rerun_reuses_finished_units(tok, jsonl_data, tmp_path):
    """An interrupted run restarted with train.resume=auto does not retrain units whose final weights exist."""
    cfg = _cfg(jsonl_data, tmp_path / "run")
    D.run_directional(cfg, model=tiny_model("llama", vocab=len(tok), seed=0), tokenizer=tok)
    again = D.run_directional(cfg, model=tiny_model("llama", vocab=len(tok), seed=0), tokenizer=tok)
    assert all(u.get("reused") for u in again["units"].values()) and "merged" in again
    fresh = D.run_directional(
        _cfg(jsonl_data, tmp_path / "run", "train.resume=never"),
        model=tiny_model("llama", vocab=len(tok), seed=0),
        tokenizer=tok,
    )
    assert not any(u.get("reused") for u in fresh["units"].values())
