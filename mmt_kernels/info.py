"""`python -m mmt_kernels.info`: build flags, backends available, device."""

from __future__ import annotations

import json
import sys

from . import _backend


def main(argv=None) -> int:
    info = _backend.report()
    if argv and "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            value = ", ".join(v.split("::")[1] for v in value) or "-"
        print(f"{key:<{width}}  {value}")
    backends = ["reference"]
    if info["cpu_kernels"]:
        backends.append("cpu")
    if info["cuda_kernels"] and info["cuda_available"]:
        backends.append("cuda")
    if not str(info["triton"]).startswith("unavailable") and (info["cuda_available"] or info["triton_interpret"]):
        backends.append("triton")
    print(f"{'usable':<{width}}  {', '.join(backends)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
