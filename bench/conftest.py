"""Writes every recorded benchmark suite into bench/results/<device>.md at the end of the session."""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if not common.RESULTS:
        return
    device = common.device_name("cuda" if torch.cuda.is_available() else "cpu")
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:
        pass
    versions["date"] = datetime.date.today().isoformat()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", device).strip("-")
    path = out_dir / f"{slug}.md"
    # Suites not re-run this session keep their previous tables.
    previous = _read_sections(path) if path.exists() else {}
    text = common.render_markdown(device, versions)
    for suite, body in previous.items():
        if suite not in common.RESULTS:
            text += f"\n## {suite}\n{body}"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"\nbenchmark results written to {path}")


def _read_sections(path: Path) -> dict[str, str]:
    sections: dict[str, str] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections
