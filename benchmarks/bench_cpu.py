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

Reported: median, min and max wall time over ``--repeats`` (warm-up excluded); the
median process CPU time of a call (all threads: on a machine shared with other work
it is less disturbed than wall time, though not immune, as caches and clocks are
shared too); the first call's time separately (for the SLA rows: Numba compilation,
or loading from Numba's on-disk cache when the kernels were compiled before; torch
set-up); and the peak memory of one call: the rise of the process's peak RSS over its
RSS before the call, measured in a fresh subprocess per case (Linux only; the probe
resets the peak through /proc/self/clear_refs and sets MALLOC_MMAP_THRESHOLD_ so
freed buffers go back to the OS). Both libraries use ``--threads`` threads (default:
all cores).

The machine is printed (and written to the JSON under ``machine``): CPU model and
the ISA flags that matter (AVX2, FMA, AVX-512F), the CPU LLVM compiles for, the
vector width of SLA's micro-kernel, CPU counts, the thread counts of Numba and torch
and Numba's threading layer, the BLAS behind numpy and torch, the versions, and the
load average at the start and end (a loaded machine makes every row slower, the
ratios less so). To compare machines at 2 threads on 2 cores:

    taskset -c 0,1 python benchmarks/bench_cpu.py --threads 2 --repeats 10 --json out.json

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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / numba start OpenMP

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
    opts = dict(
        topk=args.topk, skip=args.skip, block_q=bq, block_k=bk, feature_map=args.feature_map
    )

    tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, do))
    gq, gk, gv = (t.clone().requires_grad_() for t in (tq, tk, tv))

    saved = {}  # the kernel rows' inputs, made on first use (after the
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
        "cpu.backward": lambda: cpu.backward(
            q, k, v, *fwd_inputs()[1], do, do, fwd_inputs()[0], bq, bk, scale, fm, eps
        ),
    }, sla_attention is not None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def set_threads(n):
    import numba
    import torch

    n = n or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- the machine
def _cpuinfo():
    """(model name, set of flags, current MHz list) from /proc/cpuinfo; (None, set(), []) elsewhere."""
    model, flags, mhz = None, set(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu MHz":
                    mhz.append(float(value))
    except OSError:
        pass
    return model, flags, mhz


def machine_info():
    """What this run ran on: CPU, ISA, cores, thread pools, BLAS, versions (call after a kernel ran).

    ``numba.threading_layer()`` is only known once a parallel kernel has run.
    """
    import platform

    import llvmlite
    import numba
    import torch

    from sla_numba.cpu import _simd

    model, flags, mhz = _cpuinfo()
    try:
        numba_layer = numba.threading_layer()
    except ValueError:
        numba_layer = None
    try:
        np_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        numpy_blas = f"{np_blas.get('name')} {np_blas.get('version')}"
    except Exception:  # noqa: BLE001 - informational only
        numpy_blas = None
    torch_cfg = torch.__config__.show()
    torch_blas = next(
        (
            part.split("=", 1)[1]
            for line in torch_cfg.splitlines()
            for part in line.replace(",", " ").split()
            if part.startswith("BLAS_INFO=")
        ),
        None,
    )
    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:
        scipy_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "isa": {
            f: f in flags for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
        },
        "llvm_cpu": llvmlite.binding.get_host_cpu_name(),
        "logical_cpus": os.cpu_count(),
        "cpus_in_affinity": affinity,
        "cpu_mhz_now": mhz,
        "loadavg_start": None,  # filled in by main()
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": numba_layer,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "sla_products": (
            f"sla_numba micro-kernel (_simd.tile_fma), {8 * _simd.VECTOR_BYTES}-bit "
            f"vectors, {_simd.TILE_M}x{_simd.tile_cols(4)} float32 tile"
        ),
        "numpy_blas": numpy_blas,
        "torch_blas": torch_blas,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "llvmlite": llvmlite.__version__,
            "torch": torch.__version__,
            "scipy": scipy_version,
        },
        "env": {
            k: os.environ.get(k)
            for k in (
                "OMP_NUM_THREADS",
                "OMP_WAIT_POLICY",
                "NUMBA_NUM_THREADS",
                "NUMBA_THREADING_LAYER",
                "NUMBA_CPU_NAME",
                "NUMBA_CPU_FEATURES",
            )
        },
    }


def print_machine(m):
    isa = " ".join(f for f, on in m["isa"].items() if on) or "-"
    mhz = (
        f"{min(m['cpu_mhz_now']):.0f}-{max(m['cpu_mhz_now']):.0f} MHz now"
        if m["cpu_mhz_now"]
        else "MHz unknown"
    )
    print(
        f"CPU: {m['cpu_model']} (LLVM: {m['llvm_cpu']}), {m['logical_cpus']} logical CPUs, "
        f"{m['cpus_in_affinity']} in this process's affinity, {mhz}; ISA: {isa}"
    )
    print(
        f"threads: numba {m['numba_threads']} ({m['numba_threading_layer']} layer), "
        f"torch {m['torch_threads']} (interop {m['torch_interop_threads']}); "
        f"load average at start / end: {m['loadavg_start']} / {m['loadavg_end']}"
    )
    print(
        f"products: SLA {m['sla_products']}; numpy BLAS {m['numpy_blas']}; "
        f"torch BLAS {m['torch_blas']}; scipy {m['versions']['scipy'] or 'not installed'}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v))


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
    fn()  # compile / load, warm torch
    fn()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
        f.write("5")
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": max(0, peak - before) / 1024}))


def measure_memory(case, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    argv = [
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--topk",
        str(args.topk),
        "--skip",
        str(args.skip),
        "--block",
        str(args.block),
        "--feature-map",
        args.feature_map,
        "--memory-probe",
        case,
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    try:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError):
        return None


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)

    threads = set_threads(args.threads)
    load_start = _loadavg()
    cases, via_api = make_cases(args)
    first = {}
    for name, fn in cases.items():  # first call: compile or cache load
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for fn in cases.values():  # warm-up
        fn()
    times = {name: [] for name in cases}
    cpu_times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved repeats
        for name, fn in cases.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    load_end = _loadavg()

    memory = {
        name: (
            None
            if args.no_memory or not sys.platform.startswith("linux")
            else measure_memory(name, args)
        )
        for name in cases
    }

    machine = machine_info()
    machine["loadavg_start"], machine["loadavg_end"] = load_start, load_end
    rows = {
        name: {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "cpu_median_ms": 1e3 * statistics.median(cpu_times[name]),
            "first_call_s": first[name],
            "peak_mib": memory[name],
        }
        for name, t in times.items()
    }
    ratios = {
        f"{what}_speedup{suffix}": rows[f"SDPA {case}"][stat] / rows[f"SLA {case}"][stat]
        for what, case in (("forward", "forward"), ("fwd_bwd", "fwd+bwd"))
        for suffix, stat in (("", "median_ms"), ("_min", "min_ms"), ("_cpu", "cpu_median_ms"))
    }

    print(
        f"B={args.batch} H={args.heads} N={args.n} D={args.dim} float32, "
        f"topk={args.topk} skip={args.skip} block={args.block} phi={args.feature_map}, "
        f"{threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
        f"{args.repeats} repeats, SLA via "
        f"{'sla_numba.sla_attention' if via_api else 'the cpu backend directly'}"
    )
    print_machine(machine)
    print(
        f"{'case':<14} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'CPU ms':>9} "
        f"{'first call s':>13} {'peak MiB':>9}"
    )
    for name, r in rows.items():
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(
            f"{name:<14} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['max_ms']:>9.2f} "
            f"{r['cpu_median_ms']:>9.2f} {r['first_call_s']:>13.3f} {mem:>9}"
        )
    print(
        f"speed-up over SDPA (medians): forward {ratios['forward_speedup']:.2f}x, "
        f"forward+backward {ratios['fwd_bwd_speedup']:.2f}x   (mins: "
        f"{ratios['forward_speedup_min']:.2f}x, {ratios['fwd_bwd_speedup_min']:.2f}x; "
        f"process CPU time: {ratios['forward_speedup_cpu']:.2f}x, "
        f"{ratios['fwd_bwd_speedup_cpu']:.2f}x)"
    )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k != "memory_probe"}
                    | {
                        "threads": threads,
                        "via_api": via_api,
                        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                    },
                    "machine": machine,
                    "results": rows,
                    "ratios": ratios,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
