"""Benchmark SLA on the GPU against torch SDPA and FlexAttention, in one run.

Usage (one H200):
    PYTHONPATH=. python benchmarks/bench_gpu.py                 # full table + bench_gpu.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick         # shape b2, topk 0.05, few reps
    PYTHONPATH=. python benchmarks/bench_gpu.py --shapes b2 --topk 0.05 --no-backward

Cases: Wan2.1-1.3B attention (B=1, H=12, N=32760, D=128) and B=2, H=16, N=8192, D=64;
topk 0.05 and 0.10 with skip 0.10; block 64 x 64.
For each: SLA end to end through the public ``sla_numba.sla_attention`` (classification
included; backend="gpu", torch CUDA tensors, bf16 and fp32 inputs; the kernel path the
GPU backend takes -- "tc" tensor cores for bf16, "simt" for fp32, see
``sla_numba.gpu.select_path`` -- is a column), torch SDPA fp32 and bf16 with each
backend forced explicitly (``torch.nn.attention.sdpa_kernel``: cuDNN, flash,
efficient; a backend that refuses a dtype is an error row), and FlexAttention
(``torch.compile``-d) with a BlockMask equal to SLA's critical blocks (so it does the
sparse branch only: SLA's extra work is the linear branch). For bf16 SLA also a
per-stage breakdown (CUDA events between the backend's launches: classify,
prep+totals, tc sparse, linear; backward likewise; "glue" = torch work in between).
Reported: ms (median over blocks of calls, torch.utils.benchmark; iqr_ms, runs), dense-equivalent TFLOP/s
(4·B·H·Nq·Nk·D forward, 2.5x that for the backward, so fwd+bwd = 3.5x), speedup
vs SDPA bf16 (best backend) and vs SDPA fp32, peak memory, first-call time (JIT).
"""

import argparse
import json
import math
import time

import torch

SHAPES = {
    "wan": dict(B=1, H=12, N=32760, D=128),
    "b2": dict(B=2, H=16, N=8192, D=64),
}
BLOCK = 64


# --------------------------------------------------------------------------- timing
def cuda_time(fn, warmup, reps):
    """(median ms, IQR ms, timed calls) of ``fn()`` after ``warmup`` calls.

    ``torch.utils.benchmark.Timer.blocked_autorange``: it times blocks of calls with
    ``torch.cuda.synchronize()`` before and after each block (wall clock, so launch
    and host-side glue count, as they do for a user) and reports the median and IQR
    over blocks. The block size is picked by the library; ``min_run_time`` is set
    so that at least about ``reps`` calls are timed. Chosen over a per-call pair of
    CUDA events (the previous timer) so the timing method is a maintained, documented
    one and the spread (IQR) is reported beside the median; the per-stage breakdown
    below still uses CUDA events, which is what splitting one call needs.
    """
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=max(reps * one, 0.05)
    )
    return 1e3 * m.median, 1e3 * m.iqr, len(m.times) * m.number_per_run


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
        ms, iqr_ms, runs = cuda_time(fn, warmup, reps)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return dict(first_s=first, ms=ms, iqr_ms=iqr_ms, runs=runs, peak_mib=peak)
    except Exception as err:  # noqa: BLE001 - an unsupported backend is a table entry
        torch.cuda.synchronize()
        return dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")


# --------------------------------------------------------------------------- contenders
def sla_callables(q, k, v, do, topk, skip):
    """(forward, forward+backward, kernel path) for ``sla_numba.sla_attention``."""
    from sla_numba import gpu, sla_attention

    def fwd():
        with torch.no_grad():
            return sla_attention(
                q, k, v, topk=topk, skip=skip, block_q=BLOCK, block_k=BLOCK, backend="gpu"
            )

    def fwd_bwd():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        o = sla_attention(
            qq, kk, vv, topk=topk, skip=skip, block_q=BLOCK, block_k=BLOCK, backend="gpu"
        )
        o.backward(do)

    path = gpu.select_path(q.dtype, q.shape[-1], BLOCK, BLOCK, q.device)
    return fwd, fwd_bwd, path


def stage_breakdown(fn, warmup, reps):
    """{stage: median-free mean ms} of ``fn`` per call, from the backend's stage marks."""
    from sla_numba.gpu._stages import record_stages

    for _ in range(warmup):
        fn()
    total = {}
    for _ in range(reps):
        with record_stages(total):
            fn()
    return {name: ms / reps for name, ms in total.items()}


# --------------------------------------------------------------------------- floors
#: Which library products each stage of the tensor-core path does (the linear branch's
#: GEMM-shaped work), named as in ``cublas_floors``: the stage's floor is their sum.
STAGE_PRODUCTS = {
    "fwd prep": ["states"],
    "fwd marginal sum": ["marginal"],
    "fwd linear": ["o_l"],
    "bwd prep": ["states"],
    "bwd marginal sum (rows)": ["marginal"],
    "bwd linear dq": ["o_l", "states"],
    "bwd marginal sum (columns)": ["marginal"],
    "bwd linear dkdv": ["o_l", "o_l"],
}


def cublas_floors(B, H, N, D, dt, reps):
    """{product: median ms} of one ``torch.bmm`` in dtype ``dt`` per linear-branch
    product at this shape (block 64, M = ceil(N / 64) blocks a sequence):

    - ``states``: φ(K_j)ᵀ V_j for every key block, (BHM, D, 64) @ (BHM, 64, D); the same
      shape as the backward's QO_i = ĉᵀ dO_l;
    - ``marginal``: the block mask times every block's state, (BH, M, M) @ (BH, M, D·D + D);
    - ``o_l``: φ(Q_i) H_i for every query block, (BHM, 64, D) @ (BHM, D, D); the same shape
      as dO_l H_iᵀ, V_j dH_jᵀ and φ(K_j) dH_j.

    Timed like everything else here (:func:`cuda_time`: median, after 3 warm-up calls)."""
    M = -(-N // BLOCK)
    g = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dt)

    cases = {
        "states": lambda: (rnd(B * H * M, D, BLOCK), rnd(B * H * M, BLOCK, D)),
        "marginal": lambda: (rnd(B * H, M, M), rnd(B * H, M, D * D + D)),
        "o_l": lambda: (rnd(B * H * M, BLOCK, D), rnd(B * H * M, D, D)),
    }
    out = {}
    for name, make in cases.items():
        a, b = make()
        out[name] = cuda_time(lambda a=a, b=b: torch.bmm(a, b), 3, reps)[0]
        del a, b
    torch.cuda.empty_cache()
    return out


def floor_table(stages, floors):
    """{stage: (ms, floor ms, ratio)} for the stages that have a library floor."""
    table = {}
    for name, ms in stages.items():
        prods = STAGE_PRODUCTS.get(name)
        if prods and all(p in floors for p in prods):
            fl = sum(floors[p] for p in prods)
            table[name] = (ms, fl, ms / fl)
    return table


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


#: FlexAttention's own tiles must divide the BlockMask's blocks (its H100/H200 default
#: BLOCK_M is 128, so a 64 x 64 mask is refused without these).
FLEX_FWD_OPTIONS = {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK}


def flex_callables(q, k, v, do, crit):
    """FlexAttention with a BlockMask of SLA's critical blocks (block_q x block_k = 64 x 64).

    The BlockMask is built from the block lists directly (``BlockMask.from_kv_blocks``,
    every critical block a "full" block, so no per-element mask work in the kernel;
    ``create_block_mask`` would evaluate the mask densely: 96 GiB at N = 32760). The
    mask_mod says the same thing element-wise (Flex uses it off the fast path). The
    forward runs with 64 x 64 tiles (``kernel_options``) so that each mask block is one
    tile. The backward keeps Flex's own configuration: on sm90 its default tiles
    (64, 128, 128, 64) do not divide 64 x 64 mask blocks, which Flex refuses: an error
    row, not a number."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    N = q.shape[2]
    cmap = crit == 1
    # critical blocks first (ascending), then the rest: the first count entries are used
    order = torch.argsort((~cmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    count = cmap.sum(-1).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return cmap[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    mask = BlockMask.from_kv_blocks(
        torch.zeros_like(count),
        order,
        count,
        order,
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(N, k.shape[2]),
    )
    flex = torch.compile(flex_attention, dynamic=False)

    def fwd():
        with torch.no_grad():
            return flex(q, k, v, block_mask=mask, kernel_options=FLEX_FWD_OPTIONS)

    def fwd_bwd():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        flex(qq, kk, vv, block_mask=mask).backward(do)

    return fwd, fwd_bwd


# --------------------------------------------------------------------------- driver
def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def run_case(shape_name, topk, skip, args):
    s = SHAPES[shape_name]
    B, H, N, D = s["B"], s["H"], s["N"], s["D"]
    flops_f = 4.0 * B * H * N * N * D
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(B, H, N, D, device="cuda", generator=g) for _ in range(4)]
    rows = []

    def add(name, dtype, phase, res, flops):
        row = dict(
            shape=shape_name,
            B=B,
            H=H,
            N=N,
            D=D,
            topk=topk,
            skip=skip,
            impl=name,
            dtype=dtype,
            phase=phase,
            **res,
        )
        if "ms" in res:
            row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
        rows.append(row)
        print(_fmt(row), flush=True)

    floors = {}  # dtype name -> {product: ms}
    phases = [("fwd", 1.0)] + ([] if args.no_backward else [("fwd+bwd", 3.5)])
    flex_phases = phases[:1] if args.quick else phases
    for dt_name in args.dtypes:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dt_name]
        q, k, v, do = (x.to(dt) for x in base)
        # SLA, end to end through the public API
        f, fb, path = sla_callables(q, k, v, do, topk, skip)
        for (phase, mult), fn in zip(phases, (f, fb)):
            res = measure(fn, args.warmup, args.reps)
            res["path"] = path
            add("sla_attention", dt_name, phase, res, flops_f * mult)
            if "ms" in res and not args.no_stages:
                st = stage_breakdown(fn, 1, args.reps)
                res_st = dict(path=path, ms=sum(st.values()), stages=st)
                add("sla stages", dt_name, phase, res_st, flops_f * mult)
                if path == "tc" and dt_name != "fp32":
                    try:
                        if dt_name not in floors:
                            floors[dt_name] = cublas_floors(B, H, N, D, dt, max(args.reps, 10))
                        ft = floor_table(st, floors[dt_name])
                        res_fl = dict(path=path, ms=sum(v[0] for v in ft.values()), floors=ft)
                    except Exception as err:  # noqa: BLE001 - a failed floor is a table entry
                        res_fl = dict(error=f"{type(err).__name__}: {str(err)[:100]}")
                    add("sla vs cublas", dt_name, phase, res_fl, flops_f * mult)
        # SDPA, each backend forced
        for bname, backend in sdpa_backends().items():
            f, fb = sdpa_callables(q, k, v, do, backend)
            for (phase, mult), fn in zip(phases, (f, fb)):
                add(
                    f"sdpa[{bname}]",
                    dt_name,
                    phase,
                    measure(fn, args.warmup, args.reps),
                    flops_f * mult,
                )
        # FlexAttention with SLA's critical blocks
        if not args.no_flex and not (args.quick and dt_name != "bf16"):
            try:
                crit = critical_map(q, k, topk, skip)
                f, fb = flex_callables(q, k, v, do, crit)
                for (phase, mult), fn in zip(flex_phases, (f, fb)):
                    add(
                        "flex[critical]",
                        dt_name,
                        phase,
                        measure(fn, args.warmup, args.reps),
                        flops_f * mult,
                    )
            except Exception as err:  # noqa: BLE001
                add("flex[critical]", dt_name, "fwd", dict(error=str(err)[:120]), flops_f)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def _fmt(r):
    head = (
        f"{r['shape']:4s} topk={r['topk']:.2f} {r['impl']:16s} {r.get('path', ''):5s} "
        f"{r['dtype']:5s} {r['phase']:8s}"
    )
    if "error" in r:
        return head + f"  -- {r['error']}"
    if "floors" in r:
        return (
            head
            + "  stage ms / cuBLAS bmm floor ms (ratio): "
            + ", ".join(f"{k} {a:.3f}/{b:.3f} ({c:.1f}x)" for k, (a, b, c) in r["floors"].items())
        )
    if "stages" in r:
        return (
            head
            + f" {r['ms']:9.2f} ms  "
            + ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items())
        )
    return head + (
        f" {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s "
        f"peak {r['peak_mib']:8.0f} MiB  first {r['first_s']:6.1f} s"
    )


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
    ap.add_argument(
        "--quick",
        action="store_true",
        help="shape b2, topk 0.05, bf16 + fp32, 2 warmup / 5 reps, flex bf16 fwd only",
    )
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--topk", nargs="+", type=float, default=[0.05, 0.10])
    ap.add_argument("--skip", type=float, default=0.10)
    ap.add_argument(
        "--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"]
    )
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default="bench_gpu.json")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.topk = ["b2"], [0.05]
        args.dtypes, args.warmup, args.reps = ["bf16", "fp32"], 2, 5
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []

    def save(complete):
        """The JSON so far: written after every case, so a run cut short keeps its rows."""
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    device=torch.cuda.get_device_name(),
                    torch=torch.__version__,
                    complete=complete,
                    rows=rows,
                ),
                f,
                indent=1,
            )

    for shape in args.shapes:
        for topk in args.topk:
            rows += run_case(shape, topk, args.skip, args)
            add_speedups(rows)
            save(False)
    add_speedups(rows)
    print("\nspeedups (SLA rows) vs SDPA bf16 best backend / vs SDPA fp32 best backend:")
    for r in rows:
        if r["impl"].startswith(("sla_attention", "flex")) and "ms" in r:
            print(
                f"  {r['shape']:4s} topk={r['topk']:.2f} {r['impl']:16s} {r.get('path', ''):5s} "
                f"{r['dtype']:5s} "
                f"{r['phase']:8s} x{r.get('speedup_vs_sdpa_bf16', float('nan')):6.2f} "
                f"/ x{r.get('speedup_vs_sdpa_fp32', float('nan')):6.2f}"
            )
    save(True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
