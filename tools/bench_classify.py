"""Time the GPU block classification and check its map against the CPU backend, bit for bit.

Usage: PYTHONPATH=. python tools/bench_classify.py [--old] [--sweep] [--reps 50]
                                                    [--shapes wan b2] [--no-check]

Shapes (bf16 q, k; block 64 x 64, topk 0.05, skip 0.10, scale 1/sqrt(D)):
  wan  B1 H12 N32760 D128  (Mq = Mk = 512)
  b2   B2 H16 N8192  D64   (Mq = Mk = 128)
For each: milliseconds per call of ``sla_numba.gpu.classify.classify`` (median of
``--reps`` calls, each between a pair of CUDA events, after a warm-up call that
compiles), the effective GB/s of its input read (q and k once: 2 bytes per element),
the pooling launch alone, and whether the map equals ``sla_numba.cpu.classify``'s
on the same (bf16 -> fp32, exact) inputs.
--old     also the reference kernels (``classify_by_sorting``: the previous pooling
          and the one-block-per-row sort), same run, with the ratio.
--sweep   also other tilings of the score/select kernel (rows per block RQ, key
          blocks per thread CPT, threads NT), each checked against the default map.
"""

import argparse
import math
import sys

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.vstack = np.vstack

import torch  # noqa: E402

SHAPES = {"wan": (1, 12, 32760, 128), "b2": (2, 16, 8192, 64)}
SWEEP = [(16, 4, 128), (8, 4, 128), (12, 4, 128), (16, 2, 256), (8, 2, 256), (32, 2, 256)]


def timed(fn, reps):
    """Median milliseconds of ``fn()`` between two events (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--old", action="store_true", help="also time the reference kernels")
    ap.add_argument("--sweep", action="store_true", help="also try other tilings")
    ap.add_argument("--no-check", action="store_true", help="skip the CPU comparison")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")

    import importlib

    from sla_numba import _params

    gc = importlib.import_module("sla_numba.gpu.classify")
    simt = importlib.import_module("sla_numba.gpu.simt.classify")
    from numba import cuda

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    for name in a.shapes:
        B, H, N, D = SHAPES[name]
        bq = bk = 64
        mq, mk = -(-N // bq), -(-N // bk)
        n_crit, n_skip = _params.block_counts(mk, 0.05, 0.10)
        scale = 1 / math.sqrt(D)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k = (
            torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2)
        )
        gbytes = (q.numel() + k.numel()) * 2 / 1e9
        args = (q, k, n_crit, n_skip, bq, bk, scale)
        config = gc.fast_config(mk, D)
        print(
            f"\n[{name}] B{B} H{H} N{N} D{D} bf16, blocks {bq}x{bk}: Mq={mq} Mk={mk} "
            f"n_crit={n_crit} n_skip={n_skip}; input {gbytes * 1e3:.0f} MB; "
            f"fast config (RQ, CPT, EPL, NT) = {config}"
        )

        ms = timed(lambda: gc.classify(*args), a.reps)
        print(f"  classify (2 launches)   {ms:8.4f} ms  {gbytes / ms * 1e3:7.0f} GB/s")

        # the pooling launch alone
        qd, kd = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k))
        pq = cuda.as_cuda_array(torch.empty(B, H, mq, D, device="cuda", dtype=torch.float64))
        pk = cuda.as_cuda_array(torch.empty(B, H, D, mk, device="cuda", dtype=torch.float64))
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        kpool = simt.make_pool(simt.POOL_THREADS, gc.POOL_BATCH)
        ms_pool = timed(
            lambda: kpool[(mq + mk, H, B), simt.POOL_THREADS, stream](qd, kd, bq, bk, mq, pq, pk),
            a.reps,
        )
        print(
            f"    of which pooling     {ms_pool:8.4f} ms  {gbytes / ms_pool * 1e3:7.0f} GB/s"
            f"  (score/select ~{ms - ms_pool:.4f} ms)"
        )
        fast_map = gc.classify(*args)

        if a.old:
            ms_old = timed(lambda: gc.classify_by_sorting(*args), a.reps)
            same = torch.equal(gc.classify_by_sorting(*args), fast_map)
            print(
                f"  reference (sorting)     {ms_old:8.4f} ms  {gbytes / ms_old * 1e3:7.0f} GB/s"
                f"  -> fast is {ms_old / ms:.2f}x; maps equal: {same}"
            )
            ok &= same

        if a.sweep:
            for tiles in SWEEP:
                if gc.fast_config(mk, D, *tiles) is None:
                    continue
                run = lambda t=tiles: gc._classify(*args, fast=True, tiles=t)  # noqa: E731
                ms_t = timed(run, a.reps)
                same = torch.equal(run(), fast_map)
                print(
                    f"  tiles RQ{tiles[0]:>2} CPT{tiles[1]} NT{tiles[2]:>3}   {ms_t:8.4f} ms  "
                    f"{gbytes / ms_t * 1e3:7.0f} GB/s  map equal: {same}"
                )
                ok &= same

        if not a.no_check:
            from sla_numba import cpu

            qc, kc = (x.float().cpu().numpy() for x in (q, k))
            want = cpu.classify(qc, kc, n_crit, n_skip, bq, bk, scale)
            same = np.array_equal(fast_map.cpu().numpy(), want)
            print(f"  map == CPU backend's map: {same}")
            ok &= same
    print("\nALL MAPS EQUAL" if ok else "\nMAP MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
