"""The linear branch's per-block states as one matrix product: ``out = M · S``.

Every query-block row i of the linear branch needs ``H_i = Σ_{j marginal} h_j``
(and ``Z_i`` likewise); every key-block column j of its backward needs
``dH_j = Σ_{i marginal} QO_i``. Written per row, that is a gather of a few hundred
D x D states per block — at D = 128 each is 64 KiB, and the gathers of all rows
read tens of GB from L2 (the first GPU version did exactly that; BENCHMARKS.md,
"Lab notes", has what it cost). Written for all rows at once it is a dense product

    out[b, h, r, :] = Σ_c  M[r, c] · S[b, h, c, :]        M[r, c] = 1 if marginal else 0

with M (R x C) read from the block map (``M[r, c] = (map[r, c] == 0)``, or the
transposed map for the columns) and S (C x W) the states, W = DP·DP + DP
(vec(h) then z). A register-tiled product reuses each state row for a whole tile of
output rows, which turns the gather's L2 traffic into arithmetic.

Order and determinism: each output element is one thread's sum over c ascending,
with M exactly 0 or 1, so the result is the direct sum of the marginal states in
block order, the same bits on every run.

Tiles: a CUDA block computes RT x WT outputs (RT = TR·RR rows, WT = TC·RW columns),
TR x TC threads, each thread an RR x RW register tile; the inner dimension is staged
KT rows at a time through shared memory (``simt/tiles.make_mm`` does the arithmetic).
"""

import functools

import numpy as np

from .._compat import FASTMATH, SIMULATOR, cuda, kernel
from .._launcher import launch
from .._precompile import kernel_factory
from .tiles import U, make_mm

#: (TR, TC, RR, RW, KT): 256 threads, 128 x 128 outputs a block, 16 states a stage.
#: Simulator: 4 threads, 4 x 4 outputs, 2 states a stage.
TILES = (2, 2, 2, 2, 2) if SIMULATOR else (16, 16, 8, 8, 16)


@functools.cache
@kernel_factory
def make_marginal_sum(acc_name, tiles=TILES):
    """The kernel ``marginal_sum(bmap, transposed, n_out, n_in, states, out)``.

    bmap int8 (B, H, Mq, Mk); states (B, H, >= n_in, W); out (B, H, >= n_out, W).
    transposed = 0: rows are query blocks, ``M[r, c] = bmap[b, h, r, c] == 0``;
    transposed = 1: rows are key blocks, ``M[r, c] = bmap[b, h, c, r] == 0``.
    Grid: (ceil(W / WT), ceil(n_out / RT), B * H); block TR * TC threads.
    """
    TR, TC, RR, RW, KT = tiles
    NT = TR * TC
    RT, WT = TR * RR, TC * RW
    SM, SS = KT * RT, KT * WT  # shared-memory sizes: compile-time constants
    acc_t = np.dtype(acc_name).type
    zero = acc_t(0.0)
    one = acc_t(1.0)
    mm = make_mm(TR, TC, RR, RW, acc_name)

    @kernel(fastmath=FASTMATH)
    def marginal_sum(bmap, transposed, n_out, n_in, states, out):
        sm = cuda.shared.array(SM, acc_t)  # M chunk, [c][r]
        ss = cuda.shared.array(SS, acc_t)  # state chunk, [c][w]
        acc = cuda.local.array((RR, RW), acc_t)
        t = cuda.threadIdx.x
        tr = t // TC
        tc = t - tr * TC
        w0 = cuda.blockIdx.x * WT
        r0 = cuda.blockIdx.y * RT
        bh = cuda.blockIdx.z
        H = bmap.shape[1]
        b = bh // H
        h = bh - b * H
        m = bmap[b, h]
        s = states[b, h]
        o = out[b, h]
        W = s.shape[1]
        for a in range(RR):
            for n in range(RW):
                acc[a, n] = zero
        for c0 in range(0, n_in, KT):
            cuda.syncthreads()
            for e in range(t, SM, NT):
                kk = e // RT
                r = e - kk * RT
                v = zero
                if r0 + r < n_out and c0 + kk < n_in:
                    cls = m[c0 + kk, r0 + r] if transposed else m[r0 + r, c0 + kk]
                    if cls == 0:
                        v = one
                sm[e] = v
            for e in range(t, SS, NT):
                kk = e // WT
                w = e - kk * WT
                v = zero
                if w0 + w < W and c0 + kk < n_in:
                    v = s[U(c0 + kk), U(w0 + w)]
                ss[e] = v
            cuda.syncthreads()
            mm(acc, sm, 0, RT, ss, 0, WT, KT, tr, tc)  # rows past n_in are 0
        for a in range(RR):
            r = r0 + tr + TR * a
            if r < n_out:
                for n in range(RW):
                    w = w0 + tc + TC * n
                    if w < W:
                        o[U(r), U(w)] = acc[a, n]

    return marginal_sum


def launch_marginal_sum(stream, bmap, transposed, n_out, n_in, states, out, tiles=TILES):
    """``out[b, h, :n_out] = M · states[b, h, :n_in]`` on ``stream`` (see module doc)."""
    TR, TC, RR, RW, _ = tiles
    B, H = bmap.shape[0], bmap.shape[1]
    W = states.shape[3]
    grid = (-(-W // (TC * RW)), -(-n_out // (TR * RR)), B * H)
    acc_name = np.dtype(states.dtype).name
    kernel = make_marginal_sum(acc_name, tiles)
    launch(kernel, grid, TR * TC, stream, (bmap, 1 if transposed else 0, n_out, n_in, states, out))
