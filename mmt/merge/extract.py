"""``mmt extract-lora``: a peft LoRA adapter from the difference between a fine-tuned checkpoint and its base.

Every 2-D linear weight that differs becomes ``B @ A``, the delta's truncated SVD with the singular values
split as a square root on each side (``lora_alpha = r``, so peft's scaling is 1). The maths is fp32; the
factors are written in ``dtype`` (default: the fine-tuned tensor's). By Eckart-Young the rank-r factors are
the best rank-r approximation: the squared Frobenius error is the sum of the dropped sigma^2, reported as
the retained energy (kept sigma^2 / all sigma^2) per module.

As mergekit's ``mergekit-extract-lora`` does: embeddings and the output head go to ``modules_to_save`` at
full rank (``embed_lora=True`` decomposes them instead), and other modules whose weights differ (norms) go
to ``modules_to_save`` too, unless ``skip_undecomposable`` leaves them out. A differing bias of a LoRA
target is saved as its ``lora_B.bias`` delta (peft's ``lora_bias``); of any other linear module, the module
goes to ``modules_to_save``. Unlike mergekit, modules whose weights are identical are not in the adapter.

The checkpoints are read tensor by tensor (:class:`~mmt.merge.io.Checkpoint`); factors go straight to a
spill file, so memory stays at about one input tensor and its SVD. The output appears atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmt.errors import MergeError

from .io import ST_DTYPES, Checkpoint, atomic_output, commit
from .report import peak_rss_mb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EMBED_NAME = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|lm_head)$")


@dataclass
class ExtractReport:
    output: str
    base: str
    model: str
    rank: int
    rank_energy: float | None = None
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # LoRA module -> rank, energy, shape
    saved: dict[str, list[str]] = field(default_factory=dict)  # modules_to_save -> the differing tensors
    left_out: dict[str, str] = field(default_factory=dict)  # differing tensor -> why it is not in the adapter
    bias_deltas: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors_read: int = 0
    tensors_unchanged: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def energies(self) -> dict[str, float]:
        return {m: v["energy"] for m, v in self.modules.items()}

    def by_kind(self) -> dict[str, tuple[int, float, float]]:
        """Module kind (last name part) -> (count, mean retained energy, min)."""
        kinds: dict[str, list[float]] = {}
        for m, e in self.energies().items():
            kinds.setdefault(m.rsplit(".", 1)[-1], []).append(e)
        return {k: (len(v), sum(v) / len(v), min(v)) for k, v in sorted(kinds.items())}

    def summary(self) -> str:
        """A few lines for the terminal; the full lists are in extract_report.json and the card."""
        e = self.energies()
        ranks = sorted({v["rank"] for v in self.modules.values()})
        rank_txt = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        worst = min(e, key=e.get)
        lines = [
            f"extracted {len(e)} LoRA modules ({rank_txt}) from {self.tensors_read} tensors "
            f"({self.tensors_unchanged} unchanged); retained energy mean {sum(e.values()) / len(e):.4f}, "
            f"min {e[worst]:.4f} ({worst})",
            "retained energy per module kind: "
            + ", ".join(f"{k} {mean:.4f} (min {lo:.4f}, {n})" for k, (n, mean, lo) in self.by_kind().items()),
        ]
        if self.saved:
            lines.append(f"modules_to_save (full weights): {len(self.saved)}: {_grouped(self.saved)}")
        if self.bias_deltas:
            lines.append(f"bias deltas as lora_B.bias: {len(self.bias_deltas)}")
        if self.left_out:
            some = list(self.left_out.items())[:5]
            more = f" (+{len(self.left_out) - 5} more)" if len(self.left_out) > 5 else ""
            lines.append(
                f"differing tensors NOT in the adapter: {len(self.left_out)}: "
                + "; ".join(f"{k}: {v}" for k, v in some)
                + more
            )
        lines += self.notes
        lines += [
            f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s, "
            f"peak RSS {self.peak_rss_mb:.0f} MB",
            f"output: {self.output}",
        ]
        return "\n".join(lines)


class _SpillWriter:
    """A safetensors file written as tensors come: data to a spill file, header and data joined at the end.

    Ranks (``rank_energy``) and which tensors differ are known only after each SVD, so the header cannot be
    planned up front as :class:`~mmt.merge.io.StreamingWriter` does; one sequential copy is the price.
    """

    def __init__(self, spill: Path):
        self.spill = spill
        self.fh = open(spill, "wb")
        self.header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.header, f"{name} written twice"
        t = tensor.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        self.header[name] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + size],
        }
        if size:
            self.fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.offset += size

    def finish(self, path: Path) -> int:
        self.fh.close()
        blob = json.dumps(self.header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as out, open(self.spill, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.spill.unlink()
        return self.offset

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()


def _grouped(modules: list[str]) -> str:
    """``model.layers.3.input_layernorm`` and its siblings in other layers as one ``model.layers.*.input_layernorm x18``."""
    groups: dict[str, int] = {}
    for m in modules:
        key = re.sub(r"\.\d+\.", ".*.", m)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(k if n == 1 else f"{k} x{n}" for k, n in groups.items())


def _module_kinds(path: Path) -> tuple[dict[str, str], bool]:
    """Module name -> linear | embedding | output | conv1d | other, from a meta-device model of config.json.

    Empty when the config cannot be built (then names decide). Also whether the config ties embeddings.
    """
    try:
        import transformers
        from torch import nn

        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # an unknown or absent config: fall back to the names
        return {}, False
    out_emb = model.get_output_embeddings()
    conv1d = getattr(transformers.pytorch_utils, "Conv1D", ())
    kinds = {}
    for name, mod in model.named_modules():
        if mod is out_emb:
            kinds[name] = "output"
        elif isinstance(mod, nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(mod, nn.Linear):
            kinds[name] = "linear"
        elif conv1d and isinstance(mod, conv1d):
            kinds[name] = "conv1d"
        else:
            kinds[name] = "other"
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return kinds, tied


def _kind(module: str, ndim: int, kinds: dict[str, str]) -> str:
    if module in kinds:
        return kinds[module]
    if _EMBED_NAME.search(module):
        return "output" if module.endswith("lm_head") else "embedding"
    return "linear" if ndim == 2 else "other"


def _svd_factors(
    delta: torch.Tensor, max_rank: int, rank_energy: float | None, lowrank: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(B, A, rank, retained energy) of the fp32 ``delta`` (out x in): B @ A is its best rank-k approximation."""
    total = float(delta.double().pow(2).sum())
    k_max = min(max_rank, *delta.shape)
    if lowrank:
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=min(k_max + 8, *delta.shape), niter=4)
        vh = v.mT
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    cum = s.double().pow(2).cumsum(0)
    k = k_max
    if rank_energy is not None and total > 0:
        k = min(k_max, int((cum < rank_energy * total * (1 - 1e-12)).sum()) + 1)
    energy = float(cum[k - 1] / total) if total > 0 else 1.0
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], k, min(energy, 1.0)


def extract_lora(
    base: str | Path,
    model: str | Path,
    output: str | Path,
    rank: int,
    *,
    modules: list[str] | None = None,
    rank_energy: float | None = None,
    dtype: str | None = None,
    embed_lora: bool = False,
    skip_undecomposable: bool = False,
    lowrank: bool = False,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> ExtractReport:
    """Extract a LoRA adapter of at most ``rank`` from ``model - base``; written atomically to ``output``.

    ``modules``: regular expressions (``re.search`` on module names); deltas of other modules are left out
    and reported. ``rank_energy``: per module, the smallest rank keeping that fraction of sigma^2 (capped
    at ``rank``; peft's ``rank_pattern``).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    if not isinstance(rank, int) or rank < 1:
        raise MergeError(f"rank must be an integer >= 1, got {rank!r}")
    if rank_energy is not None and not 0 < rank_energy <= 1:
        raise MergeError(f"rank_energy must be in (0, 1], got {rank_energy}")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        patterns = [re.compile(p) for p in modules or []]
    except re.error as exc:
        raise MergeError(f"bad --modules pattern {exc.pattern!r}: {exc}") from None
    base_p, model_p, out_p = Path(base), Path(model), Path(output)
    base_ck, tuned_ck = Checkpoint(base_p), Checkpoint(model_p)
    for p in (base_p, model_p):
        if out_p.resolve() == p.resolve():
            raise MergeError(f"output {out_p} is an input checkpoint")
    names = tuned_ck.names()
    missing = sorted(set(base_ck.names()) ^ set(names))
    if missing:
        where = "base" if missing[0] not in base_ck.names() else "fine-tuned model"
        raise MergeError(
            f"tensor {missing[0]} is missing from the {where} ({len(missing)} names differ between "
            f"{base_p} and {model_p}: not the same architecture?)"
        )
    for name in names:  # every shape first: a mismatch fails before any work
        bs, ts = base_ck.meta(name)[1], tuned_ck.meta(name)[1]
        if bs != ts:
            hint = (
                " (a resized vocabulary? resize the base's embeddings first)" if _EMBED_NAME.search(name[:-7]) else ""
            )
            raise MergeError(f"tensor {name} has shape {list(ts)} in {model_p} but {list(bs)} in {base_p}{hint}")
    kinds, tied = _module_kinds(model_p)
    out_dtype = DTYPES.get(dtype) if dtype else None

    report = ExtractReport(str(out_p), str(base_p), str(model_p), rank, rank_energy)
    tmp = atomic_output(out_p, overwrite)
    writer = _SpillWriter(tmp / ".adapter.spill")
    small: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # 1-D deltas, decided once the targets are known
    full_save: list[str] = []  # modules_to_save modules
    try:
        for name in tqdm(names, desc="extract LoRA", unit="tensor", disable=not progress):
            b, t = base_ck.get(name), tuned_ck.get(name)
            report.tensors_read += 1
            report.bytes_read += b.nbytes + t.nbytes
            if not (t.is_floating_point() and b.is_floating_point()):
                if not torch.equal(b, t):
                    report.left_out[name] = f"non-float tensor ({t.dtype}) differs"
                base_ck.release(name), tuned_ck.release(name)
                continue
            same = torch.equal(b, t) if b.dtype == t.dtype else torch.equal(b.float(), t.float())
            if same:
                report.tensors_unchanged += 1
                base_ck.release(name), tuned_ck.release(name)
                continue
            module, _, param = name.rpartition(".")
            if patterns and not any(p.search(module) for p in patterns):
                report.left_out[name] = "not selected by --modules"
                base_ck.release(name), tuned_ck.release(name)
                continue
            kind = _kind(module, t.ndim, kinds)
            wd = out_dtype or t.dtype
            lora_able = (
                t.ndim == 2
                and param == "weight"
                and (kind == "linear" or (embed_lora and kind in ("embedding", "output")))
            )
            if lora_able:
                delta = t.to(device, torch.float32) - b.to(device, torch.float32)
                base_ck.release(name), tuned_ck.release(name)
                del b, t
                if kind == "embedding":  # peft's lora_embedding: delta.T = B @ A, with A (r, vocab)
                    delta = delta.T
                mseed = seed + sum(module.encode()) % 100003
                fb, fa, k, energy = _svd_factors(delta, rank, rank_energy, lowrank, mseed)
                del delta
                if kind == "embedding":
                    writer.add(f"base_model.model.{module}.lora_embedding_A", fa.to(wd))
                    writer.add(f"base_model.model.{module}.lora_embedding_B", fb.to(wd))
                else:
                    writer.add(f"base_model.model.{module}.lora_A.weight", fa.to(wd))
                    writer.add(f"base_model.model.{module}.lora_B.weight", fb.to(wd))
                report.modules[module] = {"rank": k, "energy": energy, "shape": list(fb.shape[:1] + fa.shape[1:])}
            elif t.ndim <= 1:
                small[name] = (b.float().clone(), t.clone())
            elif kind in ("embedding", "output") or not skip_undecomposable:
                if module not in full_save:
                    full_save.append(module)
                report.saved.setdefault(module, []).append(name)
            else:
                report.left_out[name] = f"{kind} module ({list(t.shape)}): cannot be a LoRA"
            base_ck.release(name), tuned_ck.release(name)

        # 1-D tensors: a LoRA target's bias as its delta; otherwise the module is saved whole (or left out).
        lora_bias = False
        for name, (b, t) in small.items():
            module, _, param = name.rpartition(".")
            if module in report.modules and param == "bias":
                writer.add(f"base_model.model.{module}.lora_B.bias", (t.float() - b).to(out_dtype or t.dtype))
                report.bias_deltas.append(name)
                lora_bias = True
            elif skip_undecomposable and module not in report.saved:
                report.left_out[name] = f"1-D tensor {list(t.shape)} of a {_kind(module, 1, kinds)} module"
            else:
                if module not in full_save:
                    full_save.append(module)
                report.saved.setdefault(module, []).append(name)
        if lora_bias:  # peft builds a bias for every target: the unchanged ones get zeros
            for module, info in report.modules.items():
                if f"{module}.bias" not in report.bias_deltas:
                    writer.add(f"base_model.model.{module}.lora_B.bias", torch.zeros(info["shape"][0], dtype=out_dtype))
        # modules_to_save: every parameter of the module, the fine-tuned values
        for module in full_save:
            if module in report.modules:
                raise MergeError(f"module {module} is both a LoRA target and in modules_to_save")
            for name in names:
                if name.rpartition(".")[0] == module:
                    t = tuned_ck.get(name)
                    writer.add(
                        f"base_model.model.{name}", t.to(out_dtype) if out_dtype and t.is_floating_point() else t
                    )
                    tuned_ck.release(name)
        if not report.modules:
            what = f"; {len(report.left_out)} differ but cannot be extracted" if report.left_out else ""
            raise MergeError(
                f"no LoRA-extractable weight differs between {model_p} and {base_p} "
                f"({report.tensors_unchanged} of {report.tensors_read} tensors identical{what})"
            )
        report.bytes_written = writer.finish(tmp / "adapter_model.safetensors")
        config = _adapter_config(report, names, kinds, full_save, lora_bias)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        report.seconds = time.time() - t0
        report.peak_rss_mb = peak_rss_mb()
        if tied and any(kinds.get(m) in ("embedding", "output") for m in full_save):
            report.notes.append("the config ties word embeddings: check that peft keeps the saved ones tied")
        (tmp / "README.md").write_text(model_card(report, config, command), encoding="utf-8")
        (tmp / "extract_report.json").write_text(json.dumps(report.__dict__, indent=2))
        commit(tmp, out_p)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _adapter_config(
    report: ExtractReport, names: list[str], kinds: dict[str, str], full_save: list[str], lora_bias: bool
) -> dict[str, Any]:
    targets = sorted(report.modules)
    r = max(v["rank"] for v in report.modules.values())
    pattern = {m: v["rank"] for m, v in report.modules.items() if v["rank"] != r}
    # Short names ('q_proj') when every such module is a target, as peft configs usually read; else full names.
    weights2d = {n.rpartition(".")[0] for n in names if n.endswith(".weight")}
    suffixes = {m.rsplit(".", 1)[-1] for m in targets}
    covered = all(
        {w for w in weights2d if w.rsplit(".", 1)[-1] == s} <= set(targets)
        and not any(f.endswith(s) for f in full_save)
        for s in suffixes
    )
    return {
        "base_model_name_or_path": report.base,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,  # scaling alpha / r = 1: B @ A is the delta itself
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(suffixes) if covered else targets,
        "modules_to_save": full_save or None,
        "lora_dropout": 0.0,
        "lora_bias": lora_bias,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def model_card(report: ExtractReport, config: dict[str, Any], command: str | None = None) -> str:
    """README.md of the adapter: what was extracted from what, the retained energy, what is not in it."""
    import yaml

    front = {"base_model": report.base, "library_name": "peft", "tags": ["mmt", "lora", "extracted-lora"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(report.output).name}",
        "",
        f"A LoRA adapter extracted with `mmt extract-lora` from the difference between `{report.model}` "
        f"(fine-tuned) and `{report.base}` (base): per module, the truncated SVD of the weight delta, "
        "singular values split as square roots between `lora_B` and `lora_A`, `lora_alpha = r` (scaling 1).",
        "",
        "## Settings",
        "",
        f"- maximum rank: {report.rank}"
        + (f"; per module the smallest rank keeping {report.rank_energy} of sigma^2" if report.rank_energy else ""),
        f"- target modules: {', '.join(config['target_modules'][:12])}"
        + (" ..." if len(config["target_modules"]) > 12 else ""),
        f"- modules_to_save (full fine-tuned weights): {', '.join(config['modules_to_save'] or []) or 'none'}",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines += [
        "",
        "## Retained energy",
        "",
        "Kept sigma^2 / all sigma^2 of each delta; 1 - this is the squared relative Frobenius error, the least "
        "any rank-r matrix can have (Eckart-Young).",
        "",
        "| module kind | modules | mean | min |",
        "|---|---|---|---|",
    ]
    for k, (n, mean, lo) in report.by_kind().items():
        lines.append(f"| {k} | {n} | {mean:.4f} | {lo:.4f} |")
    lines += ["", "Per module: `extract_report.json`.", "", "## Result", "", "```", report.summary(), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt extract-lora --base runs/base --model runs/mfti/final --rank 32 -o runs/mfti_lora32
  mmt extract-lora --base B --model M --rank 64 --rank-energy 0.9 --modules 'proj$' --dtype bfloat16 -o out

Each differing linear weight becomes B @ A, its delta's truncated SVD. Embeddings and the output head go to
modules_to_save at full rank (or --embed-lora), as do other differing modules (norms) unless
--skip-undecomposable. The summary gives each module kind's retained energy (kept sigma^2 / all)."""
    p.add_argument("--base", required=True, help="base checkpoint directory (safetensors, sharded or not)")
    p.add_argument("--model", required=True, help="fine-tuned checkpoint directory")
    p.add_argument("--rank", "-r", type=int, required=True, help="maximum LoRA rank")
    p.add_argument("--output", "-o", required=True, help="adapter directory to write")
    p.add_argument("--modules", nargs="+", metavar="REGEX", help="only modules matching one of these (re.search)")
    p.add_argument(
        "--rank-energy",
        type=float,
        help="per module, the smallest rank keeping this fraction of sigma^2 (at most --rank)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), help="factor dtype (default: the fine-tuned tensor's)")
    p.add_argument("--embed-lora", action="store_true", help="decompose embeddings/lm_head instead of saving them")
    p.add_argument("--skip-undecomposable", action="store_true", help="leave out differing norms etc. (reported)")
    p.add_argument("--lowrank", action="store_true", help="randomised SVD (torch.svd_lowrank, fixed seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --lowrank")
    p.add_argument("--device", default="cpu", help="device for the SVDs (cpu, cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = extract_lora(
        args.base,
        args.model,
        args.output,
        args.rank,
        modules=args.modules,
        rank_energy=args.rank_energy,
        dtype=args.dtype,
        embed_lora=args.embed_lora,
        skip_undecomposable=args.skip_undecomposable,
        lowrank=args.lowrank,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        command=_command(args),
    )
    print(report.summary())
    return 0


def _command(args: argparse.Namespace) -> str:
    """The invocation, for the card (rebuilt from the arguments: main() may not have had sys.argv)."""
    words = ["mmt", "extract-lora", "--base", args.base, "--model", args.model, "--rank", str(args.rank)]
    words += ["-o", args.output]
    if args.modules:
        words += ["--modules", *args.modules]
    for opt in ("rank_energy", "dtype"):
        if getattr(args, opt) is not None:
            words += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    for flag in ("embed_lora", "skip_undecomposable", "lowrank"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    if args.lowrank:
        words += ["--seed", str(args.seed)]
    return shlex.join(words)
