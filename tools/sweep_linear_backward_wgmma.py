"""The linear branch's gradients on wgmma (``gpu/tc/linear_backward_wgmma.py``) on an H200:
dk / dv variants and dq against the pipelined mma.sync kernels (the default) and cuBLAS.

Usage (on a GPU of compute capability 9.0):
    PYTHONPATH=. python tools/sweep_linear_backward_wgmma.py [--reps 20] [--shapes wan b2]
                                                             [--fm 0] [--quick]

Shapes: ``wan`` B1 H12 N32760 D128 (512 key blocks of 64, the last 56 rows), ``b2`` B2
H16 N8192 D64; bf16 k / v, fp32 dH_j rows (random, 0.3 scale), ~2 % of the blocks
without marginal partners (the kernels skip them). For each shape:

1. correctness: every variant's dk and dv (from the same random base: the kernels add)
   against the pipelined kernel's (max |diff|, and relative to max |increment|) and the
   increments of 8 blocks (the first 7 and the last, partial one, of (b, h) = (0, 0))
   against a float64 torch reference (max |err| / max |increment|);
2. time: median of ``--reps`` calls (CUDA events, ``tools/cuda_timing.py``) of the
   pipelined kernel, each wgmma variant (``pf`` 16-byte loads in flight: 8 / 16;
   ``share``: φ in V's tiles, 2 CTAs an SM at D 128), and the cuBLAS floor of the same
   two products (``torch.bmm`` per block, bf16 dH_j converted beforehand, and fp32
   with TF32); one table: ms, TFLOP/s (2 products of 2·64·D·D a live block), GB/s of the
   least traffic (k, v, dH_j read; dk, dv read and written), ratio to the pipelined
   kernel (> 1: faster) and to the bf16 cuBLAS floor (time / floor).

dq (``dq_linear``: dq += J_φᵀ(dO_l·H_iᵀ − δl Z_i)/den, QO_i = ĉᵀ·dO_l, QD_i), bf16 o_l /
do_l and bf16 qstate (the default for bf16 inputs, ``SLA_NUMBA_GRAD_STATES``): the
wgmma kernel against the pipelined one (dq increments, qstate values) and float64 (8
blocks: dq increments and QO_i), timed beside them and the cuBLAS floor of its two
products (dO_l·H_iᵀ and ĉᵀ·dO_l). The last line: the linear branch's backward stages
(dq + dk / dv) of the default and of the wgmma kernels (the issue's target: <= 1.0 ms at
the Wan shape).

A variant that fails to compile or launch is reported and skipped. ``--quick``: the
default variants only, 5 reps. Whole run: < 120 s on an H200 (cold compiles ~10 s each).
"""

import argparse
import time
import traceback

import torch
from cuda_timing import cuda_time

from sla_numba.gpu.tc import linear_backward as lb
from sla_numba.gpu.tc import linear_backward_wgmma as lw

SHAPES = {"wan": (1, 12, 32760, 128), "b2": (2, 16, 8192, 64)}
BLK = 64
DEV = "cuda"


def phi(x, fm):
    if fm == 0:
        return torch.softmax(x, -1)
    if fm == 1:
        return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0.0)))
    return torch.clamp(x, min=0.0)


def vjp(x, g, fm):
    if fm == 0:
        p = torch.softmax(x, -1)
        return p * (g - (p * g).sum(-1, keepdim=True))
    if fm == 1:
        return g * torch.where(x > 0, 1.0, torch.exp(torch.clamp(x, max=0.0)))
    return g * (x > 0)


def reference_blocks(k, v, dh, n_marg, N, D, fm, blocks):
    """float64 (ddk, ddv) of (b, h) = (0, 0)'s key blocks ``blocks``: lists of (rows, D)."""
    out = []
    for j in blocks:
        r0, r1 = j * BLK, min(N, j * BLK + BLK)
        kk = k[0, 0, r0:r1].view(torch.bfloat16).double()
        vv = v[0, 0, r0:r1].view(torch.bfloat16).double()
        d = dh[0, 0, j].double()
        dH, dZ = d[: D * D].reshape(D, D), d[D * D :]
        if int(n_marg[0, 0, j]) <= 0:
            out.append((torch.zeros_like(kk), torch.zeros_like(kk)))
            continue
        dphi = vv @ dH.T - dZ
        out.append((vjp(kk, dphi, fm), phi(kk, fm) @ dH))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", nargs="*", default=["wan", "b2"], choices=sorted(SHAPES))
    ap.add_argument("--fm", type=int, default=0, help="feature map: 0 softmax, 1 elu+1, 2 relu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t_start = time.time()
    reps = 5 if args.quick else args.reps
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fm={args.fm}")
    if torch.cuda.get_device_capability() != (9, 0):
        print("not a compute capability 9.0 GPU: the wgmma kernel does not run here")
        return
    variants = [(lw.PF_DEFAULT, lw.SHARE_DEFAULT)]
    if not args.quick:
        variants += [(pf, sh) for pf in (16, 8) for sh in (True, False) if (pf, sh) != variants[0]]
    for shape in args.shapes:
        kv = sweep(shape, variants, reps, args.fm)
        dq = sweep_dq(shape, reps, args.fm, args.quick)
        tot = {k: kv.get(k, float("nan")) + dq.get(k, float("nan")) for k in ("pipe", "wgmma")}
        print(
            f"{shape}: linear-branch backward stages (dq + dk/dv): pipelined {tot['pipe']:.3f} ms, "
            f"wgmma (default variant) {tot['wgmma']:.3f} ms"
        )
    print(f"({time.time() - t_start:.0f} s)")


def sweep(shape, variants, reps, fm):
    B, H, N, D = SHAPES[shape]
    M = -(-N // BLK)
    W = D * D + D
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*s, scale=1.0):
        return torch.randn(*s, device=dev, generator=g) * scale

    k = (randn(B, H, N, D, scale=1.5)).to(torch.bfloat16).view(torch.int16)
    v = randn(B, H, N, D).to(torch.bfloat16).view(torch.int16)
    dh = randn(B, H, M, W, scale=0.3)
    n_marg = torch.randint(1, 4, (B, H, M), device=dev, generator=g, dtype=torch.int32)
    n_marg[torch.rand(B, H, M, device=dev, generator=g) < 0.02] = 0
    n_marg[0, 0, min(3, M - 1)] = 0  # one dead block among the checked ones
    dk0, dv0 = randn(B, H, N, D), randn(B, H, N, D)
    live = int((n_marg > 0).sum())
    flops = 2 * 2 * live * BLK * D * D
    n_el = B * H * N * D
    nbytes = n_el * (4 + 16) + live * W * 4
    blocks = sorted(set(range(min(7, M))) | {M - 1})
    ref = reference_blocks(k, v, dh, n_marg, N, D, fm, blocks)
    print(
        f"\n{shape}: B{B} H{H} N{N} D{D} bf16 ({M} key blocks of {BLK}, {live} live), "
        f"{flops / 1e9:.1f} GFLOP, {nbytes / 1e9:.2f} GB least traffic"
    )

    def run(which, dk, dv):
        if which is None:
            lb.launch_dkdv_linear_tc(
                "bf16", k, v, dh, n_marg, dk, dv, B, H, N, D, BLK, fm, 0, pipeline=True
            )
        else:
            lw.launch_dkdv_linear_wgmma(
                "bf16", k, v, dh, n_marg, dk, dv, B, H, N, D, BLK, fm, 0, pf=which[0],
                share=which[1],
            )  # fmt: skip

    rows = []
    pipe_out = None
    for which in [None] + variants:
        name = (
            "pipelined (default)" if which is None else f"wgmma pf={which[0]} share={int(which[1])}"
        )
        try:
            dk, dv = dk0.clone(), dv0.clone()
            run(which, dk, dv)
            torch.cuda.synchronize()
            ddk, ddv = dk - dk0, dv - dv0
            err64 = 0.0
            for j, (rk, rv) in zip(blocks, ref):
                r0, r1 = j * BLK, min(N, j * BLK + BLK)
                for got, want in ((ddk[0, 0, r0:r1], rk), (ddv[0, 0, r0:r1], rv)):
                    sc = max(float(want.abs().max()), 1e-30)
                    err64 = max(err64, float((got.double() - want).abs().max()) / sc)
            if pipe_out is None:
                pipe_out = (ddk, ddv)
                vs = "(reference)"
            else:
                da = max(float((a - b).abs().max()) for a, b in zip((ddk, ddv), pipe_out))
                rel = max(
                    float((a - b).abs().max() / b.abs().max()) for a, b in zip((ddk, ddv), pipe_out)
                )
                vs = f"max|diff| {da:.2e} rel {rel:.1e}"
            t = cuda_time(lambda: run(which, dk, dv), reps)
            rows.append((name, t, err64, vs))
        except Exception as e:  # noqa: BLE001 - report, go on with the next variant
            print(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)

    # cuBLAS floor: the two products as batched GEMMs over the blocks
    nb = B * H * M
    pad = lambda x: torch.nn.functional.pad(x.view(torch.bfloat16), (0, 0, 0, M * BLK - N))  # noqa: E731
    vv = pad(v).reshape(nb, BLK, D)
    pk = pad(k).reshape(nb, BLK, D)
    dHs = dh[..., : D * D].reshape(nb, D, D)
    floors = {}
    for label, dt in (("cuBLAS bf16", torch.bfloat16), ("cuBLAS fp32 (TF32)", torch.float32)):
        torch.backends.cuda.matmul.allow_tf32 = True
        x, c, dd = vv.to(dt), pk.to(dt), dHs.to(dt)
        floors[label] = cuda_time(
            lambda: (torch.bmm(x, dd.transpose(1, 2)), torch.bmm(c, dd)), reps
        )
    t_pipe = rows[0][1] if rows and rows[0][0].startswith("pipelined") else float("nan")
    t_floor = floors["cuBLAS bf16"]
    default = f"wgmma pf={lw.PF_DEFAULT} share={int(lw.SHARE_DEFAULT)}"
    print(
        f"{'kernel':26s} {'ms':>7s} {'TFLOP/s':>8s} {'GB/s':>6s} {'vs pipe':>8s} "
        f"{'/floor':>7s} {'err64':>8s}  vs pipelined"
    )
    for name, t, e64, vs in rows:
        print(
            f"{name:26s} {t:7.3f} {flops / t / 1e9:8.1f} {nbytes / t / 1e6:6.0f} "
            f"{t_pipe / t:7.2f}x {t / t_floor:6.2f}x {e64:8.1e}  {vs}"
        )
    for label, t in floors.items():
        print(f"{label:26s} {t:7.3f} {flops / t / 1e9:8.1f} {'':6s} {t_pipe / t:7.2f}x")
    return {"pipe": t_pipe, "wgmma": next((t for n, t, _, _ in rows if n == default), float("nan"))}


def sweep_dq(shape, reps, fm, quick):
    """dq_linear: the pipelined kernel against the wgmma kernel (bf16 qstate)."""
    B, H, N, D = SHAPES[shape]
    M = -(-N // BLK)
    W = D * D + D
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(1)

    def randn(*s, scale=1.0):
        return torch.randn(*s, device=dev, generator=g) * scale

    def half(x):
        return x.to(torch.bfloat16).view(torch.int16)

    q, o_l, do_l = (
        half(randn(B, H, N, D, scale=1.5)),
        half(randn(B, H, N, D)),
        half(randn(B, H, N, D)),
    )
    lstate = randn(B, H, M, W, scale=0.3)
    lstate[..., D * D :] = torch.rand(B, H, M, D, device=dev, generator=g) * 4 + 1  # Z > 0
    n_marg = torch.randint(1, 4, (B, H, M), device=dev, generator=g, dtype=torch.int32)
    n_marg[torch.rand(B, H, M, device=dev, generator=g) < 0.02] = 0
    n_marg[0, 0, min(3, M - 1)] = 0
    dq0 = randn(B, H, N, D)
    live = int((n_marg > 0).sum())
    flops = 2 * 2 * live * BLK * D * D
    nbytes = B * H * N * D * (6 + 8) + live * W * 4 + B * H * M * W * 2
    eps = 1e-6

    def run(share, dq, qs):
        if share is None:
            lb.launch_dq_linear_tc(
                "bf16", q, o_l, do_l, lstate, n_marg, dq, qs, B, H, N, D, BLK, fm, eps, 0,
                pipeline=True,
            )  # fmt: skip
        else:
            lw.launch_dq_linear_wgmma(
                "bf16", q, o_l, do_l, lstate, n_marg, dq, qs, B, H, N, D, BLK, fm, eps, 0,
                share=share,
            )  # fmt: skip

    # float64 reference of 8 blocks of (b, h) = (0, 0)
    blocks = sorted(set(range(min(7, M))) | {M - 1})
    ref = {}
    for j in blocks:
        r0, r1 = j * BLK, min(N, j * BLK + BLK)
        qq, oo, dd = (x[0, 0, r0:r1].view(torch.bfloat16).double() for x in (q, o_l, do_l))
        st = lstate[0, 0, j].double()
        Hi, Zi = st[: D * D].reshape(D, D), st[D * D :]
        p = phi(qq, fm)
        den = p @ Zi + eps
        dl = (oo * dd).sum(-1)
        dphi = (dd @ Hi.T - dl[:, None] * Zi) / den[:, None]
        c = p / den[:, None]
        live_j = int(n_marg[0, 0, j]) > 0
        ref[j] = (vjp(qq, dphi, fm) if live_j else 0 * qq, c.T @ dd if live_j else 0 * Hi)
    print(
        f"\n{shape} dq_linear: {live} live query blocks, bf16 o_l / do_l, bf16 qstate "
        "(err64 includes its bf16 rounding, ~2e-3)"
    )
    rows, out = [], {}
    default = f"wgmma share={int(lw.SHARE_DEFAULT)}"
    variants = [("pipelined (default)", None), (default, lw.SHARE_DEFAULT)]
    if not quick:
        variants.append((f"wgmma share={int(not lw.SHARE_DEFAULT)}", not lw.SHARE_DEFAULT))
    for name, wg in variants:
        try:
            dq, qs = dq0.clone(), torch.full((B, H, M, W), -1, device=dev, dtype=torch.int16)
            run(wg, dq, qs)
            torch.cuda.synchronize()
            ddq, qsf = dq - dq0, qs.view(torch.bfloat16).float()
            err64 = 0.0
            for j in blocks:
                r0, r1 = j * BLK, min(N, j * BLK + BLK)
                for got, want in ((ddq[0, 0, r0:r1], ref[j][0]), (qsf[0, 0, j, : D * D].reshape(D, D), ref[j][1])):  # fmt: skip
                    sc = max(float(want.abs().max()), 1e-30)
                    err64 = max(err64, float((got.double() - want).abs().max()) / sc)
            out[name] = (ddq, qsf)
            vs = "(reference)"
            if wg is not None and "pipelined (default)" in out:
                a, b = out[name], out["pipelined (default)"]
                vs = (
                    f"dq max|diff| {float((a[0] - b[0]).abs().max()):.2e} "
                    f"rel {float((a[0] - b[0]).abs().max() / b[0].abs().max()):.1e}, qstate rel "
                    f"{float((a[1] - b[1]).abs().max() / b[1].abs().max()):.1e}"
                )
            t = cuda_time(lambda: run(wg, dq, qs), reps)
            rows.append((name, t, err64, vs))
        except Exception as e:  # noqa: BLE001
            print(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
    nb = B * H * M
    pad = lambda x: torch.nn.functional.pad(x.view(torch.bfloat16), (0, 0, 0, M * BLK - N))  # noqa: E731
    dO = pad(do_l).reshape(nb, BLK, D)
    Hs = lstate[..., : D * D].reshape(nb, D, D).to(torch.bfloat16)
    c = dO.clone()
    t_floor = cuda_time(lambda: (torch.bmm(dO, Hs.transpose(1, 2)), torch.bmm(c.transpose(1, 2), dO)), reps)  # fmt: skip
    t_pipe = rows[0][1] if rows and not rows[0][0].startswith("wgmma") else float("nan")
    print(
        f"{'kernel':26s} {'ms':>7s} {'TFLOP/s':>8s} {'GB/s':>6s} {'vs pipe':>8s} "
        f"{'/floor':>7s} {'err64':>8s}  vs pipelined"
    )
    for name, t, e64, vs in rows:
        print(
            f"{name:26s} {t:7.3f} {flops / t / 1e9:8.1f} {nbytes / t / 1e6:6.0f} "
            f"{t_pipe / t:7.2f}x {t / t_floor:6.2f}x {e64:8.1e}  {vs}"
        )
    print(f"{'cuBLAS bf16':26s} {t_floor:7.3f} {flops / t_floor / 1e9:8.1f}")
    return {"pipe": t_pipe, "wgmma": next((t for n, t, _, _ in rows if n == default), float("nan"))}


if __name__ == "__main__":
    main()
