"""Tokenisation with loss masks and padding into batches."""

from __future__ import annotations

from typing import Sequence

import torch

from mmt.errors import ConfigError

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# tokenisation and collation


def encode_pair(
    tokenizer, prompt: str, target: str, *, max_length: int, loss_on: str = "target", add_eos: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and labels for ``prompt + " " + target + EOS``.

    The prompt is encoded with the tokenizer's special tokens (BOS), the target without; labels are
    -100 on the prompt when ``loss_on == "target"``. Sequences longer than ``max_length`` are cut on
    the right (the EOS is lost then, as in the mFTI code).
    """
    if loss_on not in ("target", "full"):
        raise ConfigError(f"loss_on must be 'target' or 'full', got {loss_on!r}")
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        t_ids = t_ids + [tokenizer.eos_token_id]
    ids = (p_ids + t_ids)[:max_length]
    if loss_on == "full":
        labels = list(ids)
        if tokenizer.bos_token_id is not None and labels and labels[0] == tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX  # BOS is never predicted
    else:
        labels = ([IGNORE_INDEX] * len(p_ids) + t_ids)[:max_length]
    return ids, labels


def encode_mono(tokenizer, text: str, *, max_length: int) -> tuple[list[int], list[int]]:
    ids = tokenizer(text.strip(), add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    labels = list(ids)
    if tokenizer.bos_token_id is not None and labels and labels[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE_INDEX
    return ids, labels


def collate(
    features: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad (ids, labels) pairs into input_ids / attention_mask / labels (labels padded with -100)."""
    assert features, "collate: empty batch"
    width = max(len(ids) for ids, _ in features)
    n = len(features)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(features):
        k = len(ids)
        sl = slice(width - k, width) if padding_side == "left" else slice(0, k)
        input_ids[i, sl] = torch.as_tensor(list(ids), dtype=torch.long)
        labels[i, sl] = torch.as_tensor(list(lab), dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation (new tokens then start at the same column)."""
    rows = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]  # keep the end: the query sits there in few-shot prompts
        rows.append((ids, ids))
    batch = collate(rows, pad_token_id(tokenizer), padding_side="left")
    batch.pop("labels")
    return batch


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0
