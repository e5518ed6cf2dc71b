"""Tensor-core building blocks for Numba CUDA kernels: inline PTX, with simulator twins.

numba-cuda has no WMMA / ``mma`` API, but a Numba ``@intrinsic`` can emit inline
PTX through llvmlite's ``ir.InlineAsm``. Every instruction the tensor-core kernels
need is wrapped here, and each has a pure-Python *twin* with the same signature
and the same per-lane semantics, used when ``NUMBA_ENABLE_CUDASIM=1`` (the
simulator cannot run an intrinsic). Kernels import the public names below and
never know which of the two they got.

Registers and fragments (one warp = 32 lanes; ``g = lane >> 2``, ``t = lane & 3``)
--------------------------------------------------------------------------------
fp16 / bf16 values travel in pairs: one int32 register holds two 16-bit values,
the first (lower column / lower k) in the low half. Global and shared arrays are
handled as raw ``int16`` bits, so one compiled kernel serves fp16 and bf16 alike
except for the two instructions that interpret the bits (``mma`` and the pack).

``mma(a0..a3, b0, b1, c0..c3) -> (d0, d1, d2, d3)``: ``D = A·B + C`` with
A 16×16 (row-major), B 16×8 (k × n), C/D 16×8 fp32 (PTX ``mma.sync.aligned.
m16n8k16.row.col.f32.{bf16,f16}``). Per lane::

    a0 = A[g,   2t:2t+2]    a1 = A[g+8, 2t:2t+2]
    a2 = A[g, 2t+8:2t+10]   a3 = A[g+8, 2t+8:2t+10]
    b0 = B[2t:2t+2,   g]    b1 = B[2t+8:2t+10, g]        (a column pair of B)
    c0, c1 = C[g, 2t:2t+2]  c2, c3 = C[g+8, 2t:2t+2]      (D likewise)

The C layout of two n8 tiles side by side is exactly the A layout of one k16
step: ``pack(c0, c1)`` of tile 2j is a0, ``pack(c2, c3)`` is a1, and tile 2j+1
gives a2, a3. That is how P = softmax(S) goes from the S accumulators straight
into the P·V product without touching memory.

``ldmatrix_x4(smem, off)``: lanes 8i..8i+7 each give the start (element offset
``off`` into the flat int16 shared array ``smem``) of one row of 8 consecutive
16-bit values of matrix i (i = 0..3). Lane L receives ``r_i = M_i[L>>2,
2(L&3):2(L&3)+2]``. ``ldmatrix_x4_trans`` returns the transpose:
``r_i = (M_i[2(L&3), L>>2], M_i[2(L&3)+1, L>>2])``. With row-major tiles in
shared memory this yields, in one instruction, the A fragment of a 16×16 tile,
the B fragments of two n8 tiles of ``Kᵀ`` (non-transposed load of K rows) or of
``V`` (transposed load of V rows).

``cp_async16(smem, soff, gmem, goff, nbytes)``: an asynchronous 16-byte copy
(8 int16) global → shared that bypasses registers (``cp.async.cg``); ``nbytes``
(0 or 16) bytes are read and the rest zero-filled, which is how tails load zeros.
``cp_async_commit()`` closes a group, ``cp_async_wait_all()`` waits for all of
this thread's groups, ``cp_async_wait_1()`` for all but the most recent one,
``cp_async_wait_group(n)`` (``n`` a literal constant) for all but the ``n`` most recent
ones (a ``syncthreads`` must follow before other threads read what landed).
``cp_async_zfill(smem, saddr, size, gmem, goff, nbytes)``: an asynchronous copy of
``size`` bytes (a literal 4, 8 or 16; ``cp.async.ca``, ``.cg`` for 16) from element
``goff`` of the int16 array ``gmem`` to shared byte address ``saddr``, of which the
first ``nbytes`` are read and the rest zero-filled (``nbytes`` 0: nothing is read);
both addresses must be ``size``-aligned.

Under the simulator ``cp_async16`` / ``cp_async16i`` copy at once, but
``cp_async_zfill``'s twin is *deferred*: the copy is recorded in the thread's open
group and lands (source read, destination written) only when a wait covers its group,
the latest moment a GPU may complete it. A wait on the wrong group count, or a read of
a stage before its wait, then reads stale shared memory in the simulator too.

``ld_nc_v4_f32(gmem, goff)``: four fp32 ``gmem[goff : goff + 4]`` of a float32 array in
one 16-byte load through the read-only path (``ld.global.nc.v4.f32``): ``goff`` a multiple
of 4 and the array 16-byte aligned (the twin checks the offset), and nothing may write
the array while the kernel runs.

``pack_bf16x2(lo, hi)`` / ``pack_f16x2(lo, hi)``: round two fp32 to nearest and
pack them (``cvt.rn.bf16x2.f32``). ``exp2(x)``: ``ex2.approx.ftz.f32``.
``shfl_xor(x, m)``: fp32 butterfly shuffle over the full warp.

Twins
-----
Under the simulator each CUDA thread is a Python thread. A twin of a warp-wide
instruction publishes its lane's operands in a per-warp exchange, waits for the
other 31 lanes (a ``threading.Barrier``), and computes its own result from all
of them with numpy (e.g. the mma twin rebuilds A, B and C and does a float64
matmul rounded to fp32). Every lane of the warp must call the same sequence of
warp-wide operations (true for warp-uniform kernels, which is all we write).
"""

import math
import threading

import numpy as np
from numba import config

SIMULATED = bool(config.ENABLE_CUDASIM)

__all__ = [
    "SIMULATED",
    "mma_bf16",
    "mma_f16",
    "ldmatrix_x4",
    "ldmatrix_x4_trans",
    "cp_async16",
    "cp_async_commit",
    "cp_async_wait_all",
    "cp_async_wait_1",
    "cp_async_wait_group",
    "cp_async_zfill",
    "pack_bf16x2",
    "pack_f16x2",
    "exp2",
    "shfl_xor",
    "smem_addr",
    "ldsm_x4",
    "ldsm_x4_trans",
    "cp_async16i",
    "ld_nc_v4_f32",
    "fmax",
    "bf16_low_f32",
    "bf16_high_f32",
    "f16_low_f32",
    "f16_high_f32",
]


# ---------------------------------------------------------------------------
# Host-side bit helpers (used by the twins and by tests)
# ---------------------------------------------------------------------------


def f32_to_bf16_bits(x):
    """Round-to-nearest-even fp32 -> bf16, as uint16 bits (NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def bf16_bits_to_f32(bits):
    """uint16/int16 bf16 bits -> fp32."""
    b = np.asarray(bits).astype(np.uint16).astype(np.uint32) << 16
    return b.view(np.float32)


def _half_bits_to_f32(bits, bf16):
    bits = np.asarray(bits).astype(np.uint16)
    return bf16_bits_to_f32(bits) if bf16 else bits.view(np.float16).astype(np.float32)


def _unpack_pair(reg, bf16):
    """int32 register -> (low, high) as float32."""
    u = np.uint32(np.int64(reg) & 0xFFFFFFFF)
    lo, hi = np.uint16(u & 0xFFFF), np.uint16(u >> 16)
    vals = _half_bits_to_f32(np.array([lo, hi]), bf16)
    return float(vals[0]), float(vals[1])


def _pack_bits(lo_bits, hi_bits):
    u = (int(lo_bits) & 0xFFFF) | ((int(hi_bits) & 0xFFFF) << 16)
    return int(np.uint32(u).view(np.int32))


# ---------------------------------------------------------------------------
# Simulator twins
# ---------------------------------------------------------------------------

_ex_lock = threading.Lock()


class _WarpExchange:
    """All 32 lanes of one simulated warp meet here to swap operands."""

    def __init__(self):
        self.barrier = threading.Barrier(32)
        self.slots = [None] * 32

    def swap(self, lane, value):
        self.barrier.wait()  # previous swap fully read
        self.slots[lane] = value
        self.barrier.wait()  # every lane has written
        return list(self.slots)


def _exchange(value):
    """Publish this lane's value; return the list of all 32 lanes' values."""
    th = threading.current_thread()
    tid = th.thread_id
    lane, warp = tid % 32, tid // 32
    mgr = th._manager
    key = (tuple(th.blockIdx), warp)
    with _ex_lock:
        table = mgr.__dict__.setdefault("_sla_tc_exchange", {})
        ex = table.get(key)
        if ex is None:
            ex = table[key] = _WarpExchange()
    return ex.swap(lane, value), lane


def _mma_twin(bf16, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    lanes, lane = _exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3))
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for L, (x0, x1, x2, x3, y0, y1, z0, z1, z2, z3) in enumerate(lanes):
        g, t = L >> 2, L & 3
        A[g, 2 * t : 2 * t + 2] = _unpack_pair(x0, bf16)
        A[g + 8, 2 * t : 2 * t + 2] = _unpack_pair(x1, bf16)
        A[g, 2 * t + 8 : 2 * t + 10] = _unpack_pair(x2, bf16)
        A[g + 8, 2 * t + 8 : 2 * t + 10] = _unpack_pair(x3, bf16)
        B[2 * t : 2 * t + 2, g] = _unpack_pair(y0, bf16)
        B[2 * t + 8 : 2 * t + 10, g] = _unpack_pair(y1, bf16)
        C[g, 2 * t : 2 * t + 2] = (z0, z1)
        C[g + 8, 2 * t : 2 * t + 2] = (z2, z3)
    D = (A @ B + C).astype(np.float32)
    g, t = lane >> 2, lane & 3
    return (
        float(D[g, 2 * t]),
        float(D[g, 2 * t + 1]),
        float(D[g + 8, 2 * t]),
        float(D[g + 8, 2 * t + 1]),
    )


def _mma_bf16_twin(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    return _mma_twin(True, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)


def _mma_f16_twin(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    return _mma_twin(False, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)


def _ldmatrix_twin(trans, smem, off):
    offs, lane = _exchange(int(off))
    g, t = lane >> 2, lane & 3
    out = []
    for i in range(4):
        rows = offs[8 * i : 8 * i + 8]
        if trans:
            lo, hi = smem[rows[2 * t] + g], smem[rows[2 * t + 1] + g]
        else:
            lo, hi = smem[rows[g] + 2 * t], smem[rows[g] + 2 * t + 1]
        out.append(_pack_bits(lo, hi))
    return out[0], out[1], out[2], out[3]


def _ldmatrix_x4_twin(smem, off):
    return _ldmatrix_twin(False, smem, off)


def _ldmatrix_x4_trans_twin(smem, off):
    return _ldmatrix_twin(True, smem, off)


def _cp_async16_twin(smem, soff, gmem, goff, nbytes):
    for i in range(8):
        smem[soff + i] = gmem[goff + i] if 2 * i < nbytes else 0


# Deferred cp.async (``cp_async_zfill``): per simulated thread, the copies of the group
# not yet committed and the committed groups not yet waited for, oldest first.
def _cp_state():
    th = threading.current_thread()
    st = getattr(th, "_sla_cp_async", None)
    if st is None:
        st = th._sla_cp_async = ([], [])  # (open group, committed groups)
    return st


def _cp_async_zfill_twin(smem, saddr, size, gmem, goff, nbytes):
    if saddr % size or (2 * goff) % size:  # relative to an aligned array start
        raise ValueError(f"cp.async of {size} bytes: misaligned {saddr=} {goff=}")
    _cp_state()[0].append((smem, int(saddr) // 2, int(size) // 2, gmem, int(goff), int(nbytes)))


def _cp_land(copies):
    for smem, dst, n, gmem, goff, nbytes in copies:
        for i in range(n):
            smem[dst + i] = gmem[goff + i] if 2 * i < nbytes else 0


def _cp_async_commit_twin():
    open_, groups = _cp_state()
    groups.append(list(open_))
    open_.clear()


def _cp_async_wait_group_twin(n):
    _, groups = _cp_state()
    while len(groups) > n:
        _cp_land(groups.pop(0))


def _cp_async_wait_all_twin():
    open_, groups = _cp_state()
    _cp_async_wait_group_twin(0)
    _cp_land(open_)  # wait_all also covers copies not yet committed
    open_.clear()


def _cp_async_wait_1_twin():
    _cp_async_wait_group_twin(1)


# Byte-address variants: ``smem_addr(smem)`` is the 32-bit shared-window byte address
# of ``smem[0]`` (0 under the simulator); ``ldsm_x4(smem, addr, imm)`` loads at byte
# address ``addr + imm`` (``imm`` a literal constant, folded into the instruction).
def _smem_addr_twin(smem):
    return 0


def _ldsm_x4_twin(smem, addr, imm):
    return _ldmatrix_twin(False, smem, (addr + imm) // 2)


def _ldsm_x4_trans_twin(smem, addr, imm):
    return _ldmatrix_twin(True, smem, (addr + imm) // 2)


def _cp_async16i_twin(smem, saddr, simm, gmem, goff):
    _cp_async16_twin(smem, (saddr + simm) // 2, gmem, goff, 16)


def _ld_nc_v4_f32_twin(gmem, goff):
    if goff % 4:  # relative to an aligned array start
        raise ValueError(f"16-byte load: misaligned {goff=}")
    g = int(goff)
    return (
        np.float32(gmem[g]),
        np.float32(gmem[g + 1]),
        np.float32(gmem[g + 2]),
        np.float32(gmem[g + 3]),
    )


def _fmax_twin(a, b):
    return a if a > b else b


def _pack_bf16x2_twin(lo, hi):
    bits = f32_to_bf16_bits(np.array([lo, hi], dtype=np.float32))
    return _pack_bits(bits[0], bits[1])


def _pack_f16x2_twin(lo, hi):
    bits = np.array([lo, hi], dtype=np.float32).astype(np.float16).view(np.uint16)
    return _pack_bits(bits[0], bits[1])


def _exp2_twin(x):
    return float(np.float32(2.0) ** np.float32(x)) if x > -1e38 else 0.0


def _shfl_xor_twin(x, mask):
    vals, lane = _exchange(float(x))
    return vals[lane ^ mask]


def _bf16_low_f32_twin(p):
    """fp32 value of the bf16 in the low 16 bits of the int32 ``p``."""
    return np.array([(int(p) & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0]


def _bf16_high_f32_twin(p):
    """fp32 value of the bf16 in the high 16 bits of the int32 ``p``."""
    return np.array([int(p) & 0xFFFF0000], dtype=np.uint32).view(np.float32)[0]


def _f16_low_f32_twin(p):
    """fp32 value of the fp16 in the low 16 bits of the int32 ``p``."""
    return np.float32(np.array([int(p) & 0xFFFF], np.uint16).view(np.float16)[0])


def _f16_high_f32_twin(p):
    """fp32 value of the fp16 in the high 16 bits of the int32 ``p``."""
    return np.float32(np.array([(int(p) >> 16) & 0xFFFF], np.uint16).view(np.float16)[0])


# ---------------------------------------------------------------------------
# Inline-PTX intrinsics (real GPU)
# ---------------------------------------------------------------------------


def _build_intrinsics():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    try:  # literal-typed arguments first (immediate offsets baked into the PTX text)
        from numba.cuda.extending import _intrinsic

        lit_intrinsic = _intrinsic(target="cuda", prefer_literal=True)
    except ImportError:  # pragma: no cover - other numba-cuda versions
        lit_intrinsic = intrinsic

    i32, f32 = ir.IntType(32), ir.FloatType()
    # llvmlite caches a type's text in the object on first use (str()); the intrinsics
    # below hold these two in their closures, and Numba's disk-cache key pickles those
    # closures: fill the cache now, or a kernel's key would change once it has compiled
    # (the first process would store it under a key no later process computes).
    str(i32), str(f32)

    def _asm(builder, ret, argtys, text, constraints, args, side_effect=False):
        fnty = ir.FunctionType(ret, argtys)
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args)

    def _data_ptr(context, builder, aryty, ary):
        return context.make_array(aryty)(context, builder, ary).data

    def _shared_addr32(context, builder, aryty, ary, off):
        """32-bit shared-window address of element ``off`` of a shared array."""
        ptr = builder.gep(_data_ptr(context, builder, aryty, ary), [off])
        elt = ptr.type.pointee
        sptr = builder.addrspacecast(ptr, ir.PointerType(elt, addrspace=3))
        return builder.trunc(builder.ptrtoint(sptr, ir.IntType(64)), i32)

    def make_mma(kind):
        text = (
            "mma.sync.aligned.m16n8k16.row.col.f32.%s.%s.f32 "
            "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};" % (kind, kind)
        )
        cons = "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f"

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(
                types.int32,
                types.int32,
                types.int32,
                types.int32,
                types.int32,
                types.int32,
                types.float32,
                types.float32,
                types.float32,
                types.float32,
            )

            def codegen(context, builder, sig, args):
                args = [
                    context.cast(builder, v, ty, want)
                    for v, ty, want in zip(args, sig.args, sig.args)
                ]
                res = _asm(
                    builder,
                    ir.LiteralStructType([f32] * 4),
                    [i32] * 6 + [f32] * 4,
                    text,
                    cons,
                    args,
                )
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return mma

    def make_ldmatrix(trans):
        text = "ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {$0,$1,$2,$3}, [$4];" % (
            ".trans" if trans else ""
        )

        @intrinsic
        def ldmatrix(typingctx, smem, off):
            sig = types.UniTuple(types.int32, 4)(smem, types.int32)

            def codegen(context, builder, sig, args):
                ary, o = args
                addr = _shared_addr32(context, builder, sig.args[0], ary, o)
                res = _asm(
                    builder,
                    ir.LiteralStructType([i32] * 4),
                    [i32],
                    text,
                    "=r,=r,=r,=r,r,~{memory}",
                    [addr],
                    side_effect=True,
                )
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return ldmatrix

    @intrinsic
    def cp_async16(typingctx, smem, soff, gmem, goff, nbytes):
        sig = types.void(smem, types.int32, gmem, types.int64, types.int32)

        def codegen(context, builder, sig, args):
            sary, so, gary, go, nb = args
            saddr = _shared_addr32(context, builder, sig.args[0], sary, so)
            gptr = builder.gep(_data_ptr(context, builder, sig.args[2], gary), [go])
            gint = builder.ptrtoint(gptr, ir.IntType(64))
            _asm(
                builder,
                ir.VoidType(),
                [i32, ir.IntType(64), i32],
                "{ .reg .u64 ga; cvta.to.global.u64 ga, $1; "
                "cp.async.cg.shared.global [$0], [ga], 16, $2; }",
                "r,l,r,~{memory}",
                [saddr, gint, nb],
                side_effect=True,
            )
            return context.get_dummy_value()

        return sig, codegen

    @lit_intrinsic
    def cp_async_zfill(typingctx, smem, saddr, size, gmem, goff, nbytes):
        if not isinstance(size, types.IntegerLiteral) or size.literal_value not in (4, 8, 16):
            return None
        n = size.literal_value
        text = (
            "{ .reg .u64 ga; cvta.to.global.u64 ga, $1; "
            "cp.async.%s.shared.global [$0], [ga], %d, $2; }" % ("cg" if n == 16 else "ca", n)
        )
        sig = types.void(smem, types.int32, size, gmem, types.int64, types.int32)

        def codegen(context, builder, sig, args):
            _, sa, _, gary, go, nb = args
            sa = context.cast(builder, sa, sig.args[1], types.int32)
            go = context.cast(builder, go, sig.args[4], types.int64)
            nb = context.cast(builder, nb, sig.args[5], types.int32)
            gptr = builder.gep(_data_ptr(context, builder, sig.args[3], gary), [go])
            gint = builder.ptrtoint(gptr, ir.IntType(64))
            _asm(
                builder,
                ir.VoidType(),
                [i32, ir.IntType(64), i32],
                text,
                "r,l,r,~{memory}",
                [sa, gint, nb],
                side_effect=True,
            )
            return context.get_dummy_value()

        return sig, codegen

    @lit_intrinsic
    def cp_async_wait_group(typingctx, n):
        if not isinstance(n, types.IntegerLiteral):
            return None
        text = "cp.async.wait_group %d;" % n.literal_value

        def codegen(context, builder, sig, args):
            _asm(builder, ir.VoidType(), [], text, "~{memory}", [], side_effect=True)
            return context.get_dummy_value()

        return types.void(n), codegen

    def make_void_asm(text):
        @intrinsic
        def fn(typingctx):
            def codegen(context, builder, sig, args):
                _asm(builder, ir.VoidType(), [], text, "~{memory}", [], side_effect=True)
                return context.get_dummy_value()

            return types.void(), codegen

        return fn

    def make_pack(kind):
        @intrinsic
        def pack(typingctx, lo, hi):
            sig = types.int32(types.float32, types.float32)

            def codegen(context, builder, sig, args):
                lo_v, hi_v = args
                # cvt.rn.*x2.f32 d, a, b puts a in the upper half, b in the lower.
                return _asm(
                    builder,
                    i32,
                    [f32, f32],
                    "cvt.rn.%sx2.f32 $0, $1, $2;" % kind,
                    "=r,f,f",
                    [hi_v, lo_v],
                )

            return sig, codegen

        return pack

    @intrinsic
    def exp2(typingctx, x):
        sig = types.float32(types.float32)

        def codegen(context, builder, sig, args):
            return _asm(builder, f32, [f32], "ex2.approx.ftz.f32 $0, $1;", "=f,f", list(args))

        return sig, codegen

    @intrinsic
    def shfl_xor(typingctx, x, mask):
        sig = types.float32(types.float32, types.int32)

        def codegen(context, builder, sig, args):
            return _asm(
                builder,
                f32,
                [f32, i32],
                "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;",
                "=f,f,r",
                list(args),
                side_effect=True,
            )

        return sig, codegen

    @intrinsic
    def smem_addr(typingctx, smem):
        sig = types.int32(smem)

        def codegen(context, builder, sig, args):
            return _shared_addr32(context, builder, sig.args[0], args[0], ir.Constant(i32, 0))

        return sig, codegen

    def make_ldsm(trans):
        @lit_intrinsic
        def ldsm(typingctx, smem, addr, imm):
            if not isinstance(imm, types.IntegerLiteral):
                return None
            text = "ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {$0,$1,$2,$3}, [$4+%d];" % (
                ".trans" if trans else "",
                imm.literal_value,
            )
            sig = types.UniTuple(types.int32, 4)(smem, types.int32, imm)

            def codegen(context, builder, sig, args):
                a = context.cast(builder, args[1], sig.args[1], types.int32)
                res = _asm(
                    builder,
                    ir.LiteralStructType([i32] * 4),
                    [i32],
                    text,
                    "=r,=r,=r,=r,r,~{memory}",
                    [a],
                    side_effect=True,
                )
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return ldsm

    @lit_intrinsic
    def cp_async16i(typingctx, smem, saddr, simm, gmem, goff):
        if not isinstance(simm, types.IntegerLiteral):
            return None
        text = (
            "{ .reg .u64 ga; cvta.to.global.u64 ga, $1; "
            "cp.async.cg.shared.global [$0+%d], [ga], 16; }" % simm.literal_value
        )
        sig = types.void(smem, types.int32, simm, gmem, types.int64)

        def codegen(context, builder, sig, args):
            _, sa, _, gary, go = args
            sa = context.cast(builder, sa, sig.args[1], types.int32)
            go = context.cast(builder, go, sig.args[4], types.int64)
            gptr = builder.gep(_data_ptr(context, builder, sig.args[3], gary), [go])
            gint = builder.ptrtoint(gptr, ir.IntType(64))
            _asm(
                builder,
                ir.VoidType(),
                [i32, ir.IntType(64)],
                text,
                "r,l,~{memory}",
                [sa, gint],
                side_effect=True,
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def ld_nc_v4_f32(typingctx, gmem, goff):
        # pure (no side effect, no memory clobber): the array is read-only while the
        # kernel runs, so the compiler may place the load anywhere before its use
        sig = types.UniTuple(types.float32, 4)(gmem, types.int64)

        def codegen(context, builder, sig, args):
            gary, go = args
            gptr = builder.gep(_data_ptr(context, builder, sig.args[0], gary), [go])
            gint = builder.ptrtoint(gptr, ir.IntType(64))
            res = _asm(
                builder,
                ir.LiteralStructType([f32] * 4),
                [ir.IntType(64)],
                "{ .reg .u64 ga; cvta.to.global.u64 ga, $4; "
                "ld.global.nc.v4.f32 {$0,$1,$2,$3}, [ga]; }",
                "=f,=f,=f,=f,l",
                [gint],
            )
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def fmax(typingctx, a, b):
        sig = types.float32(types.float32, types.float32)

        def codegen(context, builder, sig, args):
            return _asm(builder, f32, [f32, f32], "max.f32 $0, $1, $2;", "=f,f,f", list(args))

        return sig, codegen

    def make_bf16_unpack(high):
        """fp32 of one bf16 of a packed pair: a bf16 is the top half of an fp32, so one
        shift / mask + bitcast."""

        @intrinsic
        def unpack(typingctx, p):
            sig = types.float32(types.int32)

            def codegen(context, builder, sig, args):
                v = args[0]
                if high:
                    bits = builder.and_(v, ir.Constant(i32, -65536))  # 0xFFFF0000
                else:
                    bits = builder.shl(v, ir.Constant(i32, 16))
                return builder.bitcast(bits, f32)

            return sig, codegen

        return unpack

    def make_f16_unpack(high):
        """fp32 of one fp16 of a packed pair (``cvt.f32.f16``)."""
        text = "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.f32.f16 $0, %s; }" % (
            "hi" if high else "lo"
        )

        @intrinsic
        def unpack(typingctx, p):
            sig = types.float32(types.int32)

            def codegen(context, builder, sig, args):
                return _asm(builder, f32, [i32], text, "=f,r", [args[0]])

            return sig, codegen

        return unpack

    return dict(
        bf16_low_f32=make_bf16_unpack(False),
        bf16_high_f32=make_bf16_unpack(True),
        f16_low_f32=make_f16_unpack(False),
        f16_high_f32=make_f16_unpack(True),
        smem_addr=smem_addr,
        ldsm_x4=make_ldsm(False),
        ldsm_x4_trans=make_ldsm(True),
        cp_async16i=cp_async16i,
        ld_nc_v4_f32=ld_nc_v4_f32,
        fmax=fmax,
        mma_bf16=make_mma("bf16"),
        mma_f16=make_mma("f16"),
        ldmatrix_x4=make_ldmatrix(False),
        ldmatrix_x4_trans=make_ldmatrix(True),
        cp_async16=cp_async16,
        cp_async_commit=make_void_asm("cp.async.commit_group;"),
        cp_async_wait_all=make_void_asm("cp.async.wait_all;"),
        cp_async_wait_1=make_void_asm("cp.async.wait_group 1;"),
        cp_async_wait_group=cp_async_wait_group,
        cp_async_zfill=cp_async_zfill,
        pack_bf16x2=make_pack("bf16"),
        pack_f16x2=make_pack("f16"),
        exp2=exp2,
        shfl_xor=shfl_xor,
    )


if SIMULATED:
    mma_bf16, mma_f16 = _mma_bf16_twin, _mma_f16_twin
    ldmatrix_x4, ldmatrix_x4_trans = _ldmatrix_x4_twin, _ldmatrix_x4_trans_twin
    cp_async16, cp_async_commit = _cp_async16_twin, _cp_async_commit_twin
    cp_async_wait_all, cp_async_wait_1 = _cp_async_wait_all_twin, _cp_async_wait_1_twin
    cp_async_wait_group, cp_async_zfill = _cp_async_wait_group_twin, _cp_async_zfill_twin
    pack_bf16x2, pack_f16x2 = _pack_bf16x2_twin, _pack_f16x2_twin
    exp2, shfl_xor = _exp2_twin, _shfl_xor_twin
    smem_addr, ldsm_x4, ldsm_x4_trans = _smem_addr_twin, _ldsm_x4_twin, _ldsm_x4_trans_twin
    cp_async16i, fmax = _cp_async16i_twin, _fmax_twin
    ld_nc_v4_f32 = _ld_nc_v4_f32_twin
    bf16_low_f32, bf16_high_f32 = _bf16_low_f32_twin, _bf16_high_f32_twin
    f16_low_f32, f16_high_f32 = _f16_low_f32_twin, _f16_high_f32_twin
else:

    def _pin_uuids(intrinsics):
        """Deterministic uuids for the intrinsics (Numba draws random ones).

        Numba keys the disk cache of a closure kernel on its pickled closure
        variables; device functions pickle by value with the intrinsics they call,
        and an intrinsic pickles with its uuid. Random uuids would give every
        process a new key (a cache that never hits). The hash of this file makes an
        edit of the inline PTX a new key."""
        import hashlib

        with open(__file__, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:12]
        for name, fn in intrinsics.items():
            try:
                fn._set_uuid(f"sla_numba.gpu.tc.ptx.{name}.{digest}")
            except Exception:  # noqa: BLE001 - private API; the cache just misses then
                pass
        return intrinsics

    globals().update(_pin_uuids(_build_intrinsics()))

LOG2E = 1.4426950408889634
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# Wide global loads for the pipelined linear-gradient kernels
# (``tc/linear_backward.py``: ``dq_linear`` / ``dkdv_linear``, ``pipelined=True``)
# ---------------------------------------------------------------------------
#
# ``ldg_v4_f32(arr, off)``: four consecutive fp32 ``arr[off : off + 4]`` in one 16-byte
# load (``ld.global.v4.f32``); the element address must be 16-byte aligned (``off`` a
# multiple of 4 from a 16-byte aligned array start; the launchers check the start).
# Numba lowers ``arr[i]`` to scalar ``ld.global.f32`` (it cannot prove the alignment a
# vector load needs). The asm has side effects, so LLVM keeps it where it is written:
# a kernel that issues it before a run of ``mma`` has the load in flight during them.
# The twin checks the alignment of ``off`` (relative to the array start) and copies.

__all__.append("ldg_v4_f32")


def _ldg_v4_f32_twin(arr, off):
    off = int(off)
    if off % 4:
        raise ValueError(f"ld.global.v4.f32: element offset {off} is not 16-byte aligned")
    return (
        np.float32(arr[off]),
        np.float32(arr[off + 1]),
        np.float32(arr[off + 2]),
        np.float32(arr[off + 3]),
    )


def _build_ldg_v4():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    f32 = ir.FloatType()
    str(f32)  # see _build_intrinsics: fill llvmlite's type-text cache before pickling

    @intrinsic
    def ldg_v4_f32(typingctx, arr, off):
        sig = types.UniTuple(types.float32, 4)(arr, types.int64)

        def codegen(context, builder, sig, args):
            ary, o = args
            data = context.make_array(sig.args[0])(context, builder, ary).data
            gint = builder.ptrtoint(builder.gep(data, [o]), ir.IntType(64))
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [ir.IntType(64)])
            asm = ir.InlineAsm(
                fnty,
                "{ .reg .u64 ga; cvta.to.global.u64 ga, $4; "
                "ld.global.v4.f32 {$0,$1,$2,$3}, [ga]; }",
                "=f,=f,=f,=f,l,~{memory}",
                side_effect=True,
            )
            res = builder.call(asm, [gint])
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    return {"ldg_v4_f32": ldg_v4_f32}


if SIMULATED:
    ldg_v4_f32 = _ldg_v4_f32_twin
else:
    globals().update(_pin_uuids(_build_ldg_v4()))


# ---------------------------------------------------------------------------
# An opaque copy for the pipelined key-block states kernel
# (``tc/states.py``: ``make_states_kernel_pipelined``)
# ---------------------------------------------------------------------------
#
# ``opaque_i32(x)``: x, through a ``mov.b32`` that LLVM must not move or merge (asm with
# side effects). A kernel that loops over several blocks re-reads its thread index
# through it at the top of each iteration, so the per-lane shared-memory addresses are
# computed where they are used instead of hoisted out of the loop (LLVM's loop-invariant
# code motion kept ~100 of them live across the states kernel's whole block loop: 225
# registers instead of 126). The twin returns x.

__all__.append("opaque_i32")


def _opaque_i32_twin(x):
    return x


def _build_opaque():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i32 = ir.IntType(32)
    str(i32)  # see _build_intrinsics: fill llvmlite's type-text cache before pickling

    @intrinsic
    def opaque_i32(typingctx, x):
        sig = types.int32(types.int32)

        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[0], sig.args[0], types.int32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32]), "mov.b32 $0, $1;", "=r,r", True)
            return builder.call(asm, [val])

        return sig, codegen

    return {"opaque_i32": opaque_i32}


if SIMULATED:
    opaque_i32 = _opaque_i32_twin
else:
    globals().update(_pin_uuids(_build_opaque()))


# ---------------------------------------------------------------------------
# Vector shared / global accesses for the staged epilogue of the marginal sums
# (``tc/marginal.py``: ``make_marginal_kernel_pipelined(..., out_store=4)``)
# ---------------------------------------------------------------------------
#
# ``sts_v2_f32(smem, off, a, b)``: fp32 ``smem[off : off + 2] = a, b`` in one 8-byte
# ``st.shared.v2.f32`` (``off`` even); ``lds_v4_f32(smem, off)``: ``smem[off : off + 4]``
# in one ``ld.shared.v4.f32`` (``off`` a multiple of 4); ``stg_v4_f32(arr, off, a, b, c,
# d)``: ``arr[off : off + 4] = a, b, c, d`` in one ``st.global.v4.f32`` (``off`` a
# multiple of 4 from a 16-byte aligned start; the launcher checks the start). ``smem``
# is an fp32 shared array, ``off`` an element offset. Numba lowers ``arr[i] = x`` to
# scalar accesses (it cannot prove the alignment a vector access needs): one vector
# access is one instruction through the L1/TEX pipe where the scalar ones are two or
# four. The twins check the alignment of ``off`` (relative to the array start).

__all__ += ["sts_v2_f32", "lds_v4_f32", "stg_v4_f32"]


def _check_vec(name, off, n):
    off = int(off)
    if off % n:
        raise ValueError(f"{name}: element offset {off} is not {4 * n}-byte aligned")
    return off


def _sts_v2_f32_twin(smem, off, a, b):
    off = _check_vec("st.shared.v2.f32", off, 2)
    smem[off], smem[off + 1] = a, b


def _lds_v4_f32_twin(smem, off):
    off = _check_vec("ld.shared.v4.f32", off, 4)
    return smem[off], smem[off + 1], smem[off + 2], smem[off + 3]


def _stg_v4_f32_twin(arr, off, a, b, c, d):
    off = _check_vec("st.global.v4.f32", off, 4)
    arr[off], arr[off + 1], arr[off + 2], arr[off + 3] = a, b, c, d


def _build_vec_f32():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
    str(i32), str(i64), str(f32)  # see _build_intrinsics: fill llvmlite's type-text cache

    def _elt_ptr(context, builder, aryty, ary, off):
        data = context.make_array(aryty)(context, builder, ary).data
        return builder.gep(data, [off])

    def _shared32(builder, ptr):
        sptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, addrspace=3))
        return builder.trunc(builder.ptrtoint(sptr, i64), i32)

    def _call(builder, ret, argtys, text, cons, args):
        fnty = ir.FunctionType(ret, argtys)
        return builder.call(ir.InlineAsm(fnty, text, cons, side_effect=True), args)

    @intrinsic
    def sts_v2_f32(typingctx, smem, off, a, b):
        sig = types.void(smem, types.int64, types.float32, types.float32)

        def codegen(context, builder, sig, args):
            ary, o, x, y = args
            addr = _shared32(builder, _elt_ptr(context, builder, sig.args[0], ary, o))
            _call(
                builder,
                ir.VoidType(),
                [i32, f32, f32],
                "st.shared.v2.f32 [$0], {$1,$2};",
                "r,f,f,~{memory}",
                [addr, x, y],
            )
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def lds_v4_f32(typingctx, smem, off):
        sig = types.UniTuple(types.float32, 4)(smem, types.int64)

        def codegen(context, builder, sig, args):
            ary, o = args
            addr = _shared32(builder, _elt_ptr(context, builder, sig.args[0], ary, o))
            res = _call(
                builder,
                ir.LiteralStructType([f32] * 4),
                [i32],
                "ld.shared.v4.f32 {$0,$1,$2,$3}, [$4];",
                "=f,=f,=f,=f,r,~{memory}",
                [addr],
            )
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def stg_v4_f32(typingctx, arr, off, a, b, c, d):
        sig = types.void(arr, types.int64, *([types.float32] * 4))

        def codegen(context, builder, sig, args):
            ary, o, *vals = args
            gint = builder.ptrtoint(_elt_ptr(context, builder, sig.args[0], ary, o), i64)
            _call(
                builder,
                ir.VoidType(),
                [i64, f32, f32, f32, f32],
                "{ .reg .u64 ga; cvta.to.global.u64 ga, $0; "
                "st.global.v4.f32 [ga], {$1,$2,$3,$4}; }",
                "l,f,f,f,f,~{memory}",
                [gint, *vals],
            )
            return context.get_dummy_value()

        return sig, codegen

    return {"sts_v2_f32": sts_v2_f32, "lds_v4_f32": lds_v4_f32, "stg_v4_f32": stg_v4_f32}


if SIMULATED:
    sts_v2_f32, lds_v4_f32, stg_v4_f32 = _sts_v2_f32_twin, _lds_v4_f32_twin, _stg_v4_f32_twin
else:
    globals().update(_pin_uuids(_build_vec_f32()))
