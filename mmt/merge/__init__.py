"""``mmt merge``: streaming merge of Hugging Face checkpoints (and LoRA adapters) through mmt_kernels.

Checkpoints are read tensor by tensor (single safetensors file, or sharded with
``model.safetensors.index.json``) and written tensor by tensor: the output's shard layout and
safetensors headers are planned from the base's shapes before any merging, so each merged tensor
goes to disk as soon as it exists. Peak memory is the K + 1 input tensors and one output tensor of
the largest parameter, never a whole model. The output appears atomically: everything is written
to a hidden temporary directory next to it and renamed at the end, so a killed merge leaves no
directory that looks like a finished checkpoint. Next to the weights go config.json, the tokenizer
(and chat template), a model card ``README.md``, ``merge_config.yaml`` (the merge, repeatable with
``mmt merge merge_config.yaml``) and ``merge_report.json``.

YAML config (every key but ``models``/``adapters`` and ``output`` has a default)::

    method: ties                # linear | task_arithmetic | ties | dare_linear | dare_ties | breadcrumbs |
                                # breadcrumbs_ties | della | della_linear | slerp | model_stock | nuslerp | sce |
                                # passthrough (one model or one source per slice, copied)
    base_model: runs/base       # needed by every method but linear, nuslerp and passthrough
    models:                     # K fine-tuned checkpoints: a path, or {path, weight, density, epsilon, gamma}
      - {path: runs/group1/final, weight: 1.0}
      - runs/group2/final
    density: 0.2                # TIES/breadcrumbs: fraction kept per task and tensor; DARE/DELLA: keep probability
    lam: 1.0                    # scale of the merged task vector
    tie_break: threshold        # TIES/breadcrumbs cut-off: threshold (keep every entry tied with the k-th
                                # magnitude) | exact_k (keep exactly k, ties in torch.argsort order: mergekit's)
    gamma: 0.01                 # breadcrumbs: fraction of largest magnitudes dropped as outliers
    epsilon: 0.15               # della: keep probabilities span density -/+ epsilon by magnitude rank
    t: 0.5                      # slerp: 0 = base_model, 1 = the model
    filter_wise: false          # model_stock: one interpolation per row instead of per tensor
    nuslerp_flatten: true       # nuslerp (2 models, t = w1 / (w0 + w1)): one vector per tensor; false: per row
    nuslerp_row_wise: false     # nuslerp, with nuslerp_flatten false: per column (vectors along dim 0) instead
    select_topk: 1.0            # sce: fraction of elements kept, those of highest variance across the models
    sign: total                 # TIES sign election: total | count
    seed: 0                     # DARE/DELLA draws (mixed with each tensor's name)
    normalize: null             # null = the method's default (see mmt.merge.methods)
    rescale: null               # DARE/DELLA survivors rescaled (null = the method's default)
    semantics: mmt              # mmt | mergekit: whose weighting and normalisation conventions
    dtype: null                 # compute dtype (float32 | bfloat16 | float16); inputs are converted to it
    out_dtype: null             # written dtype; default: dtype, else the base's
    tokenizer_source: null      # base | a model's path; default: the base (or the first model)
    chat_template: null         # a Jinja template, or a file holding one, written as chat_template.jinja
    output: runs/merged
    shard_size: 2GB
    device: cpu                 # or cuda: merge math on the GPU, I/O on the host
    backend: auto               # mmt_kernels backend (auto | reference | cpu | triton | cuda)
    stats: false                # per-tensor sign-conflict statistics (merge_stats.json, + plot)

Numeric settings (``weight``, ``density``, ``lam``, ``epsilon``, ``gamma``, ``t``, ``select_topk``) may be gradients over the
layers or per-tensor filter lists, globally or per model: see :mod:`mmt.merge.plan`. A mergekit config
(``merge_method``, ``models: [{model, parameters}]``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``, ``slices``) is read as it is: see :mod:`mmt.merge.compat`.

``slices`` instead of ``models`` stacks layer ranges of the inputs (``method: passthrough`` copies them, the
frankenmerge) or merges them per slice, with settings per slice and per source: see :mod:`mmt.merge.plan`.

LoRA adapters instead of full checkpoints: ``adapters: [dir, ...]`` (peft adapter directories),
``lora_mode: svd`` (dense ``s*B@A`` per module, merged, truncated back to ``rank`` by SVD) or
``factor`` (merge the A and B factors separately with weights sqrt(w * scaling), as peft's
``add_weighted_adapter`` does for TIES/DARE). The result is a peft adapter directory.

Layout: :mod:`.io` (reader, writer, atomic output), :mod:`.plan` (config, tensors, per-tensor settings),
:mod:`.compat` (mergekit configs), :mod:`.methods` (one tensor's merge), :mod:`.stream` (the checkpoint
merge), :mod:`.lora` (adapters), :mod:`.report` (summary, model card) and :mod:`.cli` (``mmt merge``).
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

__all__ = [
    "Checkpoint",
    "LoraAdapter",
    "MergeConfig",
    "MergeError",
    "MergeReport",
    "ModelSpec",
    "StreamingWriter",
    "add_args",
    "load_merge_config",
    "merge_checkpoints",
    "merge_lora_adapters",
    "parse_size",
    "run",
    "run_merge",
    "sign_conflict",
    "tensor_seed",
]
