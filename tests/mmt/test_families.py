"""The model-family matrix: every method variant on tiny random models of every family the papers used.

Each cell: prepare -> 2 training steps -> save (final/ and a checkpoint per step) -> reload in a new process ->
bit-identical logits per direction -> ``mmt eval`` on 2 sentences with the in-process hypotheses. One fresh
process per family checks all its cells (tests/mmt/_family_worker.py).
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "bloom", "xglm"]
VARIANTS = [
    "mfti_full",
    "mfti_lora",
    "landermt_ffn",
    "landermt_output",
    "landermt_ffn_car",
    "mixmoe_stage1",
    "mixmoe_stage2",
    "directional_merged",
]
DIRECTIONS = ["de-en", "en-fr"]
SENTS = {
    "deu_Latn": ["Das Wetter ist heute schön.", "Ich lese ein Buch.", "Die Katze schläft.", "Wo ist der Bahnhof?"],
    "eng_Latn": ["The weather is nice today.", "I am reading a book.", "The cat sleeps.", "Where is the station?"],
    "fra_Latn": ["Il fait beau aujourd'hui.", "Je lis un livre.", "Le chat dort.", "Où est la gare ?"],
}
ISO = {"deu_Latn": "de", "eng_Latn": "en", "fra_Latn": "fr"}
METHOD = {
    "mfti_full": ["method.name=mfti"],
    "mfti_lora": [
        "method.name=mfti",
        "method.lora=true",
        "method.lora_r=4",
        "method.lora_alpha=8",
        "method.lora_dropout=0.0",
    ],
    "landermt_ffn": [
        "method.name=landermt",
        "method.layers=[1]",
        "method.languages=[de,en,fr]",
        "method.detect_batch_size=2",
        "method.detect_max_length=32",
        "method.specific_ratio=0.25",
    ],
    "mixmoe_stage1": ["method.name=mixmoe", "method.stage=1", "method.n_freq=8", "method.layers=[1]"],
    "directional_merged": [
        "method.name=directional",
        "method.groups={g1: [de], g4: [fr]}",
        "method.lora_r=4",
        "method.lora_alpha=8",
        "method.lora_dropout=0.0",
        "method.merge_density=0.5",
    ],
}
METHOD["landermt_output"] = METHOD["landermt_ffn"] + ["method.neuron_kind=output"]
METHOD["landermt_ffn_car"] = METHOD["landermt_ffn"] + ["method.car=true"]
METHOD["mixmoe_stage2"] = ["method.name=mixmoe", "method.stage=2", "method.n_freq=8", "method.layers=[1]"]


@pytest.fixture(scope="module")
def family_data(tmp_path_factory) -> Path:
    """A data root: FLORES-style dev/devtest/dev_subset folders, monolingual text and a JSONL training file."""
    root = tmp_path_factory.mktemp("family_data")
    for split in ("dev", "devtest", "dev_subset"):
        folder = root / "flores200" / split
        folder.mkdir(parents=True)
        for code, lines in SENTS.items():
            with gzip.open(folder / f"{code}.txt.gz", "wt", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
    mono = root / "mono"
    mono.mkdir()
    for code, lines in SENTS.items():
        (mono / f"{code}.txt").write_text("\n".join(lines * 2) + "\n", encoding="utf-8")
    with open(root / "train.jsonl", "w", encoding="utf-8") as fh:
        for i in range(4):
            for s, t in (
                ("deu_Latn", "eng_Latn"),
                ("fra_Latn", "eng_Latn"),
                ("eng_Latn", "deu_Latn"),
                ("eng_Latn", "fra_Latn"),
            ):
                fh.write(
                    json.dumps({"src_lang": ISO[s], "tgt_lang": ISO[t], "src": SENTS[s][i], "tgt": SENTS[t][i]}) + "\n"
                )
    return root


def _config(variant: str, data: Path, out: Path, extra: list[str] = ()):
    from mmt.config import load_config

    if variant.startswith("mixmoe_stage1"):
        train = f"data.train=[{{kind: mono, path: {data / 'mono'}, directions: [de, en, fr]}}]"
    else:
        train = f"data.train=[{{kind: jsonl, path: {data / 'train.jsonl'}}}]"
    return load_config(
        None,
        [
            train,
            f"data.data_dir={data}",
            "data.max_length=48",
            f"train.output_dir={out}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.micro_batch_size=2",
            "train.save_every=1",
            "train.keep_last=2",
            "train.lr=1e-2",
            "train.progress=false",
            "eval.max_new_tokens=8",
            "eval.off_target=false",
            "eval.max_sentences=2",
            f"eval.directions=[{','.join(DIRECTIONS)}]",
            *METHOD[variant],
            *extra,
        ],
    )


def _logits(model, ids, path: Path) -> str:
    from safetensors.torch import save_file

    from mmt.arch import set_direction

    model.eval()
    refs = {}
    for direction in DIRECTIONS:
        set_direction(model, *direction.split("-"))
        with torch.no_grad():
            refs[direction] = model(input_ids=ids).logits.contiguous()
    save_file(refs, str(path))
    return str(path)


def _hyps(model, tok, cfg) -> dict[str, list[str]]:
    from mmt.evaluate import evaluate

    rep = evaluate(
        model, tok, cfg.eval, template=cfg.data.template, data_dir=cfg.data.data_dir, progress=False, log=None
    )
    return rep.hypotheses


def _at_checkpoint(model, ckpt: Path):
    """The trained model as it was at ``ckpt``: its trainable tensors loaded into a copy (the resume path)."""
    from safetensors.torch import load_file

    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, t in load_file(str(ckpt / "trainable.safetensors")).items():
            params[name].copy_(t)
    return m


def _train_cell(family: str, variant: str, data: Path, out: Path, tok, stage1: dict) -> dict | str:
    from mmt import train
    from mmt.export import merge_lora
    from mmt.testing import tiny_model

    model = tiny_model(family, vocab=len(tok), hidden=32, intermediate=64, layers=2, heads=4, seed=0)
    ids = torch.tensor([tok("Das Wetter ist schön.")["input_ids"]])
    if variant == "directional_merged":
        return _train_directional(model, tok, data, out, ids)
    extra = [f"method.stage1_path={stage1['out']}"] if variant == "mixmoe_stage2" else []
    cfg = _config(variant, data, out, extra)
    trained, tok, _plan, _ = train.run(cfg, model=model, tokenizer=tok, print_plan=False)
    if variant == "mixmoe_stage1":
        stage1["out"] = str(out)
    final = merge_lora(trained)
    ckpts = sorted((out / "checkpoints").iterdir())
    models = [
        {"path": str(out / "final"), "logits": _logits(final, ids, out / "ref-final.safetensors")},
        {"path": str(ckpts[-1]), "logits": str(out / "ref-final.safetensors")},
    ]
    if len(ckpts) > 1:
        first = merge_lora(_at_checkpoint(trained, ckpts[0]))
        models.append({"path": str(ckpts[0]), "logits": _logits(first, ids, out / "ref-ckpt0.safetensors")})
    evals = [
        {"model": str(out / "final"), "output_dir": str(out / "eval-reloaded"), "hypotheses": _hyps(final, tok, cfg)}
    ]
    return {"input_ids": ids.tolist(), "directions": DIRECTIONS, "models": models, "evals": evals}


def _train_directional(model, tok, data: Path, out: Path, ids) -> dict:
    from mmt.export import export_directional
    from mmt.methods.directional import DirectionGate, evaluate_gated, run_directional

    cfg = _config("directional_merged", data, out, [f"model.name_or_path={out / 'base'}"])
    from mmt.models import save_model

    save_model(model, tok, out / "base")  # the gate reloads the base from model.name_or_path
    run_directional(cfg, model=model, tokenizer=tok)
    gated = evaluate_gated(cfg, out, label="gated")
    exported = export_directional(out, out / "export")
    gate = DirectionGate(out)
    models = []
    for i, direction in enumerate(DIRECTIONS):
        routed = gate.model_for(*direction.split("-"), base_model=copy.deepcopy(model))
        name = json.loads((exported / "directional.json").read_text())["gate"][direction]
        models.append(
            {
                "path": str(exported / name),
                "logits": _logits(routed, ids, out / f"ref-{i}.safetensors"),
                "only": direction,
            }
        )
    evals = [
        {"model": str(out), "output_dir": str(out / "eval-run"), "hypotheses": gated.hypotheses},
        {"model": str(exported), "output_dir": str(out / "eval-export"), "hypotheses": gated.hypotheses},
    ]
    return {"input_ids": ids.tolist(), "directions": DIRECTIONS, "models": models, "evals": evals}


def _train_family(family: str, root: Path, data: Path, tok) -> dict[str, dict | str]:
    cells: dict[str, dict | str] = {}
    stage1: dict = {}
    for variant in VARIANTS:
        try:
            if variant == "mixmoe_stage2" and "out" not in stage1:
                cells[variant] = "fail: stage 1 did not train"
                continue
            cells[variant] = _train_cell(family, variant, data, root / variant, tok, stage1)
        except Exception as exc:
            cells[variant] = f"fail in training process: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    return cells


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, family_data, tok):
    """{family: {variant: "pass" | reason}}, computed per family on first use."""
    cache: dict[str, dict[str, str]] = {}

    def run(family: str) -> dict[str, str]:
        if family in cache:
            return cache[family]
        root = tmp_path_factory.mktemp(f"matrix-{family}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMT_DATA_DIR", str(family_data))  # LANDeRMT's detection reads FLORES dev from here
            cells = _train_family(family, root, family_data, tok)
        (root / "cells.json").write_text(json.dumps(cells))
        worker = Path(__file__).with_name("_family_worker.py")
        proc = subprocess.run(
            [sys.executable, str(worker), str(root / "cells.json")],
            capture_output=True,
            text=True,
            env={**os.environ, "MMT_DATA_DIR": str(family_data)},
            timeout=900,
        )
        results_file = root / "results.json"
        if not results_file.exists():
            raise AssertionError(f"family worker crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        cache[family] = json.loads(results_file.read_text())
        return cache[family]

    return run


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cell(matrix, family, variant):
    result = matrix(family)[variant]
    assert result == "pass", f"{family} x {variant}: {result}"


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision once it exists (a
    fresh `mmt train` process never meets this); this test needs bf16 after other tests ran with fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("family", ["gemma3", "bloom"])
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_every_method_trains_under_bf16_autocast(family_data, tok, tmp_path, monkeypatch, family):
    """`auto` precision is bf16 on bf16 CPUs, so every method must train under bf16 autocast: finite losses,
    and the weights it trains (fp32 masters) move."""
    import math

    from mmt import train
    from mmt.testing import tiny_model

    monkeypatch.delenv("MMT_DATA_DIR", raising=False)  # detection must read the config's data.data_dir
    stage1: dict = {}
    for variant in ("mfti_full", "mfti_lora", "landermt_ffn", "landermt_ffn_car", "mixmoe_stage1", "mixmoe_stage2"):
        model = tiny_model(family, vocab=len(tok), hidden=32, intermediate=64, layers=2, heads=4, seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = tmp_path / variant
        extra = ["train.mixed_precision=bf16", "train.save_every=0"]
        if variant == "mixmoe_stage2":
            extra.append(f"method.stage1_path={stage1['out']}")
        cfg = _config(variant, family_data, out, extra)
        trained, _tok, _plan, result = train.run(cfg, model=model, tokenizer=tok, print_plan=False)
        if variant == "mixmoe_stage1":
            stage1["out"] = str(out)
        assert result.losses and all(math.isfinite(x) for x in result.losses), (variant, result.losses)
        moved = [
            n
            for n, p in trained.named_parameters()
            if p.requires_grad and (n not in before or not torch.equal(p.detach(), before[n]))
        ]
        assert moved, f"{variant}: no trainable weight changed under bf16"
        assert all(p.dtype == torch.float32 for p in trained.parameters()), f"{variant}: masters left fp32"
