"""Benchmark SLA on the GPU against torch SDPA and FlexAttention, in one run.

Usage (one H200):
    PYTHONPATH=. python benchmarks/bench_gpu.py                 # full table + bench_gpu.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick         # one shape, forward only, few reps
    PYTHONPATH=. python benchmarks/bench_gpu.py --shapes b2 --topk 0.05 --no-backward

Cases: Wan2.1-1.3B attention (B=1, H=12, N=32760, D=128) and B=2, H=16, N=8192, D=64;
topk 0.05 and 0.10 with skip 0.10; block 64 x 64.
For each: SLA (``sla_numba.sla_attention``, backend="gpu", torch CUDA tensors, bf16
and fp32 inputs), torch SDPA fp32 and bf16 with each backend forced explicitly
(``torch.nn.attention.sdpa_kernel``: cuDNN, flash, efficient), and FlexAttention
(``torch.compile``-d) with a BlockMask equal to SLA's critical blocks (so it does the
sparse branch only: SLA's extra work is the linear branch).
Reported: ms (median of CUDA-event timings), dense-equivalent TFLOP/s
(4·B·H·Nq·Nk·D forward, 2.5x that for the backward, so fwd+bwd = 3.5x), speedup
vs SDPA bf16 (best backend) and vs SDPA fp32, peak memory, first-call time (JIT).
"""
import argparse
import json
import math
import statistics
import time

import torch

SHAPES = {
    "wan": dict(B=1, H=12, N=32760, D=128),
    "b2": dict(B=2, H=16, N=8192, D=64),
}
BLOCK = 64


# --------------------------------------------------------------------------- timing
def cuda_time(fn, warmup, reps):
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events), after warmup."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(fn, warmup, reps):
    """(first-call seconds, median ms, peak MiB) or an error string."""
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = cuda_time(fn, warmup, reps)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return dict(first_s=first, ms=ms, peak_mib=peak)
    except Exception as err:  # noqa: BLE001 - an unsupported backend is a table entry
        torch.cuda.synchronize()
        return dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")


# --------------------------------------------------------------------------- contenders
def sla_callables(q, k, v, do, topk, skip):
    """(forward, forward+backward) closures for SLA on the GPU backend."""
    try:
        from sla_numba import sla_attention

        def fwd():
            with torch.no_grad():
                return sla_attention(q, k, v, topk=topk, skip=skip, block_q=BLOCK,
                                     block_k=BLOCK, backend="gpu")

        def fwd_bwd():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            o = sla_attention(qq, kk, vv, topk=topk, skip=skip, block_q=BLOCK,
                              block_k=BLOCK, backend="gpu")
            o.backward(do)
        return fwd, fwd_bwd, "sla_numba.sla_attention"
    except ImportError:
        # TODO(lead): remove once the public API is importable; calls the backend directly.
        from sla_numba import _params, gpu
        mk = _params.n_blocks(k.shape[2], BLOCK)
        n_crit, n_skip = _params.block_counts(mk, topk, skip)
        scale = 1.0 / math.sqrt(q.shape[-1])

        def fwd():
            m = gpu.classify(q, k, n_crit, n_skip, BLOCK, BLOCK, scale)
            o_s, o_l, _ = gpu.forward(q, k, v, m, BLOCK, BLOCK, scale, 0, 1e-6)
            return o_s + o_l

        def fwd_bwd():
            m = gpu.classify(q, k, n_crit, n_skip, BLOCK, BLOCK, scale)
            o_s, o_l, lse = gpu.forward(q, k, v, m, BLOCK, BLOCK, scale, 0, 1e-6)
            gpu.backward(q, k, v, o_s, o_l, lse, do, do, m, BLOCK, BLOCK, scale, 0, 1e-6)
        return fwd, fwd_bwd, "sla_numba.gpu (backend direct)"


def critical_map(q, k, topk, skip):
    from sla_numba import _params, gpu
    mk = _params.n_blocks(k.shape[2], BLOCK)
    n_crit, n_skip = _params.block_counts(mk, topk, skip)
    return gpu.classify(q, k, n_crit, n_skip, BLOCK, BLOCK, 1.0 / math.sqrt(q.shape[-1]))


def sdpa_callables(q, k, v, do, backend):
    from torch.nn.attention import sdpa_kernel
    F = torch.nn.functional

    def fwd():
        with torch.no_grad(), sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    def fwd_bwd():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(qq, kk, vv)
        o.backward(do)
    return fwd, fwd_bwd


def flex_callables(q, k, v, do, crit):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, N = q.shape[0], q.shape[1], q.shape[2]
    cmap = (crit == 1)

    def mask_mod(b, h, q_idx, kv_idx):
        return cmap[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    mask = create_block_mask(mask_mod, B, H, N, k.shape[2], device=q.device,
                             BLOCK_SIZE=(BLOCK, BLOCK))
    flex = torch.compile(flex_attention, dynamic=False)

    def fwd():
        with torch.no_grad():
            return flex(q, k, v, block_mask=mask)

    def fwd_bwd():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        flex(qq, kk, vv, block_mask=mask).backward(do)
    return fwd, fwd_bwd


# --------------------------------------------------------------------------- driver
def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def run_case(shape_name, topk, skip, args):
    s = SHAPES[shape_name]
    B, H, N, D = s["B"], s["H"], s["N"], s["D"]
    flops_f = 4.0 * B * H * N * N * D
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(B, H, N, D, device="cuda", generator=g) for _ in range(4)]
    rows = []

    def add(name, dtype, phase, res, flops):
        row = dict(shape=shape_name, B=B, H=H, N=N, D=D, topk=topk, skip=skip,
                   impl=name, dtype=dtype, phase=phase, **res)
        if "ms" in res:
            row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
        rows.append(row)
        print(_fmt(row), flush=True)

    phases = [("fwd", 1.0)] + ([] if args.no_backward else [("fwd+bwd", 3.5)])
    for dt_name in args.dtypes:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dt_name]
        q, k, v, do = (x.to(dt) for x in base)
        # SLA
        f, fb, label = sla_callables(q, k, v, do, topk, skip)
        for (phase, mult), fn in zip(phases, (f, fb)):
            add("sla " + label.split()[0], dt_name, phase, measure(fn, args.warmup, args.reps),
                flops_f * mult)
        # SDPA, each backend forced
        for bname, backend in sdpa_backends().items():
            f, fb = sdpa_callables(q, k, v, do, backend)
            for (phase, mult), fn in zip(phases, (f, fb)):
                add(f"sdpa[{bname}]", dt_name, phase, measure(fn, args.warmup, args.reps),
                    flops_f * mult)
        # FlexAttention with SLA's critical blocks
        if not args.no_flex:
            try:
                crit = critical_map(q, k, topk, skip)
                f, fb = flex_callables(q, k, v, do, crit)
                for (phase, mult), fn in zip(phases, (f, fb)):
                    add("flex[critical]", dt_name, phase, measure(fn, args.warmup, args.reps),
                        flops_f * mult)
            except Exception as err:  # noqa: BLE001
                add("flex[critical]", dt_name, "fwd", dict(error=str(err)[:120]), flops_f)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def _fmt(r):
    head = (f"{r['shape']:4s} topk={r['topk']:.2f} {r['impl']:22s} {r['dtype']:5s} "
            f"{r['phase']:8s}")
    if "error" in r:
        return head + f"  -- {r['error']}"
    return head + (f" {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s "
                   f"peak {r['peak_mib']:8.0f} MiB  first {r['first_s']:6.1f} s")


def add_speedups(rows):
    """speedup_vs_sdpa_bf16 (best backend) and speedup_vs_sdpa_fp32 per row."""
    best = {}
    for r in rows:
        if "ms" in r and r["impl"].startswith("sdpa"):
            key = (r["shape"], r["topk"], r["phase"], r["dtype"])
            best[key] = min(best.get(key, math.inf), r["ms"])
    for r in rows:
        if "ms" not in r:
            continue
        for ref in ("bf16", "fp32"):
            b = best.get((r["shape"], r["topk"], r["phase"], ref))
            if b:
                r[f"speedup_vs_sdpa_{ref}"] = b / r["ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="shape b2, topk 0.05, forward only, bf16, 2 warmup / 5 reps")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--topk", nargs="+", type=float, default=[0.05, 0.10])
    ap.add_argument("--skip", type=float, default=0.10)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default="bench_gpu.json")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.topk, args.no_backward = ["b2"], [0.05], True
        args.dtypes, args.warmup, args.reps = ["bf16"], 2, 5
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for shape in args.shapes:
        for topk in args.topk:
            rows += run_case(shape, topk, args.skip, args)
    add_speedups(rows)
    print("\nspeedups (SLA rows) vs SDPA bf16 best backend / vs SDPA fp32 best backend:")
    for r in rows:
        if r["impl"].startswith(("sla", "flex")) and "ms" in r:
            print(f"  {r['shape']:4s} topk={r['topk']:.2f} {r['impl']:22s} {r['dtype']:5s} "
                  f"{r['phase']:8s} x{r.get('speedup_vs_sdpa_bf16', float('nan')):6.2f} "
                  f"/ x{r.get('speedup_vs_sdpa_fp32', float('nan')):6.2f}")
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       rows=rows), f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
