"""Mix-MoE: LM experts and MT experts in FFT-routed MoE layers, trained in two stages (docs/mixmoe.md).

Each chosen dense FFN becomes a MoE layer with

* ``num_lm_experts`` **LM experts** sliced from the dense FFN: expert e owns the intermediate neurons ``P_e`` (a
  partition of ``range(d_ff)``). Gated FFNs (Llama, Qwen2, Gemma 3: ``W_gate[P_e]``, ``W_up[P_e]``,
  ``W_down[:, P_e]``) become :class:`mmt_kernels.MoEFFN`; GELU FFNs (GPT-2, BLOOM, XGLM: ``W_in[P_e]``,
  ``b_in[P_e]``, ``W_out[:, P_e]``, the output bias added once) become :class:`GeluMoEFFN`. The sum of all LM
  experts is exactly the dense FFN;
* ``num_mt_experts`` **MT experts** of the same size, random input projections and a zero output projection,
  so adding them does not change the function;
* a router on ``[x ; W_f log1p|rfft(x)|[:n_freq]]`` (per token over the hidden dimension, causal-safe),
  softmax top-k, LM combine weights multiplied by ``combine_scale`` (default ``num_lm_experts``).

**Exact upcycling.** The router starts at zero (``router_init_std: 0``), so every token weights the
``top_k == num_lm_experts`` LM experts equally: ``softmax(0, 0) * 2 = (1, 1)`` is exact in floating point and
the upcycled model is the dense model up to summation order. With grouped routing (the default) stage 2 adds
the MT group's output, which is exactly zero until the MT experts train, so stage 2 starts from the stage-1
function.

Stage 1 (``stage: 1``, monolingual text): MT experts are masked out of routing; the router and FFT projection
train, and with ``stage1_train: experts+router`` (the paper's recipe) the LM experts too. Stage 2 (``stage: 2``,
parallel data): loads the stage-1 result, enables the MT experts, trains MT experts + router (+ FFT
projection) with the LM experts frozen. ``extra_loss`` adds ``aux_loss_weight * L_aux + z_loss_weight * L_z``.

The prepared model is tagged as a changed architecture (:mod:`mmt.arch`, builder :func:`build`): its
``save_pretrained`` output reloads through ``transformers.AutoModelForCausalLM`` once :mod:`mmt` is imported.
"""

from __future__ import annotations

from mmt.registry import register_method

from .analysis import expert_load, plot_expert_load
from .config import ARTIFACT, Config
from .gelu import GeluMoEFFN
from .layer import (
    aux_losses,
    build,
    ffn_slots,
    moe_layers,
    partition_neurons,
    set_stage,
    upcycle,
)
from .plan import is_mixmoe, prepare, upcycle_model

__all__ = [
    "ARTIFACT",
    "Config",
    "GeluMoEFFN",
    "aux_losses",
    "build",
    "expert_load",
    "ffn_slots",
    "is_mixmoe",
    "moe_layers",
    "partition_neurons",
    "plot_expert_load",
    "prepare",
    "set_stage",
    "upcycle",
    "upcycle_model",
]

register_method("mixmoe", module=__name__, config=Config, prepare=prepare)
