"""Builds mmt_kernels._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  MMT_BUILD_CUDA=auto|0|1   auto (default) builds CUDA kernels iff torch.version.cuda and nvcc are present
                            and of the same CUDA major version (otherwise: CPU kernels only, with a warning)
  TORCH_CUDA_ARCH_LIST      default "8.0;9.0+PTX" (PTX lets newer GPUs JIT-compile the kernels)
nvcc flags live in csrc/cuda/nvcc.flags, shared with `make cuda-check`: what is checked is what ships.
  MAX_JOBS                  parallel compile jobs (ninja)
torch must already be installed (pip install --no-build-isolation); without it no extension is
built and mmt_kernels runs its PyTorch references, saying so once at import.
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# No --use_fast_math: flushing denormals to zero would break the merge's exact radix select below 1.2e-38.
with open(os.path.join(ROOT, "csrc", "cuda", "nvcc.flags")) as _f:
    NVCC_FLAGS = _f.read().split()


def _want_cuda(torch_mod, cuda_home):
    mode = os.environ.get("MMT_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MMT_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    have = bool(torch_mod.version.cuda) and cuda_home is not None
    if have and mode == "auto":
        nvcc = _nvcc_version(cuda_home)
        if nvcc is None or nvcc.split(".")[0] != torch_mod.version.cuda.split(".")[0]:
            print(
                f"mmt: WARNING: nvcc in {cuda_home} is CUDA {nvcc}, torch was built with CUDA "
                f"{torch_mod.version.cuda}; building the CPU kernels only (Triton still runs on the GPU). "
                "Point CUDA_HOME at a matching toolkit, or set MMT_BUILD_CUDA=1 to try anyway.",
                file=sys.stderr,
            )
            return False
    if mode == "1" and not have:
        raise SystemExit(
            "MMT_BUILD_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch_mod.version.cuda!r}, CUDA_HOME={cuda_home!r}. "
            "A CPU torch wheel cannot link CUDA extensions; use `make cuda-check` to compile the .cu files alone."
        )
    return have if mode == "auto" else mode == "1"


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "mmt: torch is not importable at build time; building without mmt_kernels._C "
            "(install torch first and use `pip install --no-build-isolation`)",
            file=sys.stderr,
        )
        return [], {}

    def rel(paths):
        return [os.path.relpath(p, ROOT) for p in paths]

    sources = rel(
        [os.path.join(ROOT, "csrc", "ops.cpp")] + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    )
    cxx_flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    link_flags = ["-fopenmp"]
    define_macros = []
    use_cuda = _want_cuda(torch, CUDA_HOME)
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
        sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
        define_macros.append(("MMT_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "mmt_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "mmt_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"mmt: building mmt_kernels._C (cuda={use_cuda}, torch {torch.__version__})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
