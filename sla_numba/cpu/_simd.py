"""A register-tiled matrix-product micro-kernel, written as LLVM vector code.

Why this file exists
--------------------
Every product of the CPU kernels (Q Kᵀ, P V, φ(K)ᵀ V, ...) is a small one: 64 × 64
tiles times 64 × 64 tiles. Written as plain loops, LLVM's auto-vectoriser has to
load and store the rows of C for every few steps of the reduction (it cannot prove
that C does not overlap A or B, so it cannot keep C in registers), and on Intel
CPUs with AVX-512 it also picks 256-bit vectors (LLVM's ``prefer-vector-width``
tuning for those CPUs) — half of the machine's width. Both together made the
loop-written product run at about a third of the machine's peak.

``tile_fma`` is what a BLAS library does at its core (a "micro-kernel"): a tile of
C, ``TILE_M`` rows × ``TILE_N`` columns, is loaded into vector registers once; then
for every reduction step p, ``TILE_N / lanes`` vectors of row p of B are loaded,
each of the ``TILE_M`` scalars ``a[i, p]`` is broadcast, and every register gets one
fused multiply-add; the tile is stored once at the end. Written directly as LLVM
vectors of the machine's full width (an explicit 512-bit vector type is used as
such on AVX-512 CPUs; ``prefer-vector-width`` only steers the auto-vectoriser).

Arithmetic, and why it is deterministic
---------------------------------------
Each element of C gets ``c += a[i, p] * b[p, j]`` for p = 0, 1, ... in order, as
``llvm.fmuladd`` (one rounding where the CPU has FMA, which every x86-64 CPU with
AVX2 has). No re-association: the result does not depend on the vector width, on
the tile shape or on which thread runs it — the same bits on an AVX2 and an
AVX-512 machine with FMA.

Widths chosen at import from the CPU Numba compiles for (``cpu_features``): AVX-512F → 64-byte vectors, an 8 × 32 float32 tile (16 of
the 32 vector registers); AVX/AVX2 → 32-byte vectors, a 4 × 16 float32 tile (8 of
16); otherwise 16-byte SSE vectors. float64 tiles have the same shape in vectors
(half the columns). Numba's on-disk cache is keyed on the CPU, so a cached kernel
always matches the width chosen here.

The other register-level helpers, written the same way where LLVM's own code for
a plain loop was the bottleneck: ``tile_set`` (the micro-kernel overwriting C),
``tile_transpose`` / ``tile_transpose_add`` (square tiles transposed by shuffles)
and ``row_sum_f64`` (float64 sums of block rows with the accumulators in registers).
"""

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

#: fast-math flags of the floating-point instructions written here. Numba adds a
#: function's fast-math flags (re-association included) to every float instruction
#: that has none, also to ours once inlined; "arcp" (reciprocals allowed, which
#: means nothing for +, −, ×) is a flag, so they keep strict IEEE semantics: a chain
#: of additions stays in its order.
_EXACT = ("arcp",)


def cpu_features():
    """The set of CPU features Numba compiles for.

    ``NUMBA_CPU_FEATURES`` if set; none if only ``NUMBA_CPU_NAME`` names a CPU (e.g.
    ``generic`` for a portable cache: then Numba compiles without the host's
    features); else the host's.
    """
    if config.CPU_FEATURES is not None:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    if config.CPU_NAME not in (None, "host"):
        return set()
    return {name for name, on in llvm_binding.get_host_cpu_features().items() if on}


def _vector_bytes(features):
    if "avx512f" in features:
        return 64
    if "avx" in features:
        return 32
    return 16


#: bytes in one SIMD register used by the micro-kernel (64: AVX-512, 32: AVX2, 16: SSE)
VECTOR_BYTES = _vector_bytes(cpu_features())
#: rows of C in one register tile
TILE_M = 8 if VECTOR_BYTES == 64 else 4
#: vectors along a row of the tile
TILE_VECTORS = 2


def tile_cols(itemsize):
    """Columns of C in one register tile for elements of ``itemsize`` bytes."""
    return TILE_VECTORS * VECTOR_BYTES // itemsize


def _element_ptr(builder, intp, arr, row, col, itemsize, ty):
    """A ``ty`` pointer to ``arr[row, col]`` of a 2-D array (row stride from the
    array, elements contiguous): the address arithmetic of the intrinsics below."""
    row_stride = builder.extract_value(arr.strides, 0)
    base = builder.ptrtoint(arr.data, intp)
    off = builder.add(builder.mul(row, row_stride), builder.mul(col, ir.Constant(intp, itemsize)))
    return builder.inttoptr(builder.add(base, off), ty.as_pointer())


def _tile_fma_impl(a, b, c, a_transposed, overwrite=False):
    """Typing and code generation of ``tile_fma`` (``a_transposed`` False) and
    ``tile_fma_tn`` (True: A is stored transposed, its rows are the reduction);
    ``overwrite``: ``tile_set`` / ``tile_set_tn``, C = A·B (the accumulators start
    at +0.0 in registers instead of being loaded from C)."""
    arrays = (a, b, c)
    if not all(isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" for x in arrays):
        return None
    if not (a.dtype == b.dtype == c.dtype) or a.dtype not in (types.float32, types.float64):
        return None
    sig = types.void(a, b, c, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        intp = context.get_value_type(types.intp)
        fty = context.get_value_type(dtype)
        itemsize = dtype.bitwidth // 8
        lanes = VECTOR_BYTES // itemsize
        vty = ir.VectorType(fty, lanes)
        suffix = f"v{lanes}f{dtype.bitwidth}"
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fmuladd.{suffix}"
        )
        aa, bb, cc = (
            context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3])
        )
        i0, j0, kk = args[3:]

        def const(n):
            return ir.Constant(intp, n)

        def vector_ptr(arr, row, col):
            return _element_ptr(builder, intp, arr, row, col, itemsize, vty)

        def scalar_ptr(arr, row, col):
            return _element_ptr(builder, intp, arr, row, col, itemsize, fty)

        rows = [builder.add(i0, const(r)) for r in range(TILE_M)]
        cols = [builder.add(j0, const(v * lanes)) for v in range(TILE_VECTORS)]
        # the C tile: one alloca per register; LLVM promotes them to registers
        acc = [[cgutils.alloca_once(builder, vty) for _ in cols] for _ in rows]
        for r, row in enumerate(rows):
            for v, col in enumerate(cols):
                start = (
                    ir.Constant(vty, [ir.Constant(fty, 0.0)] * lanes)
                    if overwrite
                    else builder.load(vector_ptr(cc, row, col), align=itemsize)
                )
                builder.store(start, acc[r][v])
        undef = ir.Constant(vty, ir.Undefined)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        with cgutils.for_range(builder, kk) as loop:
            p = loop.index
            b_row = [builder.load(vector_ptr(bb, p, col), align=itemsize) for col in cols]
            for r, row in enumerate(rows):
                a_rp = builder.load(
                    scalar_ptr(aa, p, row) if a_transposed else scalar_ptr(aa, row, p)
                )
                a_vec = builder.shuffle_vector(
                    builder.insert_element(undef, a_rp, const(0)), undef, zeros
                )  # broadcast a[row, p]
                for v in range(TILE_VECTORS):
                    builder.store(
                        builder.call(fmuladd, [a_vec, b_row[v], builder.load(acc[r][v])]), acc[r][v]
                    )
        for r, row in enumerate(rows):
            for v, col in enumerate(cols):
                builder.store(builder.load(acc[r][v]), vector_ptr(cc, row, col), align=itemsize)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_fma(typingctx, a, b, c, i0, j0, kk):
    """``c[i0:i0+TILE_M, j0:j0+TN] += a[i0:i0+TILE_M, :kk] @ b[:kk, j0:j0+TN]``.

    a, b, c: 2-D C-contiguous arrays of one float dtype; TN = ``tile_cols(itemsize)``.
    No bounds checks: the caller keeps the tile inside all three arrays.
    """
    return _tile_fma_impl(a, b, c, False)


@intrinsic
def tile_fma_tn(typingctx, a, b, c, i0, j0, kk):
    """``tile_fma`` with A stored transposed:
    ``c[i0:i0+TILE_M, j0:j0+TN] += a[:kk, i0:i0+TILE_M].T @ b[:kk, j0:j0+TN]``.

    The broadcast scalars of one reduction step then come from one row of ``a``.
    """
    return _tile_fma_impl(a, b, c, True)


@intrinsic
def tile_set(typingctx, a, b, c, i0, j0, kk):
    """``tile_fma`` that overwrites: ``c[i0:i0+TILE_M, j0:j0+TN] = a[i0:i0+TILE_M, :kk] @ b[:kk, j0:j0+TN]``.

    The same bits as zero-filling C and calling ``tile_fma`` (every element starts
    at +0.0, then the same fused multiply-adds in the same order), without the
    pass that writes the zeros and the loads that read them back.
    """
    return _tile_fma_impl(a, b, c, False, True)


@intrinsic
def tile_set_tn(typingctx, a, b, c, i0, j0, kk):
    """``tile_fma_tn`` that overwrites C (see ``tile_set``)."""
    return _tile_fma_impl(a, b, c, True, True)


# --------------------------------------------------------------------------- transposes
def _transpose_impl(src, dst, accumulate):
    """Typing and code generation of ``tile_transpose`` / ``tile_transpose_add``."""
    if not all(isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" for x in (src, dst)):
        return None
    if src.dtype != dst.dtype or src.dtype not in (types.float32, types.float64):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp, src.dtype)

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        intp = context.get_value_type(types.intp)
        fty = context.get_value_type(dtype)
        itemsize = dtype.bitwidth // 8
        lanes = VECTOR_BYTES // itemsize
        vty = ir.VectorType(fty, lanes)
        ss = context.make_array(signature.args[0])(context, builder, args[0])
        dd = context.make_array(signature.args[3])(context, builder, args[3])
        si, sj, di, dj, factor = args[1], args[2], args[4], args[5], args[6]

        def vector_ptr(arr, row, col):
            return _element_ptr(builder, intp, arr, row, col, itemsize, vty)

        def const(n):
            return ir.Constant(intp, n)

        undef = ir.Constant(vty, ir.Undefined)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        splat = builder.shuffle_vector(
            builder.insert_element(undef, factor, ir.Constant(ir.IntType(32), 0)), undef, zeros
        )
        rows = [
            builder.fmul(
                builder.load(vector_ptr(ss, builder.add(si, const(r)), sj), align=itemsize),
                splat,
                flags=_EXACT,
            )
            for r in range(lanes)
        ]
        # log2(lanes) rounds of "perfect shuffle": row 2i ← the first halves of rows i and
        # i + lanes/2 interleaved, row 2i+1 ← their second halves interleaved; after
        # the last round row r holds column r of the input.
        half = lanes // 2
        lo = ir.Constant(
            ir.VectorType(ir.IntType(32), lanes), [x for e in range(half) for x in (e, lanes + e)]
        )
        hi = ir.Constant(
            ir.VectorType(ir.IntType(32), lanes),
            [x for e in range(half, lanes) for x in (e, lanes + e)],
        )
        n = 1
        while n < lanes:
            new = []
            for r in range(half):
                new.append(builder.shuffle_vector(rows[r], rows[r + half], lo))
                new.append(builder.shuffle_vector(rows[r], rows[r + half], hi))
            rows = new
            n *= 2
        for r in range(lanes):
            ptr = vector_ptr(dd, builder.add(di, const(r)), dj)
            val = rows[r]
            if accumulate:
                val = builder.fadd(builder.load(ptr, align=itemsize), val, flags=_EXACT)
            builder.store(val, ptr, align=itemsize)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_transpose(typingctx, src, si, sj, dst, di, dj, factor):
    """``dst[di + c, dj + r] = factor · src[si + r, sj + c]`` for r, c < ``TILE_T``.

    One square tile of the machine's vector width (16 × 16 float32 on AVX-512) is
    loaded as ``TILE_T`` vectors, transposed in registers by shuffles and stored as
    ``TILE_T`` vectors — instead of ``TILE_T``² scalar loads and stores, which is
    what LLVM makes of a transposing loop (one of the two sides is strided). The
    product by ``factor`` is one rounding, as in ``x * factor``; factor 1 is exact.
    No bounds checks.
    """
    return _transpose_impl(src, dst, False)


@intrinsic
def tile_transpose_add(typingctx, src, si, sj, dst, di, dj, factor):
    """``dst[di + c, dj + r] += factor · src[si + r, sj + c]`` (see ``tile_transpose``)."""
    return _transpose_impl(src, dst, True)


def tile_t(itemsize):
    """Side of the square tile of ``tile_transpose`` for elements of ``itemsize`` bytes."""
    return VECTOR_BYTES // itemsize


# --------------------------------------------------------------------------- float64 sums of block rows
#: vectors of float64 held by ``row_sum_f64`` (its accumulators)
SUM_VECTORS = 8
#: elements of a row handled by one ``row_sum_f64`` call (64 on AVX-512, 32 on AVX2)
SUM_COLS = SUM_VECTORS * VECTOR_BYTES // 8


@intrinsic
def row_sum_f64(typingctx, mats, listed, n, d, e0, start, subtract, out):
    """``out[e] = start[e] ∓ Σ_t mats[listed[t], d, e]`` in float64 for ``SUM_COLS``
    elements e = e0, e0+1, ...

    ``subtract`` True: start from ``start`` (float64) and subtract the listed blocks'
    row d; False: start from +0.0 and add them. Every element is one float64
    accumulator, updated block after block in the order of ``listed`` (IEEE
    additions, no re-association) and rounded once into ``out`` (the dtype of
    ``mats``). The accumulators are ``SUM_VECTORS`` vector registers for the whole
    loop over blocks; written as a plain loop, LLVM loaded and stored the
    accumulator row once per block. No bounds checks.
    """
    if not (
        isinstance(mats, types.Array)
        and mats.ndim == 3
        and mats.layout == "C"
        and mats.dtype in (types.float32, types.float64)
        and isinstance(out, types.Array)
        and out.dtype == mats.dtype
        and isinstance(start, types.Array)
        and start.dtype == types.float64
        and isinstance(listed, types.Array)
        and listed.dtype == types.int64
    ):
        return None
    sig = types.void(mats, listed, types.intp, types.intp, types.intp, start, types.boolean, out)

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        intp = context.get_value_type(types.intp)
        fty = context.get_value_type(dtype)
        dty = ir.DoubleType()
        itemsize = dtype.bitwidth // 8
        lanes = VECTOR_BYTES // 8
        vty = ir.VectorType(fty, lanes)
        vdty = ir.VectorType(dty, lanes)
        mm, ll, ss, oo = (
            context.make_array(t)(context, builder, v)
            for t, v in zip(
                (signature.args[0], signature.args[1], signature.args[5], signature.args[7]),
                (args[0], args[1], args[5], args[7]),
            )
        )
        n, d, e0, sub = args[2], args[3], args[4], args[6]

        def const(x):
            return ir.Constant(intp, x)

        def elem_ptr(arr, offset_bytes, ptr_ty):
            base = builder.ptrtoint(arr.data, intp)
            return builder.inttoptr(builder.add(base, offset_bytes), ptr_ty.as_pointer())

        def stride(arr, axis):
            return builder.extract_value(arr.strides, axis)

        cols = [builder.add(e0, const(v * lanes)) for v in range(SUM_VECTORS)]
        acc = [cgutils.alloca_once(builder, vdty) for _ in cols]
        zero = ir.Constant(vdty, [ir.Constant(dty, 0.0)] * lanes)
        for v, col in enumerate(cols):
            from_start = builder.load(elem_ptr(ss, builder.mul(col, stride(ss, 0)), vdty), align=8)
            builder.store(builder.select(sub, from_start, zero), acc[v])
        row_off = builder.mul(d, stride(mm, 1))

        def loop_over_blocks(op):
            with cgutils.for_range(builder, n) as loop:
                j = builder.load(
                    elem_ptr(ll, builder.mul(loop.index, stride(ll, 0)), ir.IntType(64)), align=8
                )
                base = builder.add(builder.mul(j, stride(mm, 0)), row_off)
                for v, col in enumerate(cols):
                    off = builder.add(base, builder.mul(col, const(itemsize)))
                    x = builder.load(elem_ptr(mm, off, vty), align=itemsize)
                    x = builder.fpext(x, vdty) if itemsize == 4 else x
                    builder.store(op(builder.load(acc[v]), x, flags=_EXACT), acc[v])

        with builder.if_else(sub) as (then, otherwise):
            with then:
                loop_over_blocks(builder.fsub)
            with otherwise:
                loop_over_blocks(builder.fadd)
        for v, col in enumerate(cols):
            r = builder.load(acc[v])
            r = builder.fptrunc(r, vty) if itemsize == 4 else r
            builder.store(r, elem_ptr(oo, builder.mul(col, stride(oo, 0)), vty), align=itemsize)
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------- auto-vectoriser width
#: the LLVM function attribute that sets the auto-vectoriser's vector width
_PREFER_WIDTH = f'"prefer-vector-width"="{8 * VECTOR_BYTES}"'


@intrinsic
def prefer_full_width(typingctx):
    """Let LLVM auto-vectorise the calling function's loops at the full vector width.

    Call it first thing in every ``@njit`` function with element-wise loops (and
    inside ``prange`` bodies: Numba moves those into a function of their own).
    Why: on Intel CPUs with AVX-512, LLVM's tuning prefers 256-bit vectors for
    auto-vectorised loops (``prefer-vector-width``=256), so the exponentials, the
    feature maps and the float64 sums of the linear states ran on half-width
    ``ymm`` vectors; the attribute ``"prefer-vector-width"="512"`` on the function
    lifts that for our kernels only (a 64 × 64 block of ``exp_f32`` went from 3.3 to
    2.1 µs on the Xeon of BENCHMARKS.md). On AVX2 / SSE machines it names the width
    LLVM uses anyway. It is a code-generation hint: the arithmetic of each element is
    unchanged, except that reductions that fast-math lets LLVM re-associate are split
    into a different number of partial sums (deterministic for a given build).
    (llvmlite checks function attributes against a fixed list of keywords, which
    lacks string attributes; the attribute is added to the underlying set directly.)
    """

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, _PREFER_WIDTH)
        return context.get_dummy_value()

    return types.void(), codegen
