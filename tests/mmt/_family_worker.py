"""Reload side of the model-family matrix (tests/mmt/test_families.py), run in a fresh process.

For each trained cell listed in ``cells.json``: load every saved model through :func:`mmt.models.load_model`,
route it for each direction, compare its logits with the training process's (bit for bit), then score it with
``mmt eval`` (the CLI entry point) and compare the hypotheses. Writes ``results.json``: {cell: "pass" | reason}.
Not a test module.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def check_cell(cell: dict) -> str:
    import torch
    from safetensors.torch import load_file

    from mmt.arch import set_direction
    from mmt.cli import main as cli_main
    from mmt.models import load_model

    ids = torch.tensor(cell["input_ids"])
    for saved in cell["models"]:
        ref = load_file(saved["logits"])
        model, _ = load_model(name_or_path=saved["path"], verbose=False)
        model.eval()
        for direction in [saved["only"]] if "only" in saved else cell["directions"]:
            src, tgt = direction.split("-")
            set_direction(model, src, tgt)
            with torch.no_grad():
                got = model(input_ids=ids).logits
            if not torch.equal(got, ref[direction]):
                diff = float((got - ref[direction]).abs().max())
                return f"{saved['path']}: {direction} logits differ after reload (max |diff| {diff:.3g})"
        del model
    for ev in cell["evals"]:
        out = Path(ev["output_dir"])
        rc = cli_main(
            [
                "eval",
                "--model",
                ev["model"],
                "--directions",
                *cell["directions"],
                "--max-sentences",
                "2",
                "--output-dir",
                str(out),
                "--label",
                "reloaded",
                "eval.max_new_tokens=8",
                "eval.off_target=false",
            ]
        )
        if rc != 0:
            return f"mmt eval --model {ev['model']} exited {rc}"
        for direction, hyps in ev["hypotheses"].items():
            got = (out / "reloaded_hyps" / f"{direction}.txt").read_text(encoding="utf-8").splitlines()
            if got != hyps:
                return f"mmt eval --model {ev['model']}: {direction} hypotheses {got} != in-process {hyps}"
    return "pass"


def main() -> None:
    cells_file = Path(sys.argv[1])
    cells = json.loads(cells_file.read_text())
    results = {}
    for name, cell in cells.items():
        if isinstance(cell, str):  # the training side already failed or skipped it
            results[name] = cell
            continue
        try:
            results[name] = check_cell(cell)
        except Exception as exc:  # one failing cell must not hide the others
            results[name] = f"reload failed: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    (cells_file.parent / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
