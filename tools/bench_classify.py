"""Time the GPU block classification and check its map against the CPU backend, bit for bit.

Usage: PYTHONPATH=. python tools/bench_classify.py [--old] [--sweep] [--reps 50]
                                                    [--shapes wan b2] [--no-check]
       PYTHONPATH=. python tools/bench_classify.py --fused [--quick] [--reps 20]

Shapes (bf16 q, k; block 64 x 64, topk 0.05, skip 0.10, scale 1/sqrt(D)):
  wan  B1 H12 N32760 D128  (Mq = Mk = 512)
  b2   B2 H16 N8192  D64   (Mq = Mk = 128)
For each:
- "per call": milliseconds of one call of ``sla_numba.gpu.classify.classify``
  between a pair of CUDA events (median of ``--reps``, after a warm-up call that
  compiles). This includes the host's launch overhead whenever the GPU waits for
  the host (workspace allocations, two Numba launches);
- "20 calls back to back": the time of 20 queued calls, divided by 20;
- "kernels": the GPU time of the launches themselves, from torch.profiler (CUPTI
  records every kernel of the process, Numba's too), per kernel and summed, and
  the effective GB/s of the input read (q and k once, 2 bytes per element);
- whether the map equals ``sla_numba.cpu.classify``'s on the same (bf16 -> fp32,
  exact) inputs.
--old     also the reference kernels (``classify_by_sorting``: the previous pooling
          and the one-block-per-row sort), same run, with the ratio.
--sweep   also other tilings of the score/select kernel (rows per block RQ, key
          blocks per thread CPT, threads NT) and pooling batches U, each checked
          against the default map.
--fused   instead: the default pair against ``SLA_NUMBA_CLASSIFY=fused``
          (``classify_fused``: warp pooling with packed bf16 loads, keys in shared
          memory) and its tilings, one table per shape: ms per call (CUDA events,
          median of --reps), ms of the kernels alone (torch.profiler) split pool /
          score, input GB/s, ratio to the default, and whether the map equals the
          default's and the CPU backend's, bit for bit. Two floors in the same run:
          reading q and k once (``torch.sum`` over N, fp32 accumulation) and the
          score product as one cuBLAS fp64 ``torch.bmm`` of the pooled matrices (fp64
          tensor cores, FMA: a floor, not a twin). A variant that fails prints its
          error and the run goes on. ``--quick``: the default tiling only.
"""

import argparse
import math
import sys

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack

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


def timed_back_to_back(fn, reps, calls=20):
    """Median over ``reps`` of (time of ``calls`` calls queued back to back) / calls:
    the GPU's time per call whenever the host queues faster than the GPU runs."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(max(1, reps // 5)):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return float(np.median(times))


def kernel_ms(fn, reps):
    """{kernel name: mean ms per call} and their sum, from torch.profiler's CUDA trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t and e.count:
            per[e.key] = (t / 1e3 / reps, e.count // reps)  # us total -> ms per call
    return per


def short(name):
    """A readable kernel name out of a mangled Numba one."""
    for part in (
        "score_select_keys",
        "score_select",
        "score_rank",
        "pool_words",
        "pool_rows",
        "pool",
        "fill",
        "elementwise",
    ):
        if part in name:
            return part
    return name[:40]


def report_kernels(label, per, gbytes):
    """Print each kernel's ms per call; return the sum over the Numba kernels."""
    total = 0.0
    for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        total += ms
        print(f"    {short(name):14s} x{n}  {ms:8.4f} ms")
    print(f"  {label} kernels total   {total:8.4f} ms  {gbytes / total * 1e3:7.0f} GB/s")
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=None, help="default 50 (--fused: 20)")
    ap.add_argument("--old", action="store_true", help="also time the reference kernels")
    ap.add_argument("--sweep", action="store_true", help="also try other tilings")
    ap.add_argument("--no-check", action="store_true", help="skip the CPU comparison")
    ap.add_argument("--fused", action="store_true", help="default vs SLA_NUMBA_CLASSIFY=fused")
    ap.add_argument("--quick", action="store_true", help="--fused: default tilings only")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if a.fused:
        a.reps = a.reps or 20
        return fused_main(a)
    a.reps = a.reps or 50

    import importlib

    from sla_numba import _params

    gc = importlib.import_module("sla_numba.gpu.classify")

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
        print(f"  classify per call       {ms:8.4f} ms  {gbytes / ms * 1e3:7.0f} GB/s")
        ms_b2b = timed_back_to_back(lambda: gc.classify(*args), a.reps)
        print(f"  20 calls back to back   {ms_b2b:8.4f} ms per call")
        try:
            fast_k = report_kernels(
                "classify", kernel_ms(lambda: gc.classify(*args), a.reps), gbytes
            )
        except Exception as exc:  # noqa: BLE001 - the profiler is a bonus
            fast_k = None
            print(f"  (torch.profiler failed: {exc!r})")
        fast_map = gc.classify(*args)

        if a.old:
            ms_old = timed(lambda: gc.classify_by_sorting(*args), a.reps)
            same = torch.equal(gc.classify_by_sorting(*args), fast_map)
            print(
                f"  reference per call      {ms_old:8.4f} ms  {gbytes / ms_old * 1e3:7.0f} GB/s"
                f"  (per call: fast is {ms_old / ms:.2f}x faster); maps equal: {same}"
            )
            try:
                old_k = report_kernels(
                    "reference", kernel_ms(lambda: gc.classify_by_sorting(*args), a.reps), gbytes
                )
                if fast_k:
                    print(f"  kernels: fast is {old_k / fast_k:.2f}x faster than the reference")
            except Exception as exc:  # noqa: BLE001
                print(f"  (torch.profiler failed: {exc!r})")
            ok &= same

        if a.sweep:
            for tiles in SWEEP:
                if gc.fast_config(mk, D, *tiles) is None:
                    continue
                run = lambda t=tiles: gc._classify(*args, fast=True, tiles=t)  # noqa: E731
                same = torch.equal(run(), fast_map)
                per = kernel_ms(run, a.reps)
                ms_sel = sum(t for kname, (t, _) in per.items() if "score_select" in kname)
                print(
                    f"  tiles RQ{tiles[0]:>2} CPT{tiles[1]} NT{tiles[2]:>3}: score_select "
                    f"{ms_sel:8.4f} ms, all kernels {sum(v[0] for v in per.values()):8.4f} ms;"
                    f" map equal: {same}"
                )
                ok &= same
            default_batch = gc.POOL_BATCH
            for batch in (8, 16, 32, 64):  # rows each pooling thread loads before adding
                gc.POOL_BATCH = batch
                per = kernel_ms(lambda: gc.classify(*args), a.reps)
                ms_pool = sum(t for kname, (t, _) in per.items() if "pool" in kname)
                same = torch.equal(gc.classify(*args), fast_map)
                print(
                    f"  pooling U={batch:>2}: {ms_pool:8.4f} ms  {gbytes / ms_pool * 1e3:7.0f} GB/s;"
                    f" map equal: {same}"
                )
                ok &= same
            gc.POOL_BATCH = default_batch

        if not a.no_check:
            from sla_numba import cpu

            qc, kc = (x.float().cpu().numpy() for x in (q, k))
            want = cpu.classify(qc, kc, n_crit, n_skip, bq, bk, scale)
            same = np.array_equal(fast_map.cpu().numpy(), want)
            print(f"  map == CPU backend's map: {same}")
            ok &= same
    print("\nALL MAPS EQUAL" if ok else "\nMAP MISMATCH")
    return 0 if ok else 1


# (pool tiles: lanes a group, groups a CTA, rows in flight; keys tiles: RQ, CPT, NT, RH)
FUSED_VARIANTS = [
    ("pool G4 U16, keys default", None, None),
    ("pool G4 U16 + default score_select", None, "scratch"),
    ("pool G8 U16", (None, 8, 16), None),
    ("pool G4 U32", (None, 4, 32), None),
    ("keys RQ16 RH2", None, (16, None, None, 2)),
    ("keys RQ8 RH8", None, (8, None, None, None)),
    ("keys RQ4 RH4", None, (4, None, None, None)),
]


def _split(per):
    """(pool ms, score ms, total ms) per call out of kernel_ms's table."""
    pool = sum(t for name, (t, _) in per.items() if "pool" in name)
    score = sum(t for name, (t, _) in per.items() if "score" in name)
    return pool, score, sum(t for t, _ in per.values())


def fused_main(a):
    """--fused: one table per shape (module docstring)."""
    import importlib

    from sla_numba import _params

    gc = importlib.import_module("sla_numba.gpu.classify")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, reps {a.reps}")
    ok = True
    for name in a.shapes:
        B, H, N, D = SHAPES[name]
        bq = bk = 64
        mq = mk = -(-N // bq)
        n_crit, n_skip = _params.block_counts(mk, 0.05, 0.10)
        scale = 1 / math.sqrt(D)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k = (
            torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2)
        )
        gbytes = (q.numel() + k.numel()) * 2 / 1e9
        args = (q, k, n_crit, n_skip, bq, bk, scale)
        print(
            f"\n[{name}] B{B} H{H} N{N} D{D} bf16, blocks {bq}x{bk}: Mq={mq} Mk={mk} "
            f"n_crit={n_crit} n_skip={n_skip}; input {gbytes * 1e3:.0f} MB; "
            f"keys config (RQ, CPT, EPL, NT, RH) = {gc.keys_config(mk, D)}, "
            f"pool config = {gc.pool_config(D, True)}"
        )
        want = None
        if not a.no_check:
            from sla_numba import cpu

            qc, kc = (x.float().cpu().numpy() for x in (q, k))
            want = cpu.classify(qc, kc, n_crit, n_skip, bq, bk, scale)
        default_map = gc._classify(*args, fast=True)
        rows = [("default (score_select + pool_rows)", lambda: gc._classify(*args, fast=True))]
        for label, pool_tiles, tiles in FUSED_VARIANTS[: 1 if a.quick else None]:
            scratch = tiles == "scratch"
            tiles = None if scratch else tiles
            if tiles and gc.keys_config(mk, D, *tiles) is None:
                label += " (no fit: scratch kernel)"
            rows.append(
                (
                    f"fused: {label}",
                    lambda p=pool_tiles, t=tiles, s=scratch: gc._classify_fused(
                        *args, tiles=t, pool_tiles=p, scratch=s
                    ),
                )
            )
        # floors, same run
        ms_read = float("nan")
        try:
            read = lambda: (q.sum(2, dtype=torch.float32), k.sum(2, dtype=torch.float32))  # noqa: E731
            ms_read = timed(read, a.reps)
            pq = torch.randn(B * H, mq, D, device="cuda", dtype=torch.float64)
            pkt = torch.randn(B * H, D, mk, device="cuda", dtype=torch.float64)
            ms_bmm = timed(lambda: torch.bmm(pq, pkt), a.reps)
            flops = 2 * B * H * mq * mk * D
            print(
                f"  floor: read q and k once (torch.sum) {ms_read:8.4f} ms"
                f" {gbytes / ms_read * 1e3:6.0f} GB/s; fp64 score product (torch.bmm)"
                f" {ms_bmm:8.4f} ms {flops / ms_bmm / 1e9:6.1f} TFLOP/s"
            )
        except Exception as exc:  # noqa: BLE001
            print(f"  floors FAILED: {exc!r}")
        print(
            f"  {'variant':40s} {'ms/call':>8s} {'kernels':>8s} {'pool':>7s} {'score':>7s}"
            f" {'GB/s':>6s} {'x dflt':>6s} {'/read':>6s}  map==default map==CPU"
        )
        base = None
        for label, fn in rows:
            try:
                got = fn()
                torch.cuda.synchronize()
                same_d = torch.equal(got, default_map)
                same_c = None if want is None else bool(np.array_equal(got.cpu().numpy(), want))
                ms = timed(fn, a.reps)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next variant
                print(f"  {label:40s} FAILED: {exc!r}"[:300])
                ok = False
                continue
            try:
                pool, score, kern = _split(kernel_ms(fn, a.reps))
            except Exception as exc:  # noqa: BLE001 - the profiler is a bonus
                print(f"  (torch.profiler failed: {exc!r})")
                pool = score = float("nan")
                kern = ms
            kern = kern or ms  # (a profiler that saw no kernel)
            base = base or kern
            print(
                f"  {label:40s} {ms:8.4f} {kern:8.4f} {pool:7.4f} {score:7.4f}"
                f" {gbytes / kern * 1e3:6.0f} {base / kern:6.2f} {kern / ms_read:6.2f}"
                f"  {str(same_d):11s} {same_c}"
            )
            ok &= same_d and same_c is not False
    print("\nALL MAPS EQUAL" if ok else "\nMAP MISMATCH OR FAILURE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
