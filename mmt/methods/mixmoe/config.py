"""Mix-MoE options."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config import MethodConfig
from mmt.errors import ConfigError

ARTIFACT = "mixmoe.pt"
_ACT_ALIASES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass
class Config(MethodConfig):
    """Mix-MoE options (defaults: docs/methods.md, "Mix-MoE").

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
    routing: "joint" (one top-k over every allowed expert, default) or "grouped" (the paper's
        alternative reading: top-``top_k`` inside the LM group and top-``top_k_mt`` inside the MT group, outputs
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
            raise ConfigError(f"mixmoe: stage must be 1 or 2, got {self.stage!r}")
        if self.stage == 2 and not self.stage1_path:
            raise ConfigError("mixmoe: stage 2 needs stage1_path (the stage-1 output directory or its mixmoe.pt)")
        if self.num_lm_experts < 1 or self.num_mt_experts < 0:
            raise ConfigError("mixmoe: num_lm_experts must be >= 1 and num_mt_experts >= 0")
        if self.mt_expert_size != "lm":
            raise ConfigError("mixmoe: mt_expert_size must be 'lm' (all experts of a layer share one shape)")
        if self.partition not in ("random", "contiguous"):
            raise ConfigError(f"mixmoe: partition must be 'random' or 'contiguous', got {self.partition!r}")
        if self.fft_variant not in ("hidden", "none"):
            raise ConfigError(f"mixmoe: fft_variant must be 'hidden' or 'none', got {self.fft_variant!r} (the "
                             "sequence-axis variant B mixes future tokens into a decoder's router; not offered)")
        if self.routing not in ("joint", "grouped"):
            raise ConfigError(f"mixmoe: routing must be 'joint' or 'grouped', got {self.routing!r}")
        if self.routing == "grouped":
            if self.num_mt_experts < 1:
                raise ConfigError("mixmoe: routing='grouped' needs num_mt_experts >= 1")
            if not 1 <= self.top_k <= self.num_lm_experts:
                raise ConfigError(f"mixmoe: with routing='grouped', top_k={self.top_k} must be in "
                                 f"[1, num_lm_experts={self.num_lm_experts}]")
            if self.top_k_mt is not None and not 1 <= self.top_k_mt <= self.num_mt_experts:
                raise ConfigError(f"mixmoe: top_k_mt={self.top_k_mt} must be in "
                                  f"[1, num_mt_experts={self.num_mt_experts}]")
            return
        n_allowed = self.num_lm_experts if self.stage == 1 else self.num_lm_experts + self.num_mt_experts
        if not 1 <= self.top_k <= n_allowed:
            raise ConfigError(f"mixmoe: top_k={self.top_k} must be in [1, {n_allowed}] (experts routable in stage "
                             f"{self.stage})")
