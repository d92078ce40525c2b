"""Non-gated GELU experts (GPT-2, BLOOM, XGLM FFNs) on the routing, FFT router and masks of :class:`MoEFFN`.

``mmt_kernels``' grouped MLP computes gated experts ``down(act(gate x) * up x)`` only, so the experts here
run as one PyTorch matmul pair per expert segment, between the kernels' permute / dispatch / combine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmt_kernels import MoEFFN, moe_combine, moe_dispatch, moe_permute, route
from mmt_kernels.moe import MoEOutput

GELU_ACTS = ("gelu", "gelu_tanh")


def gelu(h: torch.Tensor, act: str) -> torch.Tensor:
    return F.gelu(h, approximate="tanh" if act == "gelu_tanh" else "none")


class GeluMoEFFN(MoEFFN):
    """A dropless top-k MoE FFN whose expert e computes ``W_out[e] act(W_in[e] x + b_in[e])``; the output adds
    ``b_out`` once (the dense FFN's output bias is not an expert's).

    Router, FFT features, expert/train masks and grouped routing are :class:`MoEFFN`'s. Parameters:
    ``w_in [E, f, d]``, ``b_in [E, f]`` (None without bias), ``w_out [E, d, f]``, ``b_out [d]`` (or None).
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        num_experts: int,
        *,
        k: int = 2,
        act: str = "gelu",
        bias: bool = True,
        n_freq: int = 64,
        fft_proj_dim: int | None = None,
        router_input: str = "concat",
        fft_layernorm: bool = False,
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
        device=None,
        backend: str | None = None,
    ):
        if act not in GELU_ACTS:
            raise ValueError(f"GeluMoEFFN: act must be one of {GELU_ACTS}, got {act!r}")
        super().__init__(
            d_model,
            d_expert,
            num_experts,
            k=k,
            act="silu",
            n_freq=n_freq,
            fft_proj_dim=fft_proj_dim,
            router_input=router_input,
            fft_layernorm=fft_layernorm,
            scale=scale,
            dtype=dtype,
            device=device,
            backend=backend,
        )
        self.act = act
        # MoEFFN's gated expert tensors are replaced by the non-gated ones
        del self.w_gate, self.w_up, self.w_down
        fk = {"dtype": dtype, "device": device}
        self.w_in = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **fk))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_expert, **fk))
        self.b_in = nn.Parameter(torch.zeros(num_experts, d_expert, **fk)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "w_in"):  # MoEFFN.__init__ calls this before the expert tensors exist
            return
        for w, fan_in in ((self.w_in, self.d_model), (self.w_out, self.d_expert)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)
        nn.init.normal_(self.router.weight, std=0.02)
        if self.fft_proj is not None:
            nn.init.normal_(self.fft_proj.weight, std=0.02)

    def expert_tensors(self) -> list[torch.Tensor]:
        """The parameters whose first dim indexes experts."""
        return [t for t in (self.w_in, self.b_in, self.w_out) if t is not None]

    def _experts(
        self, x: torch.Tensor, logits: torch.Tensor, lo: int, hi: int, k: int, scale: float, n_on: int, n_train: int
    ) -> MoEOutput:
        """Route ``x`` among experts ``[lo, hi)`` and run them; frozen experts get no weight gradient."""
        mask = None if n_on == hi - lo else self.expert_mask[lo:hi]
        weights, ids, aux, z = route(logits[:, lo:hi], k, mask, n_on)
        perm, inv, offsets = moe_permute(ids, hi - lo, backend=self.backend)
        xp = moe_dispatch(x, perm, inv, k, backend=self.backend)
        rows = []
        bounds = offsets.tolist()
        train = self.train_mask[lo:hi].tolist() if n_train not in (0, hi - lo) else [bool(n_train)] * (hi - lo)
        for e in range(hi - lo):
            s, t = bounds[e], bounds[e + 1]
            if t == s:
                continue
            w_in, w_out = self.w_in[lo + e], self.w_out[lo + e]
            b_in = None if self.b_in is None else self.b_in[lo + e]
            if not train[e]:
                w_in, w_out = w_in.detach(), w_out.detach()
                b_in = None if b_in is None else b_in.detach()
            rows.append(F.linear(gelu(F.linear(xp[s:t], w_in, b_in), self.act), w_out))
        yp = torch.cat(rows) if rows else xp.new_zeros(0, self.d_model)
        w = weights * scale if scale != 1.0 else weights
        out = moe_combine(yp, inv, perm, w.reshape(-1), k, backend=self.backend)
        return MoEOutput(out, aux, z, ids, weights, offsets[1:] - offsets[:-1])

    def forward_with_aux(self, hidden: torch.Tensor) -> MoEOutput:
        x = hidden.reshape(-1, self.d_model)
        logits = self.router_logits(x)
        E = self.num_experts
        if self.group_split is None:
            n_on, all_train = self._mask_state
            n_train = E if all_train else int(self.train_mask.sum())
            groups = [(0, E, self.k, self.scale, n_on, n_train)]
        else:
            G = self.group_split
            (n1, t1, _), (n2, t2, _) = self._group_state
            groups = [(0, G, self.k, self.scale, n1, t1), (G, E, self.k_second, self.scale_second, n2, t2)]
        parts = [
            (lo, self._experts(x, logits, lo, hi, k, s, n_on, n_tr)) for lo, hi, k, s, n_on, n_tr in groups if n_on
        ]
        out = parts[0][1].out
        for _, r in parts[1:]:
            out = out + r.out
        if self.b_out is not None:
            out = out + self.b_out
        counts = torch.zeros(E, dtype=parts[0][1].counts.dtype, device=x.device)
        for lo, r in parts:
            counts[lo : lo + r.counts.numel()] = r.counts
        res = MoEOutput(
            out.to(hidden.dtype),
            sum(r.aux_loss for _, r in parts) / len(parts),
            sum(r.z_loss for _, r in parts),
            torch.cat([r.expert_ids + lo for lo, r in parts], 1),
            torch.cat([r.weights for _, r in parts], 1),
            counts,
        )
        self.last_aux_loss, self.last_z_loss = res.aux_loss, res.z_loss
        if self.track_load:
            self.load_counts += res.counts.detach().to(self.load_counts)
        return res

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.b_in is not None}"
