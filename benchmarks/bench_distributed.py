"""Benchmark context-parallel SLA (Ulysses all-to-all) on P GPUs, or tiny on the CPU.

Launch with torchrun (one process per GPU; NCCL):

    # correctness on NCCL, then strong + weak scaling over groups of 1, 2, 4 GPUs
    PYTHONPATH=. torchrun --nproc_per_node 4 benchmarks/bench_distributed.py \\
        --check --sizes 1 2 4 --json bench_distributed.json
    # (H = 12: P must divide 12; on 8 GPUs use --sizes 1 2 3 4 6)
    # the wrapper's overhead on one GPU against plain sla_attention (Wan shape)
    PYTHONPATH=. torchrun --nproc_per_node 1 benchmarks/bench_distributed.py \\
        --overhead --json bench_distributed_overhead.json
    # on the CPU, tiny (gloo; without torchrun the script is a world of one)
    PYTHONPATH=. python benchmarks/bench_distributed.py --device cpu --shape tiny
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --shape tiny

Shapes: ``wan`` B=1, H=12, N=32760, D=128 (Wan2.1-1.3B attention) and ``wan2x``
N=65520 (both by default on the GPU), ``tiny`` B=1, H=4, N=510, D=32 (CPU).
bf16 on the GPU, fp32 on the CPU; topk 0.05, skip 0.10, block 64 (tiny: 32).

For every group size P in ``--sizes`` (subgroups of the first P ranks; the others wait):

* strong scaling: the shape's N split over P ranks; weak scaling: N_shape tokens per
  rank (N = P * N_shape), so P = 1 is the same case for both;
* ``ulysses``: the public ``sla_attention_ulysses`` end to end (agreement step,
  all-to-alls, local SLA); forward, and forward + backward;
* ``attention``: the local ``sla_attention`` on (B, H/P, N, D) alone (no communication);
* ``all_to_all``: the collectives alone, with their layout copies: forward = q, k, v
  to heads + O back; forward + backward adds dO to heads + dq, dk, dv back;
* ``plain`` (P = 1 only): ``sla_attention`` on the whole (B, H, N, D).

Times: median over ``--reps`` of CUDA events (perf_counter on the CPU) after
``--warmup`` calls, each rank's median, the slowest rank reported. Speedups and
efficiencies are against the ``plain`` row of the same launch.

``--overhead`` (world of one): ``plain`` vs the wrapper (a one-rank group is the
identity, so the wrapper only checks its group) and vs the full Ulysses path forced on
one rank (agreement gather, layout copies, self all-to-all), timed alternately, call by
call; target <= 3 % for the wrapper at the Wan shape.
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

SHAPES = {
    "wan": dict(B=1, H=12, N=32760, D=128),
    "wan2x": dict(B=1, H=12, N=65520, D=128),
    "tiny": dict(B=1, H=4, N=510, D=32),
}


# --------------------------------------------------------------------------- setup
def init(device):
    """Process group from torchrun's environment, or a world of one without it."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=600))
        return torch.device("cuda", local)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    return torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_call_ms(fn, device):
    """Milliseconds of one call of fn: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def timed(fns, device, warmup, reps, group):
    """{name: slowest rank's median ms} for the callables in ``fns``, run alternately."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            dist.barrier(group=group)
            times[name].append(one_call_ms(fn, device))
    med = torch.tensor(
        [statistics.median(t) for t in times.values()], dtype=torch.float64, device=device
    )
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(fns, med.tolist()))


# --------------------------------------------------------------------------- the callables
def shards(shape, n_global, size, rank, device, dtype):
    """This rank's (B, H, n_r, D) q, k, v, dO (random normal: for timing only)."""
    g = torch.Generator(device=device).manual_seed(rank)
    B, H, D = shape["B"], shape["H"], shape["D"]
    n = n_global // size + (rank < n_global % size)
    return [torch.randn(B, H, n, D, generator=g, device=device, dtype=dtype) for _ in range(4)]


def callables(q, k, v, do, group, sla):
    """{name: fn} for the Ulysses call, the local attention alone and the comm alone."""
    from sla_numba import distributed as D
    from sla_numba import sla_attention

    def ulysses_fwd():
        with torch.no_grad():
            D.sla_attention_ulysses(q, k, v, group=group, **sla)

    def ulysses_fwd_bwd():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        D.sla_attention_ulysses(*leaves, group=group, **sla).backward(do)

    # the layout the public call agrees on, for the pieces
    grp, rank, size = D._group_info(group)
    params = dict(
        sla, scale=None, feature_map="softmax", eps=1e-6, backend="auto", return_parts=False
    )
    layout = D._agree(q, k, v, None, None, None, params, grp, rank, size)
    with torch.no_grad():
        qh, kh, vh = D._SeqToHeads.apply(layout, (layout.nq, layout.nk, layout.nk), q, k, v)
    doh = torch.randn_like(qh)

    def attention_fwd():
        with torch.no_grad():
            sla_attention(qh, kh, vh, **sla)

    def attention_fwd_bwd():
        leaves = [x.detach().requires_grad_(True) for x in (qh, kh, vh)]
        sla_attention(*leaves, **sla).backward(doh)

    def a2a_fwd():
        for x, c in ((q, layout.nq), (k, layout.nk), (v, layout.nk)):
            D._seq_to_heads(layout, x, c)
        D._heads_to_seq(layout, qh, layout.nq)

    def a2a_fwd_bwd():
        a2a_fwd()
        D._seq_to_heads(layout, do, layout.nq)
        for y, c in ((qh, layout.nq), (kh, layout.nk), (vh, layout.nk)):
            D._heads_to_seq(layout, y, c)

    return dict(
        ulysses_fwd=ulysses_fwd,
        ulysses_fwd_bwd=ulysses_fwd_bwd,
        attention_fwd=attention_fwd,
        attention_fwd_bwd=attention_fwd_bwd,
        all_to_all_fwd=a2a_fwd,
        all_to_all_fwd_bwd=a2a_fwd_bwd,
    )


def plain_callables(q, k, v, do, sla):
    from sla_numba import sla_attention

    def plain_fwd():
        with torch.no_grad():
            sla_attention(q, k, v, **sla)

    def plain_fwd_bwd():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        sla_attention(*leaves, **sla).backward(do)

    return dict(plain_fwd=plain_fwd, plain_fwd_bwd=plain_fwd_bwd)


def forced_callables(q, k, v, do, group, sla):
    """The whole Ulysses path on a group of one (no identity shortcut)."""
    from sla_numba import distributed as D

    grp, rank, size = D._group_info(group)
    params = dict(
        sla, scale=None, feature_map="softmax", eps=1e-6, backend="auto", return_parts=False
    )
    kw = dict(sla, scale=None, feature_map="softmax", eps=1e-6, backend="auto")

    def run(xs):
        layout = D._agree(*xs, None, None, None, params, grp, rank, size)
        return D._ulysses(layout, *xs, None, None, None, False, kw)

    def forced_fwd():
        with torch.no_grad():
            run((q, k, v))

    def forced_fwd_bwd():
        run([x.detach().requires_grad_(True) for x in (q, k, v)]).backward(do)

    return dict(forced_fwd=forced_fwd, forced_fwd_bwd=forced_fwd_bwd)


# --------------------------------------------------------------------------- correctness
def check(shape, n_global, group, device, dtype, sla):
    """Ulysses vs single-process sla_attention on the same global tensors, every rank.

    Returns {name: max |difference|} for o, dq, dk, dv (the slowest rank's), and
    whether all were bitwise equal on every rank.
    """
    from sla_numba import sla_attention, sla_attention_ulysses

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator(device=device).manual_seed(1234)  # the same tensors on every rank
    B, H, D = shape["B"], shape["H"], shape["D"]
    q, k, v, do = (
        torch.randn(B, H, n_global, D, generator=g, device=device, dtype=dtype) for _ in range(4)
    )
    counts = [n_global // size + (r < n_global % size) for r in range(size)]
    lo, n = sum(counts[:rank]), counts[rank]
    full = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_ref = sla_attention(*full, **sla)
    o_ref.backward(do)
    mine = [x[:, :, lo : lo + n].clone().requires_grad_(True) for x in (q, k, v)]
    o = sla_attention_ulysses(*mine, group=group, **sla)
    o.backward(do[:, :, lo : lo + n])
    pairs = [("o", o, o_ref)] + [(f"d{c}", m.grad, f.grad) for c, m, f in zip("qkv", mine, full)]
    diffs = torch.tensor(
        [(a.float() - b[:, :, lo : lo + n].float()).abs().max().item() for _, a, b in pairs],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX, group=group)
    out = {f"max_abs_diff_{name}": d for (name, _, _), d in zip(pairs, diffs.tolist())}
    out["bitwise"] = bool((diffs == 0).all().item())
    return out


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--shape",
        nargs="+",
        default=None,
        choices=list(SHAPES),
        help="default: wan and wan2x on cuda (wan alone with --overhead), tiny on cpu",
    )
    ap.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=None,
        help="group sizes to measure (default: the world size)",
    )
    ap.add_argument("--scaling", nargs="+", choices=["strong", "weak"], default=["strong", "weak"])
    ap.add_argument(
        "--overhead",
        action="store_true",
        help="world of one: plain sla_attention vs the wrapper and the forced path",
    )
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="default bf16 on cuda, fp32 on cpu",
    )
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--skip", type=float, default=0.10)
    ap.add_argument("--block", type=int, default=None, help="default 64 (tiny: 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--check",
        action="store_true",
        help="first compare with single-process sla_attention (N_shape/8 + 1 "
        "tokens: uneven shards) at every group size",
    )
    ap.add_argument("--json", default="bench_distributed.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --device cpu --shape tiny")
    device = init(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = args.shape or (
        ["tiny"] if args.device == "cpu" else ["wan"] if args.overhead else ["wan", "wan2x"]
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ]
    sizes = [1] if args.overhead else (args.sizes or [world])
    if max(sizes) > world:
        raise SystemExit(f"--sizes {sizes}: larger than the world size {world}")
    import numba

    meta = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        numba=numba.__version__,
        world_size=world,
        dtype=str(dtype),
        args=vars(args),
        python=sys.version.split()[0],
    )
    rows = []

    def save(complete):
        if rank == 0:
            with open(args.json, "w") as f:
                json.dump(dict(meta, complete=complete, rows=rows), f, indent=1)

    def report(row):
        rows.append(row)
        if rank == 0:
            cells = "  ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items()
                if k not in ("shape", "scaling", "P")
            )
            print(f"{row['shape']:6s} {row['scaling']:8s} P={row['P']}  {cells}", flush=True)
        save(False)

    groups = {s: dist.new_group(list(range(s))) for s in sizes}  # every rank makes every group
    for name in shapes:
        shape = SHAPES[name]
        block = args.block or (32 if name == "tiny" else 64)
        sla = dict(topk=args.topk, skip=args.skip, block_q=block, block_k=block)
        for size in sizes if args.check else ():
            if rank < size and shape["H"] % size == 0:
                n_check = shape["N"] // 8 + 1
                res = check(shape, n_check, groups[size], device, dtype, sla)
                report(dict(shape=name, scaling="check", P=size, N=n_check, **res))
            dist.barrier()
        if args.overhead:
            if rank == 0:
                q, k, v, do = shards(shape, shape["N"], 1, 0, device, dtype)
                fns = dict(plain_callables(q, k, v, do, sla))
                ul = callables(q, k, v, do, groups[1], sla)
                fns.update(ulysses_fwd=ul["ulysses_fwd"], ulysses_fwd_bwd=ul["ulysses_fwd_bwd"])
                fns.update(forced_callables(q, k, v, do, groups[1], sla))
                t = timed(fns, device, args.warmup, args.reps, groups[1])
                for ph in ("fwd", "fwd_bwd"):
                    t[f"overhead_{ph}"] = t[f"ulysses_{ph}"] / t[f"plain_{ph}"] - 1.0
                    t[f"overhead_forced_{ph}"] = t[f"forced_{ph}"] / t[f"plain_{ph}"] - 1.0
                report(dict(shape=name, scaling="overhead", P=1, N=shape["N"], **t))
            dist.barrier()
            continue
        plain = {}
        for scaling in args.scaling:
            for size in sizes:
                n_global = shape["N"] * (size if scaling == "weak" else 1)
                if scaling == "weak" and size == 1 and "strong" in args.scaling:
                    continue  # the same case as strong P = 1
                if shape["H"] % size:
                    if rank == 0:
                        print(
                            f"{name}: P={size} skipped, {shape['H']} heads do not split "
                            f"over {size} ranks"
                        )
                    continue
                if rank < size:
                    group = groups[size]
                    q, k, v, do = shards(shape, n_global, size, rank, device, dtype)
                    fns = callables(q, k, v, do, group, sla)
                    if size == 1:
                        fns.update(plain_callables(q, k, v, do, sla))
                    t = timed(fns, device, args.warmup, args.reps, group)
                    if size == 1:
                        plain = {ph: t[f"plain_{ph}"] for ph in ("fwd", "fwd_bwd")}
                    for ph in ("fwd", "fwd_bwd") if plain else ():
                        if scaling == "strong":  # speedup over one GPU, and per GPU
                            t[f"speedup_{ph}"] = plain[ph] / t[f"ulysses_{ph}"]
                            t[f"efficiency_{ph}"] = t[f"speedup_{ph}"] / size
                        else:
                            # N = P * N_shape: a GPU's attention work is (H/P) N^2 = P times
                            # the one-GPU case, so the ideal time is P * plain
                            t[f"efficiency_{ph}"] = size * plain[ph] / t[f"ulysses_{ph}"]
                    t["a2a_share_fwd"] = t["all_to_all_fwd"] / t["ulysses_fwd"]
                    t["a2a_share_fwd_bwd"] = t["all_to_all_fwd_bwd"] / t["ulysses_fwd_bwd"]
                    report(dict(shape=name, scaling=scaling, P=size, N=n_global, **t))
                    del q, k, v, do, fns
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                dist.barrier()
    save(True)
    if rank == 0:
        print(f"wrote {args.json}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
