"""Where the host time of a GPU SLA call goes: the cost of each host-side step, alone.

Usage (on a GPU):  PYTHONPATH=. python tools/host_overhead.py [--reps 2000] [--json F]

Times (microseconds a call, median of 5 rounds of ``--reps`` calls, no synchronisation
inside a round, so these are enqueue costs) of:

- ``torch.empty`` / ``torch.full`` of a 1 MiB buffer (workspaces and outputs);
- ``cuda.as_cuda_array(tensor, sync=False)`` (how ``DeviceCall.dev`` views a tensor),
  ``.reshape`` of the view (``flat``), ``cuda.external_stream`` (one a call);
- launching one trivial kernel with 8 one-dimensional arrays and 2 integers:
  numba's dispatcher with numba views made beforehand; with torch tensors passed
  directly; with views made in the call (what the backend does today); and the compiled
  kernel launched by ``cuda.core.launch`` with its argument list built from the
  tensors' pointers (what a launcher that skips the dispatcher would do).

Then the host time of whole SLA calls: wall time of N back-to-back calls against the
GPU time of the same calls (CUDA events), B2 and Wan shapes, bf16, for each
``SLA_NUMBA_LAUNCH`` way (``--launchers``; the ways alternate call by call), and a
Python profile of 20 B2 forwards (their host time by function; the frames under
torch's custom-op wrappers are mis-attributed by cProfile).
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from sla_numba.gpu._compat import cuda


def per_call(fn, reps, rounds=5):
    """Median over rounds of the host time per call (µs); the GPU is drained between rounds."""
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


@cuda.jit
def touch(a0, a1, a2, a3, a4, a5, a6, a7, n, m):
    i = cuda.grid(1)
    if i < n:
        a0[i] = a1[i] + a2[i] + a3[i] + a4[i] + a5[i] + a6[i] + a7[i] + m


def array_args(t):
    """numba's kernel-argument list for a C-contiguous 1-D tensor (see numba-cuda's
    ``_Kernel._prepare_args``): meminfo, parent, nitems, itemsize, data, shape, strides."""
    n = t.numel()
    isz = t.element_size()
    return [0, 0, n, isz, t.data_ptr(), n, isz]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--sla-reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sla-only", action="store_true", help="skip the per-step costs")
    ap.add_argument(
        "--launchers", nargs="+", default=["direct", "numba"], help="SLA_NUMBA_LAUNCH values"
    )
    args = ap.parse_args()
    R = args.reps
    res = {}
    dev = torch.device("cuda")
    n = 1 << 18
    ts = [torch.zeros(n, device=dev) for _ in range(8)]
    stream_ptr = torch.cuda.current_stream().cuda_stream
    stream = cuda.external_stream(stream_ptr)

    from sla_numba import config

    print("launcher:", config.launcher())
    if args.sla_only:
        return sla_calls(args, res)
    res["torch.empty 1MiB"] = per_call(lambda: torch.empty(n, device=dev), R)
    res["torch.full 1MiB"] = per_call(lambda: torch.full((n,), 1.0, device=dev), R)
    res["as_cuda_array"] = per_call(lambda: cuda.as_cuda_array(ts[0], sync=False), R)
    view = cuda.as_cuda_array(ts[0], sync=False)
    res["view.reshape"] = per_call(lambda: view.reshape(n), R)
    res["external_stream"] = per_call(lambda: cuda.external_stream(stream_ptr), R)
    res["current_stream"] = per_call(lambda: torch.cuda.current_stream().cuda_stream, R)

    views = [cuda.as_cuda_array(t, sync=False) for t in ts]
    grid, block = (n + 255) // 256, 256
    touch[grid, block, stream](*views, n, 1)  # compile
    torch.cuda.synchronize()
    res["launch: numba views"] = per_call(lambda: touch[grid, block, stream](*views, n, 1), R)
    res["launch: torch tensors"] = per_call(lambda: touch[grid, block, stream](*ts, n, 1), R)

    def with_views():
        vs = [cuda.as_cuda_array(t, sync=False) for t in ts]
        touch[grid, block, stream](*vs, n, 1)

    res["launch: views made per call"] = per_call(with_views, R)

    import ctypes

    from cuda.core import LaunchConfig, launch

    compiled = next(iter(touch.overloads.values()))
    kern = compiled._codelibrary.get_cufunc().kernel
    config = LaunchConfig(grid=grid, block=block, shmem_size=0)

    def raw():
        kargs = []
        for t in ts:
            kargs += array_args(t)
        kargs += [ctypes.c_int64(n), ctypes.c_int64(1)]
        launch(stream, config, kern, *kargs)

    res["launch: cuda.core, args from tensors"] = per_call(raw, R)

    def raw_new_config():
        kargs = []
        for t in ts:
            kargs += array_args(t)
        kargs += [ctypes.c_int64(n), ctypes.c_int64(1)]
        launch(stream, LaunchConfig(grid=grid, block=block, shmem_size=0), kern, *kargs)

    res["launch: cuda.core, new LaunchConfig"] = per_call(raw_new_config, R)

    # check the raw launch computes what the dispatcher does
    for t in ts[1:]:
        t.fill_(1.0)
    raw()
    torch.cuda.synchronize()
    ok = bool(torch.all(ts[0] == 8.0))
    res["raw launch result correct"] = ok

    for k, v in res.items():
        print(f"{k:45s} {v:8.1f} us" if not isinstance(v, bool) else f"{k:45s} {v}")

    sla_calls(args, res)


def sla_calls(args, res):
    dev = torch.device("cuda")
    # -- whole SLA calls ------------------------------------------------------
    from sla_numba import sla_attention

    shapes = {"b2": (2, 16, 8192, 64), "wan": (1, 12, 32760, 128)}
    for name, (B, H, N, D) in shapes.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (
            torch.randn(B, H, N, D, device=dev, generator=g).to(torch.bfloat16) for _ in range(4)
        )

        def fwd():
            with torch.no_grad():
                return sla_attention(q, k, v, topk=0.05, skip=0.1, backend="gpu")

        def fwd_bwd():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            sla_attention(qq, kk, vv, topk=0.05, skip=0.1, backend="gpu").backward(do)

        for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            times = {way: ([], [], []) for way in args.launchers}
            for way in args.launchers:  # compile / warm both ways first
                os.environ["SLA_NUMBA_LAUNCH"] = way
                fn()
            for _ in range(args.sla_reps):  # the ways alternate: same machine state
                for way in args.launchers:
                    os.environ["SLA_NUMBA_LAUNCH"] = way
                    enq, tot, gpu = times[way]
                    e0 = torch.cuda.Event(enable_timing=True)
                    e1 = torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    e0.record()
                    fn()
                    e1.record()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    enq.append((t1 - t0) * 1e3)
                    tot.append((t2 - t0) * 1e3)
                    gpu.append(e0.elapsed_time(e1))
            for way, (enq, tot, gpu) in times.items():
                row = {
                    "host enqueue ms": statistics.median(enq),
                    "wall ms": statistics.median(tot),
                    "events ms": statistics.median(gpu),
                }
                res[f"sla {name} {label} launch={way}"] = row
                print(
                    f"sla {name} {label} launch={way}: "
                    + ", ".join(f"{a} {b:.3f}" for a, b in row.items())
                )
        os.environ["SLA_NUMBA_LAUNCH"] = args.launchers[0]
        if name == "b2":  # what the layers above the backend cost (enqueue only)
            from sla_numba import gpu

            scale = D**-0.5
            bm = gpu.classify(q, k, 25, 12, 64, 64, scale)
            with torch.no_grad():
                layers = {
                    "backend gpu.classify": lambda: gpu.classify(q, k, 25, 12, 64, 64, scale),
                    "backend gpu.forward": lambda: gpu.forward(q, k, v, bm, 64, 64, scale, 0, 1e-6),
                    "op sla_numba.classify": lambda: torch.ops.sla_numba.classify(
                        q, k, 0.05, 0.1, 64, 64, scale, "gpu"
                    ),
                    "op sla_numba.forward": lambda: torch.ops.sla_numba.forward(
                        q, k, v, bm, 64, 64, scale, 0, 1e-6, 0, "gpu"
                    ),
                    "api sla_attention (no grad)": fwd,
                }
                for label, fn in layers.items():
                    res[f"b2 {label} us"] = us = per_call(fn, 100, rounds=3)
                    print(f"b2 {label:32s} {us:8.1f} us enqueue")
        if name == "b2":  # where the host time of a forward goes (Python profile)
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                fwd()
            prof.disable()
            torch.cuda.synchronize()
            for order in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(30)
                print("\n".join(buf.getvalue().splitlines()[:45]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
