"""SLA calls eager and replayed from CUDA graphs, against SDPA (cuDNN), in one run.

Usage (on a GPU):  PYTHONPATH=. python tools/bench_graphs.py [--shapes b2 wan] [--reps 20]
                   [--no-compile] [--compile-backward] [--json F]

Shapes: b2 (B2 H16 N8192 D64) and wan (B1 H12 N32760 D128), bf16, topk 0.05, skip 0.10,
block 64, ``backend="gpu"``. For each shape and for the forward (no grad) and the
forward + backward (``torch.autograd.grad`` of O w.r.t. q, k, v with a given dO):

- ``eager``: the call as a user makes it;
- ``graph``: the same function captured once with ``torch.cuda.graph`` (after a
  warm-up call on a side stream) and replayed with ``graph.replay()``. The copy of
  new values into the static inputs is EXCLUDED from the timed replay (a caller that
  produces its inputs inside the graph, e.g. the DiT around the attention, has no
  copy); the ``graph+copy`` row includes the three (four with dO) ``copy_`` calls;
- ``sdpa``: torch SDPA with the cuDNN backend forced (flash if cuDNN refuses), eager.

Each row: host enqueue ms (``time.perf_counter`` around the call, no sync inside), and
CUDA-event ms (events recorded on the current stream before and after the call; the
GPU is drained before each rep, so host gaps inside a call count): medians of
``--reps``. Then ratios against SDPA of the same run, and the bitwise check: the
graph replayed with new values equals an eager call on those values (every output),
and differs from the output for the capture's values.

Last, ``torch.compile(f, mode="reduce-overhead")`` of a small function calling
``sla_attention`` (b2 shape; forward under no grad; with ``--compile-backward`` also
forward + backward, which doubles inductor's compile time): whether
inductor put it in a CUDA graph -- its "skipping cudagraphs due to ..." messages
(artifact log ``cudagraphs``) and the ``cudagraph_skips`` counter, and whether a
steady-state call still runs sla_numba's launcher (launches counted by
``sla_numba.gpu._launcher.counts``: 0 means the call was a graph replay) -- its
timing, and whether its output equals the eager call's bits.
"""

import argparse
import json
import logging
import statistics
import time

import torch

from sla_numba import sla_attention
from sla_numba.gpu import _launcher

SHAPES = {"b2": (2, 16, 8192, 64), "wan": (1, 12, 32760, 128)}
KW = dict(topk=0.05, skip=0.10, block_q=64, block_k=64, backend="gpu")


def timed(fn, reps):
    """(host enqueue ms, CUDA-event ms): medians over ``reps`` calls, GPU drained before each."""
    enq, ev = [], []
    for _ in range(reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0.record()
        fn()
        e1.record()
        enq.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        ev.append(e0.elapsed_time(e1))
    return statistics.median(enq), statistics.median(ev)


def capture(fn, static):
    """Warm ``fn`` up on a side stream, then capture it; returns (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def fwd(q, k, v):
    with torch.no_grad():
        return (sla_attention(q, k, v, **KW),)


def fwd_bwd(q, k, v, do):
    o = sla_attention(q, k, v, **KW)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def sdpa_fns(q, k, v, do):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):

        def f(backend=backend):
            with torch.no_grad(), sdpa_kernel([backend]):
                return sdpa(q, k, v)

        def fb(backend=backend):
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            with sdpa_kernel([backend]):
                o = sdpa(qq, kk, vv)
            return torch.autograd.grad(o, (qq, kk, vv), do)

        try:
            f(), fb()
            torch.cuda.synchronize()
            return name, f, fb
        except RuntimeError as exc:  # this backend refuses the inputs: try the next
            print(f"sdpa {name}: {str(exc).splitlines()[0][:120]}")
    raise RuntimeError("neither cuDNN nor flash SDPA takes these inputs")


def inputs(shape, seed):
    B, H, N, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)
    ]


def bench_shape(name, shape, reps, res):
    q, k, v, do = inputs(shape, 0)
    new = inputs(shape, 1)
    sname, sdpa_f, sdpa_fb = sdpa_fns(q, k, v, do)
    for label, fn, n_in, sdpa in (("fwd", fwd, 3, sdpa_f), ("fwd+bwd", fwd_bwd, 4, sdpa_fb)):
        grad = label != "fwd"
        static = [
            x.clone().requires_grad_(grad and i < 3) for i, x in enumerate((q, k, v, do)[:n_in])
        ]
        t_first = time.perf_counter()
        graph, outs = capture(fn, static)  # the warm-up call compiles / loads the kernels
        t_first = time.perf_counter() - t_first
        eager_in = [
            x.clone().requires_grad_(grad and i < 3) for i, x in enumerate((q, k, v, do)[:n_in])
        ]
        rows = {
            "eager": timed(lambda: fn(*eager_in), reps),
            "graph": timed(graph.replay, reps),
        }

        def copy_and_replay():
            with torch.no_grad():
                for s, x in zip(static, new):
                    s.copy_(x)
            graph.replay()

        rows["graph+copy"] = timed(copy_and_replay, reps)
        rows[f"sdpa {sname}"] = timed(sdpa, reps)
        # bitwise: the static inputs now hold ``new`` (copy_and_replay ran last)
        graph.replay()
        want = fn(*[x.clone().requires_grad_(grad and i < 3) for i, x in enumerate(new[:n_in])])
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(outs, want))
        old = fn(
            *[x.detach().clone().requires_grad_(grad and i < 3) for i, x in enumerate(eager_in)]
        )
        same = same and not torch.equal(outs[0], old[0])  # (the replay did compute anew)
        base = rows[f"sdpa {sname}"][1]
        print(f"\n== {name} {shape} bf16 {label} (warm-up + capture {t_first:.1f} s)")
        print(f"  {'':14s} {'host enqueue ms':>16s} {'events ms':>10s} {'events / sdpa':>14s}")
        for r, (enq, ev) in rows.items():
            print(f"  {r:14s} {enq:16.3f} {ev:10.3f} {ev / base:14.2f}")
            res[f"{name} {label} {r}"] = {
                "host enqueue ms": enq,
                "events ms": ev,
                "/ sdpa": ev / base,
            }
        print(f"  replay == eager, bit for bit (all {len(outs)} outputs): {same}")
        res[f"{name} {label} replay == eager"] = same


class _Grab(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def bench_compile(reps, res, backward):
    """torch.compile(mode="reduce-overhead") of a function calling sla_attention (b2)."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    torch._logging.set_logs(cudagraphs=True)
    grab = _Grab()
    cudagraph_utils.cudagraphs_log.addHandler(grab)
    q, k, v, do = inputs(SHAPES["b2"], 0)

    def attn(q, k, v):
        return sla_attention(q, k, v, **KW)

    compiled = torch.compile(attn, mode="reduce-overhead")

    def c_fwd():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            return compiled(q, k, v)

    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))

    def c_fwd_bwd():
        torch.compiler.cudagraph_mark_step_begin()
        o = compiled(qq, kk, vv)
        return (o, *torch.autograd.grad(o, (qq, kk, vv), do))

    cases = [("fwd", c_fwd, lambda: fwd(q, k, v))]
    if backward:  # inductor compiles the joint graph too: ~2x the compile time
        cases.append(("fwd+bwd", c_fwd_bwd, lambda: fwd_bwd(qq, kk, vv, do)))
    for label, fn, eager in cases:
        skips0, lines0 = counters["inductor"]["cudagraph_skips"], len(grab.lines)
        t0 = time.perf_counter()
        try:
            for _ in range(3):  # compile, cudagraph-tree warm-up, record
                fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report what torch.compile said
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"\n== torch.compile reduce-overhead b2 {label}: FAILED {msg}")
            res[f"compile {label}"] = {"error": msg}
            continue
        t_compile = time.perf_counter() - t0
        before = dict(_launcher.counts)
        out = fn()
        got = [x.clone() for x in (out if isinstance(out, tuple) else (out,))]
        launches = sum(_launcher.counts.values()) - sum(before.values())
        want = eager()
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        enq, ev = timed(fn, reps)
        skips = counters["inductor"]["cudagraph_skips"] - skips0
        reasons = [line for line in grab.lines[lines0:] if "skipping cudagraph" in line]
        row = {
            "compile+warm-up s": t_compile,
            "host enqueue ms": enq,
            "events ms": ev,
            "sla launches in a steady call (0: graph replay)": launches,
            "cudagraph_skips": skips,
            "skip reasons": reasons,
            "== eager bits": same,
        }
        res[f"compile {label}"] = row
        print(f"\n== torch.compile reduce-overhead b2 {label}")
        for key, val in row.items():
            print(f"  {key}: {val}")
    cudagraph_utils.cudagraphs_log.removeHandler(grab)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    ap.add_argument(
        "--compile-backward", action="store_true", help="torch.compile part: fwd+bwd too"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    res = {}
    t0 = time.perf_counter()
    for name in args.shapes:
        bench_shape(name, SHAPES[name], args.reps, res)
    if not args.no_compile:
        bench_compile(args.reps, res, args.compile_backward)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
