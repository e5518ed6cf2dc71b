"""Saving the forward's linear-branch row states for the backward, or recomputing them:
time and memory on a GPU (``SLA_NUMBA_SAVE_STATES``, docs/internals.md "Reusing the
forward's row states").

Usage (one H200; ~30-60 s with a warm Numba cache)::

    PYTHONPATH=. python tools/bench_reuse.py [--shapes wan b2] [--reps 20] [--json out.json]

For each shape (Wan2.1: B1 H12 N32760 D128; B2 H16 N8192 D64), bf16, topk 0.05, skip
0.10, 64 x 64 blocks, a fixed block map (classified once, outside the timings), through
the public ``sla_numba.sla_attention`` with q, k, v requiring grad, with the switch 0
(recompute) and 1 (save):

* ``fwd_bwd_ms``: forward + backward (``o.backward(do)``), median of ``--reps`` calls,
  each between two CUDA events (after 2 untimed calls);
* ``fwd_ms``: the forward alone (grad enabled, so with 1 it does write and keep the
  states; the graph is dropped after each call);
* ``held_mib``: memory the forward's graph holds until the backward (allocated after the
  forward minus before: q, k, v are the caller's), i.e. the per-layer activation cost;
* ``peak_mib``: peak allocated during one forward + backward above what was allocated
  before (``torch.cuda.reset_peak_memory_stats`` before each);
* ``bwd_stages_ms``: the backward's stages (``gpu/_stages.record_stages``; CUDA events
  between the backend's launches), mean of 5 calls: with 1 the "bwd marginal sum (rows)"
  stage is gone and "bwd prep" has no states kernel;
* ``same_bits``: whether dq, dk, dv with 1 equal those with 0 bit for bit.

Ratios (save / recompute) are printed per shape; every figure comes from this run.
"""

import argparse
import json
import os
import sys

import torch
from cuda_timing import cuda_time  # tools/: median of CUDA-event pairs, one untimed call

SHAPES = {
    "wan": dict(B=1, H=12, N=32760, D=128),
    "b2": dict(B=2, H=16, N=8192, D=64),
}
BLOCK, TOPK, SKIP = 64, 0.05, 0.10
VAR = "SLA_NUMBA_SAVE_STATES"


def run_shape(name, reps):
    import sla_numba
    from sla_numba.gpu._stages import record_stages

    s = SHAPES[name]
    B, H, N, D = s["B"], s["H"], s["N"], s["D"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, H, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    do = torch.randn(B, H, N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    kw = dict(block_q=BLOCK, block_k=BLOCK, backend="gpu")
    with torch.no_grad():
        bm = sla_numba.classify_blocks(q.detach(), k.detach(), topk=TOPK, skip=SKIP, **kw).map
    kw["block_map"] = bm

    def fwd():
        return sla_numba.sla_attention(q, k, v, **kw)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fwd().backward(do)

    out = {}
    for save in ("0", "1"):
        os.environ[VAR] = save
        r = out[save] = {}
        fwd_bwd()  # first call (compiles if the cache is cold)
        grads = [t.grad.clone() for t in (q, k, v)]
        r["fwd_bwd_ms"] = cuda_time(fwd_bwd, reps)
        r["fwd_ms"] = cuda_time(fwd, reps)
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        o = fwd()
        torch.cuda.synchronize()
        r["held_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
        del o
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        r["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        stages, n = {}, 5
        for _ in range(n):  # the backward's stages, mean of n calls (forward not recorded)
            o = fwd()
            with record_stages(stages):
                o.backward(do)
        r["bwd_stages_ms"] = {k2: round(v2 / n, 4) for k2, v2 in stages.items()}
        r["grads"] = grads
    same = all(torch.equal(a, b) for a, b in zip(out["0"].pop("grads"), out["1"].pop("grads")))
    out["same_bits"] = same
    mq = -(-N // BLOCK)
    out["row_states_mib"] = B * H * mq * (D * D + D) * 4 / 2**20
    out["shape"] = dict(s, dtype="bf16", topk=TOPK, skip=SKIP, block=BLOCK)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_reuse: needs a CUDA GPU")
    old = os.environ.get(VAR)
    results = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        shapes={},
    )
    try:
        for name in args.shapes:
            r = results["shapes"][name] = run_shape(name, args.reps)
            off, on = r["0"], r["1"]
            print(f"{name} {r['shape']}  row states {r['row_states_mib']:.1f} MiB (fp32)")
            for key in ("fwd_bwd_ms", "fwd_ms", "held_mib", "peak_mib"):
                ratio = on[key] / off[key] if off[key] else float("nan")
                print(
                    f"  {key:11s} recompute {off[key]:10.3f}  save {on[key]:10.3f}"
                    f"  save/recompute {ratio:.3f}"
                )
            print(f"  backward stages, recompute: {off['bwd_stages_ms']}")
            print(f"  backward stages, save:      {on['bwd_stages_ms']}")
            print(f"  dq, dk, dv the same bits: {r['same_bits']}")
    finally:
        if old is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = old
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
