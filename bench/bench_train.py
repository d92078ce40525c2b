"""End-to-end training step per method on Gemma 3 270M: tokens/s and peak memory, side by side with a plain
Hugging Face full fine-tuning step on the same batch and the same model.

Each case builds the method's plan exactly as ``mmt train`` does (``prepare``, its optimizer, its step hooks,
its extra loss) and runs the trainer's per-micro-batch work (``mmt.train.lm_loss_sum``: the fused linear +
cross-entropy unless ``fused=off``). The HF peer: ``model(**batch).loss`` (full logits), ``torch.optim.AdamW``
(foreach) over every trainable parameter, embeddings frozen as in the demo. LANDeRMT uses a random neuron map
over the demo-sized selection (4 of 18 blocks, 10% specific neurons); ``landermt_ls`` trains only the pair's
specific neurons (the LS ablation), where the neuron-sparse weight gradients run.

Run: ``pytest bench/bench_train.py -q --benchmark-only``. ``MMT_BENCH_TRAIN_MODEL`` (default ``gemma3-270m``: the
real model when its package is installed, else random weights of its config; ``tiny``: a small Gemma 3 from
``mmt.testing``, for loaded machines), ``MMT_BENCH_TRAIN_BATCH``
(default ``8x64``), ``MMT_BENCH_TRAIN_REPEATS`` (default 3), ``MMT_BENCH_TRAIN_PRECISION`` (``fp32,bf16``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import tempfile
import time

import common  # bench/conftest.py puts bench/ on sys.path
import pytest
import torch

SUITE = "train_step"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = os.environ.get("MMT_BENCH_TRAIN_MODEL", "gemma3-270m")
B, T = (int(x) for x in os.environ.get("MMT_BENCH_TRAIN_BATCH", "8x64").split("x"))
REPEATS = int(os.environ.get("MMT_BENCH_TRAIN_REPEATS", "3"))
PRECISIONS = os.environ.get("MMT_BENCH_TRAIN_PRECISION", "fp32,bf16").split(",")
CASES = ["hf_full", "mfti", "mfti_unfused", "landermt", "landermt_ls", "mixmoe", "directional_lora"]
_BASE: dict[str, float] = {}


class _TrainCfg:
    lr, weight_decay, adam_betas, adam_eps = 1e-5, 0.0, [0.9, 0.999], 1e-8


_LOADED: list = []


def _model():
    """A fresh copy of the model for each case (loaded once per session)."""
    import copy

    if not _LOADED:
        _LOADED.append(_load())
    model, source = _LOADED[0]
    return copy.deepcopy(model).train(), source


def _load():
    from mmt.models import load_model

    if MODEL == "tiny":  # for loaded shared CPUs, where one real step takes tens of seconds
        from mmt.testing import tiny_model

        model = tiny_model("gemma3", vocab=16384, hidden=256, layers=8, heads=4, intermediate=1024, seed=0)
        model.config.use_cache = False
        return model.to(DEVICE), "tiny Gemma 3 (mmt.testing; 8 layers, hidden 256, FFN 1024, vocab 16384)"
    try:
        model, _ = load_model(name_or_path=MODEL, verbose=False)
        source = f"{MODEL} (real weights)"
    except Exception as exc:  # noqa: BLE001 - the package is optional: fall back to the architecture
        import transformers as tf

        common.note(SUITE, f"{MODEL} not loadable ({type(exc).__name__}); random weights of Gemma 3 270M's config")
        cfg = tf.Gemma3TextConfig(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            max_position_embeddings=32768,
        )
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = tf.Gemma3ForCausalLM(cfg)
        source = "Gemma 3 270M config (random weights)"
    model.config.use_cache = False
    return model.to(DEVICE), source


def _landermt(model, used="general+specific"):
    from mmt.methods import landermt as lm
    from mmt.models import decoder_layers

    n = len(decoder_layers(model)[1])
    layers = list(range(n - 4, n))
    units = lm.neuron_units(model, layers, "ffn")
    langs = ["de", "en", "fr"]
    gen = torch.Generator().manual_seed(0)
    imp = {u.name: torch.rand(len(langs), u.size, generator=gen) for u in units}
    nmap = lm.NeuronMap(langs, layers, units, imp, lm.categorise(imp, 0.10), {"method": {"neuron_kind": "ffn"}})
    path = os.path.join(tempfile.mkdtemp(), "neurons.safetensors")
    nmap.save(path)
    return lm.prepare(model, lm.Config(neurons_file=path, neurons_used=used))


def _prepare(case, model):
    """(model, plan or None, optimizer, fused parts or None, use HF's own loss)."""
    from mmt.methods.base import default_optimizer
    from mmt.train import fused_loss_parts

    if case == "hf_full":
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, None, torch.optim.AdamW(params, lr=_TrainCfg.lr, foreach=True), None, True
    if case.startswith("mfti"):
        from mmt.methods import mfti

        model, plan = mfti.prepare(model, mfti.Config(freeze_embeddings=True))
    elif case == "landermt":
        model, plan = _landermt(model)
    elif case == "landermt_ls":  # LANDeRMT-LS: specific neurons only, where the compact weight gradients run
        model, plan = _landermt(model, "specific")
    elif case == "mixmoe":
        from mmt.methods import mixmoe

        model, plan = mixmoe.prepare(model, mixmoe.Config())
    else:
        from mmt.methods import directional

        model, plan = directional.prepare(model, directional.Config(unit="de-en", directions=["de-en"]))
    opt = (plan.build_optimizer or default_optimizer)(model, _TrainCfg)
    fused = None if case == "mfti_unfused" else fused_loss_parts(model)
    return model, plan, opt, fused, False


def _peak_bytes(fn) -> int:
    """Peak memory of ``fn()``. CPU: glibc keeps freed small and mid-size blocks resident, so resident memory
    would not see a warm step's activations; the heap is trimmed first and every block of 64 KiB or more is
    mmap'd while ``fn`` runs (returned to the OS on free), so the resident-set rise follows live tensors."""
    if DEVICE == "cuda":
        return common.peak_memory_bytes(fn, DEVICE)
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 << 10)
    libc.malloc_trim(0)
    try:
        return common.peak_memory_bytes(fn, DEVICE)
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_train_step(benchmark, case, precision):
    from mmt.methods.base import StepInfo
    from mmt.train import lm_loss_sum

    model, source = _model()
    model, plan, opt, fused, hf_loss = _prepare(case, model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 262144
    ids = torch.randint(3, min(vocab, 32000), (B, T), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[:, : T // 2] = -100  # target-only loss, the prompt half of each sequence carries none
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    info = StepInfo(step=0, pair=("de", "en"), num_micro_steps=1, max_steps=1)

    def precision_ctx():
        return torch.autocast(DEVICE, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    n_label = int((labels[:, 1:] != -100).sum())

    def step():
        if plan is not None and plan.on_step_start is not None:
            plan.on_step_start(info, model, opt)
        with precision_ctx():
            if hf_loss:
                loss = model(**batch).loss
            else:
                loss_sum, _ = lm_loss_sum(model, batch, False, fused)
                loss = loss_sum / n_label
                if plan is not None and plan.extra_loss is not None:
                    loss = loss + plan.extra_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if plan is not None and plan.on_step_end is not None:
            plan.on_step_end(info, model, opt)

    step()  # warm-up: lazy optimizer state, first-call allocations
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    peak = _peak_bytes(step)
    med = statistics.median(times)
    key = precision
    if case == "hf_full":
        _BASE[key] = med
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "model": source,
        "batch": f"{B}x{T}",
        "precision": precision,
        "case": case,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "tokens_per_s": B * T / med,
        "time_vs_hf_full": med / _BASE[key] if key in _BASE else "n/a",
        "peak_step_MiB": peak / 2**20,
        "trainable_params": trainable,
    }
    common.record(SUITE, row)
    print(row, flush=True)  # also on stdout (with -s): a long session's rows survive an interruption
    gc.collect()
