"""LANDeRMT on tiny Llama / Qwen2 / Gemma3 / GPT-2 models: units, detection, categorisation, strict selective
fine-tuning per language pair, CAR, the neuron file, and the `mmt detect` / `mmt train` entry points."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from mmt.methods import landermt as lm
from mmt.methods.base import StepInfo
from mmt.models import find_ffn
from mmt.testing import tiny_model

PAIRS = [
    ("de", "en", "Das Wetter ist heute schön.", "The weather is nice today."),
    ("en", "de", "Where is the train station?", "Wo ist der Bahnhof?"),
    ("fr", "en", "Les enfants jouent dans le jardin.", "The children are playing in the garden."),
    ("en", "fr", "I would like a cup of coffee.", "Je voudrais une tasse de café."),
]

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]
SENTS = {
    "de": ["Das Wetter ist heute schön.", "Ich lese ein Buch.", "Die Katze schläft.", "Wo ist der Bahnhof?"],
    "en": ["The weather is nice today.", "I am reading a book.", "The cat sleeps.", "Where is the station?"],
    "fr": ["Il fait beau aujourd'hui.", "Je lis un livre.", "Le chat dort.", "Où est la gare ?"],
}
FLORES = {"de": "deu_Latn", "en": "eng_Latn", "fr": "fra_Latn"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("landermt_data")
    folder = root / "flores200" / "dev"
    folder.mkdir(parents=True)
    for iso, code in FLORES.items():
        with gzip.open(folder / f"{code}.txt.gz", "wt", encoding="utf-8") as fh:
            fh.write("\n".join(SENTS[iso]) + "\n")
    return root


def _model(arch, tok, layers=3):
    return tiny_model(arch, vocab=len(tok), layers=layers, hidden=32, intermediate=40, heads=4, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["ffn", "output"])
def test_units_cover_the_right_tensors(arch, kind, tok):
    model = _model(arch, tok)
    units = lm.neuron_units(model, [0, 2], kind)
    params = dict(model.named_parameters())
    assert {u.layer for u in units} == {0, 2}
    for u in units:
        for name, nd in u.params:
            p = params[name]
            size = p.shape[0] if p.dim() == 1 else p.shape[nd]
            assert size == u.size, (name, tuple(p.shape), nd, u.size)
    if kind == "ffn":
        assert len(units) == 2 and all(u.size == 40 for u in units)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_detection_matches_stored_activation_taylor(arch, tok):
    """The fused hooks give the same importance as storing activations and gradients (the original script)."""
    model = _model(arch, tok)
    texts = {k: v[:3] for k, v in SENTS.items()}
    nmap = lm.detect(model, tok, texts, [1], "ffn", batch_size=2, max_length=32, ratio=0.25, progress=False)
    unit = nmap.units[0]
    f = find_ffn(model)[1]
    out_mod = f.down if f.kind == "swiglu" else f.fc_out
    expected = torch.zeros(len(texts), unit.size, dtype=torch.float64)
    for li, (lang, sents) in enumerate(texts.items()):
        for s in sents:  # batch 1, like the original script
            batch = lm._encode(tok, [s], 32, "cpu")
            store = {}
            h = out_mod.register_forward_pre_hook(lambda m, a: store.__setitem__("a", a[0]))
            model.zero_grad()
            emb_h = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            h.remove(), emb_h.remove()
            a = store["a"]
            a.retain_grad()
            logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
            loss.backward()
            expected[li] += (a.detach().double() * a.grad.double()).abs()[0].mean(0)
    torch.testing.assert_close(nmap.importance[unit.name].double(), expected, rtol=1e-4, atol=1e-9)
    own = nmap.owner[unit.name]
    assert int((own >= 0).sum()) == round(0.25 * unit.size)
    var = expected.var(0)
    top = set(torch.topk(var, round(0.25 * unit.size)).indices.tolist())
    assert set(torch.nonzero(own >= 0).flatten().tolist()) == top
    for j in top:
        assert int(own[j]) == int(expected[:, j].argmax())


def test_output_neurons_of_per_head_norms_match_stored_activations(tok):
    """Gemma 3's q_norm output is [B, heads, T, head_dim]: each channel is scored over every head and token."""
    model = _model("gemma3", tok)
    texts = {k: v[:2] for k, v in SENTS.items()}
    nmap = lm.detect(model, tok, texts, [1], "output", batch_size=2, max_length=32, ratio=0.25, progress=False)
    name = next(u.name for u in nmap.units if u.name.endswith("q_norm"))
    q_norm = dict(model.named_modules())[name]
    expected = torch.zeros(len(texts), q_norm.weight.shape[0], dtype=torch.float64)
    for li, sents in enumerate(texts.values()):
        for s in sents:
            batch = lm._encode(tok, [s], 32, "cpu")
            store = {}
            h = q_norm.register_forward_hook(lambda m, a, o: store.__setitem__("a", o))
            emb_h = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            h.remove(), emb_h.remove()
            a = store["a"]  # [1, H, T, D]
            a.retain_grad()
            logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            ).backward()
            t = a.shape[2]  # mean over tokens, summed over heads
            expected[li] += (a.detach().double() * a.grad.double()).abs()[0].sum(0).sum(0) / t
    torch.testing.assert_close(nmap.importance[name].double(), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3", "gpt2", "bloom", "xglm"])
def test_car_at_step_zero_is_the_pretrained_model(arch, tok, data_dir, tmp_path):
    """The gate's zero init gives both sub-FFNs a factor of exactly 1: logits equal the pretrained model's, bit for
    bit, on every FFN layout (BLOOM's MLP takes the residual, XGLM's fc1/fc2 sit on the decoder layer)."""
    ref_model = _model(arch, tok).eval()
    ids = lm._encode(tok, SENTS["de"][:2], 32, "cpu")
    ref = ref_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    model, plan, opt, nmap = _prepared(arch, tok, data_dir, tmp_path, car=True)
    model.eval()
    lm.set_car_pair(model, nmap, ("de", "en"))
    assert torch.equal(model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits, ref)
    _step(model.train(), plan, opt, tok, ("de", "en"))  # and the gate trains on every layout
    assert any(float(m.car_gate.weight.abs().sum()) > 0 for m in model.modules() if hasattr(m, "car_gate"))


def test_select_layers_returns_the_biggest_changes(tok):
    model = _model("llama", tok, layers=4)
    layers, change = lm.select_layers(model, tok, SENTS["en"], 2, batch_size=2)
    assert len(layers) == 2 and len(change) == 4
    assert set(layers) == set(torch.topk(torch.tensor(change), 2).indices.tolist())
    layers2, _ = lm.select_layers(model, tok, SENTS["en"], 2, metric="relative_l2")
    assert len(layers2) == 2


def test_neuron_file_round_trip_and_plot(tok, data_dir, tmp_path):
    model = _model("qwen2", tok)
    cfg = lm.Config(layers=[0, 2], languages=["de", "en", "fr"], detect_batch_size=2, detect_max_length=32)
    nmap = lm.run_detection(model, tok, cfg, data_dir=data_dir, progress=False)
    path = nmap.save(tmp_path / "n.safetensors")
    png = nmap.plot(tmp_path / "n.png")
    back = lm.NeuronMap.load(path)
    assert back.languages == ["de", "en", "fr"] and back.layers == [0, 2]
    for u in nmap.units:
        assert torch.equal(back.importance[u.name], nmap.importance[u.name])
        assert torch.equal(back.owner[u.name], nmap.owner[u.name])
    assert back.config["method"]["specific_ratio"] == 0.10
    assert png.stat().st_size > 1000
    summary = json.loads((tmp_path / "n.json").read_text())
    assert len(summary["specific_per_language_per_layer"]) == 3


def _prepared(arch, tok, data_dir, tmp_path, **kw):
    model = _model(arch, tok)
    dcfg = lm.Config(
        layers=[1],
        languages=["de", "en", "fr"],
        detect_batch_size=2,
        detect_max_length=32,
        specific_ratio=0.25,
        neuron_kind=kw.pop("neuron_kind", "ffn"),
    )
    nmap = lm.run_detection(model, tok, dcfg, data_dir=data_dir, progress=False)
    path = nmap.save(tmp_path / f"{arch}.safetensors")
    cfg = lm.Config(neurons_file=str(path), neuron_kind=dcfg.neuron_kind, **kw)
    model, plan = lm.prepare(model, cfg, tok)

    class TC:
        lr, weight_decay, adam_betas, adam_eps = 1e-2, 0.1, [0.9, 0.999], 1e-8

    opt = plan.build_optimizer(model, TC)
    return model, plan, opt, nmap


def _step(model, plan, opt, tok, pair):
    plan.on_step_start(StepInfo(step=0, pair=pair), model, opt)
    batch = lm._encode(tok, [s for s in SENTS[pair[1]][:2]], 32, "cpu")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_strict_selective_finetuning(arch, tok, data_dir, tmp_path):
    model, plan, opt, nmap = _prepared(arch, tok, data_dir, tmp_path)
    assert plan.sampler == "pair"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pair = ("de", "en")
    for _ in range(3):
        _step(model, plan, opt, tok, pair)
    unit = nmap.units[0]
    keep = nmap.keep(unit.name, pair)
    frozen = torch.ones(unit.size, dtype=torch.bool)
    frozen[keep] = False
    assert frozen.any() and (~frozen).any()
    params = dict(model.named_parameters())
    for name, nd in unit.params:
        p, b = params[name].detach(), before[name]
        view = (lambda t: t) if (p.dim() == 1 or nd == 0) else (lambda t: t.t())  # noqa: E731
        assert torch.equal(view(p)[frozen], view(b)[frozen]), name  # other languages' neurons: bit-identical
        assert not torch.equal(view(p)[~frozen], view(b)[~frozen]), name
    for name, p in params.items():
        in_layer1 = ".1." in name
        if not in_layer1:
            assert torch.equal(p.detach(), before[name]), f"{name} is outside the selected layers but moved"


def test_sparse_weight_grads_train_as_dense_ones(tok, data_dir, tmp_path):
    """The compact weight-gradient path and the dense dW give the same training: same clipped norms, same weights
    within fp32 tolerance, never-selected neurons bit-identical to the start in both."""
    pairs = [("de", "en"), ("en", "de"), ("de", "en")]  # fr-specific neurons never train
    runs = []
    for on in (True, False):
        model, plan, opt, nmap = _prepared("llama", tok, data_dir, tmp_path, sparse_weight_grad=on)
        assert (plan.sparse_grads is not None and plan.sparse_grads.enabled) is on
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        norms = []
        for step, pair in enumerate(pairs):
            plan.on_step_start(StepInfo(step=step, pair=pair), model, opt)
            for micro in range(2):  # accumulation
                batch = lm._encode(tok, SENTS[pair[0]][2 * micro : 2 * micro + 2], 32, "cpu")
                model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                ).loss.backward()
            unit_param = dict(model.named_parameters())[nmap.units[0].params[0][0]]
            assert (unit_param.grad is None) is on
            norms.append(float(opt.clip_grad_norm_(0.01)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((dict(model.named_parameters()), before, norms, nmap))
    (on_p, before, norms_on, nmap), (off_p, _, norms_off, _) = runs
    # "auto" (default): compact only where at most 75% of a weight's neurons train (here 25% are specific)
    for used, compact in (("general+specific", False), ("specific", True)):
        model, plan, opt, nmap = _prepared("llama", tok, data_dir, tmp_path, neurons_used=used)
        plan.on_step_start(StepInfo(step=0, pair=("de", "en")), model, opt)
        assert len(plan.sparse_grads.rows) == (3 if compact else 0), used
    assert norms_on == pytest.approx(norms_off, rel=1e-4) and min(norms_on) > 0.01
    for name, p in on_p.items():
        torch.testing.assert_close(p, off_p[name], rtol=1e-4, atol=1e-6, msg=name)
    for unit in nmap.units:
        never = torch.ones(unit.size, dtype=torch.bool)
        for pair in pairs:
            never[nmap.keep(unit.name, pair)] = False
        assert never.any()
        for name, nd in unit.params:
            view = (lambda t: t) if nd == 0 else (lambda t: t.t())  # noqa: E731
            for params in (on_p, off_p):
                assert torch.equal(view(params[name].detach())[never], view(before[name])[never]), name


def test_pair_switch_and_variants(tok, data_dir, tmp_path):
    model, plan, opt, nmap = _prepared("llama", tok, data_dir, tmp_path, scaled=True, neurons_used="specific")
    unit = nmap.units[0]
    sel_de, scl_de = plan.selection_for(("de", "en"))
    sel_fr, _ = plan.selection_for(("fr", "en"))
    p = next(iter(sel_de))
    owner = nmap.owner[unit.name]
    want_de = torch.nonzero((owner == nmap.languages.index("de")) | (owner == nmap.languages.index("en"))).flatten()
    assert torch.equal(sel_de[p], want_de)  # LANDeRMT-LS: specific only
    assert not torch.equal(sel_de[p], sel_fr[p])
    assert torch.all(scl_de[p] > 0)  # importance scales, one per selected neuron
    _step(model, plan, opt, tok, ("de", "en"))
    _step(model, plan, opt, tok, ("fr", "en"))
    st = opt.state[p]
    assert set(st["neurons"].tolist()) == set(sel_de[p].tolist()) | set(sel_fr[p].tolist())


def test_non_strict_moves_masked_rows(tok, data_dir, tmp_path):
    model, plan, opt, nmap = _prepared("llama", tok, data_dir, tmp_path, strict=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, plan, opt, tok, ("de", "en"))
    _step(model, plan, opt, tok, ("de", "en"))
    unit = nmap.units[0]
    frozen = torch.ones(unit.size, dtype=torch.bool)
    frozen[nmap.keep(unit.name, ("de", "en"))] = False
    name = unit.params[0][0]
    p = dict(model.named_parameters())[name].detach()
    assert not torch.equal(p[frozen], before[name][frozen])  # decay still moves them (the original behaviour)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_car_gate_routes_and_trains(arch, tok, data_dir, tmp_path):
    model, plan, opt, nmap = _prepared(arch, tok, data_dir, tmp_path, car=True, car_other_languages_off=True)
    mlp = find_ffn(model)[1].module
    assert hasattr(mlp, "car_gate") and mlp.car_gate.weight.requires_grad
    batch = lm._encode(tok, SENTS["en"][:2], 32, "cpu")
    lm.set_car_pair(model, nmap, ("de", "en"))
    a = model(input_ids=batch["input_ids"]).logits
    lm.set_car_pair(model, nmap, ("fr", "en"))
    b = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(a, b)  # other languages' specific neurons are off
    w0 = mlp.car_gate.weight.detach().clone()
    _step(model, plan, opt, tok, ("de", "en"))
    assert not torch.equal(mlp.car_gate.weight.detach(), w0)
    assert "car_gate.weight" in "".join(n for n, _ in model.named_parameters())


def test_output_channel_mode(tok, data_dir, tmp_path):
    model, plan, opt, nmap = _prepared("llama", tok, data_dir, tmp_path, neuron_kind="output")
    names = {u.name.split(".")[-1] for u in nmap.units}
    assert {"q_proj", "o_proj", "gate_proj", "down_proj", "input_layernorm"} <= names
    _step(model, plan, opt, tok, ("fr", "en"))


def test_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="neuron_kind"):
        lm.Config(neuron_kind="rows")
    with pytest.raises(ValueError, match="neurons_used"):
        lm.Config(neurons_used="all")
    with pytest.raises(ValueError, match="unknown key"):
        lm.Config.from_dict({"specific_ratios": 0.1})
    with pytest.raises(ValueError, match="sparse_weight_grad"):
        lm.Config(sparse_weight_grad="sometimes")
    assert lm.Config.from_dict({"sparse_weight_grad": "off"}).sparse_weight_grad is False
    assert lm.Config.from_dict({"sparse_weight_grad": "auto"}).sparse_weight_grad == "auto"


def test_cli_detect_then_train(tok_dir, tok, data_dir, tmp_path):
    """`mmt detect` writes the neuron file; `mmt train --method landermt` trains with it through the Trainer."""
    from mmt.cli import main

    model_dir = tmp_path / "model"
    _model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    with open(train, "w", encoding="utf-8") as fh:
        for i in range(3):
            for s, t, a, b in PAIRS:
                fh.write(json.dumps({"src_lang": s, "tgt_lang": t, "src": f"{a} {i}", "tgt": f"{b} {i}"}) + "\n")
    neurons = tmp_path / "neurons.safetensors"
    common = [f"model.name_or_path={model_dir}", f"data.data_dir={data_dir}"]
    rc = main(
        [
            "detect",
            "--languages",
            "de",
            "en",
            "fr",
            "--layers",
            "1",
            "2",
            "-o",
            str(neurons),
            "method.detect_batch_size=2",
            "method.detect_max_length=32",
            *common,
        ]
    )
    assert rc == 0 and neurons.is_file() and neurons.with_suffix(".png").is_file()
    rc = main(
        [
            "train",
            "--method",
            "landermt",
            *common,
            f"data.train=[{{kind: jsonl, path: {train}}}]",
            f"method.neurons_file={neurons}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            "train.batch_size=4",
            "train.micro_batch_size=2",
            "train.progress=false",
            "train.save_every=0",
            "train.lr=1e-3",
        ]
    )
    assert rc == 0
    assert (tmp_path / "run" / "final" / "landermt_neurons.safetensors").is_file()


def test_deep_copy_of_a_prepared_model_computes_with_its_own_weights(tok, data_dir, tmp_path):
    """The compact-gradient forward is bound to its module: a deep copy (direction-aware units, LoRA merges, the
    test matrix's checkpoint references) must not keep computing with the original's weights."""
    import copy

    model, plan, opt, _ = _prepared("llama", tok, data_dir, tmp_path, sparse_weight_grad=True)
    plan.on_step_start(StepInfo(step=0, pair=("de", "en")), model, opt)
    clone = copy.deepcopy(model)
    patched = [m for m in clone.modules() if "forward" in m.__dict__ and isinstance(m, torch.nn.Linear)]
    assert patched  # the selected FFN projections run the compact-gradient forward
    ids = lm._encode(tok, SENTS["de"][:2], 32, "cpu")["input_ids"]
    with torch.no_grad():
        original = model(input_ids=ids).logits
        assert torch.equal(clone(input_ids=ids).logits, original)
        for m in patched:  # only the patched projections of the copy change
            m.weight.mul_(0.5)
        assert not torch.allclose(clone(input_ids=ids).logits, original)
        assert torch.equal(model(input_ids=ids).logits, original)
