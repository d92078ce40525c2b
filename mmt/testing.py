"""Tiny random models and tokenizers for tests and benchmarks (like ``transformers.testing_utils``).

Not used by the pipeline itself: :func:`tiny_model` builds a small random causal LM of a real architecture
(Llama, Mistral, Qwen2, Gemma 3, GPT-2, BLOOM, XGLM: every family the methods' papers used) and
:func:`tiny_tokenizer` trains a byte-level BPE tokenizer offline, so that tests exercise the same code paths as
real checkpoints in seconds and without network.
"""

from __future__ import annotations

from typing import Iterable

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast

__all__ = ["FAMILIES", "SPECIALS", "tiny_model", "tiny_tokenizer"]

FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "gpt2", "bloom", "xglm")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline on ``texts`` (a built-in multilingual sample if None),
    wrapped as a ``PreTrainedTokenizerFast`` with BOS ``<s>``, EOS ``</s>``, pad ``<pad>``."""
    if texts is None:
        texts = _SAMPLE_TEXT
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(
    arch: str = "llama",
    vocab: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    seed: int = 0,
    max_positions: int = 512,
) -> nn.Module:
    """A small random causal LM of the given architecture (one of :data:`FAMILIES`), in fp32, dropout off."""
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # the Llama-shaped families differ only in their classes and a sliding window
    llama_like = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        **common,
    )
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**llama_like, sliding_window=64), tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**llama_like), tf.Qwen2ForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**llama_like, head_dim=hidden // heads, sliding_window=64)
        cls = tf.Gemma3ForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=max_positions,
            vocab_size=vocab,
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cls = tf.GPT2LMHeadModel
    elif arch == "bloom":  # BLOOM's FFN is 4 x hidden (no intermediate size in its config)
        cfg = tf.BloomConfig(
            hidden_size=hidden, n_layer=layers, n_head=heads, hidden_dropout=0.0, attention_dropout=0.0, **common
        )
        cls = tf.BloomForCausalLM
    elif arch == "xglm":
        cfg = tf.XGLMConfig(
            d_model=hidden,
            ffn_dim=intermediate,
            num_layers=layers,
            attention_heads=heads,
            max_position_embeddings=max_positions,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            **common,
        )
        cls = tf.XGLMForCausalLM
    else:
        raise ValueError(f"tiny_model: unknown arch {arch!r}; use one of {', '.join(FAMILIES)}")
    try:
        cfg._attn_implementation = "eager"
    except Exception:
        pass
    torch.manual_seed(seed)
    model = cls(cfg)
    model.config.use_cache = False
    return model.float()


_SAMPLE_TEXT = [
    "The weather is nice today.",
    "Das Wetter ist heute schön.",
    "Il fait beau aujourd'hui.",
    "I would like a cup of coffee.",
    "Ich hätte gern eine Tasse Kaffee.",
    "Je voudrais une tasse de café.",
    "Where is the train station?",
    "Wo ist der Bahnhof?",
    "Où est la gare ?",
    "Translation: [German]: [English]: [French]:",
    "Translate this from German to English:",
    "The children are playing in the garden.",
    "Die Kinder spielen im Garten.",
    "Les enfants jouent dans le jardin.",
    "Наука помогает нам понять мир.",
    "科学帮助我们理解世界。",
    "La ciencia nos ayuda a entender el mundo.",
] * 4
