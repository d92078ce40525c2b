"""Training checkpoints that hold no pickle and verify themselves.

A checkpoint folder ``<output_dir>/checkpoints/checkpoint-<step>/`` holds

* the full model as ``save_pretrained`` writes it (plus the tokenizer), so it loads and scores like a final model;
* ``trainable.safetensors``: the exact trainable parameters the run resumes from;
* the optimizer, scheduler, method and per-process RNG state, each as ``<name>.safetensors`` (the tensors) +
  ``<name>.json`` (everything else, with references to the tensors): reading them runs no code;
* ``trainer_state.json`` (step, sampler cursors, data and model fingerprints);
* ``manifest.json``, written last: the size and SHA-256 of every file. A folder without it is incomplete; a file
  whose size or hash differs is damaged, and resuming names it and falls back to an older checkpoint.

Files that are not in the manifest (e.g. a ``.pt`` pickle someone dropped into the folder) are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmt.errors import CheckpointError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
FORMAT = "mmt-checkpoint/1"
_CHUNK = 1 << 22

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PREFIX",
    "checkpoint_step",
    "decode",
    "describe_folder",
    "encode",
    "file_sha256",
    "list_checkpoints",
    "load_state",
    "prune",
    "save_state",
    "verify",
    "write_manifest",
]


# ------------------------------------------------------------------------------------------------------------------
# state trees <-> (JSON, safetensors)


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able tree for ``obj``; its tensors go into ``tensors`` (keyed by their path in the tree).

    Accepts what optimizer, scheduler, sampler and RNG states are made of: None, bool, int, float, str, tensors,
    numpy arrays and scalars, lists, tuples and dicts (any hashable scalar keys). Anything else is a bug in the
    caller (a state must not hold objects), so it raises ``TypeError``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor: this process's shard only
        key = path or "tensor"
        tensors[key] = local.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {
            "__items__": [
                [encode(k, tensors, "key"), encode(v, tensors, f"{path}.{k}" if path else str(k))]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"checkpoint state at {path or '<root>'}: cannot store a {type(obj).__name__}")


def decode(tree: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of :func:`encode`; ``where`` names the file in errors."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensors, where) for v in tree]
    if not isinstance(tree, dict):
        raise CheckpointError(f"{where}: unexpected JSON value {tree!r}")
    if "__tensor__" in tree:
        key = tree["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"{where}: tensor {key!r} is missing from the .safetensors file")
        return tensors[key]
    if "__ndarray__" in tree:
        try:
            return np.asarray(tree["__ndarray__"], dtype=np.dtype(tree["dtype"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: bad array ({exc})") from None
    if "__tuple__" in tree:
        return tuple(decode(v, tensors, where) for v in tree["__tuple__"])
    if "__items__" in tree:
        out = {}
        for pair in tree["__items__"]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise CheckpointError(f"{where}: bad mapping entry {pair!r}")
            key = decode(pair[0], tensors, where)
            if isinstance(key, list):
                raise CheckpointError(f"{where}: bad mapping key {key!r}")
            out[key] = decode(pair[1], tensors, where)
        return out
    return {k: decode(v, tensors, where) for k, v in tree.items()}


def save_state(obj: Any, directory: Path, name: str) -> None:
    """``obj`` as ``<name>.json`` (+ ``<name>.safetensors`` when it holds tensors) in ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(obj, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps({"format": FORMAT, "state": tree}), encoding="utf-8")


def load_state(directory: Path, name: str) -> Any:
    """Read what :func:`save_state` wrote; never unpickles. Errors name the file."""
    jpath, tpath = directory / f"{name}.json", directory / f"{name}.safetensors"
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{jpath}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{jpath}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{jpath}: not an mmt checkpoint state file (format {FORMAT!r} expected)")
    tensors: dict[str, torch.Tensor] = {}
    if tpath.is_file():
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{tpath}: unreadable safetensors file ({exc})") from None
    return decode(doc["state"], tensors, str(jpath))


# ------------------------------------------------------------------------------------------------------------------
# manifest: sizes and hashes


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Record size and SHA-256 of every file under ``directory``; written last, it marks the folder complete."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    doc = {"format": FORMAT, "files": files, **(extra or {})}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path, *, hashes: bool = True) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every file in it; :class:`CheckpointError` names the first
    missing or damaged file."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"{directory}: not a complete mmt checkpoint (no {MANIFEST}; an older format, or a "
            "folder whose writing was interrupted)"
        )
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
        files = doc["files"]
        assert isinstance(files, dict) and doc.get("format") == FORMAT
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{mpath}: damaged manifest") from None
    for rel, rec in files.items():
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != rec.get("size"):
            raise CheckpointError(f"{p}: damaged (size {size} bytes, {rec.get('size')} when written)")
        if hashes and file_sha256(p) != rec.get("sha256"):
            raise CheckpointError(f"{p}: damaged (contents changed since it was written: SHA-256 differs)")
    return doc


# ------------------------------------------------------------------------------------------------------------------
# checkpoint folders


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX) :])
    except ValueError:
        return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` that were completely written (have a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p))


def describe_folder(path: str | Path) -> str | None:
    """What a local folder that is not a loadable model is, and what to pass instead; None when it is not one of
    ours (a run folder, its ``checkpoints`` folder, an incomplete checkpoint)."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    if (p / "checkpoints").is_dir() or (p / "final").is_dir():
        final = p / "final"
        ckpts = list_checkpoints(p / "checkpoints")
        what = f"{final}" if final.is_dir() else (str(ckpts[-1]) if ckpts else None)
        return (
            f"{p} is a training run folder; pass its model: {what}"
            if what
            else f"{p} is a training run folder without a finished model or checkpoint yet"
        )
    ckpts = list_checkpoints(p)
    if ckpts or any(checkpoint_step(c) is not None for c in p.iterdir()):
        return (
            f"{p} is the checkpoints folder of a training run; pass one checkpoint, e.g. {ckpts[-1]}"
            if ckpts
            else f"{p} is the checkpoints folder of a training run, with no complete checkpoint"
        )
    if checkpoint_step(p) is not None or p.name.startswith(TMP_PREFIX):
        return f"{p} is an incomplete training checkpoint (its writing was interrupted); use an older one"
    return f"{p} is not a model folder (no config.json)"


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and leftovers of interrupted writes."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) or (checkpoint_step(p) is not None and not (p / MANIFEST).is_file()):
            shutil.rmtree(p, ignore_errors=True)
    for old in list_checkpoints(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
