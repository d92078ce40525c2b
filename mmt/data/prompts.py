"""Prompt templates (mFTI T1-T6, ALMA, X-ALMA) and few-shot prompts."""

from __future__ import annotations

from typing import Sequence

from mmt import languages as L
from mmt.errors import ConfigError

from .readers import Example

# --------------------------------------------------------------------------------------------
# templates

TEMPLATES: dict[str, str] = {
    # mFTI (docs/methods.md, "mFTI"); brackets are literal
    "T1": "Translation: [<srclang>]: <input> [<tgtlang>]:",
    "T2": "Translation: <input> [<tgtlang>]:",
    "T3": "<input> Translate from [<srclang>] to [<tgtlang>]:",
    "T4": "<input> Translate to [<tgtlang>]:",
    "T5": "The <tgtlang> translation of <srclang> sentence '<input>' is:",
    "T6": "The <tgtlang> translation of the sentence '<input>' is:",
    # ALMA (utils.get_prompt) and X-ALMA (ALMA prompt in the Llama-2 chat format; BOS comes from the tokenizer)
    "alma": "Translate this from <srclang> to <tgtlang>:\n<srclang>: <input>\n<tgtlang>:",
    "xalma": "[INST] Translate this from <srclang> to <tgtlang>:\n<srclang>: <input>\n<tgtlang>: [/INST]",
}


def template_text(template: str) -> str:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "<input>" in template:  # a custom template string
        return template
    raise ConfigError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)} "
                     "(or a custom string containing <input>, <srclang>, <tgtlang>)")


def build_prompt(template: str, src_lang: str, tgt_lang: str, src: str) -> str:
    """The prompt up to (not including) the translation; the target follows after one space."""
    text = template_text(template)
    return (text.replace("<srclang>", L.name(src_lang)).replace("<tgtlang>", L.name(tgt_lang))
            .replace("<input>", src))


def fewshot_separator(template: str) -> str:
    return "\n\n" if "\n" in template_text(template) else "\n"


def build_fewshot_prompt(template: str, shots: Sequence[Example], src_lang: str, tgt_lang: str, src: str) -> str:
    """k solved examples, then the query prompt; examples are separated like separate documents."""
    sep = fewshot_separator(template)
    parts = [build_prompt(template, ex.src_lang, ex.tgt_lang, ex.src) + " " + ex.tgt.strip() for ex in shots]
    parts.append(build_prompt(template, src_lang, tgt_lang, src))
    return sep.join(parts)
