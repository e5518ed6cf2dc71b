"""Probe: Hopper warpgroup MMA (``wgmma.mma_async``) from a Numba CUDA kernel.

One run on an H100/H200 answers: can a Numba kernel use ``wgmma``, is the result
right, and how fast is a simple wgmma GEMM against ``torch.matmul``?

    PYTHONPATH=. python tools/wgmma_probe.py --check --bench --json OUT.json
    PYTHONPATH=. python tools/wgmma_probe.py --ptx-only --json OUT.json   # no GPU needed

What it computes: ``C = A @ Bt.T`` with A (M, K), Bt (N, K), C (M, N), all bf16,
fp32 accumulation (the "TN" GEMM: both operands K-contiguous, which is the layout
wgmma reads without a transpose). Sizes must be multiples of the block tile.

How the sm_90a code is produced (the point of the probe)
--------------------------------------------------------
``wgmma`` exists only on the arch-specific target ``sm_90a``. numba-cuda 0.30.4
already supports arch-specific targets: a compute capability may be a 3-tuple
``(9, 0, "a")`` -> NVVM option ``-arch=compute_90a`` -> PTX ``.target sm_90a`` ->
nvJitLink ``-arch=sm_90a``. And when ``@cuda.jit`` compiles for the *current*
device, ``CUDACodeLibrary._ensure_cc`` appends ``"a"`` itself for any device of
compute capability >= 9.0, so a plain ``@cuda.jit`` kernel on a Hopper GPU is
already built for sm_90a. Paths tried, in order:

``jit``     plain ``@cuda.jit`` kernel, launched by numba-cuda (the clean path).
``retarget``  fallback: ``cuda.compile_ptx(..., cc=(9, 0))``, rewrite
            ``.target sm_90`` -> ``sm_90a``, assemble with nvJitLink, load the cubin
            and launch with ``cuda.core`` (``ObjectCode.from_cubin`` / ``launch``).

The kernel takes only int64 arguments (raw device pointers and sizes), so both paths
launch it the same way: Numba's kernel ABI would otherwise flatten every array
argument into (meminfo, parent, nitems, itemsize, data, shape..., strides...).

The kernel
----------
Block = 2 warpgroups (256 threads), block tile 128 x BN (BN = 128 or 256), BK = 64.
Every thread copies global -> shared with ``cp.async`` (STAGES-deep ring); warpgroup
``w`` multiplies rows 64w..64w+63 of the A tile by the whole B tile with four
``wgmma.mma_async.m64nBNk16`` per BK, both operands read from shared memory
through 64-bit matrix descriptors. Shared tiles are K-major rows of 64 bf16 = 128
bytes. Layouts (``--layout``):

``sw128``   128-byte swizzle: the 16-byte chunk c of row r sits at chunk
            ``c ^ (r % 8)`` of its row; 8-row atoms of 1024 bytes, 1024-aligned.
            Descriptor: SBO = 1024 (between 8-row groups), LBO unused (1),
            swizzle field (bits 62-63) = 1. A k16 step adds 32 bytes to the start.
``inter``   no swizzle ("interleaved"): each 8 x 8 core matrix (8 rows x 16 bytes)
            is 128 contiguous bytes; core matrices along K are 128 bytes apart,
            8-row groups 1024. Descriptor LBO = 128 (K direction), SBO = 1024.
``inter_swapped``  the same with LBO and SBO exchanged (in case the reading of
            the ISA is the other way round; the check says which one is right).
``tma``     the sw128 layout filled by TMA (``cp.async.bulk.tensor.2d`` with
            128-byte-swizzle tensor maps from ``cuTensorMapEncodeTiled``, kept in
            device memory) and one mbarrier a stage; thread 0 issues the copies.

``ws``      TMA + warp specialisation: warpgroup 0 produces (one thread issues
            TMA), warpgroups 1-2 consume; ``full``/``empty`` mbarriers, no
            block-wide barrier in the main loop (384 threads).

Also measured: ``_mmaonly`` ceilings (the wgmma loop with no global -> shared
traffic after the prologue; meaningless result, only the time), which separate
"Numba's wgmma issue loop is slow" from "the copy pipeline is slow".

Order on the GPU (``gpu_plan``): sw128 jit at N = 128 and 256, the retarget
fallback, the ceilings, TMA and ws (only if a sw128 check passed), other ring depths, the
no-swizzle diagnostics last (a fault there poisons the CUDA context). Every step is
printed and appended to the JSON report at once; nothing new starts after
``--budget`` seconds.

Matrix descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address
>> 4, 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset
>> 4, 49-51 base offset (0: atoms are 1024-aligned), 62-63 swizzle (0 none,
1 128B, 2 64B, 3 32B).

Accumulator fragment (m64nN, fp32): warp q (0..3) of the warpgroup owns rows
16q..16q+15; lane l (g = l >> 2, t = l & 3) holds, for each n8 block j,
``d[4j], d[4j+1] = D[16q+g, 8j+2t : 8j+2t+2]`` and ``d[4j+2], d[4j+3]`` the same
for row ``16q+g+8`` (the mma.sync m16n8 layout, repeated along N).

Pipeline per k-tile kt: wait for this thread's copies of tile kt
(``cp.async.wait_group``), ``fence.proxy.async`` (cp.async writes are generic-proxy,
wgmma reads through the async proxy), ``bar.sync``; ``wgmma.fence``; 4 wgmma;
``wgmma.commit_group``; ``wgmma.wait_group 1`` (tile kt-1's wgmmas are done, so
after the next barrier stage (kt-2) is free); issue the copy of tile kt+STAGES-2.
"""

import argparse
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

if not hasattr(np, "row_stack"):  # numpy 2.5 removed it; numba-cuda 0.30 still uses it
    np.row_stack = np.vstack

BM, BK = 128, 64  # block tile rows, k-tile depth (64 bf16 = one 128-byte row)
THREADS = 256  # two warpgroups
# "tma": sw128 fed by TMA; "ws": the same, warp-specialised (producer + 2 consumers)
LAYOUTS = ("sw128", "inter", "inter_swapped", "tma", "ws")

REPORT = {"steps": []}
JSON_PATH = []  # set by main(); the report is rewritten after every step


def save_report():
    if JSON_PATH:
        with open(JSON_PATH[0], "w") as fh:
            json.dump(REPORT, fh, indent=1, default=str)


def log(step, ok, **info):
    """Print one step and record it in the JSON report (written at once, so a run
    that hangs or dies later still leaves everything before it)."""
    REPORT["steps"].append(dict(step=step, ok=bool(ok), **info))
    save_report()
    extra = " ".join("%s=%s" % (k, v) for k, v in info.items() if k != "trace")
    print("[%s] %-28s %s" % ("ok" if ok else "FAIL", step, extra), flush=True)
    if not ok and "trace" in info:
        print(info["trace"], flush=True)


# ---------------------------------------------------------------------------
# Shared-memory layouts (host-side functions, used by the kernel and the twin)
# ---------------------------------------------------------------------------


def tile_offset(layout, r, c):
    """Byte offset of 16-byte chunk ``c`` (k = 8c..8c+7) of row ``r`` in a tile."""
    if layout == "sw128":
        return r * 128 + ((c ^ (r & 7)) << 4)
    return ((r >> 3) * 8 + c) * 128 + (r & 7) * 16


def layout_desc_fields(layout):
    """(LBO bytes, SBO bytes, swizzle code, k16-step bytes) of a layout."""
    if layout == "sw128":
        return 16, 1024, 1, 32
    if layout == "inter":
        return 128, 1024, 0, 256
    return 1024, 128, 0, 256  # inter_swapped


def make_desc(addr, lbo, sbo, swz):
    """64-bit wgmma matrix descriptor of a shared-memory tile starting at ``addr``."""
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (swz << 62)


# ---------------------------------------------------------------------------
# Numpy twin: our reading of the descriptor + fragment layout, end to end
# ---------------------------------------------------------------------------


def _twin_read_operand(smem, desc, rows):
    """Decode ``desc`` the way we believe the hardware does (K-major, bf16 bits as
    uint16) and return the (rows, 16) operand tile it points at."""
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    swz = (desc >> 62) & 3
    out = np.zeros((rows, 16), np.uint16)
    for r in range(rows):
        for k in range(16):
            c = k // 8
            if swz == 1:  # 128B swizzle: XOR address bits [4:7) with [7:10)
                addr = start + (r >> 3) * sbo + (r & 7) * 128 + c * 16
                addr = addr ^ (((addr >> 7) & 7) << 4)
            elif swz == 0:  # core matrices: LBO along K, SBO along rows
                addr = start + (r >> 3) * sbo + c * lbo + (r & 7) * 16
            else:
                raise NotImplementedError("swizzle code %d" % swz)
            addr += (k % 8) * 2
            out[r, k] = smem[addr // 2]
    return out


def twin_gemm(a_bits, bt_bits, layout, bn):
    """One block of the kernel, simulated: stage A (128, 64) and Bt (bn, 64) into a
    shared-memory image with ``tile_offset``, build the descriptors exactly as the
    kernel does, decode them, multiply, scatter into per-thread accumulators with
    the m64nN fragment layout and gather them back into C (128, bn), float32."""
    from sla_numba.gpu.tc.ptx import bf16_bits_to_f32

    lbo, sbo, swz, kstep = layout_desc_fields(layout)
    smem = np.zeros((BM + bn) * 128 // 2, np.uint16)
    a_base, b_base = 0, BM * 128
    for r in range(BM):
        for c in range(8):
            o = (a_base + tile_offset(layout, r, c)) // 2
            smem[o : o + 8] = a_bits[r, 8 * c : 8 * c + 8]
    for r in range(bn):
        for c in range(8):
            o = (b_base + tile_offset(layout, r, c)) // 2
            smem[o : o + 8] = bt_bits[r, 8 * c : 8 * c + 8]
    acc = np.zeros((THREADS, bn // 2), np.float64)
    for wg in range(2):
        d = np.zeros((64, bn))
        for kk in range(BK // 16):
            da = make_desc(a_base + wg * 64 * 128 + kk * kstep, lbo, sbo, swz)
            db = make_desc(b_base + kk * kstep, lbo, sbo, swz)
            at = bf16_bits_to_f32(_twin_read_operand(smem, da, 64)).astype(np.float64)
            bt = bf16_bits_to_f32(_twin_read_operand(smem, db, bn)).astype(np.float64)
            d += at @ bt.T
        for tid in range(128 * wg, 128 * wg + 128):
            q, lane = (tid & 127) >> 5, tid & 31
            g, t = lane >> 2, lane & 3
            for j in range(bn // 8):
                acc[tid, 4 * j : 4 * j + 2] = d[16 * q + g, 8 * j + 2 * t : 8 * j + 2 * t + 2]
                acc[tid, 4 * j + 2 : 4 * j + 4] = d[
                    16 * q + g + 8, 8 * j + 2 * t : 8 * j + 2 * t + 2
                ]
    c_out = np.full((BM, bn), np.nan, np.float32)  # poisoned: every element must be written
    for tid in range(THREADS):  # the kernel's epilogue addressing
        wg, q, lane = tid // 128, (tid & 127) >> 5, tid & 31
        g, t = lane >> 2, lane & 3
        row = wg * 64 + q * 16 + g
        for j in range(bn // 8):
            c_out[row, 8 * j + 2 * t : 8 * j + 2 * t + 2] = acc[tid, 4 * j : 4 * j + 2]
            c_out[row + 8, 8 * j + 2 * t : 8 * j + 2 * t + 2] = acc[tid, 4 * j + 2 : 4 * j + 4]
    return c_out


# ---------------------------------------------------------------------------
# Inline-PTX intrinsics
# ---------------------------------------------------------------------------


def build_intrinsics():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import _intrinsic, intrinsic

    lit_intrinsic = _intrinsic(target="cuda", prefer_literal=True)

    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()

    def asm(builder, ret, argtys, text, cons, args, side_effect=True):
        fnty = ir.FunctionType(ret, argtys)
        return builder.call(ir.InlineAsm(fnty, text, cons, side_effect=side_effect), args)

    def as_int(context, builder, val, ty, want):
        return context.cast(builder, val, ty, want)

    @intrinsic
    def cp_async16(typingctx, saddr, gaddr):
        """16-byte cp.async global -> shared (shared byte address, generic address)."""
        sig = types.void(saddr, gaddr)

        def codegen(context, builder, sig, args):
            s = as_int(context, builder, args[0], sig.args[0], types.int32)
            g = as_int(context, builder, args[1], sig.args[1], types.int64)
            asm(
                builder,
                ir.VoidType(),
                [i32, i64],
                "{ .reg .u64 ga; cvta.to.global.u64 ga, $1; "
                "cp.async.cg.shared.global [$0], [ga], 16; }",
                "r,l,~{memory}",
                [s, g],
            )
            return context.get_dummy_value()

        return sig, codegen

    def void_asm(text):
        @intrinsic
        def fn(typingctx):
            def codegen(context, builder, sig, args):
                asm(builder, ir.VoidType(), [], text, "~{memory}", [])
                return context.get_dummy_value()

            return types.void(), codegen

        return fn

    @lit_intrinsic
    def cp_async_wait(typingctx, n):
        if not isinstance(n, types.IntegerLiteral):
            return None
        text = "cp.async.wait_group %d;" % n.literal_value

        def codegen(context, builder, sig, args):
            asm(builder, ir.VoidType(), [], text, "~{memory}", [])
            return context.get_dummy_value()

        return types.void(n), codegen

    def acc_asm(nacc, text_fn):
        """Intrinsic (acc, n) -> acc around an instruction that must be ordered with
        the accumulator registers (ties all of them: "+f")."""

        @lit_intrinsic
        def fn(typingctx, acc, n):
            if not isinstance(n, types.IntegerLiteral):
                return None
            text = text_fn(n.literal_value)
            sig = acc(acc, n)

            def codegen(context, builder, sig, args):
                vals = [builder.extract_value(args[0], i) for i in range(nacc)]
                cons = ",".join(["=f"] * nacc + [str(i) for i in range(nacc)] + ["~{memory}"])
                res = asm(
                    builder, ir.LiteralStructType([f32] * nacc), [f32] * nacc, text, cons, vals
                )
                out = [builder.extract_value(res, i) for i in range(nacc)]
                return context.make_tuple(builder, sig.return_type, out)

            return sig, codegen

        return fn

    def make_wgmma(bn):
        nacc = bn // 2
        regs = ",".join("$%d" % i for i in range(nacc))
        text = (
            "{ .reg .pred p; setp.ne.b32 p, $%d, 0; "
            "wgmma.mma_async.sync.aligned.m64n%dk16.f32.bf16.bf16 "
            "{%s}, $%d, $%d, p, 1, 1, 0, 0; }" % (nacc + 2, bn, regs, nacc, nacc + 1)
        )

        @intrinsic
        def wgmma(typingctx, acc, desc_a, desc_b, scale_d):
            sig = acc(acc, types.int64, types.int64, types.int32)

            def codegen(context, builder, sig, args):
                vals = [builder.extract_value(args[0], i) for i in range(nacc)]
                da = as_int(context, builder, args[1], sig.args[1], types.int64)
                db = as_int(context, builder, args[2], sig.args[2], types.int64)
                sd = as_int(context, builder, args[3], sig.args[3], types.int32)
                cons = ",".join(
                    ["=f"] * nacc + ["l", "l", "r"] + [str(i) for i in range(nacc)] + ["~{memory}"]
                )
                res = asm(
                    builder,
                    ir.LiteralStructType([f32] * nacc),
                    [i64, i64, i32] + [f32] * nacc,
                    text,
                    cons,
                    [da, db, sd] + vals,
                )
                out = [builder.extract_value(res, i) for i in range(nacc)]
                return context.make_tuple(builder, sig.return_type, out)

            return sig, codegen

        return wgmma

    def make_zero(nacc):
        @intrinsic
        def zero_acc(typingctx):
            sig = types.UniTuple(types.float32, nacc)()

            def codegen(context, builder, sig, args):
                return context.make_tuple(builder, sig.return_type, [ir.Constant(f32, 0.0)] * nacc)

            return sig, codegen

        return zero_acc

    def make_store(nacc):
        @intrinsic
        def store_acc_bf16(typingctx, acc, base, ldc):
            """Round the accumulators to bf16 and store them: pair j of row g goes to
            ``base + 16j``, pair j of row g+8 to ``base + 8*ldc + 16j`` (bytes)."""
            sig = types.void(acc, types.int64, types.int64)

            def codegen(context, builder, sig, args):
                b = as_int(context, builder, args[1], sig.args[1], types.int64)
                ld = as_int(context, builder, args[2], sig.args[2], types.int64)
                row8 = builder.add(b, builder.mul(ld, ir.Constant(i64, 8)))
                for j in range(nacc // 4):
                    for h, rb in ((0, b), (1, row8)):
                        lo = builder.extract_value(args[0], 4 * j + 2 * h)
                        hi = builder.extract_value(args[0], 4 * j + 2 * h + 1)
                        packed = asm(
                            builder,
                            i32,
                            [f32, f32],
                            "cvt.rn.bf16x2.f32 $0, $1, $2;",
                            "=r,f,f",
                            [hi, lo],
                            side_effect=False,
                        )
                        addr = builder.add(rb, ir.Constant(i64, 16 * j))
                        asm(
                            builder,
                            ir.VoidType(),
                            [i64, i32],
                            "{ .reg .u64 ga; cvta.to.global.u64 ga, $0; st.global.b32 [ga], $1; }",
                            "l,r,~{memory}",
                            [addr, packed],
                        )
                return context.get_dummy_value()

            return sig, codegen

        return store_acc_bf16

    def generic_asm(text, argtys, cons):
        """Intrinsic with int arguments (cast to ``argtys``: 32 or 64) and no result."""
        nt = {32: types.int32, 64: types.int64}

        def typer(*args):
            sig = types.void(*args)

            def codegen(context, builder, sig, vals):
                vals = [
                    as_int(context, builder, v, t, nt[w]) for v, t, w in zip(vals, sig.args, argtys)
                ]
                asm(builder, ir.VoidType(), [ir.IntType(w) for w in argtys], text, cons, vals)
                return context.get_dummy_value()

            return sig, codegen

        # @intrinsic needs a fixed arity (no *args)
        if len(argtys) == 1:
            return intrinsic(lambda typingctx, a0: typer(a0))
        if len(argtys) == 2:
            return intrinsic(lambda typingctx, a0, a1: typer(a0, a1))
        if len(argtys) == 5:
            return intrinsic(lambda typingctx, a0, a1, a2, a3, a4: typer(a0, a1, a2, a3, a4))
        raise ValueError("unsupported arity %d" % len(argtys))

    @intrinsic
    def mbar_try_wait(typingctx, addr, parity):
        """1 once the mbarrier at shared address ``addr`` completed phase ``parity``."""
        sig = types.int32(addr, parity)

        def codegen(context, builder, sig, args):
            a = as_int(context, builder, args[0], sig.args[0], types.int32)
            ph = as_int(context, builder, args[1], sig.args[1], types.int32)
            return asm(
                builder,
                i32,
                [i32, i32],
                "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2; "
                "selp.u32 $0, 1, 0, p; }",
                "=r,r,r,~{memory}",
                [a, ph],
            )

        return sig, codegen

    fns = dict(
        mbar_init=generic_asm("mbarrier.init.shared::cta.b64 [$0], $1;", (32, 32), "r,r,~{memory}"),
        mbar_expect_tx=generic_asm(
            "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;", (32, 32), "r,r,~{memory}"
        ),
        mbar_try_wait=mbar_try_wait,
        mbar_arrive=generic_asm("mbarrier.arrive.shared::cta.b64 _, [$0];", (32,), "r,~{memory}"),
        fence_mbar_init=void_asm("fence.mbarrier_init.release.cluster;"),
        tmap_acquire=generic_asm(
            "fence.proxy.tensormap::generic.acquire.gpu [$0], 128;", (64,), "l,~{memory}"
        ),
        tma_load_2d=generic_asm(
            "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
            " [$0], [$1, {$2, $3}], [$4];",
            (32, 64, 32, 32, 32),
            "r,l,r,r,r,~{memory}",
        ),
        st_u32=generic_asm(
            "{ .reg .u64 ga; cvta.to.global.u64 ga, $0; st.global.u32 [ga], $1; }",
            (64, 32),
            "l,r,~{memory}",
        ),
    )
    fns.update(
        cp_async16=cp_async16,
        cp_async_wait=cp_async_wait,
        cp_async_commit=void_asm("cp.async.commit_group;"),
        fence_proxy_async=void_asm("fence.proxy.async.shared::cta;"),
        wgmma_commit=void_asm("wgmma.commit_group.sync.aligned;"),
    )
    for bn in (128, 256):
        nacc = bn // 2
        fns["wgmma_%d" % bn] = make_wgmma(bn)
        fns["zero_%d" % bn] = make_zero(nacc)
        fns["store_%d" % bn] = make_store(nacc)
        fns["wfence_%d" % bn] = acc_asm(nacc, lambda n: "wgmma.fence.sync.aligned;")
        fns["wwait_%d" % bn] = acc_asm(nacc, lambda n: "wgmma.wait_group.sync.aligned %d;" % n)
    return fns


# ---------------------------------------------------------------------------
# The kernel (Python source for Numba), specialised by closure constants
# ---------------------------------------------------------------------------


def make_kernel_pyfunc(bn, stages, layout, mma_only=False):
    """Return the Python function of the GEMM kernel for one configuration.

    Arguments at launch (all int64): a_ptr, bt_ptr, c_ptr (device addresses of
    bf16 A (M, K), Bt (N, K), C (M, N), row-major), M, N, K. Grid (N // bn, M // 128),
    block 256, dynamic shared memory ``smem_bytes(bn, stages)``.

    ``mma_only=True`` is a ceiling measurement, not a GEMM: only the prologue copies
    data, then every k-tile runs the same wgmma sequence on whatever the ring holds
    (the result is meaningless; the time is what the wgmma issue loop costs without
    the global -> shared traffic).
    """
    from numba import cuda, int32

    from sla_numba.gpu.tc.ptx import smem_addr

    if stages < 3:
        raise ValueError("stages must be >= 3, got %r" % (stages,))
    f = build_intrinsics()
    cp_async16, cp_async_wait = f["cp_async16"], f["cp_async_wait"]
    cp_async_commit, fence_proxy_async = f["cp_async_commit"], f["fence_proxy_async"]
    wgmma, wgmma_commit = f["wgmma_%d" % bn], f["wgmma_commit"]
    zero_acc, store_acc = f["zero_%d" % bn], f["store_%d" % bn]
    wfence, wwait = f["wfence_%d" % bn], f["wwait_%d" % bn]
    lbo, sbo, swz, kstep = layout_desc_fields(layout)
    desc_hi = (lbo >> 4) << 16 | (sbo >> 4) << 32 | swz << 62  # fixed fields
    sw = layout == "sw128"
    STAGE = (BM + bn) * 128
    B_OFF = BM * 128
    NB = bn // 32
    WAITN = stages - 3
    PREF = stages - 2

    @cuda.jit(device=True, inline="always")
    def off(r, c):
        if sw:
            return r * 128 + ((c ^ (r & 7)) << 4)
        return ((r >> 3) * 8 + c) * 128 + (r & 7) * 16

    @cuda.jit(device=True, inline="always")
    def load_tile(sbase, a_ptr, b_ptr, m0, n0, K, kt, st, rsub, chunk):
        k0 = kt * BK + chunk * 8
        sa = sbase + st * STAGE
        for i in range(4):
            r = rsub + 32 * i
            cp_async16(sa + off(r, chunk), a_ptr + ((m0 + r) * K + k0) * 2)
        sb = sa + B_OFF
        for i in range(NB):
            r = rsub + 32 * i
            cp_async16(sb + off(r, chunk), b_ptr + ((n0 + r) * K + k0) * 2)

    def gemm(a_ptr, b_ptr, c_ptr, M, N, K):
        smem = cuda.shared.array(0, int32)
        sbase = (smem_addr(smem) + 1023) & ~1023  # 1024-aligned (swizzle atoms)
        tid = cuda.threadIdx.x
        wg = tid >> 7
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * bn
        KT = K // BK
        chunk = tid & 7
        rsub = tid >> 3
        acc = zero_acc()
        for s in range(PREF):
            if s < KT:
                load_tile(sbase, a_ptr, b_ptr, m0, n0, K, s, s, rsub, chunk)
            cp_async_commit()
        for kt in range(KT):
            cp_async_wait(WAITN)
            fence_proxy_async()
            cuda.syncthreads()
            sa = sbase + (kt % stages) * STAGE
            a_start = sa + wg * (64 * 128)
            b_start = sa + B_OFF
            acc = wfence(acc, 0)
            for kk in range(BK // 16):
                da = (((a_start + kk * kstep) & 0x3FFFF) >> 4) | desc_hi
                db = (((b_start + kk * kstep) & 0x3FFFF) >> 4) | desc_hi
                acc = wgmma(acc, da, db, 1)
            wgmma_commit()
            acc = wwait(acc, 1)
            nxt = kt + PREF
            if nxt < KT and not mma_only:
                load_tile(sbase, a_ptr, b_ptr, m0, n0, K, nxt, nxt % stages, rsub, chunk)
            cp_async_commit()
        acc = wwait(acc, 0)
        q = (tid & 127) >> 5
        lane = tid & 31
        row = m0 + wg * 64 + q * 16 + (lane >> 2)
        col = n0 + 2 * (lane & 3)
        store_acc(acc, c_ptr + (row * N + col) * 2, N * 2)

    return gemm


def smem_bytes(bn, stages):
    return stages * (BM + bn) * 128 + 1024 + 16 * stages  # + alignment slack + mbarriers


def make_tma_kernel_pyfunc(bn, stages, spin_limit=1 << 20):
    """The same GEMM with TMA instead of cp.async (sw128 layout only).

    Arguments (int64): ta, tb (device addresses of the two 128-byte CUtensorMaps,
    A boxes 64 x 128 and Bt boxes 64 x bn, 128B swizzle), c_ptr, M, N, K, err_ptr.
    Thread 0 arms stage s's mbarrier with the byte count and issues both tile copies;
    every thread waits on the mbarrier's phase ``(kt // stages) & 1``. Waits are
    bounded (``spin_limit`` polls): on a timeout the thread stops waiting, finishes
    with garbage and writes 1 to ``err_ptr`` (so a wrong setup cannot hang the run).
    """
    from numba import cuda, int32

    from sla_numba.gpu.tc.ptx import smem_addr

    f = build_intrinsics()
    mbar_init, mbar_expect_tx = f["mbar_init"], f["mbar_expect_tx"]
    mbar_try_wait, fence_mbar_init = f["mbar_try_wait"], f["fence_mbar_init"]
    tmap_acquire, tma_load_2d = f["tmap_acquire"], f["tma_load_2d"]
    st_u32 = f["st_u32"]
    wgmma, wgmma_commit = f["wgmma_%d" % bn], f["wgmma_commit"]
    zero_acc, store_acc = f["zero_%d" % bn], f["store_%d" % bn]
    wfence, wwait = f["wfence_%d" % bn], f["wwait_%d" % bn]
    lbo, sbo, swz, kstep = layout_desc_fields("sw128")
    desc_hi = (lbo >> 4) << 16 | (sbo >> 4) << 32 | swz << 62
    STAGE = (BM + bn) * 128
    B_OFF = BM * 128
    LIMIT = spin_limit

    @cuda.jit(device=True, inline="always")
    def issue(sbase, bars, ta, tb, m0, n0, kt, st):
        bar = bars + 8 * st
        mbar_expect_tx(bar, STAGE)
        sa = sbase + st * STAGE
        tma_load_2d(sa, ta, kt * BK, m0, bar)
        tma_load_2d(sa + B_OFF, tb, kt * BK, n0, bar)

    def gemm_tma(ta, tb, c_ptr, M, N, K, err_ptr):
        smem = cuda.shared.array(0, int32)
        sbase = (smem_addr(smem) + 1023) & ~1023
        bars = sbase + stages * STAGE
        tid = cuda.threadIdx.x
        wg = tid >> 7
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * bn
        KT = K // BK
        if tid == 0:
            tmap_acquire(ta)
            tmap_acquire(tb)
            for s in range(stages):
                mbar_init(bars + 8 * s, 1)
            fence_mbar_init()
        cuda.syncthreads()
        if tid == 0:
            for s in range(stages - 1):
                if s < KT:
                    issue(sbase, bars, ta, tb, m0, n0, s, s)
        acc = zero_acc()
        bad = 0
        for kt in range(KT):
            st = kt % stages
            parity = (kt // stages) & 1
            polls = 0
            while bad == 0 and mbar_try_wait(bars + 8 * st, parity) == 0:
                polls += 1
                if polls > LIMIT:
                    bad = 1
            sa = sbase + st * STAGE
            a_start = sa + wg * (64 * 128)
            b_start = sa + B_OFF
            acc = wfence(acc, 0)
            for kk in range(BK // 16):
                da = (((a_start + kk * kstep) & 0x3FFFF) >> 4) | desc_hi
                db = (((b_start + kk * kstep) & 0x3FFFF) >> 4) | desc_hi
                acc = wgmma(acc, da, db, 1)
            wgmma_commit()
            acc = wwait(acc, 1)
            cuda.syncthreads()  # every warpgroup is done with tile kt-1's stage
            nxt = kt + stages - 1
            if tid == 0 and nxt < KT:
                issue(sbase, bars, ta, tb, m0, n0, nxt, nxt % stages)
        acc = wwait(acc, 0)
        if bad != 0:
            st_u32(err_ptr, 1)
        q = (tid & 127) >> 5
        lane = tid & 31
        row = m0 + wg * 64 + q * 16 + (lane >> 2)
        col = n0 + 2 * (lane & 3)
        store_acc(acc, c_ptr + (row * N + col) * 2, N * 2)

    return gemm_tma


def make_ws_kernel_pyfunc(bn, stages, spin_limit=1 << 20):
    """Warp-specialised TMA GEMM: 3 warpgroups (384 threads). Warpgroup 0 is the
    producer (its thread 0 issues the TMA copies, the rest exit); warpgroups 1 and 2
    are consumers (rows 0-63 and 64-127 of the tile). Two mbarriers a stage: ``full``
    (TMA bytes landed; phase = fill number & 1) and ``empty`` (all 256 consumer
    threads finished the tile that was in it). No block-wide barrier in the loop, so
    the producer runs up to ``stages`` tiles ahead. Same kernel arguments as the
    ``tma`` variant; waits are bounded the same way."""
    from numba import cuda, int32

    from sla_numba.gpu.tc.ptx import smem_addr

    f = build_intrinsics()
    mbar_init, mbar_expect_tx = f["mbar_init"], f["mbar_expect_tx"]
    mbar_try_wait, fence_mbar_init = f["mbar_try_wait"], f["fence_mbar_init"]
    tmap_acquire, tma_load_2d, mbar_arrive = f["tmap_acquire"], f["tma_load_2d"], f["mbar_arrive"]
    st_u32 = f["st_u32"]
    wgmma, wgmma_commit = f["wgmma_%d" % bn], f["wgmma_commit"]
    zero_acc, store_acc = f["zero_%d" % bn], f["store_%d" % bn]
    wfence, wwait = f["wfence_%d" % bn], f["wwait_%d" % bn]
    lbo, sbo, swz, kstep = layout_desc_fields("sw128")
    desc_hi = (lbo >> 4) << 16 | (sbo >> 4) << 32 | swz << 62
    STAGE = (BM + bn) * 128
    B_OFF = BM * 128
    LIMIT = spin_limit

    @cuda.jit(device=True, inline="always")
    def wait(bar, parity, bad):
        polls = 0
        while bad == 0 and mbar_try_wait(bar, parity) == 0:
            polls += 1
            if polls > LIMIT:
                bad = 1
        return bad

    def gemm_ws(ta, tb, c_ptr, M, N, K, err_ptr):
        smem = cuda.shared.array(0, int32)
        sbase = (smem_addr(smem) + 1023) & ~1023
        full = sbase + stages * STAGE  # stages x 8 bytes
        empty = full + 8 * stages  # stages x 8 bytes
        tid = cuda.threadIdx.x
        wg = tid >> 7
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * bn
        KT = K // BK
        if tid == 0:
            tmap_acquire(ta)
            tmap_acquire(tb)
            for s in range(stages):
                mbar_init(full + 8 * s, 1)
                mbar_init(empty + 8 * s, 256)
            fence_mbar_init()
        cuda.syncthreads()
        bad = 0
        if wg == 0:
            if tid == 0:  # producer
                for kt in range(KT):
                    st = kt % stages
                    if kt >= stages:
                        bad = wait(empty + 8 * st, ((kt // stages) - 1) & 1, bad)
                    bar = full + 8 * st
                    mbar_expect_tx(bar, STAGE)
                    sa = sbase + st * STAGE
                    tma_load_2d(sa, ta, kt * BK, m0, bar)
                    tma_load_2d(sa + B_OFF, tb, kt * BK, n0, bar)
                if bad != 0:
                    st_u32(err_ptr, 2)
            return
        cw = wg - 1  # consumer warpgroup 0 / 1
        acc = zero_acc()
        for kt in range(KT):
            st = kt % stages
            bad = wait(full + 8 * st, (kt // stages) & 1, bad)
            sa = sbase + st * STAGE
            a_start = sa + cw * (64 * 128)
            b_start = sa + B_OFF
            acc = wfence(acc, 0)
            for kk in range(BK // 16):
                da = (((a_start + kk * kstep) & 0x3FFFF) >> 4) | desc_hi
                db = (((b_start + kk * kstep) & 0x3FFFF) >> 4) | desc_hi
                acc = wgmma(acc, da, db, 1)
            wgmma_commit()
            acc = wwait(acc, 1)  # tile kt-1 is done: release its stage
            if kt > 0:
                mbar_arrive(empty + 8 * ((kt - 1) % stages))
        acc = wwait(acc, 0)
        if bad != 0:
            st_u32(err_ptr, 1)
        q = (tid & 127) >> 5
        lane = tid & 31
        row = m0 + cw * 64 + q * 16 + (lane >> 2)
        col = n0 + 2 * (lane & 3)
        store_acc(acc, c_ptr + (row * N + col) * 2, N * 2)

    return gemm_ws


def tma_kernel_sig():
    from numba import int64, void

    return void(int64, int64, int64, int64, int64, int64, int64)


def encode_tmap(ptr, rows, K, box_rows):
    """128-byte CUtensorMap of a row-major bf16 (rows, K) matrix, boxes of
    ``box_rows`` x 64, 128-byte swizzle (the ``sw128`` shared layout)."""
    import ctypes

    from cuda.bindings import driver as drv

    err, tm = drv.cuTensorMapEncodeTiled(
        drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        2,
        ptr,
        [drv.cuuint64_t(K), drv.cuuint64_t(rows)],
        [drv.cuuint64_t(K * 2)],
        [drv.cuuint32_t(BK), drv.cuuint32_t(box_rows)],
        [drv.cuuint32_t(1), drv.cuuint32_t(1)],
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if int(err) != 0:
        raise RuntimeError("cuTensorMapEncodeTiled failed: %r" % (err,))
    return ctypes.string_at(tm.getPtr(), 128)


def kernel_sig():
    from numba import int64, void

    return void(int64, int64, int64, int64, int64, int64)


def count(text, word):
    return len(re.findall(re.escape(word), text))


def nvjitlink_assemble(ptx, arch):
    """Assemble PTX with nvJitLink -> (cubin bytes, info log)."""
    from cuda.bindings import nvjitlink

    data = ptx.encode()
    h = nvjitlink.create(2, ["-arch=%s" % arch, "-verbose"])
    try:
        try:  # PTX is compiled by add_data already; errors can come from either call
            nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "wgmma_probe")
            nvjitlink.complete(h)
        except Exception as e:
            n = nvjitlink.get_error_log_size(h)
            buf = bytearray(n)
            nvjitlink.get_error_log(h, buf)
            raise RuntimeError(
                "nvJitLink failed: %s\n%s" % (e, buf.decode(errors="replace"))
            ) from e
        n = nvjitlink.get_linked_cubin_size(h)
        cubin = bytearray(n)
        nvjitlink.get_linked_cubin(h, cubin)
        n = nvjitlink.get_info_log_size(h)
        info = bytearray(n)
        nvjitlink.get_info_log(h, info)
    finally:
        nvjitlink.destroy(h)
    return bytes(cubin), info.decode(errors="replace").strip("\x00")


def ptx_stage(bn, stages, layout, mma_only=False, negative_control=False):
    """Compile to PTX for sm_90a and sm_90, retarget, assemble. Returns the sm_90a
    PTX (or None) and records every step."""
    from numba import cuda

    tag = tag_of((bn, stages, layout, mma_only))
    if layout in ("tma", "ws"):
        make = make_tma_kernel_pyfunc if layout == "tma" else make_ws_kernel_pyfunc
        fn, sig = make(bn, stages), tma_kernel_sig()
    else:
        fn, sig = make_kernel_pyfunc(bn, stages, layout, mma_only), kernel_sig()
    t0 = time.time()
    try:
        ptx_a, _ = cuda.compile_ptx(fn, sig, cc=(9, 0, "a"))
        tgt = re.search(r"\.target\s+(\S+)", ptx_a).group(1)
        log(
            "ptx sm_90a (cc=(9,0,'a'))",
            tgt == "sm_90a",
            config=tag,
            target=tgt,
            version=re.search(r"\.version\s+(\S+)", ptx_a).group(1),
            wgmma=count(ptx_a, "wgmma.mma_async"),
            expected_wgmma=BK // 16,
            tma=count(ptx_a, "cp.async.bulk.tensor"),
            local=count(ptx_a, ".local"),
            seconds=round(time.time() - t0, 1),
        )
    except Exception as e:
        log(
            "ptx sm_90a (cc=(9,0,'a'))",
            False,
            config=tag,
            error=repr(e),
            trace=traceback.format_exc(),
        )
        ptx_a = None
    try:
        ptx_90, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        retarget = re.sub(r"\.target\s+sm_90\b", ".target sm_90a", ptx_90)
        log(
            "ptx sm_90 + retarget",
            ".target sm_90a" in retarget,
            config=tag,
            wgmma=count(retarget, "wgmma.mma_async"),
        )
    except Exception as e:
        log("ptx sm_90 + retarget", False, config=tag, error=repr(e))
        retarget = None
    ptx = ptx_a or retarget
    if ptx is None:
        return None, None
    try:
        cubin, info = nvjitlink_assemble(ptx, "sm_90a")
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        warn = [
            ln.strip()
            for ln in info.splitlines()  # e.g. wgmma serialization advice
            if re.search(r"warning|serializ|performance", ln, re.I)
        ]
        log(
            "nvjitlink sm_90a",
            True,
            config=tag,
            cubin_bytes=len(cubin),
            registers=int(regs.group(1)) if regs else -1,
            spill=spill.group(0) if spill else "?",
            warnings=warn[:6],
        )
    except Exception as e:
        log("nvjitlink sm_90a", False, config=tag, error=str(e)[:2000])
        cubin = None
    if negative_control:  # the same PTX for plain sm_90 must be refused (wgmma)
        plain = re.sub(r"\.target\s+sm_90a\b", ".target sm_90", ptx)
        try:
            nvjitlink_assemble(plain, "sm_90")
            log(
                "nvjitlink sm_90 refuses wgmma",
                False,
                config=tag,
                error="sm_90 assembled a wgmma kernel",
            )
        except Exception as e:
            msg = str(e)
            log(
                "nvjitlink sm_90 refuses wgmma",
                True,
                config=tag,
                log=" ".join(
                    ln.strip() for ln in msg.splitlines() if "wgmma" in ln or "sm_90a" in ln
                )[:300],
            )
    return ptx, cubin


# ---------------------------------------------------------------------------
# GPU part
# ---------------------------------------------------------------------------


def _set_max_dyn_smem(handle, nbytes, dev_id):
    """Allow > 48 KiB of dynamic shared memory for a CUkernel / CUfunction."""
    from cuda.bindings import driver as drv

    attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    try:  # library-based loading (cuda.core, numba-cuda >= 0.23): a CUkernel
        (err,) = drv.cuKernelSetAttribute(attr, nbytes, handle, dev_id)
    except TypeError:
        (err,) = drv.cuFuncSetAttribute(handle, attr, nbytes)
    if int(err) != 0:
        raise RuntimeError("set MAX_DYNAMIC_SHARED_SIZE_BYTES failed: %r" % (err,))


class JitLauncher:
    """Path 1: plain ``@cuda.jit``; numba-cuda builds for the current device (sm_90a)."""

    name = "jit"

    def __init__(self, bn, stages, layout, mma_only=False):
        from numba import cuda

        self.bn, self.smem = bn, smem_bytes(bn, stages)
        self.kernel = cuda.jit(kernel_sig())(make_kernel_pyfunc(bn, stages, layout, mma_only))
        lib = next(iter(self.kernel.overloads.values())).library
        ptx = lib.get_asm_str()
        self.target = re.search(r"\.target\s+(\S+)", ptx).group(1)
        self.wgmma = count(ptx, "wgmma.mma_async")
        cufunc = lib.get_cufunc()
        self.regs = cufunc.attrs.regs
        _set_max_dyn_smem(cufunc.handle, self.smem, cuda.get_current_device().id)

    def __call__(self, a, bt, c):
        M, K = a.shape
        N = bt.shape[0]
        grid = (N // self.bn, M // BM)
        self.kernel[grid, THREADS, 0, self.smem](a.data_ptr(), bt.data_ptr(), c.data_ptr(), M, N, K)


class TmaLauncher:
    """The TMA variants through plain ``@cuda.jit`` (tensor maps live in device memory)."""

    name = "jit"

    def __init__(self, bn, stages, ws=False):
        import torch
        from numba import cuda

        self.bn, self.smem = bn, smem_bytes(bn, stages)
        self.threads = THREADS + 128 if ws else THREADS
        make = make_ws_kernel_pyfunc if ws else make_tma_kernel_pyfunc
        self.kernel = cuda.jit(tma_kernel_sig())(make(bn, stages))
        lib = next(iter(self.kernel.overloads.values())).library
        ptx = lib.get_asm_str()
        self.target = re.search(r"\.target\s+(\S+)", ptx).group(1)
        self.wgmma = count(ptx, "wgmma.mma_async")
        cufunc = lib.get_cufunc()
        self.regs = cufunc.attrs.regs
        _set_max_dyn_smem(cufunc.handle, self.smem, cuda.get_current_device().id)
        self.err = torch.zeros(1, dtype=torch.int32, device="cuda")
        self._maps = {}

    def __call__(self, a, bt, c):
        import torch

        M, K = a.shape
        N = bt.shape[0]
        key = (a.data_ptr(), bt.data_ptr(), M, N, K)
        if key not in self._maps:
            raw = encode_tmap(a.data_ptr(), M, K, BM) + encode_tmap(bt.data_ptr(), N, K, self.bn)
            self._maps[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).cuda()
        maps = self._maps[key]
        grid = (N // self.bn, M // BM)
        self.kernel[grid, self.threads, 0, self.smem](
            maps.data_ptr(), maps.data_ptr() + 128, c.data_ptr(), M, N, K, self.err.data_ptr()
        )

    def timed_out(self):
        return int(self.err.item()) != 0


class RetargetLauncher:
    """Path 2: Numba PTX for sm_90 retargeted to sm_90a, assembled by nvJitLink, loaded
    and launched with cuda.core."""

    name = "retarget"

    def __init__(self, bn, stages, layout, mma_only=False, cubin=None):
        from cuda.core import Device, ObjectCode
        from numba import cuda

        self.bn, self.smem = bn, smem_bytes(bn, stages)
        fn = make_kernel_pyfunc(bn, stages, layout, mma_only)
        ptx, _ = cuda.compile_ptx(fn, kernel_sig(), cc=(9, 0))
        self.entry = re.search(r"\.entry\s+(\S+?)\(", ptx).group(1)
        if cubin is None:
            cubin, _ = nvjitlink_assemble(
                re.sub(r"\.target\s+sm_90\b", ".target sm_90a", ptx), "sm_90a"
            )
        self.target, self.wgmma, self.regs = "sm_90a", count(ptx, "wgmma.mma_async"), -1
        self.dev = Device()
        self.dev.set_current()
        self.kern = ObjectCode.from_cubin(cubin).get_kernel(self.entry)
        _set_max_dyn_smem(self.kern.handle, self.smem, self.dev.device_id)

    def __call__(self, a, bt, c):
        from cuda.core import LaunchConfig, launch

        M, K = a.shape
        N = bt.shape[0]
        cfg = LaunchConfig(grid=(N // self.bn, M // BM), block=THREADS, shmem_size=self.smem)
        from cuda.core import LEGACY_DEFAULT_STREAM  # torch's default stream too

        stream = LEGACY_DEFAULT_STREAM
        args = [np.int64(x) for x in (a.data_ptr(), bt.data_ptr(), c.data_ptr(), M, N, K)]
        launch(stream, cfg, self.kern, *args)


def check_sizes(M, N, K, bn):
    for name, v, m in (("M", M, BM), ("N", N, bn), ("K", K, BK)):
        if v <= 0 or v % m:
            raise ValueError("%s=%d must be a positive multiple of %d" % (name, v, m))


def gpu_check(launcher, M, N, K):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    bt = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g)
    c = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    launcher(a, bt, c)
    torch.cuda.synchronize()
    ref = a.float() @ bt.float().t()
    err = (c.float() - ref).abs()
    max_err = float(err.nan_to_num(float("inf")).max())
    tol = 2e-2 * float(ref.abs().max()) + 1e-2  # bf16 output rounding dominates
    return max_err, tol, int(torch.isnan(c).sum())


def bench(fn, reps):
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e-3


def gpu_plan(configs, paths):
    """(config, path) pairs in the order they run: the main sw128 GEMMs and the
    fallback path first, then the mma-only ceilings, the TMA variant, other ring
    depths, and the no-swizzle diagnostics last (a fault poisons the CUDA context)."""
    first_stage = configs[0][1]

    def rank(cfg):
        _, st, lay, ceiling = cfg
        if lay == "sw128" and not ceiling and st == first_stage:
            return 0
        if ceiling:
            return 1
        if lay in ("tma", "ws"):
            return 2
        return 3 if lay == "sw128" else 4

    plan = [(cfg, "jit") for cfg in sorted(configs, key=rank)] if "jit" in paths else []
    if "retarget" in paths:
        plan.insert(min(len(plan), 2), (configs[0], "retarget"))
    return plan


def _try_load(cfg, path, cubins):
    t0 = time.time()
    try:
        if cfg[2] in ("tma", "ws"):
            L = TmaLauncher(cfg[0], cfg[1], ws=cfg[2] == "ws")
        elif path == "jit":
            L = JitLauncher(*cfg)
        else:
            L = RetargetLauncher(*cfg, cubin=cubins.get(cfg))
        log(
            "load " + path,
            True,
            config=tag_of(cfg),
            target=L.target,
            wgmma_in_ptx=L.wgmma,
            registers=L.regs,
            smem=L.smem,
            seconds=round(time.time() - t0, 1),
        )
        return L
    except Exception as e:
        log(
            "load " + path,
            False,
            config=tag_of(cfg),
            error=repr(e)[:500],
            trace=traceback.format_exc(),
        )
        return None


def gpu_stage(args, configs, cubins, deadline):
    import torch

    if not torch.cuda.is_available():
        log("gpu", False, error="torch.cuda.is_available() is False")
        return
    cap = torch.cuda.get_device_capability()
    log(
        "gpu",
        cap >= (9, 0),
        device=torch.cuda.get_device_name(),
        cc="%d.%d" % cap,
        torch=torch.__version__,
    )
    if cap < (9, 0):
        return
    results, torch_t = [], None
    REPORT["results"] = results  # filled as configurations finish
    n = args.size
    flops = 2.0 * n**3
    if args.bench:
        a_b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        bt_b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        c_b = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        torch_t = bench(lambda: torch.matmul(a_b, bt_b.t()), args.reps)
        REPORT["torch_tflops"] = flops / torch_t / 1e12
        log("bench torch.matmul", True, size=n, tflops="%.1f" % REPORT["torch_tflops"])
    plan = gpu_plan(configs, args.paths)
    done = set()
    while plan:
        cfg, path = plan.pop(0)
        if (cfg, path) in done:
            continue
        done.add((cfg, path))
        tag = tag_of(cfg)
        if time.time() > deadline:
            log("budget", False, error="time budget spent; skipped %s %s" % (tag, path))
            continue
        if cfg[2] in ("tma", "ws") and not any(
            r.get("check_ok") and "sw128" in r["config"] for r in results
        ):
            log("skip " + tag, False, error="no sw128 configuration passed its check")
            continue
        L = _try_load(cfg, path, cubins)
        if L is None:
            if path == "jit" and "retarget" in args.paths:
                plan.insert(0, (cfg, "retarget"))  # fall back for this configuration
            results.append(dict(config=tag, path=path, loaded=False))
            continue
        rec = dict(config=tag, path=path, loaded=True, registers=L.regs)
        try:
            if cfg[3]:
                raise _Ceiling()
            ms, ns, ks = args.check_size
            check_sizes(ms, ns, ks, cfg[0])
            max_err, tol, nans = gpu_check(L, ms, ns, ks)
            ok = max_err <= tol and nans == 0
            if isinstance(L, TmaLauncher) and L.timed_out():
                ok = False
                log("tma mbarrier wait", False, config=tag, error="timed out (TMA never landed)")
            # inter_swapped is the other reading of LBO/SBO: expected NOT to match torch
            expect = cfg[2] != "inter_swapped"
            rec.update(check_ok=ok, expected_to_match=expect, max_err=max_err, tol=tol, nan=nans)
            log(
                "check " + path,
                ok == expect,
                config=tag,
                size="%dx%dx%d" % (ms, ns, ks),
                matches_torch=ok,
                expected_to_match=expect,
                max_err="%.4g" % max_err,
                tol="%.3g" % tol,
                nan=nans,
            )
        except _Ceiling:
            rec.update(check_ok=None, note="mma-only ceiling: result meaningless, not checked")
        except Exception as e:
            rec.update(check_ok=False, error=repr(e)[:500])
            log(
                "check " + path,
                False,
                config=tag,
                error=repr(e)[:500],
                trace=traceback.format_exc(),
            )
            results.append(rec)
            continue
        if args.bench and rec["check_ok"] is not False:
            try:
                check_sizes(n, n, n, cfg[0])
                t_ours = bench(lambda: L(a_b, bt_b, c_b), args.reps)
                rec.update(
                    size=n,
                    ours_tflops=flops / t_ours / 1e12,
                    torch_tflops=flops / torch_t / 1e12,
                    torch_over_ours=torch_t / t_ours,
                )
                log(
                    ("ceiling " if cfg[3] else "bench ") + path,
                    True,
                    config=tag,
                    size=n,
                    ours_tflops="%.1f" % rec["ours_tflops"],
                    torch_tflops="%.1f" % rec["torch_tflops"],
                    ours_speed_vs_torch="%.3f" % rec["torch_over_ours"],
                )
            except Exception as e:
                log(
                    "bench " + path,
                    False,
                    config=tag,
                    error=repr(e)[:500],
                    trace=traceback.format_exc(),
                )
        results.append(rec)
        save_report()


class _Ceiling(Exception):
    """Raised to skip the correctness check of an mma-only configuration."""


def tag_of(cfg):
    """(bn, stages, layout, mma_only) -> a short name."""
    return "bn%d_s%d_%s%s" % (cfg[0], cfg[1], cfg[2], "_mmaonly" if cfg[3] else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="run on the GPU, compare to torch")
    p.add_argument("--bench", action="store_true", help="time against torch.matmul")
    p.add_argument(
        "--ptx-only", action="store_true", help="no GPU: PTX + nvJitLink for every configuration"
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument("--bn", type=int, nargs="+", default=[128, 256], choices=[128, 256])
    p.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[4, 3],
        help="cp.async ring depths to try (sw128 only; the first one elsewhere)",
    )
    p.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--paths", nargs="+", default=["jit", "retarget"], choices=["jit", "retarget"])
    p.add_argument("--size", type=int, default=8192, help="square bench size")
    p.add_argument(
        "--check-size", type=int, nargs=3, default=[256, 512, 384], metavar=("M", "N", "K")
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--budget",
        type=float,
        default=95.0,
        help="seconds after which no new configuration is started",
    )
    p.add_argument("--twin", action="store_true", help="also run the numpy layout twin")
    p.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the mma-only (no global loads) ceiling configurations",
    )
    args = p.parse_args(argv)
    if min(args.stages) < 3 or smem_bytes(max(args.bn), max(args.stages)) > 227 * 1024:
        p.error("--stages: need >= 3 and the ring must fit 227 KiB of shared memory")
    t_start = time.time()
    deadline = t_start + args.budget
    REPORT["argv"] = sys.argv[1:] if argv is None else list(argv)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        JSON_PATH[:] = [args.json]
    try:
        import numba
        import numba_cuda

        REPORT["versions"] = dict(
            numba=numba.__version__, numba_cuda=numba_cuda.__version__, numpy=np.__version__
        )
    except Exception as e:  # pragma: no cover
        REPORT["versions"] = dict(error=repr(e))
    print("versions:", REPORT["versions"], flush=True)

    if args.twin:
        run_twin(args)

    # sw128 (the fast layout) in every block width; the no-swizzle layouts only as
    # correctness diagnostics, at the smallest width.
    configs = []
    for lay in args.layout:
        if lay == "sw128":
            configs += [(bn, st, lay, False) for st in args.stages for bn in sorted(args.bn)]
            if args.ceiling:
                configs += [(bn, args.stages[0], lay, True) for bn in sorted(args.bn)]
        else:  # TMA in every width; the no-swizzle diagnostics at the smallest
            bns = sorted(args.bn) if lay in ("tma", "ws") else [min(args.bn)]
            configs += [(bn, args.stages[0], lay, False) for bn in bns]
    gpu = (args.check or args.bench) and not args.ptx_only
    cubins = {}
    for i, cfg in enumerate(configs if not gpu else configs[:1]):
        try:
            _, cubins[cfg] = ptx_stage(*cfg, negative_control=(i == 0))
        except Exception as e:
            log("ptx stage", False, config=tag_of(cfg), error=repr(e), trace=traceback.format_exc())
    if gpu:
        try:
            gpu_stage(args, configs, cubins, deadline)
        except Exception as e:
            log("gpu stage", False, error=repr(e), trace=traceback.format_exc())
    REPORT["seconds"] = round(time.time() - t_start, 1)
    REPORT["ok"] = all(s["ok"] for s in REPORT["steps"])
    save_report()
    for r in REPORT.get("results", []):
        print(
            "  %-26s %-9s matches_torch=%-5s %s"
            % (
                r["config"],
                r["path"],
                r.get("check_ok"),
                "%.1f TFLOP/s (torch %.1f)" % (r["ours_tflops"], r["torch_tflops"])
                if "ours_tflops" in r
                else "",
            ),
            flush=True,
        )
    print("done in %.1f s; all steps ok: %s" % (REPORT["seconds"], REPORT["ok"]), flush=True)
    return 0 if REPORT["ok"] else 1


def run_twin(args):
    """Numpy twin of one block for each layout. ``inter_swapped`` is the *other*
    reading of LBO/SBO, so under our model it must disagree with numpy (which shows
    the GPU check can tell the two readings apart)."""
    from sla_numba.gpu.tc.ptx import bf16_bits_to_f32, f32_to_bf16_bits

    rng = np.random.default_rng(0)
    bn = min(args.bn)
    a = f32_to_bf16_bits(rng.standard_normal((BM, BK)).astype(np.float32))
    bt = f32_to_bf16_bits(rng.standard_normal((bn, BK)).astype(np.float32))
    ref = bf16_bits_to_f32(a).astype(np.float64) @ bf16_bits_to_f32(bt).astype(np.float64).T
    for layout in args.layout:
        # TMA with CU_TENSOR_MAP_SWIZZLE_128B writes the sw128 layout (our assumption)
        got = twin_gemm(a, bt, "sw128" if layout in ("tma", "ws") else layout, bn)
        err = float(np.abs(got - ref).max()) if not np.isnan(got).any() else float("nan")
        agree = err < 1e-3
        expect = layout != "inter_swapped"
        log("twin " + layout, agree == expect, max_err=err, expected_to_match=expect)


if __name__ == "__main__":
    sys.exit(main())
