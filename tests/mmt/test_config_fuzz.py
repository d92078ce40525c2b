"""Bounded fuzz of the command-line config surface: a value of the wrong type for every key of every section
(and of every method's section) must end in exit code 2 with a message naming the key, never a traceback and
never a run that silently accepts it.

Each override is run through ``mmt.cli.main`` in-process on a tiny model, so an accepted value would train.
The cases are drawn with a fixed seed; the count and the wall time are bounded.
"""

from __future__ import annotations

import dataclasses
import random
import time
import types
import typing
from typing import Any, Union

import pytest

from mmt import cli
from mmt.config import SECTIONS, DataSource
from mmt.registry import get_method, method_names

MAX_CASES = 1000
MAX_SECONDS = 150

# values that no field of the given type accepts (YAML text, as typed on a command line)
WRONG = {
    int: ["ten", "1.5", "[1, 2]", "{a: 1}", "true", "null"],
    float: ["fast", "[0.1]", "{a: 1}", "true", "null", "1e-3x"],
    bool: ["maybe", "2", "[true]", "{a: 1}", "null"],
    str: ["[1, 2]", "{a: b}", "true", "null"],
    list: ["5", "abc", "{a: 1}", "true", "[[1, 2]]"],
}


def _kind(tp: Any) -> tuple[Any, bool]:
    """(base kind among WRONG's keys or a dataclass, optional?) of an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        base, _ = _kind(options[0]) if len(options) == 1 else (None, False)
        return base, type(None) in args
    if origin in (list, tuple):
        return list, False
    if dataclasses.is_dataclass(tp):
        return tp, False
    return tp if tp in WRONG else None, False


def _wrong_values(tp: Any) -> list[str]:
    base, optional = _kind(tp)
    if base is None:
        return []
    if base is list:
        args = typing.get_args(
            tp
            if typing.get_origin(tp) in (list, tuple)
            else next(a for a in typing.get_args(tp) if a is not type(None))
        )
        values = list(WRONG[list])
        if args and dataclasses.is_dataclass(args[0]):
            values += ["[5]", "[{kind: 3}]", "[{nope: 1}]"]
        elif args and args[0] is str:
            values = [v for v in values if v != "[[1, 2]]"] + ["[[a, b]]", "[{a: 1}]"]
        return [v for v in values if not (optional and v == "null")]
    if dataclasses.is_dataclass(base):
        return ["5", "abc", "[1]"]
    return [v for v in WRONG[base] if not (optional and v == "null")]


def _cases() -> list[tuple[str, str, str]]:
    """(method, key, value) for every field of every section and method."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out += [("mfti", f"{section}.{f.name}", v) for v in _wrong_values(hints[f.name])]
    hints = typing.get_type_hints(DataSource)
    for f in dataclasses.fields(DataSource):
        out += [("mfti", f"data.train.0.{f.name}", v) for v in _wrong_values(hints[f.name])]
    for name in method_names():
        cls = get_method(name).config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out += [(name, f"method.{f.name}", v) for v in _wrong_values(hints[f.name])]
    return out


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory, tok, jsonl_data):
    from mmt.models import save_model
    from mmt.testing import tiny_model

    w = tmp_path_factory.mktemp("fuzz")
    save_model(tiny_model("llama", vocab=len(tok)), tok, w / "model")
    cfg = w / "run.yaml"
    cfg.write_text(
        f"""
model: {{name_or_path: {w / "model"}}}
data: {{data_dir: {w}, train: [{{kind: jsonl, path: {jsonl_data}}}]}}
train: {{output_dir: {w / "run"}, max_steps: 1, batch_size: 2, micro_batch_size: 2, save_every: 0, save_model: false,
         progress: false, resume: never}}
""",
        encoding="utf-8",
    )
    return cfg


def test_wrong_types_on_every_key_are_clear_errors(run_yaml, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in fuzzed values land here, not in the repository
    cases = _cases()
    assert len({key for _, key, _ in cases}) > 60  # every section and method is covered
    rng = random.Random(0)
    rng.shuffle(cases)
    counts = {"tried": 0, "clear": 0, "traceback": 0, "silent": 0, "unnamed": 0}
    bad: list[str] = []
    t0 = time.time()
    for method, key, value in cases[:MAX_CASES]:
        if time.time() - t0 > MAX_SECONDS:
            break
        counts["tried"] += 1
        argv = ["train", "-c", str(run_yaml), "--method", method, f"{key}={value}"]
        capsys.readouterr()
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
        except Exception as exc:  # noqa: BLE001 - a traceback is what this test hunts
            counts["traceback"] += 1
            bad.append(f"traceback: {key}={value} ({method}): {type(exc).__name__}: {exc}")
            continue
        err = capsys.readouterr().err
        if rc == 0:
            counts["silent"] += 1
            bad.append(f"silently accepted: {key}={value} ({method})")
        elif rc != 2 or "Traceback" in err:
            counts["traceback"] += 1
            bad.append(f"rc={rc}: {key}={value} ({method}): {err[-300:]}")
        elif key.split(".")[-1] not in err:
            counts["unnamed"] += 1
            bad.append(f"error does not name {key}: {key}={value} ({method}): {err.strip()[-300:]}")
        else:
            counts["clear"] += 1
    print(f"config fuzz: {counts} of {len(cases)} possible cases in {time.time() - t0:.0f}s")
    assert counts["tried"] >= 60
    assert not bad, "\n".join(bad)


# right type, doubtful value: either accepted (the run trains one step) or a clear error; never a traceback.
# Run sections and mFTI here; the other methods' own value checks belong with their tests.
ODD_SECONDS = 40  # accepted values train a step each: a sample, a different one per shuffle seed
ODD = {int: ["-1", "0"], float: ["-1", "0", "nan", "1e30"], str: ["'???'", "''"], list: ["[]"]}


def _odd_values(tp: Any) -> list[str]:
    base, _ = _kind(tp)
    return ODD.get(base, []) if base is not None and not dataclasses.is_dataclass(base) else []


def test_odd_values_on_every_key_never_end_in_a_traceback(run_yaml, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. train.output_dir='???' is a relative folder
    cases = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        cases += [
            ("mfti", f"{section}.{f.name}", v) for f in dataclasses.fields(cls) for v in _odd_values(hints[f.name])
        ]
    hints = typing.get_type_hints(DataSource)
    cases += [
        ("mfti", f"data.train.0.{f.name}", v)
        for f in dataclasses.fields(DataSource)
        for v in _odd_values(hints[f.name])
    ]
    hints = typing.get_type_hints(get_method("mfti").config)
    cases += [
        ("mfti", f"method.{f.name}", v)
        for f in dataclasses.fields(get_method("mfti").config)
        for v in _odd_values(hints[f.name])
    ]
    random.Random(1).shuffle(cases)
    counts = {"tried": 0, "error": 0, "accepted": 0, "traceback": 0}
    bad = []
    t0 = time.time()
    for method, key, value in cases[:MAX_CASES]:
        if time.time() - t0 > ODD_SECONDS:
            break
        counts["tried"] += 1
        capsys.readouterr()
        try:
            rc = cli.main(["train", "-c", str(run_yaml), "--method", method, f"{key}={value}"])
        except SystemExit as exc:
            rc = exc.code
        except Exception as exc:  # noqa: BLE001
            counts["traceback"] += 1
            bad.append(f"{key}={value} ({method}): {type(exc).__name__}: {str(exc)[:300]}")
            continue
        err = capsys.readouterr().err
        counts["error" if rc == 2 else "accepted" if rc == 0 else "traceback"] += 1
        if rc not in (0, 2) or "Traceback" in err:
            bad.append(f"{key}={value} ({method}): rc={rc} {err[-300:]}")
    print(f"config fuzz (odd values): {counts} of {len(cases)} in {time.time() - t0:.0f}s")
    assert counts["tried"] >= 10
    assert not bad, "\n".join(bad)
