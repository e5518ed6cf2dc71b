"""The sparse forward on wgmma (``gpu/tc/forward_wgmma.py``) against the mma.sync kernel.

Usage (a GPU of compute capability 9.0, e.g. the H200):

    PYTHONPATH=. python tools/sweep_sparse_wgmma.py            # Wan shape (meant: < 90 s)
    PYTHONPATH=. python tools/sweep_sparse_wgmma.py --quick    # tiny, correctness only

For each configuration (bf16 D=128, bf16 D=64, fp16 D=128 at B=1 H=12 N=32760,
block_q = block_k = 64, a random LUT of ``--topk`` (5 %) of the key blocks per query
block; a few query blocks without any): times ``sparse_forward_tc`` (the mma.sync
kernel, ``tc/forward.py``) and ``sparse_forward_wgmma`` in three variants (``wgmma_v2``:
V double-buffered, the default; ``wgmma_v1``: ``v_stages=1``; ``wgmma_ovl``:
``overlap=True``) with CUDA events (median
of ``--reps``, after one untimed call that compiles) and prints TFLOP/s on the work
done, ``4 * B*H*Nq * (n_crit*64) * D`` (every visited key block counted whole, also the
sequence's partial last one); the max abs difference of each wgmma kernel's O and lse
from the mma.sync kernel's; all three against float64 on a few query blocks. A ``FAIL``
line (and exit status 1) on a mismatch.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack

import torch  # noqa: E402
from cuda_timing import cuda_time  # noqa: E402

BLOCK = 64
#: (label, v_stages, overlap) of the wgmma kernels timed (the first is the default)
VARIANTS = (("wgmma_v2", 2, False), ("wgmma_v1", 1, False), ("wgmma_ovl", 2, True))


def make_inputs(B, H, N, D, dtype, topk, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, device=device, generator=g).to(dtype) for _ in range(3))
    mq = mk = -(-N // BLOCK)
    n_crit = min(mk, max(1, math.floor(topk * mk)))
    scores = torch.rand(B, H, mq, mk, device=device, generator=g)
    lut = torch.topk(scores, n_crit, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((B, H, mq), n_crit, dtype=torch.int32, device=device)
    counts[:, :, 1::17] = 0  # a few query blocks without critical blocks
    return q, k, v, lut, counts, n_crit


def float64_blocks(q, k, v, lut, counts, scale, picks):
    """(O, lse) in float64 of the query blocks ``picks`` [(b, h, i)], from the LUT."""
    out = []
    N = k.shape[2]
    for b, h, i in picks:
        rows = q[b, h, i * BLOCK : (i + 1) * BLOCK].double()
        c = int(counts[b, h, i])
        if c == 0:
            out.append(None)
            continue
        idx = torch.cat(
            [torch.arange(j * BLOCK, min((j + 1) * BLOCK, N)) for j in lut[b, h, i, :c].tolist()]
        ).to(q.device)
        s = rows @ k[b, h, idx].double().T * scale
        lse = torch.logsumexp(s, -1)
        out.append((torch.softmax(s, -1) @ v[b, h, idx].double(), lse))
    return out


def run_config(args, dtype, D, failures):
    from sla_numba._params import LSE_EMPTY
    from sla_numba.gpu.tc.forward import sparse_forward_tc
    from sla_numba.gpu.tc.forward_wgmma import make_sparse_forward_wgmma, sparse_forward_wgmma

    B, H, N = 1, args.heads, args.n
    name = f"{str(dtype).replace('torch.', '')} D={D} B={B} H={H} N={N}"
    q, k, v, lut, counts, n_crit = make_inputs(B, H, N, D, dtype, args.topk, D, args.device)
    scale = D**-0.5
    kernels = {"mma": lambda: sparse_forward_tc(q, k, v, lut, counts, BLOCK, BLOCK, scale)}
    for label, vst, ovl in VARIANTS:
        kernels[label] = lambda vst=vst, ovl=ovl: sparse_forward_wgmma(
            q, k, v, lut, counts, BLOCK, BLOCK, scale, vst, ovl
        )
    t0 = time.time()
    out = {label: fn() for label, fn in kernels.items()}
    if args.device == "cuda":
        torch.cuda.synchronize()
    first_s = time.time() - t0
    ok = True
    empty = counts.repeat_interleave(BLOCK, dim=-1)[..., :N] == 0
    for label, (o, l) in out.items():
        if not torch.isfinite(o).all() or torch.isnan(l).any():
            failures.append(f"{name}: {label} output has NaN / inf")
            ok = False
        if not ((l[empty] == LSE_EMPTY).all() and (o[empty] == 0).all()):
            failures.append(f"{name}: {label} empty query blocks not O = 0, lse = LSE_EMPTY")
            ok = False
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    o1, l1 = out["mma"]
    lines = [f"{name} n_crit={n_crit}/{-(-N // BLOCK)}  first calls {first_s:.1f}s"]
    for label, _, _ in VARIANTS:
        o2, l2 = out[label]
        d_o = (o1 - o2).abs().max().item()
        d_l = (l1 - l2)[~empty].abs().max().item()
        lines.append(f"    {label} vs mma: max|dO| {d_o:.2e} max|dlse| {d_l:.2e}")
        if d_o > tol / 10 or d_l > 1e-3:
            failures.append(f"{name}: {label} vs mma max |dO| {d_o:.3g}, |dlse| {d_l:.3g}")
            ok = False
    mq = -(-N // BLOCK)
    picks = [(0, h, i) for h, i in ((0, 0), (H // 2, mq // 2), (H - 1, mq - 1), (1 % H, 3 % mq))]
    refs = float64_blocks(q, k, v, lut, counts, scale, picks)
    for label, (o, l) in out.items():
        e_o = e_l = 0.0
        for (b, h, i), ref in zip(picks, refs):
            if ref is not None:
                r0, r1 = i * BLOCK, min((i + 1) * BLOCK, N)
                e_o = max(e_o, (o[b, h, r0:r1].double() - ref[0]).abs().max().item())
                e_l = max(e_l, (l[b, h, r0:r1].double() - ref[1]).abs().max().item())
        lines.append(
            f"    {label} vs float64 ({len(picks)} query blocks): |dO| {e_o:.2e} |dlse| {e_l:.2e}"
        )
        if e_o > tol or e_l > 1e-3:
            failures.append(
                f"{name}: {label} vs float64 |dO| {e_o:.3g} (tol {tol}), |dlse| {e_l:.3g} (tol 1e-3)"
            )
            ok = False
    if not args.quick:
        flops = 4.0 * B * H * N * (n_crit * BLOCK) * D
        times = {label: cuda_time(fn, args.reps) for label, fn in kernels.items()}
        for label, ms in times.items():
            lines.append(
                f"    {label:9s} {ms:7.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  "
                f"(mma.sync / this: {times['mma'] / ms:.2f}x)"
            )
    kind = "bf16" if dtype == torch.bfloat16 else "f16"
    for label, vst, ovl in VARIANTS:
        kern = make_sparse_forward_wgmma(D, kind, vst, ovl).kernel
        for compiled in kern.overloads.values() if args.device == "cuda" else ():
            try:
                regs = compiled.library.get_cufunc().attrs.regs
            except Exception:  # noqa: BLE001 - numba-cuda internals: report what we can
                regs = "?"
            lines.append(
                f"    {label} kernel: {regs} registers, local {compiled.local_mem_per_thread} B"
            )
    print(("ok   " if ok else "FAIL ") + "\n".join(lines), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, correctness only")
    ap.add_argument("--n", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--device",
        default="cuda",
        help="'cpu' only under NUMBA_ENABLE_CUDASIM=1 with --quick (a check of this tool)",
    )
    args = ap.parse_args()
    if args.quick:
        for name, val in (("n", 1000), ("heads", 2), ("topk", 0.3)):
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, val)
    if args.device != "cuda":
        if not (args.quick and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"):
            ap.error("--device cpu needs --quick and NUMBA_ENABLE_CUDASIM=1")
    elif not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("FAIL needs a CUDA GPU of compute capability >= 9.0 (wgmma)")
        return 1
    import numba
    import numba_cuda

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CUDA simulator"
    print(
        f"{dev_name} torch {torch.__version__} numba {numba.__version__} "
        f"numba-cuda {numba_cuda.__version__}",
        flush=True,
    )
    failures = []
    t0 = time.time()
    configs = ((torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128))
    for dtype, D in configs if args.device == "cuda" else configs[1:2]:
        try:
            run_config(args, dtype, D, failures)
        except Exception as e:  # noqa: BLE001 - report and go on with the next one
            import traceback

            traceback.print_exc()
            failures.append(f"{dtype} D={D}: {type(e).__name__}: {e}")
            print(f"FAIL {dtype} D={D}: {type(e).__name__}: {e}", flush=True)
    for f in failures:
        print("FAIL", f)
    print(f"done in {time.time() - t0:.1f} s; {'FAIL' if failures else 'all ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
