"""Translation data: readers, prompt templates, tokenisation with loss masks, collation, samplers.

Everything is keyed by ISO 639-1 codes internally (see :mod:`mmt.languages`). Readers check what
silently ruins a run (misaligned files, empty or over-long lines, unknown language codes, broken
JSONL) and raise :class:`DataError` naming the file and the 1-based line.

* :mod:`.readers`: the data folder and the corpus readers (:func:`load_source` for a config's source);
* :mod:`.prompts`: prompt templates and few-shot prompts;
* :mod:`.batching`: tokenisation with loss masks and padding into batches;
* :mod:`.samplers`: the tokenised training set and the step samplers (resumable from a small state).
"""

from mmt.errors import DataError

from .batching import IGNORE_INDEX, collate, collate_prompts, encode_mono, encode_pair, pad_token_id
from .prompts import (
    TEMPLATES,
    PromptBuilder,
    build_fewshot_prompt,
    build_prompt,
    chat_prompt,
    fewshot_separator,
    template_text,
)
from .readers import (
    DEFAULT_PATHS,
    Example,
    MonoExample,
    flores_examples,
    load_flores,
    load_hf,
    load_jsonl,
    load_mono,
    load_parallel,
    load_source,
    read_lines,
    resolve_data_dir,
    text_line_of_byte,
)
from .samplers import StepSampler, TrainSet, build_train_set, filter_directions, shard_micro_batches, temperature_probs

__all__ = [
    "DEFAULT_PATHS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "DataError",
    "Example",
    "MonoExample",
    "PromptBuilder",
    "StepSampler",
    "TrainSet",
    "build_fewshot_prompt",
    "build_prompt",
    "build_train_set",
    "chat_prompt",
    "collate",
    "collate_prompts",
    "encode_mono",
    "encode_pair",
    "fewshot_separator",
    "filter_directions",
    "flores_examples",
    "load_flores",
    "load_hf",
    "load_jsonl",
    "load_mono",
    "load_parallel",
    "load_source",
    "pad_token_id",
    "read_lines",
    "resolve_data_dir",
    "shard_micro_batches",
    "template_text",
    "temperature_probs",
    "text_line_of_byte",
]
