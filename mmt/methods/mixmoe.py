"""Mix-MoE: LM experts and MT experts in FFT-routed MoE layers, trained in two stages (METHODS.md section 3).

Each chosen dense SwiGLU/GeGLU FFN becomes a :class:`mmt_kernels.MoEFFN` with

* ``num_lm_experts`` **LM experts** sliced from the dense FFN: expert e owns the intermediate neurons
  ``P_e`` (a partition of ``range(d_ff)``): ``W_gate[P_e]``, ``W_up[P_e]``, ``W_down[:, P_e]``. The sum
  of all LM experts is exactly the dense FFN;
* ``num_mt_experts`` **MT experts** of the same size, randomly initialised with a zero down projection,
  so adding them does not change the function;
* a router on ``[x ; W_f log1p|rfft(x)|[:n_freq]]`` (FFT variant A of METHODS.md: per token over the
  hidden dimension, causal-safe), softmax top-k, combine weights multiplied by ``combine_scale``.

Stage 1 (``stage: 1``, monolingual text, ``sampler="mono"``): MT experts are masked out of routing;
LM experts, router and FFT projection train. Stage 2 (``stage: 2``, parallel data): loads the stage-1
result (``stage1_path``), enables the MT experts, trains MT experts + router (+ FFT projection) with the
LM experts frozen: the grouped GEMM skips their weight gradients. Attention and embeddings stay frozen
unless asked. ``extra_loss`` adds ``aux_loss_weight * L_aux + z_loss_weight * L_z`` summed over layers.

Assumptions (all [INF]/[UNV] in METHODS.md, each a Config field): the digest's "each group contains k
experts (k = 2)" is read both ways at once (2 LM + 2 MT experts, top-2); MT experts have the LM
experts' size; the partition is random (LLaMA-MoE's random split); ``combine_scale`` defaults to
``num_lm_experts``: with the softmax over the k selected logits summing to 1, a router that weights
all LM experts equally (k = E_LM) then reproduces the dense FFN exactly, and a uniform random k-subset
is an unbiased estimate of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import MethodConfig, TrainingPlan, count_parameters

ARTIFACT = "mixmoe.pt"
_ACT_ALIASES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass
class Config(MethodConfig):
    """Mix-MoE options (defaults are METHODS.md's documented guesses).

    stage: 1 (monolingual, LM experts) or 2 (parallel, MT experts; needs ``stage1_path``).
    stage1_path: the stage-1 run's output directory, a checkpoint directory, or its ``mixmoe.pt``.
    num_lm_experts / num_mt_experts: group sizes (E_LM, E_MT). d_ff must be divisible by E_LM.
    mt_expert_size: "lm" (d_ff / E_LM neurons, default) or "full" is not supported (experts share one shape).
    top_k: experts per token (over all allowed experts).
    partition: "random" (seeded permutation of the neurons) or "contiguous" blocks.
    fft_variant: "hidden" (per-token spectrum over the hidden dim, default) or "none" (plain router).
    n_freq: low frequency bins kept (clipped to d/2+1); fft_proj_dim: size of W_f f (None: n_freq).
    router_input: "concat" ([x ; W_f f], default) or "sum" (x + W_f f).
    fft_layernorm: LayerNorm on the log-spectrum before W_f.
    combine_scale: multiplies the combine weights; None = num_lm_experts (see the module docstring).
    aux_loss_weight / z_loss_weight: Switch load-balancing loss weight (alpha) and router z-loss weight.
    router_init_std: std of the router (and W_f) init; 0 makes the first stage-1 step route uniformly.
    mt_init_std: std of the MT experts' gate/up init (their down projection starts at zero).
    layers: indices of the decoder layers to convert (None: all).
    train_attention / train_embeddings: also train these (default frozen in both stages).
    train_fft_proj_stage2: keep training W_f in stage 2 (it is part of the router).
    seed: for the partition and the MT expert init.
    backend: force an mmt_kernels backend for the MoE ops (None: automatic).
    routing: "joint" (one top-k over every allowed expert, default) or "grouped" (METHODS.md 3(c)3's
        alternative: top-``top_k`` inside the LM group and top-``top_k_mt`` inside the MT group, outputs
        summed; the MT combine weights are not scaled). With "grouped" and ``top_k == num_lm_experts``
        stage 2 starts exactly from the stage-1 function (MT down projections are zero), whereas with
        "joint" the MT experts take routing slots from the LM experts as soon as they are enabled.
    top_k_mt: experts per token inside the MT group with ``routing: grouped`` (None: min(top_k, E_MT)).
    """

    stage: int = 1
    stage1_path: str | None = None
    num_lm_experts: int = 2
    num_mt_experts: int = 2
    mt_expert_size: str = "lm"
    top_k: int = 2
    partition: str = "random"
    fft_variant: str = "hidden"
    n_freq: int = 256
    fft_proj_dim: int | None = None
    router_input: str = "concat"
    fft_layernorm: bool = False
    combine_scale: float | None = None
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    router_init_std: float = 0.02
    mt_init_std: float = 0.02
    layers: list[int] | None = None
    train_attention: bool = False
    train_embeddings: bool = False
    train_fft_proj_stage2: bool = True
    seed: int = 0
    backend: str | None = None
    routing: str = "joint"
    top_k_mt: int | None = None
    directions: list[str] | None = None

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"mixmoe: stage must be 1 or 2, got {self.stage!r}")
        if self.stage == 2 and not self.stage1_path:
            raise ValueError("mixmoe: stage 2 needs stage1_path (the stage-1 output directory or its mixmoe.pt)")
        if self.num_lm_experts < 1 or self.num_mt_experts < 0:
            raise ValueError("mixmoe: num_lm_experts must be >= 1 and num_mt_experts >= 0")
        if self.mt_expert_size != "lm":
            raise ValueError("mixmoe: mt_expert_size must be 'lm' (all experts of a layer share one shape)")
        if self.partition not in ("random", "contiguous"):
            raise ValueError(f"mixmoe: partition must be 'random' or 'contiguous', got {self.partition!r}")
        if self.fft_variant not in ("hidden", "none"):
            raise ValueError(f"mixmoe: fft_variant must be 'hidden' or 'none', got {self.fft_variant!r} (the "
                             "sequence-axis variant B mixes future tokens into a decoder's router; not offered)")
        if self.routing not in ("joint", "grouped"):
            raise ValueError(f"mixmoe: routing must be 'joint' or 'grouped', got {self.routing!r}")
        if self.routing == "grouped":
            if self.num_mt_experts < 1:
                raise ValueError("mixmoe: routing='grouped' needs num_mt_experts >= 1")
            if not 1 <= self.top_k <= self.num_lm_experts:
                raise ValueError(f"mixmoe: with routing='grouped', top_k={self.top_k} must be in "
                                 f"[1, num_lm_experts={self.num_lm_experts}]")
            if self.top_k_mt is not None and not 1 <= self.top_k_mt <= self.num_mt_experts:
                raise ValueError(f"mixmoe: top_k_mt={self.top_k_mt} must be in [1, num_mt_experts={self.num_mt_experts}]")
            return
        n_allowed = self.num_lm_experts if self.stage == 1 else self.num_lm_experts + self.num_mt_experts
        if not 1 <= self.top_k <= n_allowed:
            raise ValueError(f"mixmoe: top_k={self.top_k} must be in [1, {n_allowed}] (experts routable in stage "
                             f"{self.stage})")


def _activation_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu"
    if name not in _ACT_ALIASES:
        raise ValueError(f"mixmoe: unsupported FFN activation {name!r}; supported: {sorted(_ACT_ALIASES)}")
    return _ACT_ALIASES[name]


def partition_neurons(d_ff: int, num_experts: int, how: str = "random", seed: int = 0) -> torch.Tensor:
    """``[E, d_ff / E]`` neuron indices per LM expert (sorted inside each expert)."""
    if d_ff % num_experts:
        raise ValueError(f"mixmoe: d_ff={d_ff} is not divisible by num_lm_experts={num_experts}")
    order = (torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed)) if how == "random"
             else torch.arange(d_ff))
    return order.view(num_experts, -1).sort(dim=1).values


def moe_from_dense(gate: nn.Linear, up: nn.Linear, down: nn.Linear, config: Config, act: str, layer: int):
    """A :class:`MoEFFN` whose LM experts are slices of the dense FFN and whose MT experts start silent."""
    from mmt_kernels import MoEFFN

    d_ff, d = gate.weight.shape
    E_lm, E_mt = config.num_lm_experts, config.num_mt_experts
    parts = partition_neurons(d_ff, E_lm, config.partition, config.seed + layer)
    f = d_ff // E_lm
    n_freq = 0 if config.fft_variant == "none" else min(config.n_freq, d // 2 + 1)
    w = gate.weight
    moe = MoEFFN(d, f, E_lm + E_mt, k=config.top_k, act=act, n_freq=n_freq, fft_proj_dim=config.fft_proj_dim,
                 router_input=config.router_input, fft_layernorm=config.fft_layernorm,
                 scale=float(config.combine_scale if config.combine_scale is not None else E_lm),
                 dtype=w.dtype, device=w.device, backend=config.backend)
    gen = torch.Generator().manual_seed(config.seed * 1000 + layer)
    with torch.no_grad():
        moe.w_gate[:E_lm] = gate.weight.detach()[parts]
        moe.w_up[:E_lm] = up.weight.detach()[parts]
        moe.w_down[:E_lm] = down.weight.detach()[:, parts].permute(1, 0, 2)
        if E_mt:
            moe.w_gate[E_lm:] = (torch.randn(E_mt, f, d, generator=gen) * config.mt_init_std).to(w)
            moe.w_up[E_lm:] = (torch.randn(E_mt, f, d, generator=gen) * config.mt_init_std).to(w)
            moe.w_down[E_lm:] = 0.0
        for lin in (moe.router, moe.fft_proj):
            if lin is not None:
                lin.weight.copy_((torch.randn(lin.weight.shape, generator=gen) * config.router_init_std).to(w))
    moe.lm_experts = E_lm  # plain attribute: which experts are the LM group
    if config.routing == "grouped":
        moe.set_groups(E_lm, config.top_k_mt if config.top_k_mt is not None else min(config.top_k, E_mt))
    return moe


def convert(model: nn.Module, config: Config) -> list[nn.Module]:
    """Replace the chosen FFNs of ``model`` in place; returns the MoE modules in layer order."""
    from mmt.models import find_ffn

    act = _activation_name(model)
    out = []
    for info in find_ffn(model):
        if config.layers is not None and info.layer not in config.layers:
            continue
        if info.kind != "swiglu" or info.gate is None:
            raise ValueError(f"mixmoe: layer {info.layer} has a {info.kind} FFN; Mix-MoE needs gate/up/down "
                             "(Llama, Qwen2, Gemma 3, Mistral ...)")
        moe = moe_from_dense(info.gate, info.up, info.down, config, act, info.layer)
        parent = model.get_submodule(info.name.rsplit(".", 1)[0])
        setattr(parent, info.name.rsplit(".", 1)[1], moe)
        out.append(moe)
    if not out:
        raise ValueError(f"mixmoe: no layer converted (layers={config.layers})")
    return out


def moe_layers(model: nn.Module) -> list[nn.Module]:
    from mmt_kernels import MoEFFN

    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def set_stage(model: nn.Module, stage: int) -> None:
    """Routing and weight-gradient masks for a stage: stage 1 routes to LM experts only and trains them;
    stage 2 routes to every expert and trains only the MT experts."""
    for moe in moe_layers(model):
        lm = torch.zeros(moe.num_experts, dtype=torch.bool, device=moe.expert_mask.device)
        lm[: moe.lm_experts] = True
        moe.set_masks(expert_mask=lm if stage == 1 else torch.ones_like(lm), train_mask=lm if stage == 1 else ~lm)


def aux_losses(model: nn.Module, aux_weight: float, z_weight: float) -> torch.Tensor:
    total = None
    for moe in moe_layers(model):
        if moe.last_aux_loss is None:
            continue
        term = aux_weight * moe.last_aux_loss + z_weight * moe.last_z_loss
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def _stage1_file(path: str | Path) -> Path:
    p = Path(path)
    candidates = [p] if p.is_file() else [p / ARTIFACT, p / "final" / ARTIFACT]
    if p.is_dir():  # newest checkpoint first (Trainer: checkpoints/<prefix><step:07d>/)
        candidates += sorted(p.glob(f"checkpoints/*/{ARTIFACT}"), key=lambda q: q.parent.name, reverse=True)
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"mixmoe: no {ARTIFACT} under {path} (tried {[str(c) for c in candidates]}); "
                            "point stage1_path at the stage-1 output directory")


def _parse_directions(items):
    if items is None:
        return None
    return [tuple(i.replace("->", "-").split("-")) for i in items]


def prepare(model: nn.Module, config: Config, tokenizer=None) -> tuple[nn.Module, TrainingPlan]:
    config.validate()
    layers = convert(model, config)
    info: dict[str, Any] = {"stage": config.stage, "moe layers": len(layers),
                            "experts": f"{config.num_lm_experts} LM + {config.num_mt_experts} MT, top-{config.top_k}, "
                                       f"{layers[0].d_expert} neurons each",
                            "router": f"fft={config.fft_variant} n_freq={layers[0].n_freq} "
                                      f"input={config.router_input} scale={layers[0].scale} "
                                      f"routing={config.routing}"}
    if config.stage == 2:
        src = _stage1_file(config.stage1_path)
        saved = torch.load(src, map_location="cpu", weights_only=True)
        state = saved["state"]
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"mixmoe: {src} holds tensors this model lacks ({missing[:3]} ...); was stage 1 run "
                             "with the same model and layer/expert settings?")
        with torch.no_grad():
            for name, t in state.items():
                if params[name].shape != t.shape:
                    raise ValueError(f"mixmoe: {name} is {tuple(t.shape)} in {src}, {tuple(params[name].shape)} here")
                params[name].copy_(t)
        info["loaded stage 1"] = f"{src} ({len(state)} tensors)"
    set_stage(model, config.stage)

    for p in model.parameters():
        p.requires_grad_(False)
    expert_params = []
    for moe in layers:
        for w in (moe.w_gate, moe.w_up, moe.w_down):
            w.requires_grad_(True)
            expert_params.append(w)
        moe.router.weight.requires_grad_(True)
        fft_mods = [m for m in (moe.fft_proj, moe.fft_norm) if m is not None]
        if config.stage == 1 or config.train_fft_proj_stage2:
            for m in fft_mods:
                for p in m.parameters():
                    p.requires_grad_(True)
    if config.train_attention:
        from mmt.models import find_attention

        for a in find_attention(model):
            for p in a.module.parameters():
                p.requires_grad_(True)
    if config.train_embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(True)

    expert_ids = {id(p) for p in expert_params}

    def build_optimizer(m: nn.Module, train_config):
        # Frozen experts live inside the same [E, f, d] tensors as trained ones and get exactly zero
        # gradients; AdamW then leaves them unchanged only without weight decay, so expert tensors get none.
        decay, no_decay = [], []
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if (p.ndim < 2 or id(p) in expert_ids) else decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": train_config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=train_config.lr, betas=tuple(train_config.adam_betas),
                                 eps=train_config.adam_eps)

    def extra_loss(m: nn.Module) -> torch.Tensor:
        return aux_losses(m, config.aux_loss_weight, config.z_loss_weight)

    def save_artifacts(path: Path) -> None:
        state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        state.update({n: b.detach().cpu() for n, b in model.named_buffers() if n.endswith(("expert_mask", "train_mask"))})
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save({"config": config.to_dict(), "state": state}, Path(path) / ARTIFACT)

    trainable, total = count_parameters(model)
    info["trainable (incl. frozen expert slices)"] = f"{trainable:,} / {total:,}"
    plan = TrainingPlan(method="mixmoe", sampler="mono" if config.stage == 1 else "mixed",
                        directions=_parse_directions(config.directions) if config.stage == 2 else None,
                        build_optimizer=build_optimizer, extra_loss=extra_loss, save_artifacts=save_artifacts,
                        loss_on="full" if config.stage == 1 else "target", ddp_find_unused_parameters=True,
                        info=info, model=model)
    return model, plan


# ---- expert load per language ----------------------------------------------------------------

@torch.no_grad()
def expert_load(model: nn.Module, tokenizer, texts_by_lang: dict[str, list[str]], *, batch_size: int = 8,
                max_length: int = 128) -> dict[str, torch.Tensor]:
    """Fraction of routed slots per expert (``[layers, E]``, rows sum to 1) for each language's texts."""
    layers = moe_layers(model)
    device = next(model.parameters()).device
    out = {}
    was_training = model.training
    model.eval()
    for lang, texts in texts_by_lang.items():
        for m in layers:
            m.load_counts.zero_()
            m.track_load = True
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        loads = torch.stack([m.load_counts.clone() for m in layers])
        out[lang] = loads / loads.sum(1, keepdim=True).clamp_min(1)
        for m in layers:
            m.track_load = False
    model.train(was_training)
    return out


def plot_expert_load(loads_by_stage: dict[str, dict[str, torch.Tensor]], path: str | Path,
                     lm_experts: int | None = None) -> Path:
    """One heatmap panel per stage: languages x experts, load averaged over layers (PNG)."""
    from mmt.plots import _plt

    plt = _plt()
    stages = list(loads_by_stage)
    fig, axes = plt.subplots(1, len(stages), figsize=(4 + 3.5 * len(stages), 1.5 + 0.5 * max(
        len(v) for v in loads_by_stage.values())), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        langs = list(loads_by_stage[stage])
        m = torch.stack([loads_by_stage[stage][lang].float().mean(0) for lang in langs]).numpy()
        im = ax.imshow(m, vmin=0, vmax=max(float(m.max()), 1e-6), cmap="viridis", aspect="auto")
        E = m.shape[1]
        names = [("LM" if lm_experts is None or e < lm_experts else "MT") + str(e) for e in range(E)]
        ax.set_xticks(range(E), names)
        ax.set_yticks(range(len(langs)), langs)
        for i in range(m.shape[0]):
            for j in range(E):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"expert load, {stage}")
        fig.colorbar(im, ax=ax)
    from mmt.plots import save_figure

    return save_figure(fig, path)
