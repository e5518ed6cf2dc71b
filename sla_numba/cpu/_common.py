"""Building blocks shared by the CPU forward and backward kernels.

Everything here is a small ``@njit`` function that works on one block at a time;
the parallel kernels in ``forward.py`` and ``backward.py`` call them inside their
``prange`` loops. Shapes use the project's letters: ``q`` (B, H, Nq, D),
``k``/``v`` (B, H, Nk, D), block map (B, H, Mq, Mk).

What lives here, and why
------------------------
* ``FASTMATH`` / ``KERNEL_OPTIONS`` — the fast-math flags and ``@njit`` options of
  the attention kernels. Re-association lets LLVM vectorise reductions;
  ``nnan``/``ninf`` are left out on purpose, so NaN/Inf in the inputs propagate to
  the outputs instead of being "assumed away".
* ``prefer_full_width()`` (from ``_simd.py``) — the first line of every function
  with element-wise loops: lets LLVM vectorise them at the CPU's full width (512
  bits on AVX-512, where LLVM would otherwise pick 256).
* ``FASTMATH`` minus re-association (``STRICT_SUM_OPTIONS``) for the float64 sums
  of the linear states, so that every path sums them in the same order.
* ``gemm_acc`` — ``C += A @ B`` on small blocks. Every product of the algorithm
  (Q Kᵀ, P V, φ(K)ᵀ V, dO Vᵀ, dSᵀ Q, ...) is one call, with the operands staged so
  that ``B``'s rows run along the output columns (``transpose_block`` copies a
  block transposed when needed). The copies cost O(block·D), the product
  O(block²·D). The product's inner loop is the register-tiled micro-kernel of
  ``_simd.py``. ``gemm_set`` / ``gemm_tn_set``: ``C = A @ B`` (same bits as
  zero-filling C first, without the fill and the loads of C).
* ``transpose_block`` / ``add_transposed`` — copies and adds of a block transposed,
  by square register tiles (``_simd.tile_transpose``); a transposing loop becomes
  one scalar load and store per element otherwise.
* ``column_max`` — the running max of a softmax stored transposed (scores of the
  online softmax, softmax φ over D), four rows at a time.
* ``fast_exp`` — exp for float32 that LLVM can vectorise (Numba's ``math.exp`` is a
  scalar libm call, which made the exponentials cost as much as the matrix
  products); float64 keeps ``math.exp``.
* ``feature_map_row`` / ``feature_map_grad_acc`` — φ and its chain rule, per token
  (the readable form); ``feature_map_block_t`` / ``feature_map_grad_block_t`` — the
  same for a block of tokens stored transposed (vectorised over tokens: every φ and
  chain rule of the kernels goes through them).
* ``gemm_tn_acc`` — ``C += Aᵀ B`` for an A that is at hand transposed.
* ``blocks_in_row`` / ``column_index`` — the critical key blocks of a query-block
  row (a row of the map is contiguous: scanning it is cheap), and the reverse
  index: for every key block, the query blocks that mark it critical (a column is
  strided, so it is gathered once into CSR form for the backward).
* ``linear_states`` (``key_block_states`` + ``block_totals``) — the linear
  branch's per-key-block summaries ``h_j = φ(K_j)ᵀ V_j`` (D × D) and
  ``z_j = Σ_rows φ(K_j)`` (D) with their float64 totals, computed once per call
  in parallel; forward and backward both need them.
* ``sum_marginal`` — the linear branch's sums over marginal blocks: H_i, Z_i
  (forward, dQ: h_j, z_j along a row of the map) and dH_j, dZ_j (dK/dV: QO_i,
  QD_i along a column), added up directly or as "total minus the non-marginal
  blocks", whichever reads fewer blocks, in float64 (``_simd.row_sum_f64``: the
  accumulators of a row stay in vector registers over all blocks).

Scalars: Numba promotes ``float32 op python-float`` to float64, so the kernels
convert every constant to the array dtype first (``dt = q.dtype.type``,
``one = dt(1)``) to keep fp32 arithmetic in fp32.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .._arrays import np_empty
from ._simd import (
    SUM_COLS,
    TILE_M,
    TILE_VECTORS,
    VECTOR_BYTES,
    prefer_full_width,
    row_sum_f64,
    tile_fma,
    tile_fma_tn,
    tile_set,
    tile_set_tn,
    tile_transpose,
    tile_transpose_add,
)

#: fast-math flags for the attention kernels (never used by classification).
#: Everything except nnan / ninf: NaN and Inf must propagate.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: ``@njit`` options of every attention kernel. ``error_model="numpy"``: a float
#: division by zero gives inf/NaN (as in NumPy) instead of raising, so a NaN input
#: propagates instead of aborting a parallel loop, and divisions can be vectorised.
KERNEL_OPTIONS = dict(fastmath=FASTMATH, error_model="numpy", cache=True)

#: ``KERNEL_OPTIONS`` without re-association, for the float64 sums of the linear
#: states (``sum_marginal``'s plain-loop parts and its reference): each element is
#: then summed strictly block after block, as ``_simd.row_sum_f64`` does, so every
#: path gives the same bits (with re-association LLVM may regroup a float64 chain
#: ``(t − a) − b`` as ``t − (a + b)``; float32 blocks are summed exactly either way).
STRICT_SUM_OPTIONS = dict(fastmath=FASTMATH - {"reassoc"}, error_model="numpy", cache=True)

#: feature-map codes (same as sla_numba._params.FEATURE_MAPS)
PHI_SOFTMAX, PHI_ELU, PHI_RELU = 0, 1, 2


# --------------------------------------------------------------------------- small dense products
@njit(**KERNEL_OPTIONS)
def gemm_acc(a, b, c, m, n, kk):
    """``c[:m, :n] += a[:m, :kk] @ b[:kk, :n]`` (all 2-D, C-contiguous, one dtype).

    The bulk of C goes through the register-tiled micro-kernel ``_simd.tile_fma``
    (``TILE_M`` rows × ``tile_cols`` columns at a time, C kept in vector registers
    over the whole reduction); the columns and rows left over at the right and
    bottom edges through ``_gemm_edge`` (plain loops). For the 64 × 64 tiles of
    the default block size with D = 64 everything is micro-kernel work.
    """
    tn = TILE_VECTORS * VECTOR_BYTES // c.itemsize  # = _simd.tile_cols(itemsize)
    i = 0
    while i + TILE_M <= m:
        j = 0
        while j + tn <= n:
            tile_fma(a, b, c, i, j, kk)
            j += tn
        _gemm_edge(a, b, c, i, i + TILE_M, j, n, kk)
        i += TILE_M
    _gemm_edge(a, b, c, i, m, 0, n, kk)


@njit(**KERNEL_OPTIONS)
def _gemm_edge(a, b, c, i0, i1, j0, j1, kk):
    """``c[i0:i1, j0:j1] += a[i0:i1, :kk] @ b[:kk, j0:j1]``, plain loops (p in order)."""
    prefer_full_width()
    if j0 >= j1:
        return
    for i in range(i0, i1):
        ci = c[i]
        for p in range(kk):
            aip = a[i, p]
            bp = b[p]
            for j in range(j0, j1):
                ci[j] += aip * bp[j]


@njit(**KERNEL_OPTIONS)
def gemm_tn_acc(a, b, c, m, n, kk):
    """``c[:m, :n] += a[:kk, :m].T @ b[:kk, :n]``: ``gemm_acc`` with A stored transposed.

    Saves the transposed copy of A where a tile is at hand the other way round
    (Pᵀ, dSᵀ, φ(Q)ᵀ held with queries along the contiguous axis).
    """
    tn = TILE_VECTORS * VECTOR_BYTES // c.itemsize
    i = 0
    while i + TILE_M <= m:
        j = 0
        while j + tn <= n:
            tile_fma_tn(a, b, c, i, j, kk)
            j += tn
        _gemm_tn_edge(a, b, c, i, i + TILE_M, j, n, kk)
        i += TILE_M
    _gemm_tn_edge(a, b, c, i, m, 0, n, kk)


@njit(**KERNEL_OPTIONS)
def _gemm_tn_edge(a, b, c, i0, i1, j0, j1, kk):
    """``c[i0:i1, j0:j1] += a[:kk, i0:i1].T @ b[:kk, j0:j1]``, plain loops (p in order)."""
    prefer_full_width()
    if j0 >= j1:
        return
    for i in range(i0, i1):
        ci = c[i]
        for p in range(kk):
            api = a[p, i]
            bp = b[p]
            for j in range(j0, j1):
                ci[j] += api * bp[j]


@njit(**KERNEL_OPTIONS)
def gemm_set(a, b, c, m, n, kk):
    """``c[:m, :n] = a[:m, :kk] @ b[:kk, :n]``: ``gemm_acc`` into a C that starts at zero.

    The same bits as ``fill2d(c, m, n, 0)`` followed by ``gemm_acc`` (every element
    starts at +0.0 and gets the same fused multiply-adds in the same order), but the
    micro-kernel ``_simd.tile_set`` starts its register tile at zero instead of
    loading it, so C is neither zero-filled nor read: one pass over C less per product.
    """
    tn = TILE_VECTORS * VECTOR_BYTES // c.itemsize
    zero = c.dtype.type(0)
    i = 0
    while i + TILE_M <= m:
        j = 0
        while j + tn <= n:
            tile_set(a, b, c, i, j, kk)
            j += tn
        _fill_block(c, i, i + TILE_M, j, n, zero)
        _gemm_edge(a, b, c, i, i + TILE_M, j, n, kk)
        i += TILE_M
    _fill_block(c, i, m, 0, n, zero)
    _gemm_edge(a, b, c, i, m, 0, n, kk)


@njit(**KERNEL_OPTIONS)
def gemm_tn_set(a, b, c, m, n, kk):
    """``c[:m, :n] = a[:kk, :m].T @ b[:kk, :n]``: ``gemm_tn_acc`` into a C that starts at zero
    (see ``gemm_set``)."""
    tn = TILE_VECTORS * VECTOR_BYTES // c.itemsize
    zero = c.dtype.type(0)
    i = 0
    while i + TILE_M <= m:
        j = 0
        while j + tn <= n:
            tile_set_tn(a, b, c, i, j, kk)
            j += tn
        _fill_block(c, i, i + TILE_M, j, n, zero)
        _gemm_tn_edge(a, b, c, i, i + TILE_M, j, n, kk)
        i += TILE_M
    _fill_block(c, i, m, 0, n, zero)
    _gemm_tn_edge(a, b, c, i, m, 0, n, kk)


@njit(**KERNEL_OPTIONS)
def _fill_block(c, i0, i1, j0, j1, value):
    """``c[i0:i1, j0:j1] = value``."""
    for i in range(i0, i1):
        ci = c[i]
        for j in range(j0, j1):
            ci[j] = value


@njit(**KERNEL_OPTIONS)
def transpose_block(src, r0, rows, cols, factor, dst):
    """``dst[:cols, :rows] = factor · src[r0:r0+rows, :cols].T``.

    Square tiles of the vector width (16 × 16 float32 on AVX-512) go through
    ``_simd.tile_transpose`` (vector loads, shuffles in registers, vector stores);
    the rows and columns left over at the edges through plain loops. A transposing
    loop is what LLVM vectorises worst: one side is strided, so it became one
    scalar load and one scalar store per element (the transposes cost ~6 % of
    the forward and ~11 % of the backward before). Each element is ``x · factor``,
    one rounding (exact for factor 1), as in the plain loop.
    """
    prefer_full_width()
    t = VECTOR_BYTES // src.itemsize  # = _simd.tile_t(itemsize)
    rows_t = rows - rows % t
    cols_t = cols - cols % t
    for r in range(0, rows_t, t):
        for d in range(0, cols_t, t):
            tile_transpose(src, r0 + r, d, dst, d, r, factor)
    for r in range(rows):  # right edge (all rows)
        sr = src[r0 + r]
        for d in range(cols_t, cols):
            dst[d, r] = sr[d] * factor
    for r in range(rows_t, rows):  # bottom edge (columns of the tiles)
        sr = src[r0 + r]
        for d in range(cols_t):
            dst[d, r] = sr[d] * factor


@njit(**KERNEL_OPTIONS)
def transpose_into(src, dst, rows, cols):
    """``dst[:cols, :rows] = src[:rows, :cols].T`` (``transpose_block``)."""
    transpose_block(src, 0, rows, cols, src.dtype.type(1), dst)


@njit(**KERNEL_OPTIONS)
def fill2d(x, rows, cols, value):
    """``x[:rows, :cols] = value``."""
    prefer_full_width()
    for r in range(rows):
        xr = x[r]
        for d in range(cols):
            xr[d] = value


# --------------------------------------------------------------------------- vectorisable exp
@intrinsic
def _pow2_f32(typingctx, n):
    """2**n as float32 for an int32 n in [-126, 127]: write n + 127 into the exponent bits."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        biased = builder.add(args[0], ir.Constant(ir.IntType(32), 127))
        bits = builder.shl(biased, ir.Constant(ir.IntType(32), 23))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


# No re-association here: it would merge the two-part ln 2 subtraction below.
@njit(fastmath={"nsz", "arcp", "contract", "afn"}, error_model="numpy", cache=True)
def exp_f32(x):
    """exp(x) in float32, max relative error about 1e-7 (Cephes ``expf``).

    x = n·ln2 + f with |f| <= ln2/2 (ln 2 split in two parts, Cody–Waite, so f is
    exact); e^f by a degree-7 polynomial; 2^n from the exponent bits. Results below
    the normal range (x < −87.3) flush to 0; NaN gives NaN, +inf gives +inf.
    """
    f32 = np.float32
    n = np.floor(x * f32(1.44269504088896341) + f32(0.5))
    n = n if n > f32(-126.0) else f32(-126.0)  # NaN lands here too (a safe int)
    n = n if n < f32(127.0) else f32(127.0)
    f = x - n * f32(0.693359375)
    f = f + n * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    p = p * f + f32(1.3981999507e-3)
    p = p * f + f32(8.3334519073e-3)
    p = p * f + f32(4.1665795894e-2)
    p = p * f + f32(1.6666665459e-1)
    p = p * f + f32(5.0000001201e-1)
    p = p * (f * f) + f + f32(1.0)
    r = p * _pow2_f32(np.int32(n))
    return f32(0.0) if x < f32(-87.33654) else r


def fast_exp(x):
    """exp(x): ``exp_f32`` for float32 scalars, ``math.exp`` otherwise (inside njit code)."""
    return math.exp(x)


@overload(fast_exp)
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: math.exp(x)


# --------------------------------------------------------------------------- feature maps φ
@njit(**KERNEL_OPTIONS)
def feature_map_row(x, y, phi):
    """``y = φ(x)`` for one token x (D,): softmax over D, elu(x)+1, or relu."""
    prefer_full_width()
    dt = y.dtype.type
    zero = dt(0)
    one = dt(1)
    n = x.shape[0]
    if phi == PHI_SOFTMAX:
        mx = x[0]
        for d in range(1, n):
            if x[d] > mx:
                mx = x[d]
        tot = zero
        for d in range(n):
            e = fast_exp(x[d] - mx)
            y[d] = e
            tot += e
        inv = one / tot
        for d in range(n):
            y[d] *= inv
    elif phi == PHI_ELU:
        for d in range(n):
            xd = x[d]
            y[d] = xd + one if xd > zero else fast_exp(xd)
    else:
        for d in range(n):
            xd = x[d]
            y[d] = zero if xd <= zero else xd  # NaN stays NaN
    return y


@njit(**KERNEL_OPTIONS)
def column_max(st, nk, nr, m):
    """``m[r] = max(m[r], max_c st[c, r])`` for c < nk, r < nr; NaNs are passed over.

    The running max of a softmax whose values are stored transposed (``st``: one
    row per key — or per feature for φ — and the softmaxes along the contiguous
    axis). Four rows at a time: their maximum is taken first, then merged into the
    running max, so ``m`` is read and written once per four rows. Written one row at
    a time, every row waited for the previous row's store of ``m`` (a chain through
    memory: 0.54 µs for a 64 × 64 tile, 0.16 µs this way). For finite and infinite
    values the result is the same maximum. A NaN never enters ``m`` either way, but
    the pairwise form may then also pass over a number next to it; such a softmax is
    NaN whatever its max (exp(NaN − m) enters its sum and its output).
    """
    prefer_full_width()
    c = 0
    while c + 4 <= nk:
        s0 = st[c]
        s1 = st[c + 1]
        s2 = st[c + 2]
        s3 = st[c + 3]
        for r in range(nr):
            a = s0[r]
            b = s1[r]
            x = a if a > b else b
            a = s2[r]
            b = s3[r]
            y = a if a > b else b
            x = x if x > y else y
            mr = m[r]
            m[r] = x if x > mr else mr
        c += 4
    while c < nk:
        sc = st[c]
        for r in range(nr):
            x = sc[r]
            mr = m[r]
            m[r] = x if x > mr else mr
        c += 1


@njit(**KERNEL_OPTIONS)
def feature_map_block_t(x, r0, nr, yt, phi):
    """``yt[:, :nr] = φ(x[r0:r0+nr])ᵀ``: φ of nr tokens of x (N, D), stored transposed (D, ≥nr).

    Same arithmetic per token as ``feature_map_row`` except that softmax's sum runs
    over d in order. With the tokens along the contiguous axis, softmax's running max
    and sum over D are element-wise loops over tokens, which LLVM vectorises (a max
    *reduction* along a row does not vectorise without the ``nnan`` flag we leave
    out); this costs one transposed copy of the block.
    """
    prefer_full_width()
    D = x.shape[1]
    dt = yt.dtype.type
    zero = dt(0)
    one = dt(1)
    transpose_block(x, r0, nr, D, one, yt)
    if phi == PHI_SOFTMAX:
        mx = np.empty(nr, yt.dtype)
        tot = np.zeros(nr, yt.dtype)
        y0 = yt[0]
        for r in range(nr):
            mx[r] = y0[r]
        column_max(yt[1:], D - 1, nr, mx)
        for d in range(D):
            yd = yt[d]
            for r in range(nr):
                e = fast_exp(yd[r] - mx[r])
                yd[r] = e
                tot[r] += e
        for r in range(nr):
            tot[r] = one / tot[r]
        for d in range(D):
            yd = yt[d]
            for r in range(nr):
                yd[r] *= tot[r]
    elif phi == PHI_ELU:
        for d in range(D):
            yd = yt[d]
            for r in range(nr):
                xr = yd[r]
                yd[r] = xr + one if xr > zero else fast_exp(xr)
    else:
        for d in range(D):
            yd = yt[d]
            for r in range(nr):
                xr = yd[r]
                yd[r] = zero if xr <= zero else xr  # NaN stays NaN


@njit(**KERNEL_OPTIONS)
def feature_map_grad_acc(x, y, dy, dx, phi):
    """``dx += (∂φ/∂x)ᵀ dy`` for one token, with ``y = φ(x)`` already computed.

    softmax: ``y ⊙ (dy − ⟨dy, y⟩)``; elu+1: ``dy · (1 if x > 0 else exp(x) = y)``;
    relu: ``dy · [x > 0]``.
    """
    prefer_full_width()
    zero = y.dtype.type(0)
    n = x.shape[0]
    if phi == PHI_SOFTMAX:
        inner = zero
        for d in range(n):
            inner += dy[d] * y[d]
        for d in range(n):
            dx[d] += y[d] * (dy[d] - inner)
    elif phi == PHI_ELU:
        for d in range(n):
            dx[d] += dy[d] if x[d] > zero else dy[d] * y[d]
    else:
        for d in range(n):
            if x[d] > zero:
                dx[d] += dy[d]


@njit(**KERNEL_OPTIONS)
def feature_map_grad_block_t(yt, gt, nr, phi):
    """``gt[:, :nr] ← (∂φ/∂x)ᵀ gt`` for nr tokens stored transposed, from ``yt = φ(x)ᵀ`` alone.

    yt, gt: (D, ≥nr), tokens along the contiguous axis (as ``feature_map_block_t``
    leaves them), so every step is an element-wise loop over tokens (vectorised);
    ``feature_map_grad_acc`` is the per-token form, with the same values. x itself
    is not needed: for elu+1, x > 0 gives y = x + 1 ≥ 1 and x ≤ 0 gives
    y = exp(x) ≤ 1, and where y = 1 both rules give dy·1 = dy, so "y > 1" picks
    the right one; for relu, x > 0 exactly when y > 0. NaN fails both tests, as it
    fails x > 0.
    """
    prefer_full_width()
    D = yt.shape[0]
    dt = yt.dtype.type
    zero = dt(0)
    one = dt(1)
    if phi == PHI_SOFTMAX:  # y ⊙ (dy − ⟨dy, y⟩), the inner product over d in order
        inner = np.zeros(nr, yt.dtype)
        for d in range(D):
            yd = yt[d]
            gd = gt[d]
            for r in range(nr):
                inner[r] += gd[r] * yd[r]
        for d in range(D):
            yd = yt[d]
            gd = gt[d]
            for r in range(nr):
                gd[r] = yd[r] * (gd[r] - inner[r])
    elif phi == PHI_ELU:
        for d in range(D):
            yd = yt[d]
            gd = gt[d]
            for r in range(nr):
                gd[r] = gd[r] if yd[r] > one else gd[r] * yd[r]
    else:
        for d in range(D):
            yd = yt[d]
            gd = gt[d]
            for r in range(nr):
                gd[r] = gd[r] if yd[r] > zero else zero


@njit(**KERNEL_OPTIONS)
def add_transposed(src_t, dst, nr):
    """``dst[:nr, :] += src_t[:, :nr].T`` for src_t (D, ≥nr), dst (≥nr, D).

    Square tiles through ``_simd.tile_transpose_add`` (see ``transpose_block``),
    the edges through plain loops; each element gets one addition either way.
    """
    prefer_full_width()
    D = src_t.shape[0]
    one = src_t.dtype.type(1)
    t = VECTOR_BYTES // src_t.itemsize
    nr_t = nr - nr % t
    D_t = D - D % t
    for d in range(0, D_t, t):
        for r in range(0, nr_t, t):
            tile_transpose_add(src_t, d, r, dst, r, d, one)
    for r in range(nr):  # columns of dst past the tiles (all rows)
        dr = dst[r]
        for d in range(D_t, D):
            dr[d] += src_t[d, r]
    for r in range(nr_t, nr):  # rows of dst past the tiles
        dr = dst[r]
        for d in range(D_t):
            dr[d] += src_t[d, r]


# --------------------------------------------------------------------------- block lists
@njit(cache=True)
def blocks_in_row(block_map, b, h, i, value, out):
    """Write the key blocks j with ``block_map[b, h, i, j] == value`` (ascending) to
    ``out``; return how many."""
    row = block_map[b, h, i]
    n = 0
    for j in range(row.shape[0]):
        if row[j] == value:
            out[n] = j
            n += 1
    return n


@njit(cache=True)
def column_index(block_map, value):
    """Reverse index of the map: for every key block, the query blocks of one class.

    Returns CSR arrays ``(ptr, idx)``: for column ``t = (b·H + h)·Mk + j`` the query
    blocks i with ``block_map[b, h, i, j] == value`` are ``idx[ptr[t]:ptr[t+1]]``,
    ascending. One serial pass over the map (O(B·H·Mq·Mk), tiny).
    """
    B, H, Mq, Mk = block_map.shape
    ptr = np.zeros(B * H * Mk + 1, np.int64)
    for b in range(B):
        for h in range(H):
            base = (b * H + h) * Mk
            for i in range(Mq):
                for j in range(Mk):
                    if block_map[b, h, i, j] == value:
                        ptr[base + j + 1] += 1
    for t in range(B * H * Mk):
        ptr[t + 1] += ptr[t]
    idx = np.empty(ptr[B * H * Mk], np.int32)
    fill = ptr[:-1].copy()
    for b in range(B):
        for h in range(H):
            base = (b * H + h) * Mk
            for i in range(Mq):  # ascending i within each column
                for j in range(Mk):
                    if block_map[b, h, i, j] == value:
                        idx[fill[base + j]] = i
                        fill[base + j] += 1
    return ptr, idx


# --------------------------------------------------------------------------- linear-branch states
@njit(parallel=True, **KERNEL_OPTIONS)
def key_block_states(k, v, block_k, phi, kv_h, kv_z):
    """Per key block j: ``kv_h[b, h, j] = φ(K_j)ᵀ V_j`` (D, D), ``kv_z[b, h, j] = Σ φ(K_j)`` (D).

    k, v: (B, H, Nk, D); kv_h: (B, H, Mk, D, D); kv_z: (B, H, Mk, D). Only the
    valid rows of a tail block count. Parallel over (b, h, j).
    """
    B, H, Nk, D = k.shape
    Mk = kv_h.shape[2]
    zero = k.dtype.type(0)
    for t in prange(B * H * Mk):
        prefer_full_width()  # the prange body is a function of its own
        b = t // (H * Mk)
        h = (t // Mk) % H
        j = t % Mk
        c0 = j * block_k
        nk = min(block_k, Nk - c0)
        yt = np.empty((D, nk), k.dtype)  # φ(K_j)ᵀ
        feature_map_block_t(k[b, h], c0, nk, yt, phi)
        zj = kv_z[b, h, j]
        for d in range(D):  # z_j = Σ_c φ(k_c)
            acc = zero
            ytd = yt[d]
            for c in range(nk):
                acc += ytd[c]
            zj[d] = acc
        gemm_set(yt, v[b, h, c0 : c0 + nk], kv_h[b, h, j], D, D, nk)


@njit(parallel=True, **KERNEL_OPTIONS)
def block_totals(mats, vecs, tot_m, tot_v, finite):
    """Per (b, h): sums over all blocks, in float64, blocks in ascending order.

    mats: (B, H, M, D, D), vecs: (B, H, M, D) -> tot_m: (B, H, D, D) and tot_v: (B, H, D)
    float64; finite: (B, H) bool, True when every total is finite — which holds
    exactly when every block is finite (a float64 sum of float32/float64 blocks
    cannot overflow unless a block is already inf or NaN).
    """
    B, H, M, D = vecs.shape
    for t in prange(B * H):
        prefer_full_width()  # the prange body is a function of its own
        b = t // H
        h = t % H
        tm = tot_m[b, h]
        tv = tot_v[b, h]
        fill2d(tm, D, D, 0.0)
        for d in range(D):
            tv[d] = 0.0
        for j in range(M):
            mj = mats[b, h, j]
            vj = vecs[b, h, j]
            for d in range(D):
                tmd = tm[d]
                mjd = mj[d]
                for e in range(D):
                    tmd[e] += mjd[e]
                tv[d] += vj[d]
        ok = True
        for d in range(D):
            ok = ok and math.isfinite(tv[d])
            for e in range(D):
                ok = ok and math.isfinite(tm[d, e])
        finite[b, h] = ok


@njit(**KERNEL_OPTIONS)
def sum_marginal(mats, vecs, tot_m, tot_v, use_totals, classes, out_m, out_v):
    """Sum of the blocks whose class is 0 (marginal): ``out_m = Σ_{classes[j]=0} mats[j]``,
    ``out_v`` likewise; returns how many blocks are marginal.

    mats: (M, D, D), vecs: (M, D); classes: (M,) int8, a row of the block map (for
    H_i, Z_i: sum of h_j, z_j over the marginal key blocks of query block i) or a
    column (for dH_j, dZ_j: sum of QO_i, QD_i over the query blocks that mark key
    block j marginal); tot_m (D, D), tot_v (D): float64 sums over all blocks.

    Two ways, same value: add the marginal blocks, or subtract the others from the
    total. With the default topk/skip most blocks are marginal, so subtracting
    reads ~6x fewer blocks. Both accumulate in float64 (the total too), so the
    subtraction loses nothing to cancellation even for float32 input; it is only
    used when the totals are finite (``use_totals``), so an inf/NaN block can only
    reach the rows where it is marginal — as in the dense reference.

    The reference form is ``sum_marginal_reference``; this one gives the same bits
    (per element: start value, then the blocks in ascending j), but works one row d
    at a time: the blocks to read are listed first, and ``SUM_COLS`` elements of a
    row (64 on AVX-512) are summed by ``_simd.row_sum_f64``, whose float64
    accumulators stay in vector registers over all listed blocks and are rounded
    into ``out_m`` once — instead of a (D, D) float64 matrix written and re-read once
    per block (it cost two 64³ products per call), or an accumulator row that LLVM
    loaded and stored once per block (2.5× slower than the registers).
    """
    prefer_full_width()
    M = classes.shape[0]
    D = out_v.shape[0]
    n_marg = 0
    for j in range(M):
        if classes[j] == 0:
            n_marg += 1
    subtract = use_totals and 2 * n_marg > M
    listed = np.empty(M, np.int64)  # the blocks read: the non-marginal ones or the marginal ones
    n = 0
    for j in range(M):
        if (classes[j] != 0) == subtract:
            listed[n] = j
            n += 1
    cols = D - D % SUM_COLS  # the columns row_sum_f64 covers; the rest below
    for d in range(D):
        for e0 in range(0, cols, SUM_COLS):
            row_sum_f64(mats, listed, n, d, e0, tot_m[d], subtract, out_m[d])
        if cols < D:
            _row_sum_tail(mats, listed, n, d, cols, tot_m[d], subtract, out_m[d])
    vecs3 = vecs.reshape((M, 1, D))  # z: one row, summed the same way
    for e0 in range(0, cols, SUM_COLS):
        row_sum_f64(vecs3, listed, n, 0, e0, tot_v, subtract, out_v)
    if cols < D:
        _row_sum_tail(vecs3, listed, n, 0, cols, tot_v, subtract, out_v)
    return n_marg


@njit(**STRICT_SUM_OPTIONS)
def _row_sum_tail(mats, listed, n, d, e0, start, subtract, out):
    """``row_sum_f64`` for the elements e0.. of row d past the vector-register part (plain loops)."""
    prefer_full_width()
    D = out.shape[0]
    acc = np.empty(D - e0, np.float64)
    for e in range(e0, D):
        acc[e - e0] = start[e] if subtract else 0.0
    for t in range(n):
        mjd = mats[listed[t], d]
        for e in range(e0, D):
            if subtract:
                acc[e - e0] -= mjd[e]
            else:
                acc[e - e0] += mjd[e]
    for e in range(e0, D):
        out[e] = acc[e - e0]


@njit(**STRICT_SUM_OPTIONS)
def sum_marginal_reference(mats, vecs, tot_m, tot_v, use_totals, classes, out_m, out_v):
    """``sum_marginal`` written plainly: a (D, D) float64 sum, one block at a time."""
    M = classes.shape[0]
    D = out_v.shape[0]
    n_marg = 0
    for j in range(M):
        if classes[j] == 0:
            n_marg += 1
    acc_m = np.empty((D, D), np.float64)
    acc_v = np.empty(D, np.float64)
    subtract = use_totals and 2 * n_marg > M
    if subtract:
        for d in range(D):
            acc_v[d] = tot_v[d]
            for e in range(D):
                acc_m[d, e] = tot_m[d, e]
    else:
        fill2d(acc_m, D, D, 0.0)
        for d in range(D):
            acc_v[d] = 0.0
    for j in range(M):
        if subtract and classes[j] != 0:  # total − critical − negligible
            for d in range(D):
                for e in range(D):
                    acc_m[d, e] -= mats[j, d, e]
                acc_v[d] -= vecs[j, d]
        elif not subtract and classes[j] == 0:  # Σ marginal
            for d in range(D):
                for e in range(D):
                    acc_m[d, e] += mats[j, d, e]
                acc_v[d] += vecs[j, d]
    for d in range(D):
        out_v[d] = acc_v[d]
        for e in range(D):
            out_m[d, e] = acc_m[d, e]
    return n_marg


def linear_map(block_map, linear_scope):
    """The map the linear branch reads its blocks from (class 0 = in the linear branch).

    ``linear_scope`` 0 ("marginal"): ``block_map`` itself. 1 ("global", the
    published thu-ml/SLA code): an all-zero map, every key block linear, while the
    sparse branch still reads the critical blocks from ``block_map``.
    """
    return block_map if linear_scope == 0 else np.zeros_like(block_map)


def linear_states(k, v, block_k, phi):
    """The linear branch's per-key-block states, for forward and backward alike.

    Returns ``(kv_h, kv_z, tot_h, tot_z, finite)``: kv_h (B, H, Mk, D, D) and kv_z
    (B, H, Mk, D) in the input dtype (``key_block_states``), their float64 totals
    over all key blocks tot_h (B, H, D, D), tot_z (B, H, D), and finite (B, H)
    (``block_totals``). Workspace: O(B·H·Mk·D²), about D/block_k times the size of k.
    """
    B, H, Nk, D = k.shape
    Mk = -(-Nk // block_k)
    kv_h = np_empty((B, H, Mk, D, D), k.dtype)
    kv_z = np_empty((B, H, Mk, D), k.dtype)
    key_block_states(k, v, block_k, phi, kv_h, kv_z)
    tot_h = np.empty((B, H, D, D), np.float64)
    tot_z = np.empty((B, H, D), np.float64)
    finite = np.empty((B, H), np.bool_)
    block_totals(kv_h, kv_z, tot_h, tot_z, finite)
    return kv_h, kv_z, tot_h, tot_z, finite
