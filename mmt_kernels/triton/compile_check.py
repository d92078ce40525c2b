"""Compile every Triton kernel specialisation the launchers request, for real GPU targets, without a GPU.

``python -m mmt_kernels.triton.compile_check [--arch 80 90] [--json FILE]``

A stand-in active Triton driver reports a CUDA ``GPUTarget`` of the wanted architecture, and every launch
becomes ``warmup=True``: each specialisation goes through ttir, ttgir, llir, ptx and cubin with Triton's
bundled ptxas, and nothing runs. The launchers are called with CPU tensors over a sweep of dtypes, flags
and sizes, with the int arguments taking the values Triton specialises (1, multiples of 16) and others.
This catches what the interpreter cannot: int arguments specialised into constants, compile errors for a
target, register spills. Prints registers and spills per kernel; exits 1 on any compile error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("compile_check: unset TRITON_INTERPRET (it replaces compilation by the interpreter)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_PTXAS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
    r".*?Used (\d+) registers",
    re.S,
)


class StandInDriver(DriverBase):
    """An active 'CUDA' driver on a machine without one: enough for compiling, never for launching."""

    def __init__(self, arch: int):
        super().__init__()
        self.arch = arch

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver compiles only")


class Recorder:
    """Wraps ``JITFunction.run``: every launch compiles (warmup) and its ptxas report is kept."""

    def __init__(self):
        self.rows: list[dict] = []
        self.case = ""
        self._run = JITFunction.run

    def __enter__(self):
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                kernel = recorder._run(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.record(fn.fn.__name__, kernel, log.getvalue())
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run

    def record(self, name: str, kernel, log: str):
        m = _PTXAS.search(log)
        if m is None:  # a specialisation compiled earlier in this process: no new ptxas run
            return
        stack, spill_st, spill_ld, regs = (int(g) for g in m.groups())
        self.rows.append(
            dict(
                kernel=name,
                case=self.case,
                regs=regs,
                stack=stack,
                spill_stores=spill_st,
                spill_loads=spill_ld,
                num_warps=kernel.metadata.num_warps,
            )
        )


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


def _ids(n: int, hi: int) -> torch.Tensor:
    return torch.randint(0, max(hi, 1), (n,), dtype=torch.int64)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SWEEP_DTYPE = torch.bfloat16  # the training dtype: its specialisations are swept in full


def cases():
    """(name, thunk) for the launch configurations to compile: every dtype and flag on a realistic shape, and
    the int arguments swept (1, multiples of 16, others) on one dtype per kernel, to stay fast enough for CI."""
    from . import merge, moe, sparse_adamw, taylor

    out = []

    def sweep(dtype, shapes):  # all shapes for the sweep dtype, the realistic (second) one for the others
        return shapes if dtype == SWEEP_DTYPE else shapes[1:2]

    # -- family 1: sparse AdamW (row and column neurons, compact state with per-row steps and scales) ------
    for dtype in DTYPES:
        for R, C, K in sweep(dtype, ((1, 1, 1), (4096, 4096, 48), (100, 33, 7))):
            for neuron_dim in (0, 1):
                for compact, cgrad in ((False, False), (True, False), (True, True)):
                    n = R if neuron_dim == 0 else C
                    param = _t(R, C, dtype=dtype)
                    per = param.numel() // n
                    state = (_t(K, per) if neuron_dim == 0 else _t(per, K)) if compact else _t(R, C)  # [C, K]: cols
                    grad = state.clone() if cgrad else param.clone()
                    rows = _ids(K, n)
                    extra = (torch.rand(K), torch.ones(K, dtype=torch.int64)) if compact else (None, None)
                    out.append(
                        (
                            f"sparse_adamw_ {dtype} [{R},{C}] K={K} dim={neuron_dim} compact={compact} "
                            f"compact_grad={cgrad}",
                            lambda p=param, s=state, g=grad, r=rows, e=extra, nd=neuron_dim, c=compact, cg=cgrad: (
                                sparse_adamw.sparse_adamw_(
                                    p,
                                    s,
                                    s.clone(),
                                    g,
                                    r,
                                    *e,
                                    1e-3,
                                    0.9,
                                    0.999,
                                    1e-8,
                                    0.01,
                                    3,
                                    nd,
                                    c,
                                    r if c else None,
                                    cg,
                                )
                            ),
                        )
                    )
        for N, M in sweep(dtype, ((1, 1), (4096, 2048), (37, 33))):
            out.append(
                (
                    f"taylor {dtype} [{N},{M}]",
                    lambda N=N, M=M, d=dtype: taylor.taylor_accumulate_(
                        _t(M), _t(N, M, dtype=d), _t(N, M, dtype=d), _t(N)
                    ),
                )
            )
    # -- family 2: MoE ----------------------------------------------------------------------------------
    for T, k, E in ((1, 1, 1), (1024, 2, 16), (333, 2, 12288), (77, 3, 7)):
        out.append((f"permute T={T} k={k} E={E}", lambda T=T, k=k, E=E: moe.permute(_ids(T * k, E), E)))
    for dtype in DTYPES:
        for T, d, k in sweep(dtype, ((1, 1, 1), (512, 2048, 2), (333, 1000, 3))):
            perm, w = _ids(T * k, T * k), _t(T * k)
            out.append(
                (
                    f"dispatch/combine {dtype} T={T} d={d} k={k}",
                    lambda T=T, d=d, k=k, p=perm, w=w, dt=dtype: (
                        moe.dispatch(_t(T, d, dtype=dt), p, None, k),
                        moe.dispatch(_t(T, d, dtype=dt), p, w, k),
                        moe.combine(_t(T * k, d, dtype=dt), p, None, k),
                        moe.combine(_t(T * k, d, dtype=dt), p, w, k),
                        moe.combine_weight_grad(_t(T, d, dtype=dt), _t(T * k, d, dtype=dt), p, k),
                    ),
                )
            )
        for N, E, d, f in sweep(dtype, ((1, 1, 1, 1), (4096, 64, 2048, 768), (500, 6, 96, 33))):
            for act in (0, 1) if (dtype == SWEEP_DTYPE and N == 4096) else (0,):

                def mlp(N=N, E=E, d=d, f=f, act=act, dt=dtype):
                    offsets = torch.linspace(0, N, E + 1).long()
                    xp = _t(N, d, dtype=dt)
                    wg, wu, wd = _t(E, f, d, dtype=dt), _t(E, f, d, dtype=dt), _t(E, d, f, dtype=dt)
                    y, g, u = moe.grouped_mlp(xp, offsets, wg, wu, wd, act)
                    moe.grouped_mlp_backward(
                        y, xp, g, u, offsets, wg, wu, wd, torch.ones(E, dtype=torch.bool), act, True, True
                    )

                out.append((f"grouped_mlp {dtype} N={N} E={E} d={d} f={f} act={act}", mlp))
        for T, D, F in sweep(dtype, ((1, 2, 1), (4096, 2048, 64), (300, 640, 17))):
            basis = _t(D, 2 * F)
            out.append(
                (
                    f"fft {dtype} T={T} D={D} F={F}",
                    lambda T=T, D=D, F=F, b=basis, dt=dtype: (
                        moe.fft_features(_t(T, D, dtype=dt), b),
                        moe.fft_features_backward(_t(T, F, dtype=dt), _t(T, 2 * F), b),
                    ),
                )
            )

    # -- family 3: merging: every method and flag on the sweep dtype; sizes, seeds and K on one method --------
    def merge_case(dtype, n, K, method, seed, sign, has_base):
        xs = [_t(n, dtype=dtype) for _ in range(K)]
        b = _t(n, dtype=dtype) if has_base else None
        return (
            f"merge {dtype} n={n} K={K} {method} seed={seed} count={sign} base={has_base}",
            lambda: merge.merge(xs, b, [1.0] * K, torch.zeros(K), [0.5] * K, method, 1.0, seed, sign),
        )

    for dtype in DTYPES:
        for method in merge.METHOD_IDS:
            for sign in (False, True) if method.endswith("ties") else (False,):
                for has_base in (True, False) if method != "linear" else (False,):
                    if dtype == SWEEP_DTYPE or (method == "dare_ties" and has_base and not sign):
                        out.append(merge_case(dtype, 1000003, 3, method, 12345, sign, has_base))
        xs = [_t(65536, dtype=dtype) for _ in range(2)]
        out.append(
            (
                f"threshold {dtype}",
                lambda xs=xs, d=dtype: (
                    merge.magnitude_threshold(xs, xs[0], [1, 1]),
                    merge.magnitude_threshold(xs, None, [1, 1]) if d == SWEEP_DTYPE else None,
                ),
            )
        )
    for n in (1, 65536, 1000003):
        for seed in (0, 1, 12345):
            out.append(merge_case(SWEEP_DTYPE, n, 2, "dare_ties", seed, False, True))
    for K in (1, 32, 33):
        out.append(merge_case(SWEEP_DTYPE, 4096, K, "ties", 0, False, True))
    return out


def check(arch: int, selected, rec: Recorder) -> list[str]:
    driver.set_active(StandInDriver(arch))
    for fn in _jit_functions():
        fn.device_caches.clear()  # compile again for this target
    errors = []
    for name, thunk in selected:
        rec.case = f"sm_{arch} {name}"
        try:
            thunk()
        except Exception as exc:  # report every failing specialisation, then fail
            errors.append(f"sm_{arch} {name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
            print(f"FAILED {errors[-1]}", file=sys.stderr)
    return errors


def _jit_functions():
    from . import merge, moe, sparse_adamw, taylor

    for module in (merge, moe, sparse_adamw, taylor):
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                yield value


def summary(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["kernel"], r["case"].split()[0])].append(r)
    lines = [f"{'kernel':<24} {'arch':<6} {'specs':>5} {'regs':>9} {'stack B':>9} {'spill st/ld B':>15}"]
    for (kernel, arch), rs in sorted(by.items()):
        regs = f"{min(r['regs'] for r in rs)}-{max(r['regs'] for r in rs)}"
        stack = max(r["stack"] for r in rs)
        spills = f"{max(r['spill_stores'] for r in rs)}/{max(r['spill_loads'] for r in rs)}"
        lines.append(f"{kernel:<24} {arch:<6} {len(rs):>5} {regs:>9} {stack:>9} {spills:>15}")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    lines.append(f"{len(rows)} specialisations compiled, {len(spilling)} with spills")
    for r in spilling[:20]:
        lines.append(
            f"  spills: {r['kernel']} {r['case']}: {r['regs']} regs, {r['stack']} B stack, "
            f"{r['spill_stores']}/{r['spill_loads']} B spill st/ld"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--json", help="also write every specialisation's registers and spills here")
    args = ap.parse_args(argv)
    start = time.time()
    if len(args.arch) > 1:  # one process per architecture, side by side (compiling is single-threaded)
        rows, errors = [], []
        with tempfile.TemporaryDirectory() as tmp:
            procs = [
                (
                    a,
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "mmt_kernels.triton.compile_check",
                            "--arch",
                            str(a),
                            "--only",
                            args.only,
                            "--json",
                            os.path.join(tmp, f"{a}.json"),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
                for a in args.arch
            ]
            for a, proc in procs:
                out, err = proc.communicate()
                if proc.returncode:
                    errors.append(f"sm_{a}: exit {proc.returncode}\n{err.strip()[-3000:]}")
                path = os.path.join(tmp, f"{a}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        rows += json.load(f)
        report(rows, args, start)
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 1
        return 0
    # A fresh cache, so that every specialisation really compiles (and ptxas reports on it).
    from triton import knobs

    knobs.cache.dir = tempfile.mkdtemp(prefix="mmt-triton-check-")
    knobs.nvidia.dump_ptxas_log = True
    selected = [c for c in cases() if args.only in c[0]]
    with Recorder() as rec:
        errors = check(args.arch[0], selected, rec)
    print(f"{len(selected)} launch cases")
    report(rec.rows, args, start)
    if errors:
        print(f"{len(errors)} compile errors:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


def report(rows, args, start):
    print(f"triton {triton.__version__}, sm_{'/'.join(map(str, args.arch))}, {time.time() - start:.0f} s")
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
