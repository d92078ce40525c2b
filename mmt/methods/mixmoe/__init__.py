"""Mix-MoE: LM experts and MT experts in FFT-routed MoE layers, trained in two stages (docs/methods.md, "Mix-MoE").

Each chosen dense SwiGLU/GeGLU FFN becomes a :class:`mmt_kernels.MoEFFN` with

* ``num_lm_experts`` **LM experts** sliced from the dense FFN: expert e owns the intermediate neurons
  ``P_e`` (a partition of ``range(d_ff)``): ``W_gate[P_e]``, ``W_up[P_e]``, ``W_down[:, P_e]``. The sum
  of all LM experts is exactly the dense FFN;
* ``num_mt_experts`` **MT experts** of the same size, randomly initialised with a zero down projection,
  so adding them does not change the function;
* a router on ``[x ; W_f log1p|rfft(x)|[:n_freq]]`` (per token over the hidden dimension,
  causal-safe), softmax top-k, combine weights multiplied by ``combine_scale``.

Stage 1 (``stage: 1``, monolingual text, ``sampler="mono"``): MT experts are masked out of routing;
LM experts, router and FFT projection train. Stage 2 (``stage: 2``, parallel data): loads the stage-1
result (``stage1_path``), enables the MT experts, trains MT experts + router (+ FFT projection) with the
LM experts frozen: the grouped GEMM skips their weight gradients. Attention and embeddings stay frozen
unless asked. ``extra_loss`` adds ``aux_loss_weight * L_aux + z_loss_weight * L_z`` summed over layers.

Assumptions where the paper is silent (docs/methods.md; each a Config field): the digest's "each group contains k
experts (k = 2)" is read both ways at once (2 LM + 2 MT experts, top-2); MT experts have the LM
experts' size; the partition is random (LLaMA-MoE's random split); ``combine_scale`` defaults to
``num_lm_experts``: with the softmax over the k selected logits summing to 1, a router that weights
all LM experts equally (k = E_LM) then reproduces the dense FFN exactly, and a uniform random k-subset
is an unbiased estimate of it.
"""

from __future__ import annotations

from mmt.registry import register_method

from .analysis import expert_load, plot_expert_load
from .config import ARTIFACT, Config
from .layer import aux_losses, convert, moe_from_dense, moe_layers, partition_neurons, set_stage
from .plan import prepare

__all__ = ["ARTIFACT", "Config", "aux_losses", "convert", "expert_load", "moe_from_dense", "moe_layers",
           "partition_neurons", "plot_expert_load", "prepare", "set_stage"]

register_method("mixmoe", module=__name__, config=Config, prepare=prepare)
