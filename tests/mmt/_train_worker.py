"""Training worker for subprocess tests (resume after kill, multi-process equivalence).

Not a test module: run as ``python tests/mmt/_train_worker.py ...`` or via ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tok", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--kill-at", type=int, default=-1, help="SIGKILL ourselves after this optimizer step")
    p.add_argument("--sampler", default="mixed")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--params-out", default=None)
    p.add_argument("--save-final", action="store_true", help="also write output_dir/final")
    p.add_argument(
        "--fsdp2-on-cpu",
        action="store_true",
        help="shard with FSDP2 on the CPU (gloo) process group: accelerate itself enables FSDP only on "
        "accelerator devices, so the test switches its state the way `accelerate launch` would",
    )
    a = p.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from mmt.config import load_config
    from mmt.data import build_train_set
    from mmt.methods.base import TrainingPlan
    from mmt.testing import tiny_model
    from mmt.train import Trainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.tok)
    cfg = load_config(
        None,
        [
            f"data.train=[{{kind: jsonl, path: {a.data}}}]",
            f"train.output_dir={a.out}",
            f"train.max_steps={a.steps}",
            f"train.batch_size={a.batch}",
            f"train.micro_batch_size={a.micro}",
            f"train.save_every={a.save_every}",
            "train.lr=3e-3",
            f"train.lr_schedule={a.schedule}",
            "train.warmup_steps=2",
            "train.weight_decay=0.01",
            "train.progress=false",
            "train.log_every=1",
        ],
    )
    model = tiny_model("llama", vocab=len(tok), seed=0)

    def on_step_end(info, model, optimizer):
        if info.step + 1 == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    plan = TrainingPlan(method="mfti", sampler=a.sampler, on_step_end=on_step_end)
    ts = build_train_set(cfg.data, tok, plan=plan)
    accelerator = None
    if a.fsdp2_on_cpu:
        from _cpu_engines import enable_fsdp_on_cpu

        accelerator = enable_fsdp_on_cpu(Path(__file__).resolve().parents[2] / "examples/accelerate/fsdp2.yaml")
    trainer = Trainer(model, tok, plan, ts, cfg.train, data_cfg=cfg.data, accelerator=accelerator)
    result = trainer.train()
    if a.save_final:
        trainer.save_final()
    full = trainer._full_state_dict()  # a collective under FSDP: every process calls it
    if a.params_out and trainer.acc.is_main_process:
        names = [n for n, _ in trainer.raw_model.named_parameters()]
        state = {n: full[n].detach().cpu().contiguous() for n in names}
        save_file(state, a.params_out)
        Path(a.params_out + ".losses").write_text(" ".join(repr(x) for x in result.losses))
        Path(a.params_out + ".engine").write_text(f"{trainer.acc.distributed_type.value} {trainer.acc.num_processes}")


if __name__ == "__main__":
    main()
