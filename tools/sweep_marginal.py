"""Tile configurations of the tensor-core marginal sum (``gpu/tc/marginal.py``) on the GPU.

Usage (on a GPU):  PYTHONPATH=. python tools/sweep_marginal.py [--reps 20] [--tiles 2,2,2,4 ...]

At the Wan2.1 shape's sizes (B*H = 12, Mq = Mk = 512 blocks, W = 128*128 + 128 state
values) with a random block map (5 % critical, 10 % negligible, the rest marginal):
median time of one ``launch_marginal_sum_tc`` per tile configuration ``(WR, WC, MT, NP)``
(WR x WC warps, each 16·MT rows x 16·NP columns), its output compared bit for bit with the
default configuration's (each output is one lane's fixed sequence of mma over the same
k-steps, so every tiling gives the same bits), and the cuBLAS floor of the same product
(``torch.bmm`` of the 0/1 matrix and the states in bf16) measured in the same run;
then the default tiles with bf16 states (``SLA_NUMBA_STATES=bf16``: one product a tile),
and beside it the pipelined bf16-states kernel (``SLA_NUMBA_MARGINAL=pipelined``: cp.async
ring, ``kb`` c-values per barrier) for each ``--pipe KB,STAGES[,MIN_CTAS]`` (and for the
tile configurations of ``--pipe-tiles``), each compared bit for bit with the register
kernel's output.

``--v2``: instead, the pipelined kernel's v2 variants (``SLA_NUMBA_MARGINAL=pipelined_v2``,
module doc of ``gpu/tc/marginal.py``) against the present pipelined kernel, for row and
column sums: the present kernel (timed twice: first and last, the run's noise), the map as
int32 words only, the staged epilogue only, both; each output compared bit for bit with
the present kernel's, and the cuBLAS floor. Usage:
``PYTHONPATH=. python tools/sweep_marginal.py --v2 [--reps 50]``.
"""

import argparse

import numpy as np
import torch
from cuda_timing import cuda_time

from sla_numba.gpu._arrays import device_view
from sla_numba.gpu.tc import marginal as tcm

CANDIDATES = [
    (2, 2, 2, 4),  # the default: 4 warps, CTA 64 x 128
    (4, 2, 2, 4),  # 8 warps, CTA 128 x 128
    (2, 4, 2, 4),  # 8 warps, CTA 64 x 256
    (4, 1, 2, 4),  # 4 warps, CTA 128 x 64
    (1, 4, 2, 4),  # 4 warps, CTA 32 x 256
    (2, 2, 4, 4),  # 4 warps, CTA 128 x 128 (128 accumulators a lane)
    (2, 2, 2, 8),  # 4 warps, CTA 64 x 256 (128 accumulators a lane)
    (4, 2, 1, 4),  # 8 warps, CTA 64 x 128
    (2, 2, 1, 8),  # 4 warps, CTA 32 x 256
]


def main_v2(args):
    """Present pipelined kernel vs its v2 variants at the Wan2.1 sizes (see the doc)."""
    M, W = args.blocks, args.d * args.d + args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    r = torch.rand(1, args.bh, M, M, device="cuda", generator=g)
    bmap = torch.zeros(1, args.bh, M, M, dtype=torch.int8, device="cuda")
    bmap[r < 0.05] = 1
    bmap[r > 0.90] = -1
    bits = (torch.randn(1, args.bh, M, W, device="cuda", generator=g) * 0.1).bfloat16()
    bits = bits.view(torch.int16)
    vm, vs = device_view(bmap), device_view(bits)
    print(
        f"B*H={args.bh} Mq=Mk={M} W={W}; marginal fraction {(bmap == 0).float().mean():.3f}; "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    variants = [
        ("present", False),
        ("v2 map words", (True, False)),
        ("v2 staged epilogue", (False, True)),
        ("v2 both", True),
        ("present (again)", False),
    ]
    for transposed in (False, True):
        ref = None
        for name, v2 in variants:
            out = torch.full((1, args.bh, M, W), float("nan"), device="cuda")
            vo = device_view(out)

            def run(v2=v2, vo=vo, transposed=transposed):
                tcm.launch_marginal_sum_tc(0, vm, transposed, M, M, vs, vo, pipeline=True, v2=v2)

            ms = cuda_time(run, args.reps)
            variant = (
                tcm.v2_variant(v2, tcm.PIPE_TILES, tcm.PIPE_KB, transposed, bmap, out, W)
                if v2 is not False
                else ("bytes", 0)
            )
            if ref is None:
                ref = out
            same = (
                "same bits"
                if torch.equal(out.view(torch.int32), ref.view(torch.int32))
                else "DIFFERENT"
            )
            print(
                f"{'column' if transposed else 'row'} sums, {name:20s} (map {variant[0]}, "
                f"out_store {variant[1]}): {ms:.3f} ms ({same} as present; "
                f"finite {bool(torch.isfinite(out).all())})"
            )
    m16 = (bmap == 0).to(torch.bfloat16).reshape(args.bh, M, M)
    s16 = bits.view(torch.bfloat16).reshape(args.bh, M, W)
    floor = cuda_time(lambda: torch.bmm(m16, s16), args.reps)
    floor_t = cuda_time(lambda: torch.bmm(m16.transpose(1, 2), s16), args.reps)
    print(f"cuBLAS floor torch.bmm bf16: row sums {floor:.3f} ms, column sums {floor_t:.3f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v2", action="store_true", help="the pipelined kernel's v2 variants")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bh", type=int, default=12)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--tiles", nargs="*", default=None, help="WR,WC,MT,NP ...")
    ap.add_argument(
        "--pipe",
        nargs="*",
        default=["32,3", "32,4", "64,3", "64,4", "32,3,4", "64,3,3"],
        help="pipelined kernel configurations KB,STAGES[,MIN_CTAS_PER_SM] ...",
    )
    ap.add_argument(
        "--pipe-tiles",
        nargs="*",
        default=["2,2,2,4", "4,2,2,4", "2,4,2,4"],
        help="tile configurations WR,WC,MT,NP for the pipelined kernel",
    )
    args = ap.parse_args()
    if args.v2:
        main_v2(args)
        return
    cands = [tuple(int(x) for x in t.split(",")) for t in args.tiles] if args.tiles else CANDIDATES
    M, W = args.blocks, args.d * args.d + args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    r = torch.rand(1, args.bh, M, M, device="cuda", generator=g)
    bmap = torch.zeros(1, args.bh, M, M, dtype=torch.int8, device="cuda")
    bmap[r < 0.05] = 1
    bmap[r > 0.90] = -1
    states = torch.randn(1, args.bh, M, W, device="cuda", generator=g) * 0.1
    stream = 0
    outs = {}
    print(f"B*H={args.bh} Mq=Mk={M} W={W}; marginal fraction {(bmap == 0).float().mean():.3f}")
    for tiles in cands:
        try:
            geo = tcm.geometry(tcm.Tiles(*tiles))
        except ValueError as e:
            print(f"tiles {tiles}: skipped ({e})")
            continue
        out = torch.full((1, args.bh, M, W), float("nan"), device="cuda")
        views = [device_view(x) for x in (bmap, states, out)]

        def run(tiles=tiles, views=views):
            tcm.launch_marginal_sum_tc(stream, views[0], False, M, M, views[1], views[2], tiles)

        try:
            ms = cuda_time(run, args.reps)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile / launch
            print(f"tiles {tiles}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        outs[tiles] = out
        same = "same bits" if torch.equal(out, outs[cands[0]]) else "DIFFERENT"
        print(
            f"tiles {tiles}: CTA {geo['RT']}x{geo['WT']}, {geo['NT']} threads, "
            f"smem {geo['SMEM_BYTES'] / 1024:.1f} KiB: {ms:.3f} ms  ({same} as {cands[0]})"
        )
    # bf16 states (SLA_NUMBA_STATES=bf16): the default tiles, one product a tile
    bits = states.to(torch.bfloat16).view(torch.int16)
    out16 = torch.full((1, args.bh, M, W), float("nan"), device="cuda")
    v16 = [device_view(x) for x in (bmap, bits, out16)]
    ms16 = cuda_time(
        lambda: tcm.launch_marginal_sum_tc(
            stream, v16[0], False, M, M, v16[1], v16[2], pipeline=False
        ),
        args.reps,
    )
    ref = torch.einsum("bhij,bhjw->bhiw", (bmap == 0).double(), bits.view(torch.bfloat16).double())
    err = ((out16.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"bf16 states, tiles {cands[0]}: {ms16:.3f} ms (max error / max |ref| {err:.1e})")
    # the pipelined kernel (bf16 states), same bits as the register kernel of its tiles
    for ptiles in (tuple(int(x) for x in t.split(",")) for t in args.pipe_tiles):
        if ptiles == tuple(tcm.TILES):  # out16's tiles
            ref16 = out16
        else:  # the register kernel of these tiles (the same bits, but check anyway)
            ref16 = torch.full_like(out16, float("nan"))
            tcm.launch_marginal_sum_tc(
                stream, v16[0], False, M, M, v16[1], device_view(ref16), ptiles, pipeline=False
            )
        for spec in args.pipe:
            pipe = tuple(int(x) for x in spec.split(","))
            outp = torch.full_like(out16, float("nan"))
            vp = device_view(outp)

            def runp(pipe=pipe, vp=vp, ptiles=ptiles):
                tcm.launch_marginal_sum_tc(
                    stream, v16[0], False, M, M, v16[1], vp, ptiles, pipeline=pipe
                )

            try:
                msp = cuda_time(runp, args.reps)
            except Exception as e:  # noqa: BLE001 - a configuration that does not fit
                print(f"pipelined {pipe} tiles {ptiles}: failed ({type(e).__name__}: {e})")
                continue
            geo = tcm.pipelined_geometry(tcm.Tiles(*ptiles), *pipe[:2])
            same = "same bits" if torch.equal(outp, ref16) else "DIFFERENT"
            print(
                f"pipelined kb,stages[,minCTAs]={pipe} tiles {ptiles}: smem "
                f"{geo['SMEM_BYTES'] / 1024:.1f} KiB: {msp:.3f} ms ({same} as the register "
                f"kernel; chunk {tcm.chunk_bytes(bits, W)} B)"
            )
    m16 = (bmap == 0).to(torch.bfloat16).reshape(args.bh, M, M)
    s16 = states.to(torch.bfloat16).reshape(args.bh, M, W)
    floor = cuda_time(lambda: torch.bmm(m16, s16), args.reps)
    print(f"cuBLAS floor torch.bmm bf16 (one product): {floor:.3f} ms")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
