"""One launch of the marginal-sum kernel at the Wan2.1 sizes, for a profiler.

Usage (on a GPU):  ncu --kernel-name regex:marginal --launch-skip 1 --launch-count 1 \\
                       --section SpeedOfLight python tools/ncu_marginal.py \\
                       [--wgmma | --v2 [words|staged|both]] [--columns]

Row sums of bf16 states (B*H = 12, Mq = Mk = 512, W = 128*128 + 128, a random map with
~85 % marginal entries): a warm-up launch, then the profiled one. ``--wgmma`` sets
``SLA_NUMBA_MARGINAL=wgmma`` (the Hopper kernel) before the package is imported.
``--v2 [words|staged|both]`` profiles the pipelined kernel's v2 variant (map as int32
words, staged epilogue, or both: ``SLA_NUMBA_MARGINAL=pipelined_v2``; default both);
``--columns`` profiles the column sums (transposed map) instead of the row sums.
"""

import os
import sys

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--wgmma" in sys.argv:
    os.environ["SLA_NUMBA_MARGINAL"] = "wgmma"

import torch  # noqa: E402

from sla_numba.gpu.tc.marginal import launch_marginal_sum_tc  # noqa: E402


def _v2_arg():
    """The launcher's ``v2`` from ``--v2 [words|staged|both]`` (False without the flag)."""
    if "--v2" not in sys.argv:
        return False
    i = sys.argv.index("--v2") + 1
    which = sys.argv[i] if i < len(sys.argv) and not sys.argv[i].startswith("--") else "both"
    return {"words": (True, False), "staged": (False, True), "both": True}[which]


def main():
    v2 = _v2_arg()
    transposed = "--columns" in sys.argv
    B, H, M, W = 1, 12, 512, 128 * 128 + 128
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.rand(B, H, M, M, device="cuda", generator=g)
    bmap = torch.where(u < 0.05, 1, torch.where(u < 0.15, -1, 0)).to(torch.int8)
    states = torch.randn(B, H, M, W, device="cuda", generator=g).bfloat16().view(torch.int16)
    out = torch.empty(B, H, M, W, device="cuda")
    for _ in range(2):
        if v2 is False:  # the switch decides (wgmma, or the default)
            launch_marginal_sum_tc(0, bmap, transposed, M, M, states, out)
        else:
            launch_marginal_sum_tc(0, bmap, transposed, M, M, states, out, pipeline=True, v2=v2)
    torch.cuda.synchronize()
    print(
        f"launched twice (v2={v2}, columns={transposed}); out finite:",
        bool(torch.isfinite(out).all()),
    )


if __name__ == "__main__":
    main()
