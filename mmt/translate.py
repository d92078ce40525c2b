"""``mmt translate``: translate a file or stdin with a trained model, batched, with a progress bar.

The model is a model folder (``final/``, a checkpoint, an export), a run folder (its ``final/`` is used), a
direction-aware run or export (``directional.json``: each direction goes to the weights its gate picks), or a
name ``mmt.models.load_model`` accepts. The prompt template is the one the run trained with (``data.template``
of the run's ``config.yaml``, found next to the model or up to two folders above it) unless ``--template``
is given. Generation goes through :func:`mmt.evaluate.generate`, which routes direction-dependent models.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from mmt import languages as L
from mmt.errors import ConfigError, DataError, ModelLoadError
from mmt.precision import PRECISIONS

GATE_MANIFEST = "directional.json"


# --------------------------------------------------------------------------------------------
# generation: the one entry point into mmt.evaluate (routing lives there, not here)


def generate_for(
    model, tokenizer, prompts: Sequence[str], direction: tuple[str, str], template: str, **kwargs
) -> list[str]:
    """Hypotheses for ``prompts`` in ``direction``; the model is routed for that direction by ``generate``."""
    from mmt.data.prompts import CHAT_USER_TEMPLATE
    from mmt.evaluate import generate

    params = inspect.signature(generate).parameters
    cut_at = CHAT_USER_TEMPLATE.get(template, template)  # a chat prompt's fields are those of its user turn
    extra = {k: v for k, v in (("direction", direction), ("template", cut_at)) if k in params}
    return generate(model, tokenizer, list(prompts), **extra, **kwargs)


# --------------------------------------------------------------------------------------------
# finding the model and its run settings


def find_run_config(model_path: Path) -> Path | None:
    """The ``config.yaml`` of the run ``model_path`` belongs to (the folder itself, its parent or grandparent)."""
    for d in (model_path, model_path.parent, model_path.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def run_template(model_path: Path) -> str | None:
    """``data.template`` of the run's config, or None (no config, or the default left implicit)."""
    cfg = find_run_config(model_path)
    if cfg is None:
        return None
    try:
        raw = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg}: invalid YAML: {exc}") from None
    template = (raw.get("data") or {}).get("template") if isinstance(raw, dict) else None
    return str(template) if template else None


def resolve_model(path: str) -> tuple[str, bool]:
    """(where to load from, whether it is a direction gate). A run folder resolves to its ``final/``."""
    p = Path(path).expanduser()
    if not p.exists():
        if p.suffix == ".gguf" or os.sep in path or path.startswith("."):
            raise ModelLoadError(f"{path}: no such model file or folder")
        return path, False  # an alias or hub id: load_model decides
    if p.is_file():
        if p.suffix == ".gguf":
            return str(p), False
        raise ModelLoadError(f"{p}: not a model (expected a model folder, a run folder or a .gguf file)")
    if (p / GATE_MANIFEST).is_file():
        return str(p), True
    if (p / "config.json").is_file():
        return str(p), False
    if (p / "final" / "config.json").is_file() or (p / "final" / GATE_MANIFEST).is_file():
        return resolve_model(str(p / "final"))
    raise ModelLoadError(f"{p}: not a model folder (no config.json, {GATE_MANIFEST} or final/ inside)")


class _Models:
    """Loads each distinct set of weights once: one model, or one per gate target of a direction-aware run."""

    def __init__(self, where: str, gated: bool, dtype: str):
        self.where, self.gated, self.dtype = where, gated, dtype
        self.cache: dict[str, tuple[Any, Any]] = {}
        self.gate = None
        if gated:
            from mmt.methods.directional.gate import DirectionGate

            self.gate = DirectionGate(Path(where))

    def for_direction(self, src: str, tgt: str) -> tuple[Any, Any]:
        from mmt.models import load_model

        if not self.gated:
            if self.where not in self.cache:
                self.cache[self.where] = load_model(name_or_path=self.where, dtype=self.dtype, verbose=False)
            return self.cache[self.where]
        weights = self.gate.weights_for(src, tgt)
        if weights not in self.cache:
            if hasattr(self.gate, "load"):  # gates that load (model, tokenizer) themselves
                self.cache[weights] = self.gate.load(weights)
            else:
                base = self.gate.manifest.get("base") if self.gate.manifest.get("lora") else weights
                base_model, tok = load_model(name_or_path=base, dtype=self.dtype, verbose=False)
                model = self.gate.model_for(src, tgt, base_model) if self.gate.manifest.get("lora") else base_model
                self.cache[weights] = (model, tok)
        return self.cache[weights]


# --------------------------------------------------------------------------------------------
# input and output


def read_input(path: str) -> list[str]:
    """One segment per line from a file (UTF-8, BOM accepted) or ``-`` for stdin; empty lines stay empty."""
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: input file not found")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from None
    text = text.lstrip("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def one_line(text: str) -> str:
    """``text`` with any line break (\\r, \\u2028, ...) as a space, so output lines stay aligned with input."""
    return " ".join(text.splitlines())


def write_output(path: str, lines: Sequence[str]) -> None:
    """``-``: stdout; else written atomically (a temporary file in the same folder, then renamed)."""
    text = "".join(one_line(ln) + "\n" for ln in lines)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out)


# --------------------------------------------------------------------------------------------
# API


def translate_lines(
    models: _Models,
    lines: Sequence[str],
    direction: tuple[str, str],
    template: str,
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 150,
    progress: bool = True,
    precision: str = "auto",
) -> list[str]:
    """Translate ``lines``; blank lines come back blank without being decoded."""
    from mmt.data import PromptBuilder

    s, t = direction
    keep = [i for i, ln in enumerate(lines) if ln.strip()]
    model, tok = models.for_direction(s, t)
    prompt_of = PromptBuilder(template, tok)  # chat templates render through this model's tokenizer
    hyps = generate_for(
        model,
        tok,
        [prompt_of(s, t, lines[i].strip()) for i in keep],
        direction,
        template,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        progress=progress,
        precision=precision,
    )
    out = [""] * len(lines)
    for i, h in zip(keep, hyps):
        out[i] = h
    return out


def _directions(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.directions:
        if args.src or args.tgt:
            raise ConfigError("give either --src/--tgt or --directions, not both")
        return [L.parse_direction(d) for d in args.directions]
    if not (args.src and args.tgt):
        raise ConfigError("give the languages: --src de --tgt en (or --directions de-en en-de)")
    return [L.parse_direction(f"{args.src}-{args.tgt}")]


def add_translate_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt translate --model runs/mfti_demo --src de --tgt en --input news.de --output news.en
  echo "Guten Morgen." | mmt translate --model runs/mfti_demo/final --src de --tgt en
  mmt translate --model runs/directional_demo --directions de-en en-de --input text.txt --output out/

A run folder means its final/ model and the prompt template it trained with (its config.yaml).
With several --directions, every input line is translated in each direction and --output is a folder
receiving <src>-<tgt>.txt per direction."""
    p.add_argument("--model", "-m", required=True, help="model or run folder, direction-aware run, .gguf or alias")
    p.add_argument("--src", help="source language (ISO 639-1, FLORES-200 code or English name)")
    p.add_argument("--tgt", help="target language")
    p.add_argument("--directions", nargs="+", help="several directions, e.g. de-en fr-en (output is a folder)")
    p.add_argument("--input", "-i", default="-", help="input file, one segment per line ('-': stdin, default)")
    p.add_argument("--output", "-o", default="-", help="output file ('-': stdout, default), or a folder")
    p.add_argument("--template", help="prompt template (default: the run's data.template, else T1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="maths of an fp32 model: auto = bf16 autocast where the device has native bf16 (default), no = fp32",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_translate(args: argparse.Namespace) -> int:
    from mmt.data import PromptBuilder

    directions = _directions(args)
    if args.batch_size < 1 or args.beams < 1 or args.max_new_tokens < 1:
        raise ConfigError("--batch-size, --beams and --max-new-tokens must be at least 1")
    if len(directions) > 1 and args.output == "-":
        raise ConfigError("several --directions write one file per direction: give --output <folder>")
    where, gated = resolve_model(args.model)
    template = args.template or run_template(Path(where)) or "T1"
    PromptBuilder(template)  # an unknown template name fails before the model loads
    lines = read_input(args.input)
    models = _Models(where, gated, args.dtype)
    progress = not args.no_progress
    for s, t in directions:
        hyps = translate_lines(
            models,
            lines,
            (s, t),
            template,
            batch_size=args.batch_size,
            num_beams=args.beams,
            max_new_tokens=args.max_new_tokens,
            progress=progress,
            precision=args.precision,
        )
        out = args.output if len(directions) == 1 else str(Path(args.output) / f"{s}-{t}.txt")
        write_output(out, hyps)
        if out != "-":
            print(f"{s}-{t}: {len(lines)} lines -> {out}", file=sys.stderr)
    return 0
