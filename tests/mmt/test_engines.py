"""Every method through ``mmt train`` on 2 CPU processes (gloo) under FSDP2 and DeepSpeed ZeRO-2/3 equals the
1-process run.

The 2-process runs are the CPU equivalent of
``accelerate launch --config_file examples/accelerate/<engine>.yaml -m mmt.cli train -c my.yaml``:
``torch.distributed.run`` starts ``tests/mmt/_cpu_engines.py``, which sets accelerate's state up for the engine that
config file describes and runs the mmt command line (why accelerate's own launcher does not do it on CPU: see that
file). The 1-process reference runs the same command line in this process. The DeepSpeed tests need the
``deepspeed`` package (``pip install deepspeed``; its CPU accelerator runs here) and are skipped without it.

Equality: the same loss at every step (rel 1e-5) and the same final weights within float tolerance. The tolerance
on weights is absolute, ``WEIGHT_ATOL`` = 5e-5 with lr 3e-3: Adam divides each gradient element by its own running
norm, so a summation order that differs in the last bits (a reduce-scatter over 2 processes vs accumulation in 1)
moves an element with a near-zero gradient by a small fraction of one step (measured: up to ~4e-5 after 3 steps,
about 1% of lr). Dropout is off (LoRA's default 0.05 draws other masks on another process layout).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmt.cli import main as mmt_main

REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("_cpu_engines.py")
FSDP2_YAML = REPO / "examples" / "accelerate" / "fsdp2.yaml"
ZERO_YAML = {stage: REPO / "examples" / "accelerate" / f"zero{stage}.yaml" for stage in (2, 3)}
WEIGHT_ATOL = 5e-5
_PORT = iter(range(29711, 29790))


@pytest.fixture(scope="module")
def tiny_dir(tok, tmp_path_factory) -> Path:
    from mmt.models import save_model
    from mmt.testing import tiny_model

    d = tmp_path_factory.mktemp("model") / "tiny"
    save_model(tiny_model("llama", vocab=len(tok), seed=0), tok, d)
    return d


def _overrides(tiny_dir: Path, jsonl_data: Path, steps: int, batch: int = 8, micro: int = 2) -> list[str]:
    return [
        f"model.name_or_path={tiny_dir}",
        f"data.train=[{{kind: jsonl, path: {jsonl_data}}}]",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"train.micro_batch_size={micro}",
        "train.lr=3e-3",
        "train.lr_schedule=constant",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.progress=false",
    ]


def train_one(args: list[str], out: Path) -> None:
    """``mmt train ...`` in this process (1 process, no engine)."""
    assert mmt_main(["train", *args, f"train.output_dir={out}"]) == 0


def train_engine(
    args: list[str], out: Path, config: Path = FSDP2_YAML, nproc: int = 2, kill_at: int = -1
) -> subprocess.CompletedProcess:
    """``mmt train ...`` on ``nproc`` CPU processes under the accelerate config ``config``; the finished process."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "ACCELERATE_USE_CPU": "true"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(next(_PORT)),
        str(LAUNCH),
        "--config_file",
        str(config),
        "--kill-at",
        str(kill_at),
        "--",
        "train",
        *args,
        f"train.output_dir={out}",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


def train_fsdp2(args: list[str], out: Path, **kw) -> subprocess.CompletedProcess:
    return train_engine(args, out, FSDP2_YAML, **kw)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, atol: float = WEIGHT_ATOL) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{a.name}: {k}: {m}")


def assert_same_run(one: Path, two: Path) -> None:
    """Same loss curve, same final model (and the same files in final/)."""
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert sorted(p.relative_to(two / "final").as_posix() for p in (two / "final").rglob("*")) == sorted(
        p.relative_to(one / "final").as_posix() for p in (one / "final").rglob("*")
    )
    for f in (one / "final").rglob("*.safetensors"):
        assert_same_weights(f, two / "final" / f.relative_to(one / "final"))


def no_leftovers(run: Path) -> None:
    """Nothing half-written: no temporary folders of checkpoints, final/ or merges."""
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".")], list(run.rglob("*"))


# ------------------------------------------------------------------------------------------------- mFTI (LoRA)


def test_mfti_lora_fsdp2_two_processes_match_one(tiny_dir, jsonl_data, tmp_path):
    args = [
        "--method",
        "mfti",
        *_overrides(tiny_dir, jsonl_data, steps=3),
        "method.lora=true",
        "method.lora_r=4",
        "method.lora_alpha=8",
        "method.lora_dropout=0.0",
        "train.save_every=0",
    ]
    train_one(args, tmp_path / "one")
    r = ok(train_fsdp2(args, tmp_path / "two"))
    assert "global batch 8 = 2 process(es)" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # the adapter alone (from the gathered weights) and the merged model, written once by the main process
    assert (tmp_path / "two" / "final" / "adapter" / "adapter_config.json").is_file()
    no_leftovers(tmp_path / "two")


@pytest.mark.slow
def test_mfti_full_fsdp2_cli_two_processes_match_one(tiny_dir, jsonl_data, tmp_path):
    args = ["--method", "mfti", *_overrides(tiny_dir, jsonl_data, steps=3), "train.save_every=0"]
    train_one(args, tmp_path / "one")
    ok(train_fsdp2(args, tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two")


# ------------------------------------------------------------------------------------------------- direction-aware


def _directional(tiny_dir, jsonl_data, lora: bool) -> list[str]:
    return [
        "--method",
        "directional",
        *_overrides(tiny_dir, jsonl_data, steps=2, batch=4, micro=2),
        "method.groups={a: [de], b: [fr]}",
        f"method.lora={str(lora).lower()}",
        "method.lora_r=4",
        "method.lora_alpha=8",
        "method.lora_dropout=0.0",
        "method.merge_density=0.5",
        "train.save_every=0",
    ]


def _assert_same_directional(one: Path, two: Path, r: subprocess.CompletedProcess, lora: bool) -> None:
    m1 = json.loads((one / "directional.json").read_text())
    m2 = json.loads((two / "directional.json").read_text())
    assert m2["gate"] == m1["gate"] and set(m2["units"]) == set(m1["units"]) == {"xx-en.a", "xx-en.b", "en-xx.all"}
    for unit in m1["units"]:
        assert_same_run(one / unit, two / unit)
    merged = m1["merged"]["weights"]
    assert_same_weights(one / merged / "model.safetensors", two / merged / "model.safetensors")
    # the merge (and, for full fine-tuning, the base copy it reads) ran once, on the main process
    merge_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("merged ")]
    assert len(merge_lines) == 1, r.stdout[-3000:]
    assert r.stdout.count("directional units:") == 1
    if not lora:
        assert_same_weights(one / "base" / "model.safetensors", two / "base" / "model.safetensors", atol=0)
    no_leftovers(two)


def test_directional_lora_fsdp2_two_processes_match_one(tiny_dir, jsonl_data, tmp_path):
    args = _directional(tiny_dir, jsonl_data, lora=True)
    train_one(args, tmp_path / "one")
    r = ok(train_fsdp2(args, tmp_path / "two"))
    _assert_same_directional(tmp_path / "one", tmp_path / "two", r, lora=True)


@pytest.mark.slow
def test_directional_full_fsdp2_two_processes_match_one(tiny_dir, jsonl_data, tmp_path):
    args = _directional(tiny_dir, jsonl_data, lora=False)
    train_one(args, tmp_path / "one")
    r = ok(train_fsdp2(args, tmp_path / "two"))
    _assert_same_directional(tmp_path / "one", tmp_path / "two", r, lora=False)


# ------------------------------------------------------------------------------------------------- LANDeRMT

LANDERMT_SENTS = {
    "de": ["Das Wetter ist heute schön.", "Ich lese ein Buch.", "Die Katze schläft.", "Wo ist der Bahnhof?"],
    "en": ["The weather is nice today.", "I am reading a book.", "The cat sleeps.", "Where is the station?"],
    "fr": ["Il fait beau aujourd'hui.", "Je lis un livre.", "Le chat dort.", "Où est la gare ?"],
}


@pytest.fixture(scope="module")
def neurons(tiny_dir, tok, tmp_path_factory) -> Path:
    """A LANDeRMT neuron file for the tiny model: both layers, a quarter of each FFN's neurons language-specific."""
    import gzip

    from mmt.methods import landermt as lm
    from mmt.models import load_model

    root = tmp_path_factory.mktemp("flores")
    (root / "flores200" / "dev").mkdir(parents=True)
    for iso, code in {"de": "deu_Latn", "en": "eng_Latn", "fr": "fra_Latn"}.items():
        with gzip.open(root / "flores200" / "dev" / f"{code}.txt.gz", "wt", encoding="utf-8") as fh:
            fh.write("\n".join(LANDERMT_SENTS[iso]) + "\n")
    model, _ = load_model(name_or_path=str(tiny_dir))
    cfg = lm.Config(layers=[0, 1], languages=["de", "en", "fr"], detect_batch_size=2, specific_ratio=0.25)
    nmap = lm.run_detection(model, tok, cfg, data_dir=root, progress=False)
    return nmap.save(tmp_path_factory.mktemp("neurons") / "neurons.safetensors")


def _landermt(tiny_dir, jsonl_data, neurons, steps: int, *extra: str) -> list[str]:
    return [
        "--method",
        "landermt",
        *_overrides(tiny_dir, jsonl_data, steps=steps),
        f"method.neurons_file={neurons}",
        *extra,
    ]


def test_landermt_fsdp2_two_processes_match_one_strict_per_shard(tiny_dir, jsonl_data, neurons, tmp_path):
    """Strict neuron-sparse AdamW on FSDP2 row shards equals the 1-process run; unselected neurons stay
    bit-identical on every shard; each process checkpoints only its shard's compact state, in local indices."""
    from mmt.methods import landermt as lm

    # "specific": the general neurons are never selected, so they must come out bit-identical; scaled: the
    # per-neuron gradient scales follow the neurons onto their shard
    args = _landermt(
        tiny_dir, jsonl_data, neurons, 4, "method.neurons_used=specific", "method.scaled=true", "train.save_every=2"
    )
    train_one(args, tmp_path / "one")
    r = ok(train_fsdp2(args, tmp_path / "two"))
    assert "global batch 8 = 2 process(es)" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")
    nmap = lm.NeuronMap.load(neurons)
    base = load_file(str(tiny_dir / "model.safetensors"))
    final = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    checked = 0
    for u in nmap.units:
        general = nmap.owner[u.name] < 0
        assert 0 < int(general.sum()) < general.numel()
        for name, nd in u.params:
            before, after = base[name], final[name]
            assert torch.equal(
                before.index_select(nd, general.nonzero().flatten()),
                after.index_select(nd, general.nonzero().flatten()),
            ), name
            assert not torch.equal(before, after), name  # the specific neurons did train
            checked += 1
    assert checked == 6  # gate, up (row neurons) and down (column neurons) of both layers
    # per-process optimizer shards: compact state of this shard's neurons only (local row indices, local width)
    ckpt_dir = tmp_path / "two" / "checkpoints" / "checkpoint-4"
    from mmt import checkpoint as ckpt

    shards = [ckpt.load_state(ckpt_dir, f"optimizer_{rank}") for rank in (0, 1)]
    inter, hidden = base["model.layers.0.mlp.up_proj.weight"].shape
    # optimizer parameter order: the trainable (both layers: neurons + train_other) matrices, then the vectors
    from mmt.testing import tiny_model

    trainable = [(n, p.dim()) for n, p in tiny_model("llama", vocab=384).named_parameters() if ".layers." in n]
    order = [n for n, d in trainable if d == 2] + [n for n, d in trainable if d == 1]
    for sd in shards:
        by_name = {order[i]: st for i, st in sd["state"].items()}
        assert len(by_name) == len(order)
        for name, st in by_name.items():
            columns = st["neuron_dim"] == 1  # compact: [U, C] for row neurons, [C, U] for columns
            assert st["exp_avg"].shape[1 if columns else 0] == st["neurons"].numel()  # one entry per known neuron
            if name.endswith(("gate_proj.weight", "up_proj.weight")):  # row neurons: this shard's, local indices
                assert st["neuron_dim"] == 0 and st["exp_avg"].shape[1] == hidden
                assert 0 < st["neurons"].numel() < inter // 2 and int(st["neurons"].max()) < inter // 2
            elif name.endswith("down_proj.weight"):  # column neurons keep their indices; width = this row shard
                assert columns and st["exp_avg"].shape[0] == hidden // 2
                assert 0 < st["neurons"].numel() < inter


@pytest.mark.slow
def test_landermt_fsdp2_kill_and_resume_is_exact(tiny_dir, jsonl_data, neurons, tmp_path):
    args = _landermt(tiny_dir, jsonl_data, neurons, 4, "train.save_every=2")
    ok(train_fsdp2(args, tmp_path / "a"))
    killed = train_fsdp2(args, tmp_path / "b", kill_at=3)
    assert killed.returncode != 0
    resumed = ok(train_fsdp2(args, tmp_path / "b"))
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert_same_weights(
        tmp_path / "a" / "final" / "model.safetensors", tmp_path / "b" / "final" / "model.safetensors", atol=0
    )


@pytest.mark.slow
def test_landermt_fsdp2_non_strict_matches_one(tiny_dir, jsonl_data, neurons, tmp_path):
    """The original scripts' mode (torch-AdamW-like full state over masked gradients) on shards."""
    args = _landermt(tiny_dir, jsonl_data, neurons, 3, "method.strict=false", "train.save_every=0")
    train_one(args, tmp_path / "one")
    ok(train_fsdp2(args, tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two")


# ------------------------------------------------------------------------------------------------- Mix-MoE


MIXMOE = [
    "--method",
    "mixmoe",
    "method.layers=[0, 1]",
    "method.num_lm_experts=2",
    "method.num_mt_experts=2",
    "method.top_k=2",
    "method.n_freq=8",
    "method.router_init_std=0.02",
]


@pytest.fixture(scope="module")
def mono_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mono")
    for iso, lines in LANDERMT_SENTS.items():
        (d / f"{iso}.txt").write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    return d


def _stage1(tiny_dir, mono_dir, steps: int = 3) -> list[str]:
    return [
        *MIXMOE,
        *_overrides(tiny_dir, mono_dir, steps=steps),
        f"data.train=[{{kind: mono, path: {mono_dir}, directions: [de, en, fr]}}]",
        "data.max_length=48",
        "method.stage=1",
        "method.stage1_train=experts+router",
        "train.save_every=0",
    ]


@pytest.fixture(scope="module")
def stage1_run(tiny_dir, mono_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1") / "run"
    train_one(_stage1(tiny_dir, mono_dir), out)
    return out


def _stage2(tiny_dir, jsonl_data, stage1_run, steps: int, *extra: str) -> list[str]:
    return [
        *MIXMOE,
        *_overrides(tiny_dir, jsonl_data, steps=steps),
        "method.stage=2",
        f"method.stage1_path={stage1_run}",
        *extra,
    ]


def _experts(final: Path) -> dict[str, torch.Tensor]:
    state = torch.load(final / "mixmoe.pt", map_location="cpu", weights_only=True)["state"]
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down")}


def test_mixmoe_stage2_fsdp2_two_processes_match_one_experts_sharded(tiny_dir, jsonl_data, stage1_run, tmp_path):
    """Stage 2 (MT experts train, LM experts frozen inside the same [E, ...] tensors) with the expert tensors
    sharded by expert across the 2 processes equals the 1-process run; the LM experts stay bit-identical."""
    args = _stage2(tiny_dir, jsonl_data, stage1_run, 3, "train.save_every=3")
    train_one(args, tmp_path / "one")
    r = ok(train_fsdp2(args, tmp_path / "two"))
    assert "global batch 8 = 2 process(es)" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")
    before, one, two = (
        _experts(stage1_run / "final"),
        _experts(tmp_path / "one" / "final"),
        _experts(tmp_path / "two" / "final"),
    )
    assert len(two) == 6 and two.keys() == one.keys() == before.keys()
    for k in two:
        torch.testing.assert_close(two[k], one[k], atol=WEIGHT_ATOL, rtol=1e-4)
        assert torch.equal(two[k][:2], before[k][:2]), k  # LM experts: frozen
        assert not torch.equal(two[k][2:], before[k][2:]), k  # MT experts: trained
    # each process holds (and checkpoints the Adam moments of) half of the experts: [2, ...] of [4, ...]
    from mmt import checkpoint as ckpt

    shard = ckpt.load_state(tmp_path / "two" / "checkpoints" / "checkpoint-3", "optimizer_0")
    shapes = {tuple(st["exp_avg"].shape) for st in shard["state"].values()}
    w_gate = one["model.layers.0.mlp.w_gate"]
    assert (2, *w_gate.shape[1:]) in shapes and tuple(w_gate.shape) not in shapes


@pytest.mark.slow
def test_mixmoe_stage1_fsdp2_two_processes_match_one(tiny_dir, mono_dir, tmp_path):
    args = _stage1(tiny_dir, mono_dir)
    train_one(args, tmp_path / "one")
    ok(train_fsdp2(args, tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one, two = _experts(tmp_path / "one" / "final"), _experts(tmp_path / "two" / "final")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=WEIGHT_ATOL, rtol=1e-4)


@pytest.mark.slow
def test_mixmoe_fsdp2_kill_and_resume_is_exact(tiny_dir, jsonl_data, stage1_run, tmp_path):
    args = _stage2(tiny_dir, jsonl_data, stage1_run, 4, "train.save_every=2")
    ok(train_fsdp2(args, tmp_path / "a"))
    killed = train_fsdp2(args, tmp_path / "b", kill_at=3)
    assert killed.returncode != 0
    resumed = ok(train_fsdp2(args, tmp_path / "b"))
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert_same_weights(
        tmp_path / "a" / "final" / "model.safetensors", tmp_path / "b" / "final" / "model.safetensors", atol=0
    )
    a, b = _experts(tmp_path / "a" / "final"), _experts(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- DeepSpeed

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed package (pip install deepspeed)"
)


def _mfti(tiny_dir, jsonl_data, lora: bool) -> list[str]:
    lora_args = ["method.lora=true", "method.lora_r=4", "method.lora_alpha=8", "method.lora_dropout=0.0"]
    return [
        "--method",
        "mfti",
        *_overrides(tiny_dir, jsonl_data, steps=3),
        *(lora_args if lora else []),
        "train.save_every=0",
    ]


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("variant", ["mfti_full", "mfti_lora", "directional_lora"])
def test_deepspeed_two_processes_match_one(variant, stage, tiny_dir, jsonl_data, tmp_path):
    """ZeRO-2 (gradients and optimizer state partitioned) and ZeRO-3 (parameters too, every one of them: the
    launcher sets the persistence threshold to 0) on 2 CPU processes equal the 1-process run."""
    if variant == "directional_lora":
        args = _directional(tiny_dir, jsonl_data, lora=True)
    else:
        args = _mfti(tiny_dir, jsonl_data, lora=variant == "mfti_lora")
    train_one(args, tmp_path / "one")
    r = ok(train_engine(args, tmp_path / "two", ZERO_YAML[stage]))
    if variant == "directional_lora":
        _assert_same_directional(tmp_path / "one", tmp_path / "two", r, lora=True)
    else:
        assert "global batch 8 = 2 process(es) x 2 accumulation" in r.stdout
        assert_same_run(tmp_path / "one", tmp_path / "two")
        # DeepSpeed's gradient norm (before its clipping) is logged, and equals the 1-process one
        g1 = [json.loads(x)["grad_norm"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
        g2 = [json.loads(x)["grad_norm"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
        assert g2 == pytest.approx(g1, rel=1e-4)
        no_leftovers(tmp_path / "two")


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_refuses_landermt_and_names_the_engines_that_run_it(tiny_dir, jsonl_data, neurons, tmp_path):
    r = train_engine(_landermt(tiny_dir, jsonl_data, neurons, 2, "train.save_every=0"), tmp_path / "x", ZERO_YAML[2])
    assert r.returncode != 0
    assert (
        "'landermt' does not run under DEEPSPEED" in r.stderr and "FSDP2 (examples/accelerate/fsdp2.yaml)" in r.stderr
    )


# ------------------------------------------------------------------------------------------------- 7B recipes

RECIPES = sorted((REPO / "examples" / "configs").glob("*_7b*.yaml"))


def test_every_method_has_a_7b_recipe_that_names_its_engine():
    """One 7B recipe per method (Mix-MoE: both stages); each names in its header the accelerate config it is launched
    with, that file exists, and the global batch splits over 8 processes."""
    from mmt.config import load_config

    methods = {}
    for path in RECIPES:
        cfg = load_config(str(path), [])
        methods.setdefault(cfg.method_name, []).append(path.name)
        header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
        named = re.findall(r"--config_file (examples/accelerate/\S+\.yaml)", header)
        assert named, f"{path.name}: no accelerate config named in the header"
        assert all((REPO / n).is_file() for n in named), named
        assert cfg.train.batch_size % (8 * cfg.train.micro_batch_size) == 0, path.name
    assert set(methods) == {"mfti", "landermt", "mixmoe", "directional"}, methods
    assert len(methods["mixmoe"]) == 2
