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
"""

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic


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


def _tile_fma_impl(a, b, c, a_transposed):
    """Typing and code generation of ``tile_fma`` (``a_transposed`` False) and
    ``tile_fma_tn`` (True: A is stored transposed, its rows are the reduction)."""
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

        def addr(arr, row, col):
            """Address of arr[row, col] (row stride from the array, elements contiguous)."""
            row_stride = builder.extract_value(arr.strides, 0)
            base = builder.ptrtoint(arr.data, intp)
            off = builder.add(builder.mul(row, row_stride), builder.mul(col, const(itemsize)))
            return builder.add(base, off)

        def vector_ptr(arr, row, col):
            return builder.inttoptr(addr(arr, row, col), vty.as_pointer())

        def scalar_ptr(arr, row, col):
            return builder.inttoptr(addr(arr, row, col), fty.as_pointer())

        rows = [builder.add(i0, const(r)) for r in range(TILE_M)]
        cols = [builder.add(j0, const(v * lanes)) for v in range(TILE_VECTORS)]
        # the C tile: one alloca per register; LLVM promotes them to registers
        acc = [[cgutils.alloca_once(builder, vty) for _ in cols] for _ in rows]
        for r, row in enumerate(rows):
            for v, col in enumerate(cols):
                builder.store(builder.load(vector_ptr(cc, row, col), align=itemsize), acc[r][v])
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
