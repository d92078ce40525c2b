"""FSDP2 and DeepSpeed on CPU (gloo) for the multi-process tests: a stand-in for ``accelerate launch`` there.

* FSDP: accelerate enables it only on accelerator devices (on a CPU machine its state stays ``MULTI_CPU``), and
  ``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up. The processes are
  started with ``torch.distributed.run`` (gloo) and accelerate's state is switched to FSDP with the plugin that the
  config file's ``fsdp_config`` describes, as ``accelerate launch --config_file examples/accelerate/fsdp2.yaml``
  sets it up on GPUs.
* DeepSpeed: its CPU accelerator (gloo) runs ZeRO-2 and ZeRO-3 here, and accelerate switches to DeepSpeed when
  ``ACCELERATE_USE_CPU`` is unset; but on a machine without accelerators accelerate's state counts one process
  although DeepSpeed joined all of them into one process group, so the group's size and ranks are written into
  the state. (``accelerate launch --config_file examples/accelerate/zero2.yaml`` itself starts the 2 processes;
  only that count is wrong.)

Every ``Accelerator()`` created afterwards (the trainer's own) shares the state. As a script it runs the mmt
command line, the CPU equivalent of ``accelerate launch --config_file <file> -m mmt.cli train -c my.yaml``::

    python -m torch.distributed.run --nproc_per_node 2 tests/mmt/_cpu_engines.py \\
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


def _config(config_file: str | Path | None) -> dict:
    if config_file is None:
        return {"distributed_type": "FSDP"}
    import yaml

    return yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))


def plugin_from_config(config_file: str | Path | None):
    """The FSDP plugin an accelerate config file describes (FSDP2 with the repository's defaults if None)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    kwargs = {
        "fsdp_version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "transformer_based_wrap",
        "state_dict_type": "FULL_STATE_DICT",
    }
    cfg = _config(config_file)
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


def enable_deepspeed_on_cpu(config_file: str | Path):
    """DeepSpeed (its CPU accelerator, gloo) with the plugin the config file's ``deepspeed_config`` describes."""
    import dataclasses

    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    os.environ.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate never switches to DeepSpeed
    fields = {f.name for f in dataclasses.fields(DeepSpeedPlugin)}
    ds = {k: v for k, v in (_config(config_file).get("deepspeed_config") or {}).items() if k in fields}
    plugin = DeepSpeedPlugin(**ds)
    if plugin.zero_stage == 3:  # partition every parameter: DeepSpeed keeps small ones (< 1e5 elements) whole
        plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    accelerator = Accelerator(deepspeed_plugin=plugin)
    assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type
    assert dist.is_initialized(), "DeepSpeed did not join the processes"
    counts = {
        "num_processes": dist.get_world_size(),
        "process_index": dist.get_rank(),
        "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank())),
    }
    PartialState._shared_state.update(counts)
    AcceleratorState._shared_state.update(counts)
    assert accelerator.num_processes == dist.get_world_size()
    return accelerator


def enable_engine_on_cpu(config_file: str | Path | None):
    """FSDP or DeepSpeed, as the accelerate config file says."""
    if _config(config_file).get("distributed_type") == "DEEPSPEED":
        return enable_deepspeed_on_cpu(config_file)
    return enable_fsdp_on_cpu(config_file)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file", default=None, help="accelerate config file (distributed_type FSDP or DEEPSPEED)")
    p.add_argument("--kill-at", type=int, default=-1, help="SIGKILL every process once this step is logged")
    p.add_argument("mmt_args", nargs=argparse.REMAINDER, help="-- then the mmt command line")
    a = p.parse_args()
    argv = a.mmt_args[1:] if a.mmt_args[:1] == ["--"] else a.mmt_args
    enable_engine_on_cpu(a.config_file)
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
