"""Mix-MoE options."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config import MethodConfig
from mmt.errors import ConfigError

ARTIFACT = "mixmoe.pt"
# settings that fix the layer structure or the LM experts' content: stage 2 must use stage 1's values
STRUCTURAL = (
    "layers",
    "num_lm_experts",
    "num_mt_experts",
    "top_k",
    "routing",
    "partition",
    "fft_variant",
    "n_freq",
    "fft_proj_dim",
    "router_input",
    "fft_layernorm",
    "combine_scale",
    "seed",
)


@dataclass
class Config(MethodConfig):
    """Mix-MoE options (the defaults and the paper's literal recipe are compared in docs/mixmoe.md).

    stage: 1 (monolingual, LM experts) or 2 (parallel, MT experts; needs ``stage1_path``).
    stage1_path: the stage-1 run's output directory, a checkpoint directory, or its ``mixmoe.pt``.
    num_lm_experts / num_mt_experts: group sizes (E_LM, E_MT). d_ff must be divisible by E_LM.
    mt_expert_size: "lm" (d_ff / E_LM neurons; the only size: experts of a layer share one shape).
    top_k: experts per token in the LM group (``routing: grouped``) or over all allowed experts (``joint``).
        ``top_k == num_lm_experts`` with a zero router is the exact dense FFN at upcycling.
    routing: "grouped" (default: top-``top_k`` inside the LM group and top-``top_k_mt`` inside the MT group,
        outputs summed, MT combine weights unscaled; stage 2 then starts exactly from the stage-1 function,
        since MT experts start silent) or "joint" (one top-k over every allowed expert: MT experts take
        routing slots from the LM experts as soon as stage 2 enables them).
    top_k_mt: experts per token inside the MT group with ``routing: grouped`` (None: min(top_k, E_MT)).
    partition: "random" (seeded permutation of the neurons) or "contiguous" blocks.
    fft_variant: "hidden" (per-token spectrum over the hidden dim, default) or "none" (plain router).
    n_freq: low frequency bins kept (clipped to d/2+1); fft_proj_dim: size of W_f f (None: n_freq).
    router_input: "concat" ([x ; W_f f], default) or "sum" (x + W_f f).
    fft_layernorm: LayerNorm on the log-spectrum before W_f.
    combine_scale: multiplies the LM combine weights; None = num_lm_experts, so that a router weighting
        the LM experts equally reproduces the dense FFN.
    aux_loss_weight / z_loss_weight: Switch load-balancing loss weight and router z-loss weight.
    router_init_std: std of the router's initial weights. 0 (default): the router starts uniform, so the
        upcycled model is the dense model (an exact identity, not an approximation).
    fft_proj_init_std: std of W_f's initial weights (it gets gradients once the router is non-zero).
    mt_init_std: std of the MT experts' input projections (their output projection starts at zero).
    stage1_train: what stage 1 trains: "router" (default: router + FFT projection; the LM experts keep the
        pretrained FFN) or "experts+router" (the paper's recipe: LM experts continue pretraining too).
    router_lr_scale: the router's and FFT projection's learning rate is ``train.lr`` times this (no weight decay).
    layers: indices of the decoder layers to convert (None: all).
    train_attention / train_embeddings: also train these (default frozen in both stages).
    train_fft_proj_stage2: keep training W_f in stage 2 (it is part of the router).
    seed: for the partition and the MT expert init.
    backend: force an mmt_kernels backend for the MoE ops (None: automatic).
    directions: stage 2 only: train on these directions (None: all in the data).
    """

    stage: int = 1
    stage1_path: str | None = None
    num_lm_experts: int = 2
    num_mt_experts: int = 2
    mt_expert_size: str = "lm"
    top_k: int = 2
    routing: str = "grouped"
    top_k_mt: int | None = None
    partition: str = "random"
    fft_variant: str = "hidden"
    n_freq: int = 256
    fft_proj_dim: int | None = None
    router_input: str = "concat"
    fft_layernorm: bool = False
    combine_scale: float | None = None
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    router_init_std: float = 0.0
    fft_proj_init_std: float = 0.02
    mt_init_std: float = 0.02
    stage1_train: str = "router"
    router_lr_scale: float = 1.0
    layers: list[int] | None = None
    train_attention: bool = False
    train_embeddings: bool = False
    train_fft_proj_stage2: bool = True
    seed: int = 0
    backend: str | None = None
    directions: list[str] | None = None

    def resolved_top_k_mt(self) -> int | None:
        if self.routing != "grouped":
            return None
        return self.top_k_mt if self.top_k_mt is not None else min(self.top_k, self.num_mt_experts)

    def resolved_combine_scale(self) -> float:
        return float(self.combine_scale if self.combine_scale is not None else self.num_lm_experts)

    def exact_upcycling(self) -> bool:
        """Whether the upcycled model is exactly the dense one (uniform router over all LM experts)."""
        return (
            self.router_init_std == 0
            and self.top_k == self.num_lm_experts
            and self.resolved_combine_scale() == self.num_lm_experts
        )

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"mixmoe: stage must be 1 or 2, got {self.stage!r}")
        if self.num_lm_experts < 1 or self.num_mt_experts < 0:
            raise ConfigError("mixmoe: num_lm_experts must be >= 1 and num_mt_experts >= 0")
        if self.mt_expert_size != "lm":
            raise ConfigError("mixmoe: mt_expert_size must be 'lm' (all experts of a layer share one shape)")
        if self.partition not in ("random", "contiguous"):
            raise ConfigError(f"mixmoe: partition must be 'random' or 'contiguous', got {self.partition!r}")
        if self.router_input not in ("concat", "sum"):
            raise ConfigError(f"mixmoe: router_input must be 'concat' or 'sum', got {self.router_input!r}")
        if self.n_freq < 1 or (self.fft_proj_dim is not None and self.fft_proj_dim < 1):
            raise ConfigError(
                f"mixmoe: n_freq and fft_proj_dim must be >= 1, got {self.n_freq!r} and {self.fft_proj_dim!r}"
            )
        if self.fft_variant not in ("hidden", "none"):
            raise ConfigError(
                f"mixmoe: fft_variant must be 'hidden' or 'none', got {self.fft_variant!r} (the "
                "sequence-axis variant B mixes future tokens into a decoder's router; not offered)"
            )
        if self.stage1_train not in ("router", "experts+router"):
            raise ConfigError(f"mixmoe: stage1_train must be 'router' or 'experts+router', got {self.stage1_train!r}")
        for name in ("router_init_std", "fft_proj_init_std", "mt_init_std", "router_lr_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"mixmoe: {name} must be >= 0, got {getattr(self, name)}")
        if self.routing not in ("joint", "grouped"):
            raise ConfigError(f"mixmoe: routing must be 'joint' or 'grouped', got {self.routing!r}")
        if self.routing == "grouped":
            if self.num_mt_experts < 1:
                raise ConfigError("mixmoe: routing='grouped' needs num_mt_experts >= 1")
            if not 1 <= self.top_k <= self.num_lm_experts:
                raise ConfigError(
                    f"mixmoe: with routing='grouped', top_k={self.top_k} must be in "
                    f"[1, num_lm_experts={self.num_lm_experts}]"
                )
            if self.top_k_mt is not None and not 1 <= self.top_k_mt <= self.num_mt_experts:
                raise ConfigError(
                    f"mixmoe: top_k_mt={self.top_k_mt} must be in [1, num_mt_experts={self.num_mt_experts}]"
                )
            return
        n_allowed = self.num_lm_experts if self.stage == 1 else self.num_lm_experts + self.num_mt_experts
        if not 1 <= self.top_k <= n_allowed:
            raise ConfigError(
                f"mixmoe: top_k={self.top_k} must be in [1, {n_allowed}] (experts routable in stage {self.stage})"
            )
