"""Compile the wgmma states kernels (``gpu/tc/states_wgmma.py``) to sm_90a PTX and cubin
without a GPU: wgmma count a key block, ``.local`` use, registers and spills.

Usage:  PYTHONPATH=. python tools/check_states_wgmma_ptx.py [--quick]  (needs numba-cuda's CUDA
wheels: NVVM for the PTX, nvJitLink for the cubin; no GPU). Prints one JSON line a
configuration. Each key block issues 4 k-steps x (hi, lo) wgmma m64n(D+8)k16 a
warpgroup: 8 in the PTX (4 without the split).
"""

import importlib.util
import json
import os
import re
import sys

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
import numba.cuda.dispatcher as disp  # noqa: E402
from numba import cuda, float32, int16, int32, int64  # noqa: E402

try:
    cuda.get_current_device()
except Exception:  # noqa: BLE001 - no GPU: type device functions for sm_90

    class _Dev:
        compute_capability = (9, 0)

    disp.get_current_device = lambda: _Dev()

HERE = os.path.dirname(os.path.abspath(__file__))


def _probe():
    spec = importlib.util.spec_from_file_location(
        "wgmma_probe", os.path.join(HERE, "wgmma_probe.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    from sla_numba.gpu.tc.states_wgmma import make_states_wgmma

    quick = "--quick" in sys.argv[1:]  # the first and the fp32-state D 64 ones only
    probe = _probe()
    i16 = int16[::1]
    configs = (
        (128, "bf16", True, True, -1),
        (128, "bf16", True, True, None),
        (128, "bf16", True, False, -1),
        (64, "bf16", True, True, -1),
        (64, "bf16", True, True, 3),
        (64, "f16", True, False, -1),
        (128, "f16", False, True, -1),
        (128, "bf16", True, True, "kA"),  # φ stored [d][c] (trans_a=False)
    )
    if quick:
        configs = (configs[0], configs[5])
    for D, kind, split, out_bf16, minb in configs:
        ta = minb != "kA"
        kern = make_states_wgmma(kind, D, split, out_bf16, -1 if not ta else minb, ta).kernel
        out = int32[::1] if out_bf16 else float32[::1]
        sig = (i16, i16, out, int64, int64, int64, int64, int64)
        fm = kern.targetoptions.get("fastmath", False)
        rep = dict(D=D, kind=kind, split=split, out_bf16=out_bf16, min_blocks=minb, trans_a=ta)
        try:
            ptx, _ = cuda.compile_ptx(
                kern.py_func, sig, cc=(9, 0, "a"), fastmath=fm,
                launch_bounds=kern.targetoptions.get("launch_bounds"),
            )  # fmt: skip
            rep.update(
                target=re.search(r"\.target\s+(\S+)", ptx).group(1),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                n=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx))),
                local=ptx.count(".local"),
            )
            cubin, info = probe.nvjitlink_assemble(ptx, "sm_90a")
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            rep.update(
                cubin=len(cubin),
                regs=int(regs.group(1)) if regs else -1,
                spill=[int(spill.group(1)), int(spill.group(2))] if spill else None,
            )
        except Exception as e:  # noqa: BLE001 - report and go on
            rep["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
        print(json.dumps(rep), flush=True)


if __name__ == "__main__":
    sys.exit(main())
