"""Prompt templates (mFTI T1-T6, ALMA, X-ALMA), chat-template prompts, several templates per run, few-shot prompts."""

from __future__ import annotations

from typing import Sequence

import numpy as np

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
    raise ConfigError(
        f"unknown template {template!r}; known: {', '.join(TEMPLATES)} "
        "(or a custom string containing <input>, <srclang>, <tgtlang>)"
    )


def build_prompt(template: str, src_lang: str, tgt_lang: str, src: str) -> str:
    """The prompt up to (not including) the translation; the target follows after one space."""
    text = template_text(template)
    return text.replace("<srclang>", L.name(src_lang)).replace("<tgtlang>", L.name(tgt_lang)).replace("<input>", src)


def fewshot_separator(template: str) -> str:
    return "\n\n" if "\n" in template_text(template) else "\n"


def build_fewshot_prompt(template: str, shots: Sequence[Example], src_lang: str, tgt_lang: str, src: str) -> str:
    """k solved examples, then the query prompt; examples are separated like separate documents."""
    sep = fewshot_separator(template)
    parts = [build_prompt(template, ex.src_lang, ex.tgt_lang, ex.src) + " " + ex.tgt.strip() for ex in shots]
    parts.append(build_prompt(template, src_lang, tgt_lang, src))
    return sep.join(parts)


# --------------------------------------------------------------------------------------------
# chat models and several instruction templates

# templates rendered through the tokenizer's chat template: the user turn is the named plain template
# (X-ALMA prompts its chat models with the ALMA instruction as the user message)
CHAT_USER_TEMPLATE = {"chat": "alma", "xalma": "alma"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, template: str, src_lang: str, tgt_lang: str, src: str) -> str:
    """The user turn ``build_prompt(CHAT_USER_TEMPLATE[template], ...)`` through ``apply_chat_template``,
    ending with the assistant's generation prompt. A BOS the template writes is dropped when the tokenizer
    adds its own, so that tokenising the prompt does not start with two BOS tokens."""
    if not has_chat_template(tokenizer):
        raise ConfigError(
            f"template {template!r} needs a tokenizer with a chat template; this one has none "
            "(use 'alma' or a plain template)"
        )
    user = build_prompt(CHAT_USER_TEMPLATE[template], src_lang, tgt_lang, src)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer) -> bool:
    bos_id = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id is not None and bool(ids) and ids[0] == bos_id


class PromptBuilder:
    """Prompts for training and inference from one template or several.

    * ``chat``: the ALMA instruction through the tokenizer's chat template (an error without one);
      ``xalma``: the same where the tokenizer has a chat template, else X-ALMA's Llama-2 chat string;
    * several templates (LANDeRMT trains with multiple instruction templates): each call draws one,
      from a generator seeded with ``seed``, so the same data and seed give the same prompts.
    """

    def __init__(self, template: str | Sequence[str], tokenizer=None, seed: int = 0):
        self.templates = [template] if isinstance(template, str) else list(template)
        if not self.templates:
            raise ConfigError("no prompt template given")
        for t in self.templates:
            if t == "chat" and tokenizer is not None and not has_chat_template(tokenizer):
                raise ConfigError("template 'chat' needs a tokenizer with a chat template; this one has none")
            if t != "chat":
                template_text(t)
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng([seed, 0x7E41]) if len(self.templates) > 1 else None

    def __call__(self, src_lang: str, tgt_lang: str, src: str) -> str:
        t = self.templates[int(self.rng.integers(len(self.templates)))] if self.rng is not None else self.templates[0]
        chat = self.tokenizer is not None and (t == "chat" or has_chat_template(self.tokenizer))
        if t in CHAT_USER_TEMPLATE and chat:
            return chat_prompt(self.tokenizer, t, src_lang, tgt_lang, src)
        if t == "chat":
            raise ConfigError("template 'chat' needs the tokenizer (a chat template renders the prompt)")
        return build_prompt(t, src_lang, tgt_lang, src)
