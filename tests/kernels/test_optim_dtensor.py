"""``NeuronSparseAdamW`` on DTensor row shards (FSDP2's layout) equals the optimizer on whole tensors.

Two gloo processes each hold a ``Shard(0)`` of every parameter, with an uneven split (5 rows: 3 + 2) so that the
offset translation of row neurons is exercised; column neurons (``neuron_dim=1``) keep their indices on each row
shard; per-neuron scales follow their neurons; strict mode's state stays compact and local; a state_dict round
trip resumes exactly. End-to-end training under FSDP2: tests/mmt/test_engines.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from mmt_kernels import NeuronSparseAdamW


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "rows": torch.randn(5, 4, generator=g),  # neuron_dim 0
        "cols": torch.randn(5, 6, generator=g),  # neuron_dim 1: 6 column neurons, rows sharded
        "bias": torch.randn(5, generator=g),
    }


SELECTIONS = [  # global neuron indices per step; scales per selected neuron
    {"rows": [0, 3, 4], "cols": [1, 5], "bias": [2, 3]},
    {"rows": [1, 2], "cols": [0, 1, 2], "bias": [0, 4]},
    {"rows": [4], "cols": [5], "bias": [1, 2, 3]},
    {"rows": [0, 3, 4], "cols": [1, 5], "bias": [2, 3]},
]


def _run(rank: int, world: int, init_file: str, strict: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    dims = {"rows": 0, "cols": 1, "bias": 0}

    def build(sharded: bool):
        ps = {
            k: torch.nn.Parameter(distribute_tensor(v, mesh, [Shard(0)]) if sharded else v.clone())
            for k, v in _params(0).items()
        }
        opt = NeuronSparseAdamW(
            list(ps.values()), lr=1e-2, weight_decay=0.1, neuron_dims={ps[k]: d for k, d in dims.items()}, strict=strict
        )
        return ps, opt

    def step(ps, opt, i: int, sharded: bool):
        g = torch.Generator().manual_seed(100 + i)
        sel = SELECTIONS[i % len(SELECTIONS)]
        scales = {ps[k]: torch.rand(len(v), generator=g) + 0.5 for k, v in sel.items()}
        opt.set_selection({ps[k]: torch.tensor(v) for k, v in sel.items()}, scales)
        for k, p in ps.items():
            grad = torch.randn(p.shape, generator=g)
            p.grad = distribute_tensor(grad, mesh, [Shard(0)]) if sharded else grad
        opt.step()

    ref, ref_opt = build(False)
    sh, sh_opt = build(True)
    before = {k: v.full_tensor().clone() for k, v in sh.items()}
    for i in range(3):
        step(ref, ref_opt, i, False)
        step(sh, sh_opt, i, True)
    for k in ref:
        torch.testing.assert_close(sh[k].full_tensor(), ref[k].detach(), rtol=1e-6, atol=1e-7)
    if strict:  # never-selected neurons are bit-identical (rows 0-4 of "rows" were all selected once: check "cols")
        never = [c for c in range(6) if all(c not in s["cols"] for s in SELECTIONS[:3])]
        assert never and torch.equal(sh["cols"].full_tensor()[:, never], before["cols"][:, never])
        local_rows = sh["rows"].to_local().shape[0]
        st = sh_opt.state[sh["rows"]]
        assert st["exp_avg"].shape[1] == 4 and int(st["neurons"].max()) < local_rows  # local, compact
        st = sh_opt.state[sh["cols"]]
        assert st["exp_avg"].shape == (local_rows, st["neurons"].numel())  # [C, U]: split along C like the param
    # resume from this process's state_dict (selections saved in global indices)
    sd = sh_opt.state_dict()
    sh2 = {k: torch.nn.Parameter(distribute_tensor(v.detach().full_tensor(), mesh, [Shard(0)])) for k, v in sh.items()}
    opt2 = NeuronSparseAdamW(
        list(sh2.values()), lr=1e-2, weight_decay=0.1, neuron_dims={sh2[k]: d for k, d in dims.items()}, strict=strict
    )
    opt2.load_state_dict(sd)
    step(ref, ref_opt, 3, False)
    step(sh2, opt2, 3, True)
    for k in ref:
        torch.testing.assert_close(sh2[k].full_tensor(), ref[k].detach(), rtol=1e-6, atol=1e-7)
    dist.destroy_process_group()


def _both(rank: int, world: int, init_file: str) -> None:
    for strict in (True, False):
        _run(rank, world, f"{init_file}.{strict}", strict)


@pytest.mark.slow  # ~20 s: two processes start torch (the fast suite trains LANDeRMT under FSDP2 end to end)
def test_row_shards_match_whole_tensors(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_both, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
