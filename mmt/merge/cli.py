"""``mmt merge CONFIG [key=value ...]``: the command-line entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

from .plan import load_merge_config
from .stream import run_merge


def add_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt merge examples/merge/ties.yaml
  mmt merge merge.yaml output=runs/merged_d03 density=0.3 method=dare_ties seed=1
  mmt merge merge.yaml stats=true        # also write merge_stats.json and merge_conflicts.png

The output directory appears only when the merge has finished (written to a hidden temporary
directory next to it, then renamed). Config keys: see `python -c "import mmt.merge; help(mmt.merge)"`."""
    p.add_argument("config", nargs="?", help="YAML merge config (method, base_model, models or adapters, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. density=0.3")
    p.add_argument("--output", "-o", help="output directory (overrides `output`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).is_file():  # only key=value, no config file
        overrides.insert(0, args.config)
        args.config = None
    if args.output:
        overrides.append(f"output={args.output}")
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_merge_config(args.config, overrides)  # a MergeError reaches the CLI's one handler: exit 2
    report = run_merge(cfg, progress=not args.no_progress)
    print(report.summary())
    return 0
