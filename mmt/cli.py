"""The ``mmt`` command line.

Subcommands are declared in :data:`SUBCOMMANDS` (name -> module, argument adder, runner) and
imported only when chosen, so a subcommand whose module is missing or broken fails with a clear
message without breaking the others, and ``mmt --help`` does not import torch. A runner is
``run_<command>(args) -> int``. Every user mistake is an :class:`mmt.errors.MmtError`, reported here
once as ``mmt <command>: error: <message>`` with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

import yaml

from mmt import __version__
from mmt.config import load_config, overrides_from_args
from mmt.errors import MmtError
from mmt.registry import get_method

# Sleeping (not spinning) OpenMP workers: on a 2-core machine shared with other processes, spinning
# threads made decoding ~10x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module, function adding arguments, function running, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("mmt.cli", "add_train_args", "run_train", "post-train a model with a method config"),
    "eval": ("mmt.cli", "add_eval_args", "run_eval", "score a model on FLORES-style test sets (BLEU, chrF++)"),
    "demo": ("mmt.demo", "add_args", "run_demo", "CPU demo: score Gemma 3 270M, fine-tune with mFTI, score again"),
    "detect": ("mmt.methods.landermt", "add_detect_args", "run_detect", "LANDeRMT: detect language-aware neurons"),
    "merge": (
        "mmt.merge",
        "add_args",
        "run",
        "merge checkpoints or LoRA adapters, streaming: TIES, DARE, DELLA, SLERP, NuSLERP, SCE, model stock, ... "
        "(reads mergekit YAML)",
    ),
    "extract-lora": (
        "mmt.merge.extract",
        "add_args",
        "run",
        "extract a LoRA adapter from a fine-tuned checkpoint and its base (truncated SVD of the deltas)",
    ),
    "analyze": (
        "mmt.analyze",
        "add_args",
        "run_analyze",
        "measure conflict and synergy between directions; suggest direction-aware groups",
    ),
    "compare": (
        "mmt.compare",
        "add_compare_args",
        "run_compare",
        "compare evaluated systems: paired bootstrap and approximate randomisation",
    ),
    "experiment": (
        "mmt.experiment",
        "add_experiment_args",
        "run_experiment",
        "run method configs at a matched budget, pick best dev checkpoints, compare",
    ),
    "translate": (
        "mmt.translate",
        "add_translate_args",
        "run_translate",
        "translate a file or stdin with a trained model",
    ),
    "export": (
        "mmt.export",
        "add_export_args",
        "run_export",
        "write a run's result as standalone Hugging Face model(s), LoRA merged",
    ),
}

EPILOG = """\
examples:
  mmt demo                                        # ~8 min on 2 CPU cores; results in runs/demo
  mmt train --config examples/configs/mfti_demo.yaml
  mmt train --config examples/configs/mfti_7b.yaml train.lr=1e-5 train.output_dir=runs/x
  mmt train --config my.yaml --method landermt    # same data/train sections, another method
  mmt eval --config examples/configs/mfti_demo.yaml --model runs/mfti_demo/final
  mmt eval --model gemma3-270m --directions de-en en-de --max-sentences 50 --shots 3

Overrides are section.key=value (YAML values): train.max_steps=100, data.template=alma,
method.lora=true, data.train.0.max_examples=500. Data comes from $MMT_DATA_DIR (default
../shared/data next to the repository). Run 'mmt <command> --help' for each command's options.
"""


class Unavailable(Exception):
    pass


def _resolve(name: str) -> tuple[Callable, Callable]:
    module_name, add_name, run_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise Unavailable(f"'mmt {name}' is not available yet: module {module_name} does not exist") from None
        raise
    missing = [f for f in (add_name, run_name) if not hasattr(module, f)]
    if missing:
        raise Unavailable(f"'mmt {name}' is not available yet: {module_name} does not define {', '.join(missing)}")
    return getattr(module, add_name), getattr(module, run_name)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Parser whose chosen subcommand (first subcommand name in ``argv``) gets its full arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = argparse.ArgumentParser(
        prog="mmt",
        description="Post-train Hugging Face causal LMs for multilingual machine translation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, _, _, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if name != chosen:
            continue
        try:
            add, run = _resolve(name)
        except Unavailable as exc:
            p.set_defaults(_unavailable=str(exc))
            continue
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # key=value after an option (`--no-progress density=0.3`) is an override too
        args.overrides = list(args.overrides or []) + [u for u in unknown if "=" in u and not u.startswith("-")]
        unknown = [u for u in unknown if not ("=" in u and not u.startswith("-"))]
    if unknown and not getattr(args, "_unavailable", None):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"mmt: error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        rc = args._run(args)
    except KeyboardInterrupt:
        print("\nmmt: interrupted (checkpoints written so far are kept; rerun to resume)", file=sys.stderr)
        return 130
    except MmtError as exc:
        print(f"mmt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


# ------------------------------------------------------------------------------------------
# train


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (sections model, data, method, train, eval)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values, e.g. train.lr=1e-5 data.template=alma",
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt train --config examples/configs/mfti_demo.yaml
  mmt train -c examples/configs/mfti_7b.yaml --method landermt train.output_dir=runs/lander
  accelerate launch --num_processes 2 --cpu -m mmt.cli train -c my.yaml   # DDP (gloo on CPU)

A killed run resumes from its last checkpoint in train.output_dir (train.resume=auto)."""
    _add_common(p)
    p.add_argument("--method", help="method name (mfti, landermt, mixmoe, directional); overrides method.name")
    p.add_argument("--eval", action="store_true", help="evaluate the trained model afterwards (eval section)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_train(args: argparse.Namespace) -> int:
    # the pipeline imports torch: deliberately here, not at the top, so that `mmt --help` stays fast
    from accelerate import PartialState

    from mmt import train

    cfg = load_config(args.config, args.overrides, method=args.method)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
        return 0
    method = get_method(cfg.method_name)
    if method.run is not None:  # a method of several training runs (e.g. direction-aware: units + merge)
        return method.run(cfg, with_eval=args.eval)
    model, tokenizer, plan, result = train.run(cfg)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s; final loss {result.final_loss:.4f}; "
        f"output in {result.output_dir}"
    )
    if not PartialState().is_main_process:
        return 0
    if getattr(cfg.method, "select_best", False):  # mFTI's protocol: the best checkpoint on a dev split
        from mmt.evaluate import select_best_checkpoint
        from mmt.models import load_model

        m = cfg.method
        sel = select_best_checkpoint(
            cfg, metric=m.select_metric, split=m.select_split, max_sentences=m.select_sentences
        )
        print(f"best on {sel['split']} ({sel['metric']}): {sel['best']}; copied to {result.output_dir}/best")
        if args.eval:
            model, tokenizer = load_model(cfg.model, name_or_path=str(Path(result.output_dir) / "best"))
    if args.eval:
        from mmt.evaluate import training_directions_of
        from mmt.export import merge_lora

        model = merge_lora(model)  # the weights final/ holds: `mmt eval --model final/` gives the same scores
        _evaluate_and_write(
            cfg, model, tokenizer, label=f"{cfg.method_name}", seen=training_directions_of(result.output_dir)
        )
    return 0


# ------------------------------------------------------------------------------------------
# eval


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt eval --model runs/mfti_demo/final --directions de-en en-de
  mmt eval --model runs/mfti_demo/checkpoints/checkpoint-12     # any checkpoint is a standalone model
  mmt eval --model runs/directional_demo                       # a direction-aware run: routed per direction
  mmt eval --model gemma3-270m --shots 3 --max-sentences 100
  mmt eval -c examples/configs/icl_8shot.yaml                  # the 8-shot in-context baseline
  mmt eval -c examples/configs/mfti_demo.yaml eval.num_beams=4

Writes <label>.json, <label>.md and <label>_hyps/<direction>.txt to eval.output_dir."""
    _add_common(p)
    p.add_argument(
        "--model", help="model to score: directory, hub id, .gguf file or alias (overrides model.name_or_path)"
    )
    p.add_argument("--directions", nargs="+", help="e.g. de-en en-de (overrides eval.directions)")
    p.add_argument("--max-sentences", type=int, help="first N test lines per direction")
    p.add_argument("--shots", type=int, help="k-shot in-context examples drawn from eval.shots_from")
    p.add_argument("--beams", type=int, help="beam size (1 = greedy)")
    p.add_argument("--label", default=None, help="name of this result set (default: model name)")
    p.add_argument("--output-dir", help="where to write results (overrides eval.output_dir)")


def run_eval(args: argparse.Namespace) -> int:
    from mmt.models import load_model  # see run_train: kept out of `mmt --help`

    ov = overrides_from_args(
        args,
        {
            "model": "model.name_or_path",
            "directions": "eval.directions",
            "max_sentences": "eval.max_sentences",
            "shots": "eval.shots",
            "beams": "eval.num_beams",
            "output_dir": "eval.output_dir",
        },
    )
    cfg = load_config(args.config, ov)
    label = args.label or cfg.model.name_or_path.rstrip("/").split("/")[-1]
    if (Path(cfg.model.name_or_path) / "directional.json").is_file():  # one model per direction: route each
        from mmt.evaluate import write_report
        from mmt.methods.directional import evaluate_gated

        report = evaluate_gated(cfg, Path(cfg.model.name_or_path), label=label)
        out = Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")
        write_report(report, out)
        print(report.markdown())
        print(f"results written to {out}")
        return 0
    from mmt.evaluate import training_directions_of

    model, tokenizer = load_model(cfg.model)
    _evaluate_and_write(cfg, model, tokenizer, label=label, seen=training_directions_of(cfg.model.name_or_path))
    return 0


def _evaluate_and_write(cfg, model, tokenizer, label: str, seen=None) -> None:
    from mmt.evaluate import evaluate, write_report  # see run_train

    report = evaluate(
        model, tokenizer, cfg.eval, template=cfg.data.template, data_dir=cfg.data.data_dir, label=label, seen=seen
    )
    out = Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")
    write_report(report, out)
    print(report.markdown())
    print(f"results written to {out}")


if __name__ == "__main__":
    sys.exit(main())
