"""FSDP2 on CPU (gloo) for the multi-process tests, and a stand-in for ``accelerate launch`` there.

accelerate enables FSDP only on accelerator devices (on a CPU machine its state stays ``MULTI_CPU``), and
``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up. So the tests start the
processes with ``torch.distributed.run`` (gloo) and switch accelerate's state to FSDP the way ``accelerate launch
--config_file examples/accelerate/fsdp2.yaml`` would on GPUs: the plugin is built from that file's ``fsdp_config``.
Every ``Accelerator()`` created afterwards (the trainer's own) shares that state.

As a script it runs the mmt command line under FSDP2, the CPU equivalent of
``accelerate launch --config_file examples/accelerate/fsdp2.yaml -m mmt.cli train -c my.yaml``::

    python -m torch.distributed.run --nproc_per_node 2 tests/mmt/_fsdp_cpu.py \\
        --config_file examples/accelerate/fsdp2.yaml [--kill-at N] -- train -c my.yaml key=value ...

``--kill-at N`` SIGKILLs every process once optimizer step N is logged (kill-and-resume tests).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# accelerate config keys (fsdp_config) -> FullyShardedDataParallelPlugin arguments, where the name is not just
# the key without its "fsdp_" prefix
_RENAMED = {"offload_params": "cpu_offload", "transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap"}


def plugin_from_config(config_file: str | Path | None):
    """The FSDP plugin an accelerate config file describes (FSDP2 with the repository's defaults if None)."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    kwargs = {
        "fsdp_version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "transformer_based_wrap",
        "state_dict_type": "FULL_STATE_DICT",
    }
    if config_file is not None:
        cfg = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        if cfg.get("distributed_type") != "FSDP":
            raise SystemExit(f"{config_file}: distributed_type is {cfg.get('distributed_type')!r}, not FSDP")
        for key, value in (cfg.get("fsdp_config") or {}).items():
            name = key if key == "fsdp_version" else key.removeprefix("fsdp_")
            name = _RENAMED.get(name, name)
            if name == "auto_wrap_policy" and isinstance(value, str):
                value = value.lower()
            kwargs[name] = value
    return FullyShardedDataParallelPlugin(**kwargs)


def enable_fsdp_on_cpu(config_file: str | Path | None = None):
    """Switch accelerate's (shared) state of this gloo process group to FSDP; returns the Accelerator."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator = Accelerator()
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it when re-created
    accelerator.state.fsdp_plugin = plugin_from_config(config_file)
    return accelerator


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file", default=None, help="accelerate config file (distributed_type: FSDP)")
    p.add_argument("--kill-at", type=int, default=-1, help="SIGKILL every process once this step is logged")
    p.add_argument("mmt_args", nargs=argparse.REMAINDER, help="-- then the mmt command line")
    a = p.parse_args()
    argv = a.mmt_args[1:] if a.mmt_args[:1] == ["--"] else a.mmt_args
    enable_fsdp_on_cpu(a.config_file)
    if a.kill_at > 0:
        from mmt import train

        log = train.Trainer._log

        def _log(self, record, _log=log):
            _log(self, record)
            if record.get("step") == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        train.Trainer._log = _log
    from mmt.cli import main as mmt_main

    return mmt_main(argv)


if __name__ == "__main__":
    sys.exit(main())
