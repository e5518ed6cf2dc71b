"""Benchmark: SLA on the CPU (Numba kernels) against dense PyTorch SDPA, float32.

    python benchmarks/bench_cpu.py                      # B=1, H=4, N=4096, D=64
    python benchmarks/bench_cpu.py --n 8192 --heads 2 --repeats 5 --json out.json

What is timed, in one process and interleaved (each repeat runs every case once,
so a busy machine slows all cases alike):

* ``SLA forward``   — ``sla_numba.sla_attention`` on numpy arrays (classification +
  forward + combine), or ``cpu.classify`` + ``cpu.forward`` if the API is missing;
* ``SLA fwd+bwd``   — the same on torch tensors with ``requires_grad``, then
  ``backward`` (or the backend's ``backward`` called directly);
* ``SDPA forward`` / ``SDPA fwd+bwd`` — ``torch.nn.functional.scaled_dot_product_attention``;
* kernel rows ``cpu.classify`` / ``cpu.forward`` / ``cpu.backward`` — the backend alone.

Reported: median and min wall time over ``--repeats`` (warm-up excluded), the
first call's time separately (for the SLA rows: Numba compilation, or loading
from Numba's on-disk cache when the kernels were compiled before; torch set-up),
and the peak memory of one call: the rise of the process's peak RSS over its RSS
before the call, measured in a fresh subprocess per case (Linux only; the probe
resets the peak through /proc/self/clear_refs and sets MALLOC_MMAP_THRESHOLD_ so
freed buffers go back to the OS). Both libraries use ``--threads`` threads
(default: all cores).

OpenMP: torch and Numba each bring their own OpenMP runtime, so one process has
two thread pools. With the default (active, spinning) wait policy the idle pool
keeps spinning while the other one works, and on a busy machine both slow down
several-fold. The script therefore sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it already (pass ``OMP_WAIT_POLICY=ACTIVE`` to see the other case);
it applies to both libraries alike.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch / numba start OpenMP

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n", type=int, default=4096, help="tokens (Nq = Nk)")
    p.add_argument("--dim", type=int, default=64, help="head dim D")
    p.add_argument("--topk", type=float, default=0.05)
    p.add_argument("--skip", type=float, default=0.10)
    p.add_argument("--block", type=int, default=64, help="block_q = block_k")
    p.add_argument("--feature-map", default="softmax", choices=("softmax", "elu", "relu"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--memory-probe", metavar="CASE", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the cases
def make_cases(args):
    """name -> zero-argument callable running that case once (inputs prepared here)."""
    import torch
    import torch.nn.functional as F

    from sla_numba import cpu
    from sla_numba._params import FEATURE_MAPS, block_counts, n_blocks
    try:
        from sla_numba import sla_attention
    except ImportError:
        sla_attention = None

    rng = np.random.default_rng(0)
    shape = (args.batch, args.heads, args.n, args.dim)
    q, k, v, do = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    bq = bk = args.block
    scale = 1.0 / math.sqrt(args.dim)
    fm = FEATURE_MAPS[args.feature_map]
    eps = 1e-6
    n_crit, n_skip = block_counts(n_blocks(args.n, bk), args.topk, args.skip)
    opts = dict(topk=args.topk, skip=args.skip, block_q=bq, block_k=bk,
                feature_map=args.feature_map)

    tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, do))
    gq, gk, gv = (t.clone().requires_grad_() for t in (tq, tk, tv))

    saved = {}                      # the kernel rows' inputs, made on first use (after the
                                    # SLA rows, so their first call includes compilation)

    def fwd_inputs():
        if not saved:
            saved["map"] = cpu.classify(q, k, n_crit, n_skip, bq, bk, scale)
            saved["out"] = cpu.forward(q, k, v, saved["map"], bq, bk, scale, fm, eps)
        return saved["map"], saved["out"]

    def sla_forward():
        if sla_attention is not None:
            return sla_attention(q, k, v, backend="cpu", **opts)
        m = cpu.classify(q, k, n_crit, n_skip, bq, bk, scale)
        return cpu.forward(q, k, v, m, bq, bk, scale, fm, eps)

    def sla_fwd_bwd():
        if sla_attention is not None:
            for t in (gq, gk, gv):
                t.grad = None
            out = sla_attention(gq, gk, gv, backend="cpu", **opts)
            out.backward(tdo)
            return gq.grad
        m = cpu.classify(q, k, n_crit, n_skip, bq, bk, scale)
        os_, ol_, lse_ = cpu.forward(q, k, v, m, bq, bk, scale, fm, eps)
        return cpu.backward(q, k, v, os_, ol_, lse_, do, do, m, bq, bk, scale, fm, eps)

    def sdpa_forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv)

    def sdpa_fwd_bwd():
        for t in (gq, gk, gv):
            t.grad = None
        out = F.scaled_dot_product_attention(gq, gk, gv)
        out.backward(tdo)
        return gq.grad

    return {
        "SLA forward": sla_forward,
        "SLA fwd+bwd": sla_fwd_bwd,
        "SDPA forward": sdpa_forward,
        "SDPA fwd+bwd": sdpa_fwd_bwd,
        "cpu.classify": lambda: cpu.classify(q, k, n_crit, n_skip, bq, bk, scale),
        "cpu.forward": lambda: cpu.forward(q, k, v, fwd_inputs()[0], bq, bk, scale, fm, eps),
        "cpu.backward": lambda: cpu.backward(q, k, v, *fwd_inputs()[1], do, do, fwd_inputs()[0],
                                             bq, bk, scale, fm, eps),
    }, sla_attention is not None


def set_threads(n):
    import numba
    import torch
    n = n or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- memory
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_probe(args):
    """In a subprocess: peak RSS rise (MiB) of one warm call of ``args.memory_probe``."""
    set_threads(args.threads)
    cases, _ = make_cases(args)
    fn = cases[args.memory_probe]
    fn()                                              # compile / load, warm torch
    fn()
    with open("/proc/self/clear_refs", "w") as f:     # reset the peak (VmHWM) to now
        f.write("5")
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": max(0, peak - before) / 1024}))


def measure_memory(case, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    argv = ["--batch", str(args.batch), "--heads", str(args.heads), "--n", str(args.n),
            "--dim", str(args.dim), "--topk", str(args.topk), "--skip", str(args.skip),
            "--block", str(args.block), "--feature-map", args.feature_map,
            "--memory-probe", case]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                             capture_output=True, text=True, env=env, timeout=900, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError):
        return None


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)

    threads = set_threads(args.threads)
    cases, via_api = make_cases(args)
    first = {}
    for name, fn in cases.items():                    # first call: compile or cache load
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for fn in cases.values():                         # warm-up
        fn()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):                     # interleaved repeats
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    memory = {name: (None if args.no_memory or not sys.platform.startswith("linux")
                     else measure_memory(name, args))
              for name in cases}

    rows = {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                   "first_call_s": first[name], "peak_mib": memory[name]}
            for name, t in times.items()}
    ratios = {f"{what}_speedup{suffix}": rows[f"SDPA {case}"][stat] / rows[f"SLA {case}"][stat]
              for what, case in (("forward", "forward"), ("fwd_bwd", "fwd+bwd"))
              for suffix, stat in (("", "median_ms"), ("_min", "min_ms"))}

    print(f"B={args.batch} H={args.heads} N={args.n} D={args.dim} float32, "
          f"topk={args.topk} skip={args.skip} block={args.block} phi={args.feature_map}, "
          f"{threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"{args.repeats} repeats, SLA via "
          f"{'sla_numba.sla_attention' if via_api else 'the cpu backend directly'}")
    print(f"{'case':<14} {'median ms':>10} {'min ms':>9} {'first call s':>13} {'peak MiB':>9}")
    for name, r in rows.items():
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(f"{name:<14} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
              f"{r['first_call_s']:>13.3f} {mem:>9}")
    print(f"speed-up over SDPA (medians): forward {ratios['forward_speedup']:.2f}x, "
          f"forward+backward {ratios['fwd_bwd_speedup']:.2f}x   (mins: "
          f"{ratios['forward_speedup_min']:.2f}x, {ratios['fwd_bwd_speedup_min']:.2f}x)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "memory_probe"}
                       | {"threads": threads, "via_api": via_api,
                          "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]},
                       "results": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
