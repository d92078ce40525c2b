"""``MoEFFN``: the FFT-routed MoE layer, a drop-in replacement for a decoder's MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import act_name
from .fused import MoEOutput, moe_ffn
from .routing import fft_features


class MoEFFN(nn.Module):
    """A dropless top-k MoE FFN with an FFT-feature router, a drop-in replacement for a decoder MLP.

    Router: ``logits = W_r [x ; W_f f(x)]`` (``router_input="concat"``) or ``W_r (x + W_f f(x))``
    (``"sum"``, needs ``fft_proj_dim == d``), with ``f(x) = log1p|rfft(x)|[:n_freq]`` (``n_freq=0``: no FFT
    features). ``forward`` returns the output only (it must fit the MLP slot of a decoder layer); the
    auxiliary losses of the last call are in ``last_aux_loss`` / ``last_z_loss`` and per-expert loads
    accumulate in ``load_counts`` while ``track_load`` is set.
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        num_experts: int,
        *,
        k: int = 2,
        act: str = "silu",
        n_freq: int = 64,
        fft_proj_dim: int | None = None,
        router_input: str = "concat",
        fft_layernorm: bool = False,
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
        device=None,
        backend: str | None = None,
    ):
        super().__init__()
        if router_input not in ("concat", "sum"):
            raise ValueError(f"MoEFFN: router_input must be 'concat' or 'sum', got {router_input!r}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoEFFN: k={k} must be in [1, num_experts={num_experts}]")
        act_name(act)
        if n_freq < 0 or n_freq > d_model // 2 + 1:
            raise ValueError(f"MoEFFN: n_freq must be in [0, d//2+1 = {d_model // 2 + 1}], got {n_freq}")
        fft_proj_dim = (d_model if router_input == "sum" else n_freq) if fft_proj_dim is None else fft_proj_dim
        if router_input == "sum" and fft_proj_dim != d_model:
            raise ValueError("MoEFFN: router_input='sum' needs fft_proj_dim == d_model")
        fk = dict(dtype=dtype, device=device)
        self.d_model, self.d_expert, self.num_experts = d_model, d_expert, num_experts
        self.k, self.act, self.n_freq, self.router_input = k, act, n_freq, router_input
        self.scale, self.backend = scale, backend
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **fk))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **fk))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, d_expert, **fk))
        self.fft_proj = nn.Linear(n_freq, fft_proj_dim, bias=False, **fk) if n_freq else None
        self.fft_norm = nn.LayerNorm(n_freq, **fk) if (n_freq and fft_layernorm) else None
        router_in = d_model + (fft_proj_dim if (n_freq and router_input == "concat") else 0)
        self.router = nn.Linear(router_in, num_experts, bias=False, **fk)
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.register_buffer("train_mask", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.register_buffer(
            "load_counts", torch.zeros(num_experts, dtype=torch.float64, device=device), persistent=False
        )
        self.track_load = False
        # Grouped routing (optional): experts [0, group_split) and [group_split, E) are routed separately,
        # top-k inside the first group and top-k_second inside the second, outputs summed (the second
        # group's combine weights multiplied by scale_second). None: one top-k over all allowed experts.
        self.group_split: int | None = None
        self.k_second: int = k
        self.scale_second: float = 1.0
        self._mask_state = (num_experts, True)  # (allowed experts, all experts train): host-side copies
        self._group_state = ((0, 0, 0), (0, 0, 0))  # set by set_groups / set_masks
        self.register_load_state_dict_post_hook(lambda module, _keys: module.set_masks())
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self.reset_parameters()

    def set_masks(self, expert_mask: torch.Tensor | None = None, train_mask: torch.Tensor | None = None) -> None:
        """Set which experts may be routed to and which train (bool [E] each; None keeps the current one).

        Host-side summaries are cached here so that ``forward`` never reads the masks back from a GPU.
        """
        with torch.no_grad():
            if expert_mask is not None:
                self.expert_mask.copy_(expert_mask)
            if train_mask is not None:
                self.train_mask.copy_(train_mask)
        n_allowed = int(self.expert_mask.sum())
        if n_allowed < self.k:
            raise ValueError(f"MoEFFN: {n_allowed} allowed experts is fewer than k={self.k}")
        self._mask_state = (n_allowed, bool(self.train_mask.all()))
        G = self.group_split
        if G is not None:
            em, tm = self.expert_mask.cpu(), self.train_mask.cpu()
            # per group: (allowed experts, experts that train, group size)
            self._group_state = tuple(
                (int(em[lo:hi].sum()), int(tm[lo:hi].sum()), hi - lo) for lo, hi in ((0, G), (G, self.num_experts))
            )
            (n1, _, _), (n2, _, _) = self._group_state
            if (n1 and n1 < self.k) or (n2 and n2 < self.k_second) or not (n1 or n2):
                raise ValueError("MoEFFN: grouped routing needs at least k allowed experts in each enabled group")

    def set_groups(self, split: int, k_second: int, scale_second: float = 1.0) -> None:
        """Route experts ``[0, split)`` (top-``k``) and ``[split, E)`` (top-``k_second``) separately."""
        n_second = self.num_experts - split
        if not 1 <= split < self.num_experts or not 1 <= self.k <= split or not 1 <= k_second <= n_second:
            raise ValueError(
                f"MoEFFN.set_groups: need 1 <= k={self.k} <= split={split} and 1 <= k_second={k_second} "
                f"<= {self.num_experts - split}"
            )
        self.group_split, self.k_second, self.scale_second = split, k_second, scale_second
        self.set_masks()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w_gate, self.d_model), (self.w_up, self.d_model), (self.w_down, self.d_expert)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # nn.Linear's default range
        nn.init.normal_(self.router.weight, std=0.02)
        if self.fft_proj is not None:
            nn.init.normal_(self.fft_proj.weight, std=0.02)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits ``[T, E]`` for tokens ``x [T, d]``."""
        z = x
        if self.n_freq:
            f = fft_features(x, self.n_freq, backend=self.backend)
            if self.fft_norm is not None:
                f = self.fft_norm(f)
            pf = self.fft_proj(f)
            z = torch.cat([x, pf], dim=-1) if self.router_input == "concat" else x + pf
        return F.linear(z.float(), self.router.weight.float())

    def _forward_grouped(self, x: torch.Tensor) -> MoEOutput:
        G, E = self.group_split, self.num_experts
        (n1, t1, s1), (n2, t2, s2) = self._group_state
        logits = self.router_logits(x)
        parts = []
        for lo, hi, k, scale, n_on, n_tr in (
            (0, G, self.k, self.scale, n1, t1),
            (G, E, self.k_second, self.scale_second, n2, t2),
        ):
            if not n_on:
                continue
            ws = [w[lo:hi] if n_tr else w[lo:hi].detach() for w in (self.w_gate, self.w_up, self.w_down)]
            res = moe_ffn(
                x,
                logits[:, lo:hi],
                *ws,
                k=k,
                act=self.act,
                expert_mask=None if n_on == hi - lo else self.expert_mask[lo:hi],
                train_mask=None if n_tr in (0, hi - lo) else self.train_mask[lo:hi],
                scale=scale,
                backend=self.backend,
                n_active=n_on,
            )
            parts.append((lo, hi, res))
        out = parts[0][2].out
        for _, _, r in parts[1:]:
            out = out + r.out
        counts = torch.zeros(E, dtype=parts[0][2].counts.dtype, device=x.device)
        for lo, hi, r in parts:
            counts[lo:hi] = r.counts
        aux = sum(r.aux_loss for _, _, r in parts) / len(parts)
        z = sum(r.z_loss for _, _, r in parts)
        ids = torch.cat([r.expert_ids + lo for lo, _, r in parts], 1)
        weights = torch.cat([r.weights for _, _, r in parts], 1)
        return MoEOutput(out, aux, z, ids, weights, counts)

    def forward_with_aux(self, hidden: torch.Tensor) -> MoEOutput:
        x = hidden.reshape(-1, self.d_model)
        if self.group_split is not None:
            res = self._forward_grouped(x)
            self.last_aux_loss, self.last_z_loss = res.aux_loss, res.z_loss
            if self.track_load:
                self.load_counts += res.counts.detach().to(self.load_counts)
            return res
        n_allowed, all_train = self._mask_state
        res = moe_ffn(
            x,
            self.router_logits(x),
            self.w_gate,
            self.w_up,
            self.w_down,
            k=self.k,
            act=self.act,
            expert_mask=None if n_allowed == self.num_experts else self.expert_mask,
            train_mask=None if all_train else self.train_mask,
            scale=self.scale,
            backend=self.backend,
            n_active=n_allowed,
        )
        self.last_aux_loss, self.last_z_loss = res.aux_loss, res.z_loss
        if self.track_load:
            self.load_counts += res.counts.detach().to(self.load_counts)
        return res

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        res = self.forward_with_aux(hidden)
        return res.out.reshape(hidden.shape)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_expert={self.d_expert}, num_experts={self.num_experts}, k={self.k}, "
            f"act={self.act}, n_freq={self.n_freq}, router_input={self.router_input}, scale={self.scale}"
        )
