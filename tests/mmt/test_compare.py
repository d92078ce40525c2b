"""mmt compare: agreement with sacreBLEU's paired tests, reading mmt's result files, bad inputs."""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmt import compare as C
from mmt.errors import MmtError

LANGS = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn"}
WORDS = {
    "en": "the a house cat river city school train book green small walks sees reads".split(),
    "de": "der die das Haus Katze Fluss Stadt Schule Zug Buch grün klein geht sieht liest".split(),
    "fr": "le la maison chat rivière ville école train livre vert petit marche voit lit".split(),
}


def _write_flores(root: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "flores" / "devtest"
    folder.mkdir(parents=True)
    lines = {lang: [] for lang in LANGS}
    for _ in range(n):
        k = rng.randint(4, 9)
        pos = [rng.randrange(len(WORDS["en"])) for _ in range(k)]
        for lang in LANGS:
            lines[lang].append(" ".join(WORDS[lang][p] for p in pos) + ".")
    for lang, code in LANGS.items():
        with gzip.open(folder / f"{code}.txt.gz", "wt", encoding="utf-8") as fh:
            fh.write("".join(x + "\n" for x in lines[lang]))
    return folder


def _noisy(refs: list[str], rate: float, seed: int) -> list[str]:
    """Drop or shuffle words of the references: a system of controlled quality."""
    rng = random.Random(seed)
    out = []
    for r in refs:
        w = r.split()
        w = [x for x in w if rng.random() > rate] or w[:1]
        if rng.random() < rate:
            rng.shuffle(w)
        out.append(" ".join(w))
    return out


def _read_refs(folder: Path, d: str) -> list[str]:
    t = d.split("-")[1]
    with gzip.open(folder / f"{LANGS[t]}.txt.gz", "rt", encoding="utf-8") as fh:
        return [x.rstrip("\n") for x in fh]


def _write_result(out: Path, label: str, test_folder: Path, hyps: dict[str, list[str]], **settings) -> Path:
    from mmt.evaluate import DirectionResult, EvalReport, bleu, chrf_pp, write_report

    refs = {d: _read_refs(test_folder, d) for d in hyps}
    results = [
        DirectionResult(direction=d, n=len(h), bleu=bleu(h, refs[d], d[-2:]), chrf=chrf_pp(h, refs[d]))
        for d, h in hyps.items()
    ]
    rep = EvalReport(
        label=label,
        results=results,
        hypotheses=hyps,
        settings={"test_set": str(test_folder), "first_line": 0, "max_sentences": None, **settings},
    )
    write_report(rep, out)
    return out / f"{label}.json"


@pytest.fixture()
def runs(tmp_path):
    folder = _write_flores(tmp_path)
    dirs = ["de-en", "en-de", "fr-en"]
    refs = {d: _read_refs(folder, d) for d in dirs}
    paths = {}
    for i, (label, rate) in enumerate((("base", 0.45), ("better", 0.15), ("same", 0.45))):
        hyps = {d: _noisy(refs[d], rate, seed=(0 if label == "same" else i) * 100 + k) for k, d in enumerate(dirs)}
        if label == "same":  # identical outputs to the baseline on purpose
            hyps = {d: _noisy(refs[d], 0.45, seed=k) for k, d in enumerate(dirs)}
        paths[label] = _write_result(tmp_path / label, label, folder, hyps)
    return tmp_path, folder, paths, refs


def test_per_direction_numbers_are_sacrebleus_paired_bootstrap(runs):
    """Scores, means, intervals and p-values equal sacreBLEU's own paired bootstrap / AR for a fixed seed."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import Result, _bootstrap_resample, _paired_ar_test, _paired_bs_test, estimate_ci

    tmp, folder, paths, refs = runs
    systems = C.load_systems([str(paths["base"]), str(paths["better"])])
    seed = 777
    res = C.compare(systems, samples=300, ar_trials=400, seed=seed, log=None)
    for d in ("de-en", "en-de", "fr-en"):
        base_h, sys_h = systems[0].hypotheses[d], systems[1].hypotheses[d]
        for name, metric in (("bleu", BLEU(tokenize="13a")), ("chrf", CHRF(word_order=2))):
            bl_stats = metric._extract_corpus_statistics(base_h, [refs[d]])
            bl = Result(metric._aggregate_and_compute(bl_stats).score)
            info = {name: (bl_stats, bl)}
            _, out = _paired_bs_test(info, "better", sys_h, [refs[d]], {name: metric}, n_samples=300, seed=seed)
            want = out[name]
            got = res["directions"][d]["systems"]["better"][name]
            assert got["score"] == pytest.approx(want.score, abs=1e-9)
            assert got["mean"] == pytest.approx(want.mean, abs=1e-9)
            assert got["ci"] == pytest.approx(want.ci, abs=1e-9)
            assert got["p_bs"] == pytest.approx(want.p_value, abs=1e-12)
            _, ar = _paired_ar_test(info, "better", sys_h, [refs[d]], {name: metric}, n_samples=400, seed=seed)
            assert got["p_ar"] == pytest.approx(ar[name].p_value, abs=1e-12)
            # baseline interval: sacreBLEU's resampling of the baseline alone (same draws)
            import os

            os.environ["SACREBLEU_SEED"] = str(seed)
            try:
                _, scores = _bootstrap_resample(bl_stats, metric, 300)
            finally:
                os.environ.pop("SACREBLEU_SEED")
            m, ci = estimate_ci(np.array([s.score for s in scores]))
            base_row = res["directions"][d]["systems"]["base"][name]
            assert (base_row["mean"], base_row["ci"]) == pytest.approx((m, ci), abs=1e-9)
            # the delta interval brackets the observed difference and is computed on the same draws
            lo, hi = got["delta_ci"]
            assert lo <= got["delta"] <= hi and got["delta"] == pytest.approx(want.score - bl.score)


def test_groups_and_stratified_average(runs):
    tmp, folder, paths, refs = runs
    systems = C.load_systems([str(paths["base"]), str(paths["better"]), str(paths["same"])])
    res = C.compare(systems, samples=200, ar_trials=200, seed=5, seen=["de-en", "en-de"], log=None)
    assert res["groups"]["all"]["directions"] == ["de-en", "en-de", "fr-en"]
    assert res["groups"]["seen"]["directions"] == ["de-en", "en-de"]
    assert res["groups"]["unseen"]["directions"] == ["fr-en"]
    assert res["groups"]["xx->en"]["directions"] == ["de-en", "fr-en"]
    assert "unseen xx->en" not in res["groups"]  # same directions as "unseen": not repeated
    # a one-direction group is exactly that direction's test
    one = res["groups"]["unseen"]["systems"]["better"]["bleu"]
    direct = res["directions"]["fr-en"]["systems"]["better"]["bleu"]
    for k in ("score", "mean", "ci", "delta", "p_bs", "p_ar"):
        assert one[k] == pytest.approx(direct[k], abs=1e-9), k
    # the average is the mean of the direction scores; a clearly better system is significant there
    allb = res["groups"]["all"]["systems"]["better"]
    assert allb["chrf"]["score"] == pytest.approx(
        np.mean([res["directions"][d]["systems"]["better"]["chrf"]["score"] for d in ("de-en", "en-de", "fr-en")])
    )
    assert allb["bleu"]["delta"] > 0 and allb["bleu"]["p_bs"] < 0.05 and allb["chrf"]["delta_ci"][0] > 0
    # identical outputs: zero difference, not significant
    same = res["groups"]["all"]["systems"]["same"]["bleu"]
    assert same["delta"] == 0 and same["delta_ci"] == [0, 0] and same["p_bs"] > 0.5 and same["p_ar"] > 0.5
    json.dumps(res)  # plain floats only (sacreBLEU's CLI fails here with numpy floats)


def test_cli_writes_outputs_and_reads_references_from_test_set(runs, capsys):
    tmp, folder, paths, refs = runs
    out = tmp / "cmp"
    p = argparse.ArgumentParser()
    C.add_compare_args(p)
    args = p.parse_args(
        [
            str(tmp / "base"),
            f"good={paths['better']}",
            "-o",
            str(out),
            "--bootstrap",
            "100",
            "--ar-trials",
            "100",
            "--seen",
            "de-en",
            "en-de",
        ]
    )
    assert C.run_compare(args) == 0
    res = json.loads((out / "compare.json").read_text())
    assert [s["label"] for s in res["systems"]] == ["base", "good"]
    md = (out / "compare.md").read_text()
    assert "## Average: all" in md and "## Average: unseen" in md and "| good |" in md and "COMET off" in md
    from PIL import Image

    with Image.open(out / "compare_deltas.png") as im:
        assert im.size[0] > 200
    assert "results written" in capsys.readouterr().out
    # references from the test set the result names equal those next to it (the _refs/ form)
    sys_a = C.load_system(paths["better"])
    ref_dir = paths["better"].parent / "better_refs"
    ref_dir.mkdir()
    for d, r in sys_a.references.items():
        (ref_dir / f"{d}.txt").write_text("".join(x + "\n" for x in r), encoding="utf-8")
    assert C.load_system(paths["better"]).references == sys_a.references == {d: refs[d] for d in refs}


def test_seen_directions_from_run_config(runs):
    tmp, folder, paths, refs = runs
    (tmp / "better" / "config.yaml").write_text(
        "data:\n  train:\n    - kind: tatoeba\n      directions: [de-en, en-de]\nmethod: {name: mfti}\n"
    )
    systems = C.load_systems([str(paths["base"]), str(paths["better"])])
    assert systems[1].trained_directions == ["de-en", "en-de"]
    res = C.compare(systems, samples=50, ar_trials=50, log=None)
    assert res["seen_directions"] == ["de-en", "en-de"] and "unseen" in res["groups"]


def test_comet_path_with_a_segment_scorer(runs):
    """COMET is tested on segment scores like the other metrics (a stand-in scorer: chrF of each sentence)."""
    from sacrebleu.metrics import CHRF

    tmp, folder, paths, refs = runs
    systems = C.load_systems([str(paths["base"]), str(paths["better"])])
    chrf = CHRF()

    def scorer(srcs, hyps, refs_):
        assert len(srcs) == len(hyps) == len(refs_)
        return [chrf.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs_)]

    sources = C.system_sources(systems[0])
    res = C.compare(systems, samples=100, ar_trials=100, comet_scorer=scorer, sources=sources, log=None)
    row = res["directions"]["de-en"]["systems"]["better"]["comet"]
    want = np.mean(scorer(sources["de-en"], systems[1].hypotheses["de-en"], refs["de-en"])) * 100
    assert row["score"] == pytest.approx(want) and row["delta"] > 0 and row["p_bs"] is not None
    assert "comet" in res["metrics"] and not any("COMET off" in n for n in res["notes"])


@pytest.mark.parametrize(
    "case", ["missing", "not_report", "short_hyps", "different_sentences", "one_system", "bad_baseline", "seed0"]
)
def test_bad_inputs_raise_clear_errors(runs, case):
    tmp, folder, paths, refs = runs
    inputs, kw = [str(paths["base"]), str(paths["better"])], {}
    if case == "missing":
        inputs[1] = str(tmp / "nope")
        match = "no such result file"
    elif case == "not_report":
        bad = tmp / "x.json"
        bad.write_text('{"a": 1}')
        inputs[1], match = str(bad), "not an mmt result file"
    elif case == "short_hyps":
        hf = paths["better"].parent / "better_hyps" / "de-en.txt"
        hf.write_text("\n".join(hf.read_text().splitlines()[:-1]) + "\n")
        match = "lines, the result file says n=40"
    elif case == "different_sentences":
        data = json.loads(paths["better"].read_text())
        data["settings"]["first_line"] = 1
        for r in data["results"]:
            r["n"] -= 1
        paths["better"].write_text(json.dumps(data))
        for hf in (paths["better"].parent / "better_hyps").iterdir():
            hf.write_text("".join(x + "\n" for x in hf.read_text().splitlines()[1:]))
        match = "different de-en sentences"
    elif case == "one_system":
        inputs, match = inputs[:1], "at least two systems"
    elif case == "bad_baseline":
        kw, match = {"baseline": "nobody"}, "not one of the systems"
    else:
        kw, match = {"seed": 0}, "seed must be >= 1"
    with pytest.raises(MmtError, match=match):
        C.compare(C.load_systems(inputs), samples=50, ar_trials=50, log=None, **kw)


def test_cli_exit_code_2_without_traceback(runs, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmt.cli", "compare", str(tmp_path / "nope"), str(tmp_path / "nope2")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2, proc.stderr
    assert "no such result file" in proc.stderr and "Traceback" not in proc.stderr


def test_reads_demo_and_train_eval_layouts(tmp_path):
    """mmt demo's folder (before/after/fewshot + demo_results.json) and mmt train --eval's (config.yaml, eval/)."""
    folder = _write_flores(tmp_path)
    refs = {d: _read_refs(folder, d) for d in ("de-en", "fr-en")}
    demo = tmp_path / "demo"
    for k, label in enumerate(("before", "after", "fewshot")):
        _write_result(demo, label, folder, {d: _noisy(r, 0.3, seed=k) for d, r in refs.items()})
    (demo / "demo_results.json").write_text(
        json.dumps(
            {
                "config": {
                    "data": {"train": [{"kind": "tatoeba", "directions": ["de-en", "en-de"]}]},
                    "method": {"name": "mfti"},
                }
            }
        )
    )
    systems = C.load_systems([str(demo)])
    assert sorted(s.label for s in systems) == ["after", "before", "fewshot"]
    assert all(s.trained_directions == ["de-en", "en-de"] for s in systems)
    run = tmp_path / "run"
    _write_result(run / "eval", "mfti", folder, {d: _noisy(r, 0.1, seed=9) for d, r in refs.items()})
    (run / "config.yaml").write_text("data:\n  train:\n    - {kind: parallel, directions: [fr-en]}\n")
    systems = C.load_systems([str(demo / "before.json"), str(run)])
    assert [s.label for s in systems] == ["before", "mfti"] and systems[1].trained_directions == ["fr-en"]
    res = C.compare(systems, samples=50, ar_trials=50, log=None)
    assert res["seen_directions"] == ["de-en", "en-de", "fr-en"] and any(
        "different directions" in n for n in res["notes"]
    )
