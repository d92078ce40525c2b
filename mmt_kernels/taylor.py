"""Family 1 helper op: fused Taylor importance accumulator for neuron detection (LANDeRMT).

``taylor_accumulate_(acc, act, grad, ...)`` adds, per sequence, the token mean of ``|a * dL/da|`` for every neuron
(output channel) into ``acc`` in one pass. :class:`TaylorHook` calls it from a tensor hook during backward, so a
detection pass keeps no activation or gradient copies around (the hooks of the original script stored both:
about 1.4 GB per 2 048-token pass for Llama-2-7B's FFNs in bf16).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import reference as _ref
from ._registry import OpSpec, register
from .reference.taylor import token_weights

__all__ = ["taylor_accumulate_", "token_weights", "TaylorHook"]

TAYLOR_ACCUMULATE = register(
    OpSpec(
        name="taylor_accumulate_",
        schema="(Tensor(a!) acc, Tensor act, Tensor grad, Tensor token_weight) -> ()",
        reference=_ref.taylor_accumulate_,
        fake=lambda acc, act, grad, token_weight: None,
        triton="taylor:taylor_accumulate_",
        fp64=("reference",),
    )
)


def taylor_accumulate_(
    acc: torch.Tensor,
    act: torch.Tensor,
    grad: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``acc[j] += sum over sequences of mean_t |act[t, j] * grad[t, j]|``, in place; returns ``acc``.

    ``act``/``grad``: ``[B, T, M]`` (sequences of a padded batch) or ``[N, M]`` (packed tokens). Sequences come from
    ``attention_mask`` [B, T], ``lengths`` [B] (right padding), ``offsets`` [S+1] (packed), or a ready
    ``token_weight`` [N]; with none of them each of the B rows (or all N packed tokens) is one sequence.
    ``acc`` is fp32 [M]; act/grad are fp32, bf16 or fp16 (math in fp32).
    """
    if act.dim() not in (2, 3):
        raise ValueError(f"taylor_accumulate_: act must be [B, T, M] or [N, M], got shape {tuple(act.shape)}")
    if grad.shape != act.shape or grad.dtype != act.dtype:
        raise ValueError(
            f"taylor_accumulate_: grad {tuple(grad.shape)}/{grad.dtype} does not match act "
            f"{tuple(act.shape)}/{act.dtype}"
        )
    if act.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"taylor_accumulate_: act dtype must be fp32, bf16 or fp16, got {act.dtype}")
    M = act.shape[-1]
    if acc.dtype != torch.float32 or acc.shape != (M,):
        raise ValueError(f"taylor_accumulate_: acc must be fp32 [{M}], got {acc.dtype} {tuple(acc.shape)}")
    for name, t in (("grad", grad), ("acc", acc)):
        if t.device != act.device:
            raise ValueError(f"taylor_accumulate_: {name} is on {t.device}, act on {act.device}")
    if token_weight is None:
        if offsets is not None and act.dim() != 2:
            raise ValueError("taylor_accumulate_: offsets describe packed tokens; act must be [N, M]")
        if (attention_mask is not None or lengths is not None) and act.dim() != 3:
            raise ValueError("taylor_accumulate_: attention_mask/lengths need act [B, T, M]")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(act.shape[:2]):
            raise ValueError(
                f"taylor_accumulate_: attention_mask {tuple(attention_mask.shape)} != act's "
                f"[B, T] {tuple(act.shape[:2])}"
            )
        token_weight = token_weights(
            attention_mask=attention_mask, lengths=lengths, offsets=offsets, shape=tuple(act.shape[:-1])
        )
    token_weight = token_weight.to(device=act.device, dtype=torch.float32).reshape(-1).contiguous()
    n_tok = act.numel() // M if M else (act.shape[0] if act.dim() == 2 else act.shape[0] * act.shape[1])
    act2, grad2 = act.reshape(n_tok, M).contiguous(), grad.reshape(n_tok, M).contiguous()
    if token_weight.numel() != act2.shape[0]:
        raise ValueError(f"taylor_accumulate_: {token_weight.numel()} token weights for {act2.shape[0]} tokens")
    which = TAYLOR_ACCUMULATE.choose(act.device, backend, act.dtype)
    TAYLOR_ACCUMULATE(which, acc, act2, grad2, token_weight)
    return acc


class TaylorHook:
    """Accumulates Taylor importance of a module's output (or input) channels during backward.

    ``TaylorHook(module, where="output"|"input")`` registers a forward (pre-)hook that attaches a tensor hook to
    the chosen activation; when its gradient arrives, ``taylor_accumulate_`` folds ``|a * g|`` into
    ``self.acc[bucket]`` and the closure is dropped, so neither tensor outlives its backward. Set
    :attr:`bucket` (e.g. the language) and :attr:`token_weight` (from :func:`token_weights`) before each forward.
    ``transform`` maps the activation to ``[..., M]`` (e.g. GPT-2 Conv1D needs none; default identity).
    """

    def __init__(
        self,
        module: nn.Module,
        where: str = "output",
        backend: str | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if where not in ("output", "input"):
            raise ValueError(f"TaylorHook: where must be 'output' or 'input', got {where!r}")
        self.acc: dict[object, torch.Tensor] = {}
        self.bucket: object = None
        self.token_weight: torch.Tensor | None = None
        self.backend, self.transform = backend, transform
        if where == "output":
            self._handle = module.register_forward_hook(lambda mod, args, out: self._attach(out))
        else:
            self._handle = module.register_forward_pre_hook(lambda mod, args: self._attach(args[0]))

    def _attach(self, t):
        if isinstance(t, tuple):
            t = t[0]
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return None
        bucket, weight = self.bucket, self.token_weight
        act = t.detach()

        def on_grad(g):
            a, gg = (act, g) if self.transform is None else (self.transform(act), self.transform(g))
            M = a.shape[-1]
            acc = self.acc.get(bucket)
            if acc is None:
                acc = self.acc[bucket] = torch.zeros(M, dtype=torch.float32, device=a.device)
            a2, g2 = a.reshape(-1, M), gg.reshape(-1, M).to(a.dtype)
            w = weight if weight is not None else token_weights(shape=tuple(a.shape[:-1]))
            taylor_accumulate_(acc, a2, g2, token_weight=w, backend=self.backend)
            return None

        t.register_hook(on_grad)
        return None

    def remove(self) -> None:
        self._handle.remove()
