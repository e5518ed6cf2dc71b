"""How long a new user waits: the first SLA call of a fresh process, cold and warm cache.

Runs each case in a NEW Python process (so nothing is compiled or imported yet):
  cold  -- an empty Numba cache (``NUMBA_CACHE_DIR`` pointed at a new temporary
           folder): what a user sees on a fresh machine;
  warm  -- the same folders again, now filled by the cold run: a new process later.
In each process it times, with the GPU synchronised: ``import sla_numba``, the first
forward (classification included), the first backward, and a second forward (the
steady state, for scale). Wan2.1 attention shape by default (B1 H12 N32760 D128,
bf16, topk 0.05, skip 0.10, block 64).

    PYTHONPATH=. python tools/first_call.py [--shape 1,12,32760,128] [--dtype bf16]
        [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter() - t0
t0 = time.perf_counter()
import sla_numba
t_import = time.perf_counter() - t0
from sla_numba.gpu import _precompile as _ahead  # what the first calls compiled ahead
B, H, N, D = (int(x) for x in sys.argv[1].split(","))
dtype = getattr(torch, {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[sys.argv[2]])
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g).requires_grad_()
           for _ in range(3))
kw = dict(topk=0.05, skip=0.10, block_q=64, block_k=64)

def sync():
    if dev == "cuda":
        torch.cuda.synchronize()

import os
prof = None
if os.environ.get("FIRST_CALL_PROFILE"):
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
sync(); t0 = time.perf_counter()
o = sla_numba.sla_attention(q, k, v, **kw)
sync(); t_fwd = time.perf_counter() - t0
ahead_fwd = dict(_ahead.last)
t0 = time.perf_counter()
o.float().square().sum().backward()
sync(); t_bwd = time.perf_counter() - t0
ahead_bwd = dict(_ahead.last)
if prof is not None:
    prof.disable()
    prof.dump_stats(os.environ["FIRST_CALL_PROFILE"])
t0 = time.perf_counter()
sla_numba.sla_attention(q, k, v, **kw)
sync(); t_fwd2 = time.perf_counter() - t0
print(json.dumps(dict(torch_import_s=t_torch, import_s=t_import, first_forward_s=t_fwd,
                      first_backward_s=t_bwd, second_forward_s=t_fwd2,
                      ahead_forward=ahead_fwd, ahead_backward=ahead_bwd,
                      path=sla_numba.kernel_path(q))))
"""


def run_child(shape, dtype, cache, profile=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(cache, "numba"), PYTHONUNBUFFERED="1")
    if profile:
        env["FIRST_CALL_PROFILE"] = profile
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, shape, dtype],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    # the package's compile notices (logger "sla_numba") and, with NUMBA_DEBUG_CACHE=1,
    # Numba's cache misses: what the process compiled instead of loading
    res["stderr_notes"] = [
        ln
        for ln in out.stderr.splitlines()
        if "compiling" in ln or "ready in" in ln or "[cache]" in ln and "index" not in ln
    ][:80]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1,12,32760,128", help="B,H,N,D")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="then run a cold and a warm process again under cProfile (first forward + "
        "backward), write their stats to DIR and print the top functions",
    )
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="sla_first_call_")
    results = {}
    for case in ("cold", "warm"):
        r = results[case] = run_child(args.shape, args.dtype, cache)
        print(
            f"{case:5s} cache: import sla_numba {r['import_s']:.2f} s, first forward "
            f"{r['first_forward_s']:.2f} s, first backward {r['first_backward_s']:.2f} s "
            f"(forward+backward {r['first_forward_s'] + r['first_backward_s']:.2f} s), "
            f"second forward {r['second_forward_s'] * 1e3:.1f} ms; path {r['path']}; "
            f"whole process {r['process_wall_s']:.1f} s",
            flush=True,
        )
        for line in r["stderr_notes"]:
            print("   ", line[:200])
        for stage in ("forward", "backward"):
            print(f"    compiled ahead ({stage}): {r.get('ahead_' + stage)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, dtype=args.dtype, **results), f, indent=1)
    if args.profile:
        import pstats

        os.makedirs(args.profile, exist_ok=True)
        cache = tempfile.mkdtemp(prefix="sla_first_call_prof_")
        for case in ("cold", "warm"):
            path = os.path.join(args.profile, f"first_call_{case}.prof")
            r = run_child(args.shape, args.dtype, cache, profile=path)
            print(
                f"--- {case} process under cProfile: forward {r['first_forward_s']:.2f} s, "
                f"backward {r['first_backward_s']:.2f} s"
            )
            for key in ("cumulative", "tottime"):
                pstats.Stats(path).sort_stats(key).print_stats(35)


if __name__ == "__main__":
    main()
