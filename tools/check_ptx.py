"""Compile the SIMT GPU kernels to PTX for sm_90 on a machine without a GPU, and check them.

Usage:  python tools/check_ptx.py [--quick] [--dims 64 128] [--dtypes f32 bf16] [--dump DIR]
        python tools/check_ptx.py --classify     (the classification kernels only)

Needs numba-cuda with its CUDA wheels (``pip install 'numba-cuda[cu13]'``); no
driver, no GPU. For every kernel, head dim and input dtype it reports:

- that the kernel *types* and compiles for real (the simulator runs Python and
  never type-checks: a float64 constant in an fp32 kernel, a bad cast or an
  unsupported call only shows here);
- ``.local`` bytes (local arrays not promoted to registers; ptxas spills come
  later and are not visible in PTX), ``call`` instructions (an out-of-line call
  in an inner loop), and the number of ``.f64`` instructions in fp32 kernels
  (a float64 constant promoting fp32 arithmetic);
- ``fma.rn.f64`` in the classification kernels: must be 0 (bit-exact rule).

Exit status 1 when a check fails.
"""

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import importlib  # noqa: E402

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402
from numba.cuda import types as nt  # noqa: E402

from sla_numba.gpu import _compat  # noqa: E402,F401  (np.row_stack shim first)

# the SIMT kernel modules (the package's classify/forward/backward are functions)
classify, forward, backward = (
    importlib.import_module(f"sla_numba.gpu.simt.{m}") for m in ("classify", "forward", "backward")
)
classify_fused = importlib.import_module("sla_numba.gpu.simt.classify_fused")
from sla_numba.gpu._compat import FASTMATH, SIMULATOR  # noqa: E402
from sla_numba.gpu.simt.marginal import make_marginal_sum  # noqa: E402
from sla_numba.gpu.simt.states import make_prep  # noqa: E402
from sla_numba.gpu.simt.tiles import choose_tiles, smem_bytes  # noqa: E402


class _TargetDevice:
    """Stands in for the current device: device functions called by a kernel compile
    for ``get_current_device().compute_capability``, which needs a driver."""

    compute_capability = (9, 0)


def _patch_device_lookup():
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: _TargetDevice()


def arr(dtype, ndim):
    return nt.Array(dtype, ndim, "C")


I64, F64 = nt.int64, nt.float64


def ptxas_info(ptx):
    """(registers, spill-store bytes) from ptxas via nvJitLink (offline, no driver)."""
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return None, None, None
    data = ptx.encode()
    h = nvjitlink.create(3, ["-arch=sm_90", "-verbose", "-O3"])
    try:
        nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(h)
        buf = bytearray(nvjitlink.get_info_log_size(h))
        nvjitlink.get_info_log(h, buf)
    finally:
        nvjitlink.destroy(h)
    log = buf.decode(errors="replace")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return (
        (int(regs.group(1)) if regs else None),
        (int(spill.group(1)) if spill else 0),
        (int(smem.group(1)) if smem else None),
    )


def local_bytes(ptx):
    return sum(int(m) for m in re.findall(r"\.local \.align \d+ \.b8 \w+\[(\d+)\]", ptx))


DUMP = {"dir": None}
PTXAS = {"on": True}
F64_ALLOWED = 2  # scale * log2(e), computed once per block


def compile_one(name, disp, sig, fastmath, acc_f32, exact=False):
    dump = DUMP["dir"]
    t0 = time.time()
    ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=(9, 0), fastmath=fastmath)
    dt = time.time() - t0
    body = ptx[ptx.find(".entry") :]
    n_local = local_bytes(ptx)
    n_call = len(re.findall(r"^\s*call", body, re.M))
    # float64 arithmetic in an fp32 kernel (param loads and the one-time conversion
    # of the float64 scalar arguments are expected: allow a handful)
    n_f64 = (
        len(re.findall(r"^\s*(?:add|sub|mul|fma|div|ex2|lg2|max|min|setp)\.[\w.]*f64", body, re.M))
        if acc_f32
        else 0
    )
    n_fma64 = len(re.findall(r"fma\.rn\.f64", body))
    regs, spill, smem = ptxas_info(ptx) if PTXAS["on"] else (None, None, None)
    problems = []
    if smem is not None and smem > 48 * 1024:
        problems.append(f"{smem} B static smem > 48 KiB")
    if spill:
        problems.append(f"{spill} B spilled")
    if n_local:
        problems.append(f"{n_local} B local")
    if n_call:
        problems.append(f"{n_call} calls")
    if acc_f32 and n_f64 > F64_ALLOWED:
        problems.append(f"{n_f64} f64 ops")
    if exact and n_fma64:
        problems.append(f"{n_fma64} fma.f64")
    print(
        f"{name:30s} {dt:5.1f}s  regs {regs if regs is not None else '?':>3}  "
        f"smem {smem if smem is not None else '?':>5}  "
        f"spill {spill if spill is not None else '?':>4}  local {n_local:4d} B  "
        f"calls {n_call:2d}  f64 {n_f64:3d}  {'ok' if not problems else 'CHECK: ' + ', '.join(problems)}"
    )
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, name.replace(" ", "_").replace("/", "_") + ".ptx"), "w") as f:
            f.write(ptx)
    # .local from the bf16/fp16 read path or spills of local arrays are perf issues, not errors;
    # f64 in fp32 kernels and fma.f64 in classification are errors.
    too_big = smem is not None and smem > 48 * 1024
    return not ((acc_f32 and n_f64 > F64_ALLOWED) or (exact and n_fma64) or too_big)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="D=128 fp32 and bf16 only")
    ap.add_argument("--dump", default=None, help="write the PTX files here")
    ap.add_argument(
        "--dims", nargs="+", type=int, default=None, help="head dims (default 64 128 80 96)"
    )
    ap.add_argument("--dtypes", nargs="+", default=None, help="subset of f32 bf16 f16 f64")
    ap.add_argument("--classify", action="store_true", help="the classification kernels only")
    args = ap.parse_args()
    DUMP["dir"] = args.dump
    if SIMULATOR:
        sys.exit("unset NUMBA_ENABLE_CUDASIM: this compiles real PTX")
    _patch_device_lookup()
    ok = True

    # classification (float64, exact)
    for dtn, dt in (("f32", nt.float32), ("bf16", nt.int16)):
        ok &= compile_one(
            f"classify.pool {dtn}",
            classify.pool,
            (arr(dt, 4), arr(dt, 4), I64, I64, I64, arr(F64, 4), arr(F64, 4)),
            False,
            False,
            exact=True,
        )
    for dtn, dt in (("f32", nt.float32), ("bf16", nt.int16), ("f64", nt.float64)):
        ok &= compile_one(
            f"classify.make_pool {dtn}",
            classify.make_pool(classify.POOL_THREADS, 16, dtn == "f64"),
            (arr(dt, 4), arr(dt, 4), I64, I64, I64, arr(F64, 4), arr(F64, 4)),
            False,
            False,
            exact=True,
        )
    for d, rq, cpt, epl in ((128, 16, 4, 16), (64, 16, 1, 4), (128, 16, 4, 32), (128, 16, 4, 64)):
        ok &= compile_one(
            f"classify.select D{d} R{rq} C{cpt} E{epl}",
            classify.make_score_select(d, rq, cpt, epl),
            (
                arr(F64, 4),
                arr(F64, 4),
                F64,
                I64,
                I64,
                arr(F64, 4),
                arr(nt.uint64, 4),
                arr(nt.int8, 4),
            ),
            False,
            False,
            exact=True,
        )
    # SLA_NUMBA_CLASSIFY=fused: warp pooling (packed bf16 words or elements) and the
    # score/select kernel with its keys in shared memory
    for tag, word, lay in (
        ("bf16 u64 D128", nt.uint64, (32, 4, 16, 4, 1, True)),
        ("bf16 u32 D64", nt.uint32, (32, 4, 16, 2, 1, True)),
        ("f32 D128", nt.float32, (32, 4, 16, 1, 4, False)),
        ("f64 D64", nt.float64, (32, 4, 16, 1, 2, False)),
    ):
        ok &= compile_one(
            f"classify.pool_words {tag}",
            classify_fused.make_pool_words(*lay),
            (arr(word, 4), arr(word, 4), I64, I64, I64, arr(F64, 4), arr(F64, 4)),
            False,
            False,
            exact=True,
        )
    for d, rq, cpt, epl, rh in ((128, 16, 4, 16, 4), (128, 8, 4, 16, 8), (64, 16, 1, 4, 16)):
        ok &= compile_one(
            f"classify.keys D{d} R{rq} C{cpt} E{epl} H{rh}",
            classify_fused.make_score_select_keys(d, rq, cpt, epl, 128, 32, rh),
            (arr(F64, 4), arr(F64, 4), F64, I64, I64, arr(nt.int8, 4)),
            False,
            False,
            exact=True,
        )
    sr = classify.make_score_rank(classify.RANK_THREADS)
    ok &= compile_one(
        "classify.score_rank",
        sr,
        (arr(F64, 4), arr(F64, 4), F64, I64, I64, arr(F64, 4), arr(nt.int8, 4)),
        False,
        False,
        exact=True,
    )
    if args.classify:
        print("ALL OK" if ok else "FAILED")
        return 0 if ok else 1

    for acc_name, A in (("float32", nt.float32), ("float64", nt.float64)):
        ok &= compile_one(
            f"marginal_sum {acc_name}",
            make_marginal_sum(acc_name),
            (arr(nt.int8, 4), I64, I64, I64, arr(A, 4), arr(A, 4)),
            FASTMATH,
            acc_name == "float32",
        )

    dims = (128,) if args.quick else (64, 128, 80, 96)
    dtypes = (
        ("f32", nt.float32, np.float32),
        ("bf16", nt.int16, np.float32),
        ("f16", nt.float16, np.float32),
        ("f64", nt.float64, np.float64),
    )
    if args.quick:
        dtypes = dtypes[:2]
    if args.dims:
        dims = tuple(args.dims)
    if args.dtypes:
        dtypes = tuple(d for d in dtypes if d[0] in args.dtypes)
    for D in dims:
        for dtn, dt, acc in dtypes:
            T = choose_tiles(D, acc, 64, 64)
            A = nt.float64 if acc == np.float64 else nt.float32
            f32 = acc == np.float32
            tag = f"D={D} {dtn}"
            x4, a4, a3, i4 = arr(dt, 4), arr(A, 4), arr(A, 3), arr(nt.int32, 4)
            print(f"-- {tag}: {T}  smem {smem_bytes(T) / 1024:.1f} KiB")
            ok &= compile_one(
                f"prep {tag}",
                make_prep(T),
                (
                    x4,
                    x4,
                    I64,
                    I64,
                    I64,
                    a4,
                    I64,
                    a3,
                    arr(nt.int8, 4),
                    I64,
                    I64,
                    I64,
                    i4,
                    i4,
                    i4,
                    i4,
                    I64,
                    x4,
                    x4,
                    a3,
                    I64,
                ),
                FASTMATH,
                f32,
            )
            # sparse=False: the linear-only kernels of the tensor-core path (fp16 / bf16)
            for sparse in (True, False) if dtn in ("bf16", "f16") else (True,):
                st = "" if sparse else " linear-only"
                ok &= compile_one(
                    f"forward{st} {tag}",
                    forward.make_forward_simt(T, sparse),
                    (x4, x4, x4, a4, i4, i4, I64, I64, I64, I64, F64, I64, F64, a4, a4, a3),
                    FASTMATH,
                    f32,
                )
                # backward: o_s / o_l / dO in the input dtype (torch path), lse compute dtype
                ok &= compile_one(
                    f"dq{st} {tag}",
                    backward.make_dq(T, sparse),
                    (
                        x4,
                        x4,
                        x4,
                        x4,
                        x4,
                        a3,
                        x4,
                        x4,
                        a4,
                        i4,
                        i4,
                        I64,
                        I64,
                        I64,
                        I64,
                        F64,
                        I64,
                        F64,
                        a4,
                        a3,
                        a3,
                        a3,
                        a4,
                    ),
                    FASTMATH,
                    f32,
                )
                ok &= compile_one(
                    f"dkdv{st} {tag}",
                    backward.make_dkdv(T, sparse),
                    (x4, x4, x4, a3, x4, i4, i4, a3, I64, I64, I64, I64, F64, I64, a4, a4, a4),
                    FASTMATH,
                    f32,
                )
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
