"""Kernels shared by the forward and the backward: block lists and linear states.

1. ``prep`` (one launch) does independent jobs, told apart by blockIdx.x:
   - blocks ``x < n_state``: the linear-attention state of one block of rows,
     ``S_x = [vec(A_xᵀ B_x), colsum(A_x)]`` with ``A = w·φ(X)`` and ``B = Y``:
     for key blocks (forward) that is ``h_j = φ(K_j)ᵀ V_j`` (D x D) and
     ``z_j = Σ_rows φ(K_j)`` (D), over the block's valid rows only.
     Stored padded as ``state[b, h, x, :DP*DP]`` (row-major h) and
     ``state[b, h, x, DP*DP:]`` (z), zeros in the padding.
   - the other blocks: one thread per map row (and, for the backward, per map
     column) compacts the block map into lists:
       * ``crit[b,h,i,:n]``: the critical key blocks of row i, ascending;
       * ``info[:, b, h, i] = (n_crit, n_marginal)``, stored field-major, shape
         (2, B, H, M): ``info[0]`` is a contiguous (B, H, M) count array that the
         tensor-core kernels read as their ``counts``.
     Column lists (the reverse index, for dK/dV) are the same over query blocks
     of one key-block column. ``crit`` + ``info[0]`` are the tensor-core
     kernels' LUT / counts (rows) and reverse index / counts (columns).
   - (tensor-core backward only) the last blocks, one thread per query row:
     ``delta[b, h, r] = O_s[r]·dO_s[r]`` (compute dtype), which the tensor-core
     sparse backward reads before the SIMT kernels run. ``DELTA_LANES`` (8) threads
     share a row: thread i of the row sums the products at d = i, i + 8, i + 16, ...
     and the row's first thread adds the 8 partial sums in order (through shared memory).
     A warp's load then reads 4 rows x 8 consecutive values instead of one value of
     each of 32 rows 2·D bytes apart: ~8x fewer memory transactions (one thread a
     row took 0.4 ms at the Wan2.1 shape on the H200, most of the backward's prep).

The sums of states over each row's marginal blocks are the next launch
(``simt/marginal.py``: one matrix product for all rows).

Nothing goes back to the host.
"""

import functools
import math

from .._compat import FASTMATH, cuda, device, kernel
from .._precompile import kernel_factory
from .tiles import make_common, make_mm, smem_sizes

#: Threads that share one row of the backward's delta (see the module doc).
DELTA_LANES = 8


def delta_lanes(nt):
    """Threads a delta row for blocks of ``nt`` threads: DELTA_LANES, or fewer when
    ``nt`` is not a multiple of it (the simulator's 4-thread blocks)."""
    return math.gcd(DELTA_LANES, int(nt))


def state_rows(tiles, one_pass):
    """State rows (d1) a thread holds per pass of :func:`make_state_fn`: all DP rows in
    one pass (``one_pass``), else BQ rows a pass (the dQ kernel's register tile)."""
    return -(-tiles.DP // tiles.TR) if one_pass else max(1, tiles.BQ // tiles.TR)


@functools.cache
@kernel_factory
def make_state_fn(tiles, one_pass=False):
    """Device function: the linear state of one block of rows, into ``state[b, h, s]``.

    ``state[s, d1*DP + e] = Σ_r w_r φ(x_r)[d1] · y_r[e]`` and
    ``state[s, DP*DP + d1] = Σ_r w_r φ(x_r)[d1] · zw_r`` over rows r in [r0, r1),
    for one head's views: x, y (N, D), wv, zv (N,), state (M, W).
    Without weights (``use_w == 0``) w = zw = 1: h_j and z_j of a key block.
    With weights (backward): w = 1/den, zw = δl gives QO_i and QD_i.
    All threads of the block must call it (it synchronises). ``scratch`` (>= NT
    elements) is :func:`row_stats`'s; it must be free on entry.

    The state's DP rows (d1) are computed BR at a time, each pass re-reading the
    block's rows: BR = BQ by default (the register budget of the dQ kernel, which
    calls this too); ``one_pass``: BR = DP, one read of x and y (the prep kernel;
    ``sa`` must then hold KC x (DP + 1) elements, see :func:`prep_smem`).
    """
    T = tiles
    TR, TC, NT, DP = T.TR, T.TC, T.NT, T.DP
    RQ = state_rows(T, one_pass)
    BR = TR * RQ  # state rows (d1) per pass
    KC = T.KC  # rows of x / y staged at a time
    RD = T.RD
    acc_t = T.acc_dtype.type
    mm = make_mm(TR, TC, RQ, RD, T.acc)
    ops = make_common(NT, T.acc)
    (
        load_t,
        load_n,
        phi_value,
        phi_slope,
        row_stats,
        load_phi_t,
        load_phi_n,
        load_state,
        to_acc,
    ) = ops.functions()
    zero = acc_t(0.0)
    one = acc_t(1.0)

    @device
    def state_block(
        x, y, r0, r1, D, fm, wv, zv, use_w, state, s, sa, sb, srow, scratch, acc, zacc, t, tr, tc
    ):
        for d10 in range(0, DP, BR):
            for a in range(RQ):
                zacc[a] = zero
                for n in range(RD):
                    acc[a, n] = zero
            for c0 in range(r0, r1, KC):
                nc = min(KC, r1 - c0)
                cuda.syncthreads()
                row_stats(srow, x, c0, nc, D, KC, t, fm, scratch)
                # row_stats ends with a barrier: its srow writes (by other threads)
                # are ordered before these weight writes
                for r in range(t, KC, NT):
                    zw = one if r < nc else zero
                    if use_w != 0 and r < nc:
                        srow[4 * r + 2] = wv[c0 + r]
                        zw = zv[c0 + r]
                    srow[4 * r + 3] = zw
                cuda.syncthreads()
                # A[c][d1] = w_c φ(x_c)[d10 + d1],  B[c][e] = y_c[e]
                load_phi_n(sa, 0, BR + 1, x, c0, nc, d10, D, KC, BR, t, srow, fm)
                load_n(sb, 0, DP, y, c0, nc, 0, D, KC, DP, t, one)
                cuda.syncthreads()
                mm(acc, sa, 0, BR + 1, sb, 0, DP, nc, tr, tc)
                if tc == 0:
                    for a in range(RQ):
                        zs = zero
                        for cc in range(nc):
                            zs += sa[cc * (BR + 1) + tr + TR * a] * srow[4 * cc + 3]
                        zacc[a] += zs
            for a in range(RQ):
                d1 = d10 + tr + TR * a
                if d1 < DP:
                    for n in range(RD):
                        state[s, d1 * DP + tc + TC * n] = acc[a, n]
                    if tc == 0:
                        state[s, DP * DP + d1] = zacc[a]

    return state_block


def prep_one_pass(tiles):
    """Whether the prep kernel computes a whole state in one pass (fp32: 64
    accumulators a thread at D = 128; fp64 would spill)."""
    return tiles.acc_dtype.itemsize == 4


def prep_smem(tiles):
    """Shared-memory size of the prep kernel's ``sa`` buffer."""
    SA = smem_sizes(tiles)[0]
    if prep_one_pass(tiles):
        SA = max(SA, tiles.KC * (state_rows(tiles, True) * tiles.TR + 1))
    return SA


@functools.cache
@kernel_factory
def make_prep(tiles):
    """The prep kernel for a tile config (see module docstring)."""
    T = tiles
    TC, NT = T.TC, T.NT
    ONE = prep_one_pass(T)
    RQ, RD = state_rows(T, ONE), T.RD
    acc_t = T.acc_dtype.type
    _, SB, SP, SRED, SROW = smem_sizes(T)
    SA = prep_smem(T)
    state_block = make_state_fn(T, ONE)
    to_acc = make_common(NT, T.acc).to_acc
    zero = acc_t(0.0)
    DL = delta_lanes(NT)

    @kernel(fastmath=FASTMATH)
    def prep(
        x,
        y,
        n_rows,
        block,
        n_state,
        state,
        fm,
        dummy,
        bmap,
        mq,
        mk,
        want_cols,
        row_crit,
        row_info,
        col_crit,
        col_info,
        n_list_blocks,
        o_s,
        do_s,
        delta,
        nq,
    ):
        """Blocks x < n_state: state of row block x of (x, y) (h_j, z_j).
        The next ``n_list_blocks``: the map's row lists (and column lists if want_cols).
        The rest (``nq > 0`` only): ``delta[b, h, r] = o_s[b, h, r]·do_s[b, h, r]``.
        ``dummy``: any (B', H', N') array of the compute dtype (unused weights)."""
        sa = cuda.shared.array(SA, acc_t)
        sb = cuda.shared.array(SB, acc_t)
        srow = cuda.shared.array(SROW, acc_t)
        scratch = cuda.shared.array(NT, acc_t)  # row_stats' lane partials
        acc = cuda.local.array((RQ, RD), acc_t)
        zacc = cuda.local.array(RQ, acc_t)
        t = cuda.threadIdx.x
        tr = t // TC
        tc = t - tr * TC
        bx = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z

        if bx < n_state:
            r0 = bx * block
            r1 = min(r0 + block, n_rows)
            state_block(
                x[b, h],
                y[b, h],
                r0,
                r1,
                x.shape[3],
                fm,
                dummy[0, 0],
                dummy[0, 0],
                0,
                state[b, h],
                bx,
                sa,
                sb,
                srow,
                scratch,
                acc,
                zacc,
                t,
                tr,
                tc,
            )
            return

        if bx >= n_state + n_list_blocks:
            # ---- delta rows (tensor-core backward): DELTA_LANES threads a row ----
            i = t % DL
            r = (bx - n_state - n_list_blocks) * (NT // DL) + t // DL
            part = zero
            if r < nq:
                for d in range(i, o_s.shape[3], DL):
                    part += to_acc(o_s[b, h, r, d]) * to_acc(do_s[b, h, r, d])
            scratch[t] = part
            cuda.syncthreads()
            if i == 0 and r < nq:
                acc_d = zero
                for j in range(DL):
                    acc_d += scratch[t + j]
                delta[b, h, r] = acc_d
            return

        # ---- block lists: one thread per map row, then per map column ----
        u = (bx - n_state) * NT + t
        if u < mq:
            _lists(bmap, b, h, u, mk, 0, row_crit, row_info)
        elif want_cols != 0 and u < mq + mk:
            _lists(bmap, b, h, u - mq, mq, 1, col_crit, col_info)

    return prep


@cuda.jit(device=True)
def _lists(bmap, b, h, u, n, column, crit, info):
    """Row u of the map (``column`` = 0) or column u (``column`` = 1): its critical
    blocks, ascending, and the counts (critical, marginal)."""
    nc = 0
    nm = 0
    for x in range(n):
        v = bmap[b, h, x, u] if column else bmap[b, h, u, x]
        if v == 1:
            crit[b, h, u, nc] = x
            nc += 1
        elif v == 0:
            nm += 1
    info[0, b, h, u] = nc
    info[1, b, h, u] = nm
