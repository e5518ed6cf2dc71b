"""Old against new: the three tensor-core linear-branch kernels of two package trees.

Usage (H200, from the project root)::

    python tools/compare_tc_linear.py --old /path/to/old/tree --new .
    python tools/compare_tc_linear.py --old /path/to/old/tree --new . --sim   # logic check

Each tree is a folder holding ``sla_numba/`` (e.g. ``git worktree add /tmp/old <commit>``).
Every measurement runs in subprocesses with that folder first on ``sys.path``:

1. compile: for each tree (old and new side by side), a fresh process with empty
   temporary ``NUMBA_CACHE_DIR`` and ``SLA_NUMBA_CACHE_DIR`` times the first call
   (compile + launch + synchronize) of ``launch_states_tc``, ``launch_marginal_sum_tc``,
   ``launch_linear_forward_tc`` on a small problem of the Wan configuration (bf16,
   D = 128, block 64), in that order; a second fresh process with the same folders
   times them again (disk-cache hits should make those far shorter).
2. time: one long-lived worker per tree builds the Wan-shape inputs (B 1, H 12,
   N 32760, D 128, bf16, block 64, a random block map with 5 % critical and 10 %
   negligible blocks; same seed, so both trees get identical inputs), then the parent
   asks old and new in turn (interleaved rounds) for the mean time of ``--reps``
   launches of each kernel; the median over ``--rounds`` rounds is printed, with the
   ratio new / old and the cuBLAS floor of the same product (``torch.bmm`` bf16, same
   shapes; the tensor-core kernels do two or three bf16 products for the hi / lo split,
   the floor one).
3. diff: both workers save their outputs; the max abs difference old vs new per kernel.

The kernels (see their module docs): states ``h_j = φ(K_j)ᵀ V_j`` (B*H*Mk products of
(D x BK)(BK x D)), marginal ``out = M·S`` (B*H products of (Mq x Mk)(Mk x D*D + D)),
linear ``φ(Q_i) H_i`` (B*H*Mq products of (BQ x D)(D x D)). φ = softmax (fm 0).

``--sim``: NUMBA_ENABLE_CUDASIM=1 in the workers, tiny shapes (B 1, H 2, N 40, D 16,
block 16), CPU torch for the floor: checks this script's logic, not speed.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

KERNELS = ("states", "marginal", "linear")
PROTO = "@@"  # prefix of a worker's protocol lines on stdout


# ---------------------------------------------------------------------------
# Problem (built identically in every worker)
# ---------------------------------------------------------------------------


def shape(sim, small=False):
    if sim:
        return dict(B=1, H=2, N=40, D=16, block=16)
    if small:
        return dict(B=1, H=1, N=300, D=128, block=64)
    return dict(B=1, H=12, N=32760, D=128, block=64)


def build_problem(sim, small=False):
    """Inputs and outputs of the three kernels (torch tensors; CUDA unless ``sim``)."""
    import torch

    S = shape(sim, small)
    B, H, N, D, bs = S["B"], S["H"], S["N"], S["D"], S["block"]
    dev = "cpu" if sim else "cuda"
    g = torch.Generator(device=dev).manual_seed(1234)
    M = -(-N // bs)
    W = D * D + D
    q, k, v = (
        torch.randn(B, H, N, D, generator=g, device=dev).to(torch.bfloat16) for _ in range(3)
    )
    u = torch.rand(B, H, M, M, generator=g, device=dev)
    bmap = torch.zeros(B, H, M, M, dtype=torch.int8, device=dev)
    bmap[u < 0.05] = 1  # critical
    bmap[(u >= 0.05) & (u < 0.15)] = -1  # negligible; the rest marginal
    states_in = torch.randn(B, H, M, W, generator=g, device=dev)
    lstate = torch.randn(B, H, M, W, generator=g, device=dev)
    lstate[..., D * D :] = torch.rand(B, H, M, D, generator=g, device=dev) * 50 + 1  # Z > 0
    n_marg = (bmap == 0).sum(dim=3, dtype=torch.int32).contiguous()
    nan = float("nan")
    return dict(
        S=S,
        M=M,
        W=W,
        q=q,
        k=k,
        v=v,
        bmap=bmap,
        states_in=states_in,
        lstate=lstate,
        n_marg=n_marg,
        state=torch.full((B, H, M, W), nan, device=dev),
        marg=torch.full((B, H, M, W), nan, device=dev),
        o_l=torch.full((B, H, N, D), nan, device=dev),
    )


def launchers(P, sim):
    """name -> zero-argument launch of that kernel on P's arrays (the package's API)."""
    import torch

    from sla_numba.gpu.tc.linear import launch_linear_forward_tc
    from sla_numba.gpu.tc.marginal import launch_marginal_sum_tc
    from sla_numba.gpu.tc.states import launch_states_tc

    if sim:

        def arr(t):
            return t.numpy()
    else:
        from numba import cuda

        def arr(t):
            return cuda.as_cuda_array(t)

    S = P["S"]
    B, H, N, D, bs = S["B"], S["H"], S["N"], S["D"], S["block"]
    bits = {n: arr(P[n].view(torch.int16)) for n in ("q", "k", "v")}
    a = {n: arr(P[n]) for n in ("bmap", "states_in", "lstate", "n_marg", "state", "marg", "o_l")}
    M = P["M"]
    return {
        "states": lambda: launch_states_tc(
            "bf16", bits["k"], bits["v"], a["state"], B, H, N, D, bs, 0, 0
        ),
        "marginal": lambda: launch_marginal_sum_tc(
            0, a["bmap"], False, M, M, a["states_in"], a["marg"]
        ),
        "linear": lambda: launch_linear_forward_tc(
            "bf16", bits["q"], a["lstate"], a["n_marg"], a["o_l"], B, H, N, D, bs, 0, 1e-6, 0
        ),
    }


OUTPUT = {"states": "state", "marginal": "marg", "linear": "o_l"}


# ---------------------------------------------------------------------------
# Workers (run in subprocesses: ``--worker MODE`` with the tree first on sys.path)
# ---------------------------------------------------------------------------


def _sync(sim):
    if not sim:
        from numba import cuda

        cuda.synchronize()


def _say(obj):
    print(PROTO + json.dumps(obj), flush=True)


def worker_compile(sim):
    """First-call time of each kernel (compile + launch + sync), small problem."""
    P = build_problem(sim, small=True)
    L = launchers(P, sim)
    _sync(sim)
    out = {}
    for name in KERNELS:
        t0 = time.perf_counter()
        L[name]()
        _sync(sim)
        out[name] = time.perf_counter() - t0
    _say(out)


def worker_time(sim, outdir):
    """Serve ``time NAME REPS`` / ``save`` / ``quit`` requests on stdin."""
    import torch

    P = build_problem(sim)
    L = launchers(P, sim)
    for name in KERNELS:  # compile (or load) and warm up
        L[name]()
    _sync(sim)
    _say({"ready": True})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "time":
            name, reps = cmd[1], int(cmd[2])
            _sync(sim)
            t0 = time.perf_counter()
            for _ in range(reps):
                L[name]()
            _sync(sim)
            _say({"ms": (time.perf_counter() - t0) * 1e3 / reps})
        elif cmd[0] == "save":
            for name in KERNELS:
                torch.save(P[OUTPUT[name]].cpu(), os.path.join(outdir, name + ".pt"))
            _say({"saved": True})


def worker_floor(sim, reps):
    """cuBLAS (torch.bmm, bf16) time of each kernel's product at the same shapes."""
    import torch

    S = shape(sim)
    B, H, N, D, bs = S["B"], S["H"], S["N"], S["D"], S["block"]
    M = -(-N // bs)
    W = D * D + D
    dev = "cpu" if sim else "cuda"
    dt = torch.float32 if sim else torch.bfloat16  # CPU bf16 bmm: slow and beside the point
    z = lambda *s: torch.randn(*s, device=dev).to(dt)  # noqa: E731
    prods = {
        "states": (z(B * H * M, D, bs), z(B * H * M, bs, D)),
        "marginal": (z(B * H, M, M), z(B * H, M, W)),
        "linear": (z(B * H * M, bs, D), z(B * H * M, D, D)),
    }
    out = {}
    for name, (x, y) in prods.items():
        torch.bmm(x, y)
        _sync_torch(sim)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.bmm(x, y)
        _sync_torch(sim)
        out[name] = (time.perf_counter() - t0) * 1e3 / reps
    _say(out)


def _sync_torch(sim):
    if not sim:
        import torch

        torch.cuda.synchronize()


def worker_main(args):
    tree = os.path.abspath(args.tree)
    sys.path.insert(0, tree)
    import sla_numba

    if not os.path.abspath(sla_numba.__file__).startswith(tree + os.sep):
        raise SystemExit(f"sla_numba imported from {sla_numba.__file__}, not from {tree}")
    if args.worker == "compile":
        worker_compile(args.sim)
    elif args.worker == "time":
        worker_time(args.sim, args.outdir)
    else:
        worker_floor(args.sim, args.reps)


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def _env(sim, cache=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the tree comes first on sys.path, alone
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = os.path.join(cache, "numba")
        env["SLA_NUMBA_CACHE_DIR"] = os.path.join(cache, "sla")
    return env


def _cmd(args, tree, mode, **extra):
    c = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--tree",
        tree,
        "--reps",
        str(args.reps),
    ]
    if args.sim:
        c.append("--sim")
    for k, v in extra.items():
        c += ["--" + k, v]
    return c


def _protocol_line(stream):
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError("worker ended early")
        if line.startswith(PROTO):
            return json.loads(line[len(PROTO) :])


def _run_once(args, tree, mode, cache=None, timeout=300):
    r = subprocess.run(
        _cmd(args, tree, mode),
        env=_env(args.sim, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in r.stdout.splitlines():
        if line.startswith(PROTO):
            return json.loads(line[len(PROTO) :])
    raise RuntimeError(f"{mode} worker for {tree} failed:\n{r.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old")
    ap.add_argument("--new", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--sim", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-compile", action="store_true", help="no cold-compile timing")
    ap.add_argument("--worker", choices=("compile", "time", "floor"), help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if not args.old:
        ap.error("--old DIR is required")
    if args.sim:
        args.rounds, args.reps = min(args.rounds, 2), 1
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    S = shape(args.sim)
    print(f"trees: old {trees['old']}  new {trees['new']}")
    print(
        f"shape: B {S['B']} H {S['H']} N {S['N']} D {S['D']} bf16 block {S['block']}, "
        f"{'simulator' if args.sim else 'GPU'}"
    )
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="cmp_tc_linear_")
    try:
        # 1. cold compile, then the same cache folders again
        if not args.skip_compile:
            print(
                "\nfirst call (compile + launch), s: cold = empty caches, warm = a second "
                "fresh process on the same caches"
            )
            print(
                f"{'kernel':10s} {'old cold':>9s} {'old warm':>9s} {'new cold':>9s} "
                f"{'new warm':>9s}"
            )
            # old and new side by side (each compile is one thread; the GPU host has
            # cores to spare), cold first, then warm
            res = {tag: [] for tag in trees}
            for _ in ("cold", "warm"):
                with ThreadPoolExecutor(2) as pool:
                    futs = {
                        tag: pool.submit(
                            _run_once, args, tree, "compile", os.path.join(tmp, "cache_" + tag), 600
                        )
                        for tag, tree in trees.items()
                    }
                    for tag in trees:
                        res[tag].append(futs[tag].result())
            for name in KERNELS:
                print(
                    f"{name:10s} "
                    + " ".join(f"{res[t][i][name]:9.2f}" for t in trees for i in (0, 1))
                )
        # 2. interleaved timing
        procs = {}
        for tag, tree in trees.items():
            outdir = os.path.join(tmp, "out_" + tag)
            os.makedirs(outdir)
            procs[tag] = subprocess.Popen(  # on the caches step 1 filled
                _cmd(args, tree, "time", outdir=outdir),
                env=_env(args.sim, os.path.join(tmp, "cache_" + tag)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
        for tag in trees:
            _protocol_line(procs[tag].stdout)
        floor = _run_once(args, trees["new"], "floor")
        times = {tag: {n: [] for n in KERNELS} for tag in trees}
        for name in KERNELS:
            for _ in range(args.rounds):
                for tag in trees:
                    procs[tag].stdin.write(f"time {name} {args.reps}\n")
                    procs[tag].stdin.flush()
                    times[tag][name].append(_protocol_line(procs[tag].stdout)["ms"])
        # 3. outputs
        for tag in trees:
            procs[tag].stdin.write("save\n")
            procs[tag].stdin.flush()
            _protocol_line(procs[tag].stdout)
            procs[tag].stdin.write("quit\n")
            procs[tag].stdin.flush()
            procs[tag].wait(timeout=60)
        import torch

        print(
            f"\nrun time, ms (median of {args.rounds} rounds of {args.reps} launches, "
            "old and new interleaved); max |new - old| over all outputs"
        )
        print(
            f"{'kernel':10s} {'old':>9s} {'new':>9s} {'new/old':>8s} {'bmm floor':>10s} "
            f"{'max|diff|':>10s} {'max|old|':>10s}"
        )
        for name in KERNELS:
            o = torch.load(os.path.join(tmp, "out_old", name + ".pt"))
            n = torch.load(os.path.join(tmp, "out_new", name + ".pt"))
            both = torch.isfinite(o) & torch.isfinite(n)
            nan_mismatch = int((torch.isfinite(o) != torch.isfinite(n)).sum())
            diff = float((n[both].double() - o[both].double()).abs().max()) if both.any() else 0
            mo, mn = statistics.median(times["old"][name]), statistics.median(times["new"][name])
            print(
                f"{name:10s} {mo:9.3f} {mn:9.3f} {mn / mo:8.2f} {floor[name]:10.3f} "
                f"{diff:10.3e} {float(o[both].abs().max()):10.3e}"
                + (f"  ({nan_mismatch} non-finite in one only!)" if nan_mismatch else "")
            )
        print(f"\ntotal {time.time() - t_start:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
