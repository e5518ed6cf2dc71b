"""Compile the tensor-core kernels to PTX for sm_90 (no GPU needed) and check them.

Usage:  python tools/check_tc_ptx.py [--quick]
Needs numba-cuda with its CUDA wheels (``pip install 'numba-cuda[cu13]'``).
For every configuration: counts ``mma.sync`` / ``ldmatrix`` / ``cp.async`` in the
PTX against the expected number (the inline asm of mma is pure, so LLVM could
merge identical chains: the counts must match exactly) and reports ``.local``
usage (spills happen later, in ptxas; this catches local arrays that were not
turned into registers, e.g. a loop LLVM did not unroll). The tensor-core kernels
are plain ``@cuda.jit`` factories: their expected counts are the
constants in ``SPARSE_EXPECTED`` and in the check_* functions below (those of the
generated kernels they replaced). Kernels compile with their own fast-math flags.
Also links the PTX for sm_90 with nvJitLink (``cuda.bindings``, part of the cu13
wheels) and reports ptxas's register count and spill bytes.
Exit status 1 on a mismatch.

``--only NAME[,NAME]`` checks only some kernels (forward, backward, sparse_bwd (the
pipelined sparse backward), marginal (with its v2 variants), marginal_v2 (those only), states, linear, linear_grad, linear_wgmma (the
Hopper kernel of ``tc/linear_wgmma.py``: compiled for sm_90a, its wgmma counted),
linear_grad_wgmma. ``linear_grad_wgmma`` (the Hopper dk / dv kernel,
``tc/linear_backward_wgmma.py``) compiles for ``sm_90a`` and counts its wgmma; only
with ``--only`` (it is not one of the default checks, which target sm_90).
"""

import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack

from numba import cuda, float32, int16, int32, int64  # noqa: E402

from sla_numba.gpu.tc import backward as backward_tc  # noqa: E402
from sla_numba.gpu.tc import forward as forward_tc


def _count(text, word):
    return len(re.findall(re.escape(word), text))


def ptxas_info(ptx, arch="sm_90"):
    """(registers, spill store bytes, spill load bytes) of the PTX's kernel, from
    ptxas's verbose log through nvJitLink (None when nvJitLink is not installed)."""
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return None
    data = ptx.encode()
    handle = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (
        int(regs.group(1)) if regs else -1,
        int(spill.group(1)) if spill else -1,
        int(spill.group(2)) if spill else -1,
    )


#: (kernel, D, block_k, block_q, kind) -> (mma.sync, ldmatrix) per kernel, as counted in
#: the generated kernels these replaced (this tool at commit 3856a2d).
SPARSE_EXPECTED = {
    ("forward", 128, 64, 128, "bf16"): (256, 80),
    ("forward", 64, 64, 128, "bf16"): (128, 40),
    ("forward", 128, 64, 64, "f16"): (128, 72),
    ("dq", 128, 64, 128, "bf16"): (192, 112),
    ("dkv", 128, 64, 128, "bf16"): (256, 144),
    ("dq", 64, 64, 128, "bf16"): (96, 56),
    ("dkv", 64, 64, 128, "bf16"): (128, 72),
    ("dq", 128, 64, 64, "f16"): (192, 112),
    ("dkv", 128, 64, 64, "f16"): (256, 144),
}


def _pretend_sm90():
    """Device functions called from a kernel are typed for the current device's
    compute capability; without a GPU, answer sm_90 (compile_ptx targets it)."""
    import numba.cuda.dispatcher as disp

    class _Dev:
        compute_capability = (9, 0)

    try:
        cuda.get_current_device()
    except Exception:  # noqa: BLE001 - no driver / no GPU here
        disp.get_current_device = lambda: _Dev()


def _count_cp_async(text):
    """cp.async copies (``.cg`` 16-byte and ``.ca`` 4 / 8-byte; not commit / wait)."""
    return len(re.findall(r"cp\.async\.c[ag]\.", text))


def compile_sm90(fn, sig):
    """The PTX of kernel ``fn`` for sm_90, with the kernel's own fast-math flags."""
    opts = getattr(fn, "targetoptions", {})
    ptx, _ = cuda.compile_ptx(
        getattr(fn, "py_func", fn),
        sig,
        cc=(9, 0),
        fastmath=opts.get("fastmath", False),
        launch_bounds=opts.get("launch_bounds"),
    )
    return ptx


def check(name, fn, sig, want, want_cp=None, want_ld4=None, want_re=None):
    """Compile ``fn`` (a kernel, with its own fast-math flags) for sm_90 and compare its
    mma.sync / ldmatrix counts with ``want`` (and its cp.async copies with ``want_cp``
    when given; ``want_re``: {label: (regex, predicate of its count)}, each printed);
    no ``.local`` allowed."""
    t0, c0 = time.time(), time.process_time()
    ptx = compile_sm90(fn, sig)
    info = ptxas_info(ptx)
    want_mma, want_ld = want
    got_mma = _count(ptx, "mma.sync.aligned")
    got_ld = _count(ptx, "ldmatrix.sync")
    local = _count(ptx, ".local")
    got_cp = _count_cp_async(ptx)
    got_ld4 = _count(ptx, "ld.global.v4.f32")
    ok = got_mma == want_mma and got_ld == want_ld and local == 0
    ok &= want_cp is None or got_cp == want_cp
    ok &= want_ld4 is None or got_ld4 == want_ld4
    extra = ""
    for label, (rx, pred) in (want_re or {}).items():
        n = len(re.findall(rx, ptx))
        ok &= bool(pred(n))
        extra += f" {label} {n}"
    print(
        f"{name:38s} mma {got_mma:4d}/{want_mma:<4d} ldmatrix {got_ld:4d}/{want_ld:<4d} "
        f"cp.async {got_cp:3d}"
        + ("" if want_cp is None else f"/{want_cp:<3d}")
        + ("" if want_ld4 is None else f" ld.v4 {got_ld4:2d}/{want_ld4:<2d}")
        + extra
        + f" .local {local:2d} "
        + (f"regs {info[0]:3d} spill {info[1]:3d}/{info[2]:<3d} " if info else "")
        + f"{time.time() - t0:5.1f}s (cpu {time.process_time() - c0:5.1f}s) "
        f"{'ok' if ok else 'MISMATCH'}"
    )
    return ok


def main():
    quick = "--quick" in sys.argv
    only = None
    if "--only" in sys.argv:
        only = set(sys.argv[sys.argv.index("--only") + 1].split(","))

    def wanted(part):
        return only is None or part in only

    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    ok = True
    fwd_sig = (i16, i16, i16, i32, i32, f32, f32, int64, int64, int64, int64, float32)
    configs = [(128, 64, 128, "bf16"), (64, 64, 128, "bf16"), (128, 64, 64, "f16")]
    if quick:
        configs = configs[:1]
    _pretend_sm90()
    for D, bk, bq, kind in configs if wanted("forward") else []:
        kern = forward_tc.make_sparse_forward(D, bk, bq, kind).kernel
        ok &= check(
            f"forward D={D} bk={bk} bq={bq} {kind}",
            kern,
            fwd_sig,
            SPARSE_EXPECTED["forward", D, bk, bq, kind],
        )
    for D, bk, bq, kind in configs if wanted("backward") else []:
        for which in backward_tc.KERNELS:
            kern = backward_tc.make_sparse_backward(which, D, bk, bq, kind).kernel
            ok &= check(
                f"backward {which} D={D} bk={bk} bq={bq} {kind}",
                kern,
                backward_tc.signature(which),
                SPARSE_EXPECTED[which, D, bk, bq, kind],
            )
    if wanted("sparse_bwd"):
        ok &= check_sparse_bwd(configs)
    if wanted("marginal"):
        ok &= check_marginal()
    if wanted("marginal") or wanted("marginal_v2"):
        ok &= check_marginal_v2()
    if wanted("states"):
        ok &= check_states(quick)
    if wanted("linear"):
        ok &= check_linear(quick)
    if wanted("linear_grad"):
        ok &= check_linear_grad(quick)
    if wanted("linear_wgmma"):
        ok &= check_linear_wgmma(quick)
    if only is not None and "linear_grad_wgmma" in only:
        ok &= check_linear_grad_wgmma()
    sys.exit(0 if ok else 1)


def check_sparse_bwd(configs):
    """The pipelined sparse-backward kernels (``SLA_NUMBA_SPARSE_BWD=pipelined``): the
    same products as the sync kernels (``SPARSE_EXPECTED``), and as many ``cp.async`` as
    the sync kernel of the same configuration (the same copy sites: the prologue's and
    the one inside the loop, which only moves from the loop's end to its start)."""
    ok = True
    for D, bk, bq, kind in configs:
        for which in backward_tc.KERNELS:
            sig = backward_tc.signature(which)
            sync = backward_tc.make_sparse_backward(which, D, bk, bq, kind).kernel
            want_cp = _count_cp_async(compile_sm90(sync, sig))
            kern = backward_tc.make_sparse_backward(which, D, bk, bq, kind, True).kernel
            ok &= check(
                f"sparse_bwd {which} pipelined D={D} bk={bk} bq={bq} {kind}",
                kern,
                sig,
                SPARSE_EXPECTED[which, D, bk, bq, kind],
                want_cp=want_cp,
            )
    return ok


def check_marginal():
    """The tensor-core marginal sum (``tc.marginal``), GPU tiles: 32 mma, 10 ldmatrix; bf16
    states: 16 mma, 6 ldmatrix; the pipelined kernel for bf16 states."""
    from numba import int8

    from sla_numba.gpu.tc import marginal as marginal_tc

    tiles = marginal_tc.GPU_TILES
    i8, f32 = int8[::1], float32[::1]
    sig = (i8, int64, int64, int64, int64, int64, f32, int64, f32, int64, int64)
    kern = marginal_tc.make_marginal_kernel(tiles).kernel
    ok = check(f"marginal_sum_tc tiles={tuple(tiles)}", kern, sig, (32, 10))
    # bf16 states (SLA_NUMBA_STATES=bf16): int32 pairs, one product: 16 mma, 6 ldmatrix
    sig16 = sig[:6] + (int32[::1],) + sig[7:]
    kern = marginal_tc.make_marginal_kernel(tiles, s_bf16=True).kernel
    ok &= check(f"marginal_sum_tc tiles={tuple(tiles)} bf16 states", kern, sig16, (16, 6))
    # pipelined (SLA_NUMBA_MARGINAL=pipelined), states as int16 bits: one stage's kb/16
    # k-steps of mma / ldmatrix; cp.async: NPASS chunks at each of the STAGES - 1
    # prologue issues and the loop's one
    sigp = sig[:6] + (int16[::1],) + sig[7:]
    kb0, st0, pipe = marginal_tc.PIPE_KB, marginal_tc.PIPE_STAGES, marginal_tc.GPU_PIPE_TILES
    configs = [
        (pipe, kb0, st0, 16, None),  # the default
        (pipe, kb0, st0, 4, None),  # W % 8 == 2: 4-byte chunks
        (tiles, kb0, st0, 16, None),  # the register kernel's tiles
        (tiles, 64, 3, 16, None),
        (tiles, 32, 4, 16, None),
        (tiles, 32, 3, 16, 4),  # launch bound: 4 CTAs a SM, 128 registers (spills a little)
    ]
    for tl, kb, stages, chunk, mb in configs:
        kern = marginal_tc.make_marginal_kernel_pipelined(tl, kb, stages, chunk, mb).kernel
        npass = marginal_tc.pipelined_geometry(tl, kb, stages, chunk)["NPASS"]
        ok &= check(
            f"marginal pipelined tiles={tuple(tl)} kb={kb} st={stages} chunk={chunk}"
            + ("" if mb is None else f" minCTA={mb}"),
            kern,
            sigp,
            marginal_tc.ops_per_stage_pipelined(tl, kb),
            want_cp=npass * stages,
        )
    return ok


#: PTX patterns of the v2 variants: the map's byte loads, its word loads, the 16-byte
#: output stores (``ptx.stg_v4_f32``), scalar fp32 output stores.
_MAP_BYTE = r"ld\.global(?:\.nc)?\.[us]8"
_MAP_WORD = r"ld\.global(?:\.nc)?\.[us]32"
_ST_V4 = r"st\.global\.v4\.f32"
_ST_F32 = r"st\.global\.f32"


def check_marginal_v2():
    """The v2 variants of the pipelined marginal kernel (``map_load`` / ``out_store``,
    ``SLA_NUMBA_MARGINAL=pipelined_v2``), GPU pipelined tiles: the same mma / ldmatrix /
    cp.async counts as the present kernel; map words: no byte loads left; staged
    epilogue with 16-byte stores: no scalar fp32 stores left (and some v4 ones)."""
    from numba import int8

    from sla_numba.gpu.tc import marginal as marginal_tc

    i8, i16, i32, f32 = int8[::1], int16[::1], int32[::1], float32[::1]
    kb, stages, tl = marginal_tc.PIPE_KB, marginal_tc.PIPE_STAGES, marginal_tc.GPU_PIPE_TILES
    ok = True
    for map_load, out_store in (("rows", 4), ("cols", 4), ("rows", 0), ("bytes", 4), ("cols", 1)):
        m = i8 if map_load == "bytes" else i32
        sig = (m, int64, int64, int64, int64, int64, i16, int64, f32, int64, int64)
        kern = marginal_tc.make_marginal_kernel_pipelined(
            tl, kb, stages, 16, None, map_load, out_store
        ).kernel
        npass = marginal_tc.pipelined_geometry(tl, kb, stages, 16)["NPASS"]
        want_re = {
            "ld.u8": (_MAP_BYTE, (lambda n: n > 0) if map_load == "bytes" else (lambda n: n == 0)),
            "ld.u32": (_MAP_WORD, lambda n: True),
            "st.v4": (_ST_V4, (lambda n: n > 0) if out_store == 4 else (lambda n: n == 0)),
            "st.f32": (_ST_F32, (lambda n: n == 0) if out_store == 4 else (lambda n: n > 0)),
        }
        ok &= check(
            f"marginal v2 map={map_load} out={out_store}",
            kern,
            sig,
            marginal_tc.ops_per_stage_pipelined(tl, kb),
            want_cp=npass * stages,
            want_re=want_re,
        )
    return ok


def check_states(quick=False):
    """The tensor-core key-block states (``tc.states``), GPU tiles; a whole key block
    (its BK/16 k-steps are unrolled)."""
    from sla_numba.gpu.tc import states as states_tc

    i16, f32 = int16[::1], float32[::1]
    sig = (i16, i16, f32, int64, int64, int64, int64)
    configs = [
        ("bf16", 128, 64, True, 144, 32),
        ("f16", 64, 64, True, 80, 24),
        ("bf16", 128, 64, False, 72, 24),
    ]
    ok = True
    for kind, D, bk, split, mma, ld in configs[:1] if quick else configs:
        tiles = states_tc.choose_tiles(D, states_tc.GPU_MAX_WARPS)
        kern = states_tc.make_states_kernel(kind, D, bk, tiles, split).kernel
        ok &= check(
            f"states_tc {kind} D={D} bk={bk} tiles={tuple(tiles)} split={split}",
            kern,
            sig,
            (mma, ld),
        )
    # bf16 output (SLA_NUMBA_STATES=bf16): same products, int16 stores
    tiles = states_tc.choose_tiles(128, states_tc.GPU_MAX_WARPS)
    kern = states_tc.make_states_kernel("bf16", 128, 64, tiles, True, out_bf16=True).kernel
    ok &= check(
        f"states_tc bf16 D=128 bk=64 tiles={tuple(tiles)} bf16 output",
        kern,
        (i16, i16, i16, int64, int64, int64, int64),
        (144, 32),
    )
    # the staged and pipelined kernels (SLA_NUMBA_STATES_KERNEL=staged|pipelined): the
    # same products, so the same mma / ldmatrix counts; ceil(BK·D/8 / threads) 16-byte
    # cp.async a tile: K and V (staged), and the first and the next block's (pipelined)
    i32 = int32[::1]
    sconf = [
        ("bf16", 128, 64, True, True, 144, 32),  # the Wan default: bf16 states
        ("bf16", 128, 64, True, False, 144, 32),
        ("f16", 64, 64, True, False, 80, 24),
        ("bf16", 128, 64, False, True, 72, 24),
    ]
    variants = [  # name, factory, extra int64 arguments (pipelined: nper), tiles copied
        ("staged", states_tc.make_states_kernel_staged, (), 2),
        ("pipelined", states_tc.make_states_kernel_pipelined, (int64,), 4),
    ]
    for name, make, extra, copies in variants:
        for kind, D, bk, split, ob, mma, ld in sconf[:1] if quick else sconf:
            tiles = states_tc.choose_tiles(D, states_tc.GPU_MAX_WARPS)
            nt = 32 * tiles[0] * tiles[1]
            ok &= check(
                f"states {name} {kind} D={D} bk={bk} split={split}"
                + (" bf16 output" if ob else ""),
                make(kind, D, bk, tiles, split, ob).kernel,
                (i16, i16, i32 if ob else f32, int64, int64, int64, int64) + extra,
                (mma, ld),
                want_cp=copies * -(-bk * D // 8 // nt),
            )
    return ok


def check_linear(quick=False):
    """The tensor-core linear-branch output (``tc.linear``), GPU chunking. The counts are
    those of one chunk of H_i (the chunk loop stays a loop)."""
    from sla_numba.gpu.tc import linear as linear_tc

    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    sig = (i16, f32, i32, f32, int64, int64, int64, int64, float32)
    configs = [("bf16", 128, 64, 100, 38), ("f16", 64, 64, 52, 22), ("bf16", 128, 128, 100, 38)]
    ok = True
    for kind, D, bq, mma, ld in configs[:1] if quick else configs:
        hk = linear_tc.chunk_rows(D, linear_tc.GPU_HK)
        kern = linear_tc.make_linear_kernel(kind, D, bq, hk).kernel
        ok &= check(f"linear_tc {kind} D={D} bq={bq} hk={hk}", kern, sig, (mma, ld))
    # the pipelined kernel (SLA_NUMBA_LINEAR=pipelined): the same products, so per chunk
    # the same mma / ldmatrix counts (ops_per_chunk) as the register kernel of equal HK
    mb = linear_tc.pipe_min_blocks
    pconf = [
        ("bf16", 128, 64, linear_tc.PIPE_HK, True, mb(64)),  # the default: HK 16, no bound
        ("bf16", 128, 64, 32, True, None),  # unbounded
        ("bf16", 128, 64, 32, True, 3),  # bounded to 12 warps an SM
        ("bf16", 128, 64, 16, False, mb(64)),  # lstate not 16-byte aligned: scalar loads
        ("f16", 64, 64, 16, True, mb(64)),
        ("bf16", 128, 128, 16, True, mb(128)),
        ("bf16", 64, 32, 16, True, mb(32)),
    ]
    for kind, D, bq, hk, vec4, mb in pconf[:1] if quick else pconf:
        kern = linear_tc.make_linear_kernel_pipelined(kind, D, bq, hk, vec4, mb).kernel
        ok &= check(
            f"linear pipelined {kind} D={D} bq={bq} hk={hk}"
            + ("" if vec4 else " scalar")
            + ("" if mb is None else f" minCTA={mb}"),
            kern,
            sig,
            linear_tc.ops_per_chunk(D, hk),
        )
    return ok


def check_linear_wgmma(quick=False):
    """The wgmma linear-branch output (``tc.linear_wgmma``) for sm_90a: per chunk of HK
    rows 3·HK/16 ``wgmma.mma_async`` m64nDk16 bf16 with both operands by descriptor (the
    chunk loop stays a loop), one ``wgmma.fence``, no ``.local``; ptxas registers and
    spills through nvJitLink for sm_90a."""
    from sla_numba.gpu.tc import linear_wgmma as lw

    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    sig = (i16, f32, i16, i32, f32, int64, int64, int64, int64, float32)
    configs = [  # kind, D, HK, stages, vec4, ring
        ("bf16", 128, 16, 3, True, 0),
        ("bf16", 128, 16, 2, True, 0),
        ("bf16", 128, 32, 2, True, 0),
        ("bf16", 128, 32, 3, True, 0),
        ("f16", 64, 16, 3, True, 0),
        ("bf16", 128, 16, 3, False, 0),
        ("bf16", 128, 16, 2, True, 3),
        ("bf16", 128, 16, 2, True, 4),
        ("bf16", 128, 32, 2, True, 3),
        ("bf16", 64, 16, 2, True, 4),
    ]
    ok = True
    for kind, D, hk, st, vec4, ring in configs[:1] if quick else configs:
        t0 = time.time()
        fn = lw.make_linear_forward_wgmma(kind, D, hk, st, vec4, ring).kernel
        ptx, _ = cuda.compile_ptx(
            fn.py_func, sig, cc=(9, 0, "a"), fastmath=fn.targetoptions.get("fastmath", False)
        )
        info = ptxas_info(ptx, "sm_90a")
        pat = r"wgmma\.mma_async\.sync\.aligned\.m64n%dk16\.f32\.bf16\.bf16 \{[^}]*\}, %%rd" % D
        n_wg = len(re.findall(pat, ptx))
        want = 3 * hk // 16
        local = _count(ptx, ".local")
        target = re.search(r"\.target\s+(\S+)", ptx).group(1)
        good = n_wg == want and local == 0 and target == "sm_90a"
        good &= _count(ptx, "wgmma.fence") == 1
        if info:
            good &= 0 < info[0] <= 255 and info[1] == 0 and info[2] == 0
        ok &= good
        print(
            f"linear_wgmma {kind} D={D} hk={hk} stages={st} ring={ring}"
            + ("" if vec4 else " scalar")
            + f" {target} wgmma {n_wg:2d}/{want:<2d} .local {local:2d} "
            + (f"regs {info[0]:3d} spill {info[1]:3d}/{info[2]:<3d} " if info else "")
            + f"{time.time() - t0:5.1f}s {'ok' if good else 'MISMATCH'}"
        )  # fmt: skip
    return ok


def check_linear_grad(quick=False):
    """The linear branch's backward (``tc.linear_backward``), GPU chunking. Counts: one
    chunk of pass 1 (the chunk loop stays a loop) plus one work item of pass 2 (dq) or
    one chunk of pass 2 (dk / dv): per k-step A loads (1, or 2 when the operand is
    split) and two B loads per n-tile pair; 4 mma per pair, 6 when A is split. With fp32
    or fp16 dO_l (split) LLVM keeps dq's pass-2 k-loop a loop: one k-step counted.
    The pipelined variants (``pipelined=True``) must give the same mma / ldmatrix counts
    and ``prefetch_slots`` 16-byte loads per place that issues a chunk's loads: dq 2 (chunk
    0 before phase 0, the next chunk in the loop), dk / dv 4 (also the row chunk pass 1
    hands to pass 2, and pass 2's loop)."""
    from sla_numba.gpu.tc import linear_backward as lb

    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    ok = True
    # kind, D, block, o_l / do_l as half bits, (mma, ldmatrix) of dq, of dkdv
    configs = [
        ("bf16", 128, 64, True, (192, 74), (160, 70)),
        ("bf16", 128, 64, False, (144, 54), None),
        ("f16", 64, 64, True, (144, 60), (96, 40)),
    ]
    for kind, D, blk, half, want_dq, want_kv in configs[:1] if quick else configs:
        hk = lb.chunk_rows(D)
        lt = i16 if half else f32
        sig = (i16, lt, lt, f32, i32, f32, f32, int64, int64, int64, int64, float32)
        for pipe in (False, True):
            kern = lb.make_dq_linear_kernel(kind, D, blk, hk, half, pipelined=pipe).kernel
            name = f"dq_linear{'_pipe' if pipe else ''} {kind} D={D} b={blk} half={half}"
            ok &= check(
                name,
                kern,
                sig,
                want_dq,
                want_ld4=lb.prefetch_slots(D, hk, 2 * blk) * (2 if pipe else 0),
            )
        if want_kv:
            sig = (i16, i16, f32, i32, f32, f32, int64, int64, int64, int64)
            for pipe in (False, True):
                kern = lb.make_dkdv_linear_kernel(kind, D, blk, hk, pipelined=pipe).kernel
                name = f"dkdv_linear{'_pipe' if pipe else ''} {kind} D={D} b={blk}"
                ok &= check(
                    name,
                    kern,
                    sig,
                    want_kv,
                    want_ld4=lb.prefetch_slots(D, hk, 2 * blk) * (4 if pipe else 0),
                )
    return ok


def check_linear_grad_wgmma():
    """The wgmma dk / dv kernel (``tc/linear_backward_wgmma.py``) for sm_90a: per
    variant (kind, D, pf) the PTX's target, its wgmma count (pass 1: D/16 k-steps x 2
    products, x 3 for fp16 (v split); pass 2: D/16 x 3), two ``wgmma.fence``, no
    ``.local``; nvJitLink (tools/wgmma_probe.py) assembles it for sm_90a and reports
    registers and spill bytes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from wgmma_probe import nvjitlink_assemble

    from sla_numba.gpu.tc import linear_backward_wgmma as lw

    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    sig = (i16, i16, f32, i32, f32, f32, int64, int64, int64, int64)
    ok = True
    variants = [("bf16", 128, 16, True), ("bf16", 128, 8, True), ("bf16", 128, 16, False)]
    variants += [("f16", 128, 16, True), ("bf16", 64, 8, True), ("bf16", 64, 8, False)]
    for kind, D, pf, share in variants:
        kern = lw.make_dkdv_linear_wgmma(kind, D, pf, share).kernel
        fm = kern.targetoptions.get("fastmath", False)
        t0 = time.time()
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0, "a"), fastmath=fm)
        target = re.search(r"\.target\s+(\S+)", ptx).group(1)
        n_wg = _count(ptx, "wgmma.mma_async")
        want = D // 16 * ((3 if kind == "f16" else 2) + 3)
        fences, local = _count(ptx, "wgmma.fence"), _count(ptx, ".local")
        try:
            _, info = nvjitlink_assemble(ptx, "sm_90a")
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            asm = (
                f"regs {regs.group(1) if regs else '?'}, spill "
                f"{spill.group(1) + '/' + spill.group(2) if spill else '?'}"
            )
        except ImportError:
            asm = "nvJitLink not installed"
        good = target == "sm_90a" and n_wg == want and fences == 2 and local == 0
        ok &= good
        print(
            f"{'ok ' if good else 'BAD'} dkdv_linear_wgmma {kind} D={D} pf={pf} share={share}: "
            f"{target}, "
            f"wgmma {n_wg} (want {want}), fences {fences}, .local {local}, {asm}, "
            f"smem {lw.smem_layout(D, kind, share)['bytes']} B, {time.time() - t0:.1f} s"
        )
    # dq: pass 1 D/16 x (2, or 3 with dO_l split), pass 2 D/64 m-tiles x 4 k-steps x (2 / 3)
    for kind, D, half, q16, share in (
        ("bf16", 128, True, True, True), ("bf16", 128, True, True, False),
        ("f16", 128, False, False, True), ("bf16", 64, True, True, True),
    ):  # fmt: skip
        lt = i16 if half else f32
        sig = (i16, lt, lt, f32, i32, f32, i16 if q16 else f32, int64, int64, int64, int64, float32)
        kern = lw.make_dq_linear_wgmma(kind, D, half, q16, share=share).kernel
        t0 = time.time()
        ptx, _ = cuda.compile_ptx(
            kern.py_func, sig, cc=(9, 0, "a"), fastmath=kern.targetoptions.get("fastmath", False)
        )
        split = not (half and kind == "bf16")
        want = D // 16 * (3 if split else 2) + D // 64 * 4 * (3 if split else 2)
        n_wg, fences = _count(ptx, "wgmma.mma_async"), _count(ptx, "wgmma.fence")
        local = _count(ptx, ".local")
        try:
            _, info = nvjitlink_assemble(ptx, "sm_90a")
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            asm = (
                f"regs {regs.group(1) if regs else '?'}, spill "
                f"{spill.group(1) + '/' + spill.group(2) if spill else '?'}"
            )
        except ImportError:
            asm = "nvJitLink not installed"
        # the pass-2 m-tile loop may stay a loop (one body counted) or be unrolled
        per_m = 4 * (3 if split else 2)
        good = n_wg in (want, want - (D // 64 - 1) * per_m) and local == 0 and fences >= 2
        ok &= good
        print(
            f"{'ok ' if good else 'BAD'} dq_linear_wgmma {kind} D={D} half={half} q_bf16={q16} "
            f"share={share}: "
            f"wgmma {n_wg} (want {want} unrolled), fences {fences}, .local {local}, {asm}, "
            f"{time.time() - t0:.1f} s"
        )
    return ok


if __name__ == "__main__":
    main()
