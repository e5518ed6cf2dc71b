"""Compare the tensor-core sparse kernels of two versions of the package, on one GPU.

Usage (from the repository root, on a GPU machine)::

    python tools/compare_tc_kernels.py --old .old --new . [--rounds 5] [--loop 10]
    python tools/compare_tc_kernels.py --old .old --new . --sim     # logic only, CUDA simulator

``--old`` / ``--new`` are package roots (folders holding ``sla_numba/``). Each runs in its
own worker process (two versions of one package cannot share an interpreter), started
with an empty Numba cache (``NUMBA_CACHE_DIR`` and ``SLA_NUMBA_CACHE_DIR`` in a fresh
temporary folder), so the first compile of each kernel there is a cold one. Reported:

* compile: seconds from asking for a kernel to its loaded cubin (Numba compile, then
  ptxas through the driver), per kernel, after one throw-away kernel has absorbed
  Numba's one-off start-up; the two workers compile at the same time.
* outputs: max |old - new| of o, lse, dq, dk, dv on the same inputs.
* time: ms per call of ``sparse_forward_tc`` and of ``sparse_backward_tc`` (the dQ and
  dK/dV kernels), ``--loop`` calls back to back between two CUDA events, ``--reps``
  such measurements a round, ``--rounds`` rounds with old and new interleaved (the
  order alternating), median over all; TFLOP/s from the work actually done:
  forward 4*B*H*Nq*(keys visited)*D, backward 2.5x that.

Cases: bf16, B=1 H=12 N=32760 (the Wan shape) with a 5 % random critical LUT, D=128
block_q=128 and D=64 block_q=128, block_k=64. ``--sim`` runs tiny shapes under the
CUDA simulator (timings there mean nothing; it checks this script).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CASES = [  # (name, B, H, N, D, block_q, block_k, critical fraction)
    ("wan D128", 1, 12, 32760, 128, 128, 64, 0.05),
    ("wan D64", 1, 12, 32760, 64, 128, 64, 0.05),
]
SIM_CASES = [
    ("sim D16", 1, 1, 40, 16, 16, 16, 0.5),
]
KERNELS = ("fwd", "dq", "dkv")
TAG = "@@"  # prefix of the worker's replies on stdout


# ---------------------------------------------------------------------------
# Worker: one package version
# ---------------------------------------------------------------------------


def _kernel(forward_tc, backward_tc, which, D, bk, bq, kind):
    """The Numba dispatcher of one kernel, in either version of the package."""
    if which == "fwd":
        if hasattr(forward_tc, "make_sparse_forward"):
            return forward_tc.make_sparse_forward(D, bk, bq, kind).kernel
        return forward_tc.get_forward_kernel(D, bk, bq, kind).sla_fwd_tc  # generated
    if hasattr(backward_tc, "make_sparse_backward"):
        return backward_tc.make_sparse_backward(which, D, bk, bq, kind).kernel
    mod = backward_tc.kernel_source_and_module(which, D, bk, bq, kind)[1]  # generated
    return getattr(mod, backward_tc.KERNEL_NAMES[which])


def _signature(backward_tc, which):
    from numba import float32, int16, int32, int64

    if which != "fwd":
        return backward_tc.signature(which)
    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    return (i16, i16, i16, i32, i32, f32, f32, int64, int64, int64, int64, float32)


class Worker:
    def __init__(self, root, sim, outdir):
        sys.path.insert(0, os.path.abspath(root))
        import numpy as np

        if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
            np.row_stack = np.vstack
        import torch

        from sla_numba.gpu.tc import backward as backward_tc
        from sla_numba.gpu.tc import forward as forward_tc

        self.np, self.torch = np, torch
        self.fwd_mod, self.bwd_mod = forward_tc, backward_tc
        self.sim, self.outdir = sim, outdir
        self.dev = "cpu" if sim else "cuda"
        self.cases = SIM_CASES if sim else CASES
        self.state = {}

    def hello(self):
        import sla_numba

        return {"package": os.path.dirname(os.path.abspath(sla_numba.__file__))}

    def compile(self):
        """Seconds to the first usable kernel, per (case, kernel), cold cache."""
        from numba import cuda

        if self.sim:
            return {}

        @cuda.jit
        def warmup(x):  # Numba / NVVM start-up, not charged to any kernel
            x[0] = 1

        warmup[1, 1](cuda.device_array(1, dtype=self.np.int32))
        cuda.synchronize()
        out = {}
        for ci, (_, _, _, _, D, bq, bk, _) in enumerate(self.cases):
            for which in KERNELS:
                t0 = time.perf_counter()
                kern = _kernel(self.fwd_mod, self.bwd_mod, which, D, bk, bq, "bf16")
                compiled = kern.compile(_signature(self.bwd_mod, which))
                compiled._codelibrary.get_cufunc()  # ptxas: the cubin is linked here
                out[f"{ci}:{which}"] = time.perf_counter() - t0
        return out

    def setup(self, ci):
        """Inputs of case ci (same seed in both workers), one forward + backward; the
        outputs are saved for the parent to compare."""
        torch, np = self.torch, self.np
        name, B, H, N, D, bq, bk, frac = self.cases[ci]
        mq, mk = -(-N // bq), -(-N // bk)
        n_crit = min(mk, max(1, int(frac * mk)))
        g = torch.Generator(device=self.dev).manual_seed(1234 + ci)
        q, k, v, do = (
            torch.randn(B, H, N, D, generator=g, device=self.dev).to(torch.bfloat16)
            for _ in range(4)
        )
        scores = torch.rand(B, H, mq, mk, generator=g, device=self.dev)
        lut = torch.topk(scores, n_crit, dim=-1).indices.sort(-1).values.to(torch.int32)
        lut = lut.contiguous()
        counts = torch.full((B, H, mq), n_crit, dtype=torch.int32, device=self.dev)
        rev, rcnt = self.bwd_mod.reverse_index(lut, counts, mk)
        scale = D**-0.5

        def fwd():
            return self.fwd_mod.sparse_forward_tc(q, k, v, lut, counts, bq, bk, scale)

        o, lse = fwd()
        delta = (o * do.float()).sum(-1)

        def bwd():
            return self.bwd_mod.sparse_backward_tc(
                q, k, v, o, lse, do, lut, counts, rev, rcnt, bq, bk, scale, delta=delta
            )

        grads = bwd()
        self._sync()
        paths = {}
        for key, x in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads)):
            paths[key] = os.path.join(self.outdir, f"{key}.npy")
            np.save(paths[key], x.float().cpu().numpy())
        self.state[ci] = {"fwd": fwd, "bwd": bwd}
        flops = 4.0 * B * H * N * (n_crit * bk) * D  # keys visited per query: n_crit*bk
        return {
            "paths": paths,
            "flops_fwd": flops,
            "flops_bwd": 2.5 * flops,
            "n_crit": n_crit,
            "mk": mk,
        }

    def _sync(self):
        if not self.sim:
            self.torch.cuda.synchronize()

    def time(self, ci, what, reps, loop):
        """ms per call: ``loop`` calls back to back between two events, ``reps`` times."""
        fn = self.state[ci][what]
        if not self.sim:
            fn()  # warm: caches, allocator
            self._sync()
        out = []
        for _ in range(reps):
            if self.sim:
                t0 = time.perf_counter()
                for _ in range(loop):
                    fn()
                out.append((time.perf_counter() - t0) * 1e3 / loop)
                continue
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(loop):
                fn()
            end.record()
            self.torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / loop)
        return out


def worker_main(root, sim, outdir):
    w = Worker(root, sim, outdir)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            reply = {"ok": getattr(w, op)(**cmd)}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which stops
            import traceback

            reply = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        print(TAG + json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


class Client:
    def __init__(self, label, root, sim, tmp):
        self.label = label
        cache = os.path.join(tmp, f"cache_{label}")
        self.outdir = os.path.join(tmp, f"out_{label}")
        os.makedirs(cache)
        os.makedirs(self.outdir)
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, SLA_NUMBA_CACHE_DIR=cache)
        env.pop("PYTHONPATH", None)
        if sim:
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        args = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            root,
            "--outdir",
            self.outdir,
        ]
        if sim:
            args.append("--sim")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp
        )

    def send(self, op, **kw):
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()

    def recv(self):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                reply = json.loads(line[len(TAG) :])
                if "error" in reply:
                    raise RuntimeError(f"{self.label} worker: {reply['error']}\n{reply['trace']}")
                return reply["ok"]
            sys.stdout.write(f"[{self.label}] {line}")
        raise RuntimeError(f"{self.label} worker exited (rc {self.proc.wait()})")

    def call(self, op, **kw):
        self.send(op, **kw)
        return self.recv()

    def close(self):
        if self.proc.poll() is None:
            self.send("quit")
            self.proc.wait(timeout=60)


def both(clients, op, **kw):
    """Send ``op`` to every worker first, then collect: they run concurrently."""
    for c in clients:
        c.send(op, **kw)
    return [c.recv() for c in clients]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", help="package root of the old version")
    ap.add_argument("--new", help="package root of the new version")
    ap.add_argument("--sim", action="store_true", help="tiny shapes under the CUDA simulator")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loop", type=int, default=10)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a.worker, a.sim, a.outdir)
    if not (a.old and a.new):
        ap.error("--old and --new are required")
    for root in (a.old, a.new):
        if not os.path.isdir(os.path.join(root, "sla_numba")):
            ap.error(f"{root!r} holds no sla_numba/ package")
    if a.sim:
        a.rounds, a.reps, a.loop = 1, 1, 1
    import numpy as np

    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="compare_tc_")
    clients = [
        Client("old", os.path.abspath(a.old), a.sim, tmp),
        Client("new", os.path.abspath(a.new), a.sim, tmp),
    ]
    try:
        for c, h in zip(clients, both(clients, "hello")):
            print(f"{c.label}: {h['package']}")
        cases = SIM_CASES if a.sim else CASES

        print("\nfirst-call compile, fresh process, empty cache (s):")
        comp = both(clients, "compile")
        if a.sim:
            print("  (not under the simulator)")
        for ci, case in enumerate(cases if not a.sim else []):
            for which in KERNELS:
                o, n = comp[0][f"{ci}:{which}"], comp[1][f"{ci}:{which}"]
                print(f"  {case[0]:9s} {which:4s} old {o:6.1f}  new {n:6.1f}")

        info = []
        print("\nmax |old - new| of the outputs:")
        for ci, case in enumerate(cases):
            res = both(clients, "setup", ci=ci)
            info.append(res[1])
            diffs = []
            for key in ("o", "lse", "dq", "dk", "dv"):
                x, y = (np.load(r["paths"][key]) for r in res)
                finite = bool(np.isfinite(x).all() and np.isfinite(y).all())
                note = "" if finite else " (NON-FINITE)"
                diffs.append(f"{key} {float(np.abs(x - y).max()):.2e}{note}")
            print(f"  {case[0]:9s} n_crit {res[1]['n_crit']}/{res[1]['mk']}: " + "  ".join(diffs))

        times = {}
        for rnd in range(a.rounds):
            order = clients if rnd % 2 == 0 else clients[::-1]
            for ci in range(len(cases)):
                for what in ("fwd", "bwd"):
                    for c in order:
                        ms = c.call("time", ci=ci, what=what, reps=a.reps, loop=a.loop)
                        times.setdefault((ci, what, c.label), []).extend(ms)

        print(
            f"\nms per call (median of {a.rounds} rounds x {a.reps} x {a.loop} calls, "
            "interleaved), TFLOP/s:"
        )
        for ci, case in enumerate(cases):
            for what in ("fwd", "bwd"):
                old = _median(times[ci, what, "old"])
                new = _median(times[ci, what, "new"])
                fl = info[ci][f"flops_{what}"]
                print(
                    f"  {case[0]:9s} {what}  old {old:8.3f} ms {fl / old / 1e9:6.1f}  "
                    f"new {new:8.3f} ms {fl / new / 1e9:6.1f}  new/old {new / old:5.3f}"
                )
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - already gone
                c.proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
