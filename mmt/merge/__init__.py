"""``mmt merge``: streaming merge of Hugging Face checkpoints (and LoRA adapters) through mmt_kernels.

Checkpoints are read tensor by tensor with ``safetensors.safe_open`` (single file or sharded with
``model.safetensors.index.json``) and written tensor by tensor: the output's shard layout and
safetensors headers are planned from the base's shapes before any merging, so each merged tensor
goes to disk as soon as it exists. Peak memory is the K + 1 input tensors and one output tensor of
the largest parameter, never a whole model. The output appears atomically: everything is written
to a hidden temporary directory next to it and renamed at the end, so a killed merge leaves no
directory that looks like a finished checkpoint.

YAML config (every key but ``models``/``adapters`` and ``output`` has a default)::

    method: ties                # linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: runs/base       # needed by every method but linear
    models:                     # K fine-tuned checkpoints: a path, or {path, weight, density}
      - {path: runs/group1/final, weight: 1.0}
      - runs/group2/final
    density: 0.2                # TIES: fraction kept per task and tensor; DARE: keep probability
    lam: 1.0                    # scale of the merged task vector
    sign: total                 # TIES sign election: total | count
    seed: 0                     # DARE drop mask (mixed with each tensor's name)
    dtype: null                 # output dtype (float32 | bfloat16 | float16); default: the base's
    output: runs/merged
    shard_size: 2GB
    device: cpu                 # or cuda: merge math on the GPU, I/O on the host
    backend: auto               # mmt_kernels backend (auto | reference | cpu | triton | cuda)
    stats: false                # per-tensor sign-conflict statistics (merge_stats.json, + plot)

LoRA adapters instead of full checkpoints: ``adapters: [dir, ...]`` (peft adapter directories),
``lora_mode: svd`` (dense ``s*B@A`` per module, merged, truncated back to ``rank`` by SVD) or
``factor`` (merge the A and B factors separately with weights sqrt(w * scaling), as peft's
``add_weighted_adapter`` does for TIES/DARE). The result is a peft adapter directory.

Layout: :mod:`.io` (reader, writer, atomic output), :mod:`.plan` (config, tensors, per-tensor settings),
:mod:`.methods` (one tensor's merge), :mod:`.stream` (the checkpoint merge), :mod:`.lora` (adapters),
:mod:`.report` and :mod:`.cli` (``mmt merge``).
"""
from __future__ import annotations

from mmt.errors import MergeError

from .cli import add_args, run
from .io import Checkpoint, StreamingWriter
from .lora import LoraAdapter, merge_lora_adapters
from .methods import sign_conflict
from .plan import MergeConfig, ModelSpec, load_merge_config, parse_size, tensor_seed
from .report import MergeReport
from .stream import merge_checkpoints, run_merge

__all__ = ["Checkpoint", "LoraAdapter", "MergeConfig", "MergeError", "MergeReport", "ModelSpec", "StreamingWriter",
           "add_args", "load_merge_config", "merge_checkpoints", "merge_lora_adapters", "parse_size", "run",
           "run_merge", "sign_conflict", "tensor_seed"]
