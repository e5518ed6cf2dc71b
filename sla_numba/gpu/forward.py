"""SLA forward on the GPU: sparse FlashAttention over critical blocks + linear attention.

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D); block_map int8 (B, H, Mq, Mk).

Three launches, all on the caller's stream:

1. ``prep`` (``_prep.py``): per key block j, the linear state
   ``h_j = φ(K_j)ᵀ V_j`` (D x D) and ``z_j = Σ_rows φ(K_j)`` (D); in the same
   launch, per query-block row i, its critical list C_i and counts.
2. ``marginal_sum`` (``_marginal.py``): for every row i at once,
   ``H_i = Σ_{j marginal} h_j`` and ``Z_i`` likewise, as one matrix product
   (block mask x states), summed in j order.
3. the fused kernel below, one CUDA block per (b, h, query block i), walking
   the block's rows in sub-tiles of BQ rows:

   sparse branch (FlashAttention-2 over C_i only; fp32 accumulation)::

       m = -inf, l = 0, O = 0
       for j in C_i, for each key tile of BK rows of block j:
           S = (scale·log2 e) · Q Kᵀ              # d in chunks of DC through shared memory
           m' = max(m, rowmax S);  P = 2^(S - m')
           l = l·2^(m - m') + rowsum P;  O = O·2^(m - m') + P V;  m = m'
       O_s = O / l;   lse = ln 2 · (m + log2 l)   (natural log, for the backward)

   A row with no critical block gets O_s = 0, lse = LSE_EMPTY.

   linear branch::

       O_l = φ(Q) H_i / (φ(Q)·Z_i + eps)      (0 with no marginal block)

   H_i (from launch 2) is staged DC rows at a time through shared memory.

The products all run through one register-tile micro-kernel (``_tiles.make_mm``).

``path`` (``_path.py``) selects who does the sparse branch: ``"simt"`` — the fused
kernel above does both branches; ``"tc"`` — the tensor-core kernel
(``forward_tc``, fp16 / bf16 ``mma.sync``) writes O_s and lse, reading the prep
kernel's critical lists as its LUT (``row_crit`` + ``row_info[0]``: no host work,
no sync); the linear branch runs on tensor cores too (docs/internals.md): the
states from ``states_tc``, their marginal sums from ``marginal_tc``, O_l from
``linear_tc`` — each sent back to its SIMT kernel (for O_l: the fused kernel
compiled with ``sparse=False``) where ``SLA_NUMBA_TC_OFF`` names it; ``"auto"``
(default) — ``"tc"`` whenever the inputs allow it. Launches with ``"tc"``: prep
(lists), states, marginal sum, tc sparse, linear (5).
"""
import functools
import math

import numpy as np

from .._params import FEATURE_MAPS, LSE_EMPTY, n_blocks
from ._arrays import DeviceCall
from ._compat import FASTMATH, cuda, kernel
from ._path import PATHS, resolve_path, select_path, tc_part  # noqa: F401  (re-exported)
from ._marginal import launch_marginal_sum
from ._prep import make_prep
from ._stages import mark
from ._tiles import LN2, LOG2E, choose_tiles, make_common, make_mm, smem_sizes


@functools.lru_cache(maxsize=None)
def make_forward_simt(tiles, sparse=True):
    """The fused forward kernel for one tile configuration.

    ``sparse=False`` (the tensor-core path): the sparse loops are compiled out and
    the kernel writes only ``o_l`` (``o_s`` and ``lse`` are left untouched)."""
    T = tiles
    SPARSE = bool(sparse)
    TR, TC, NT = T.TR, T.TC, T.NT
    BQ, BK, DP, DC, KC = T.BQ, T.BK, T.DP, T.DC, T.KC
    RQ, RK, RD = BQ // TR, BK // TC, T.RD
    LDQ = BQ + 1                     # transposed tiles indexed by query row
    LDK = BK + 1                     # transposed tiles indexed by key row
    acc_t = T.acc_dtype.type
    SA, SB, SP, SRED, SROW = smem_sizes(T)
    mm_s = make_mm(TR, TC, RQ, RK, T.acc)       # S  (BQ x BK)
    mm_o = make_mm(TR, TC, RQ, RD, T.acc)       # O  (BQ x DP)
    ops = make_common(NT, T.acc)
    (load_t, load_n, phi_value, phi_slope, row_stats, load_phi_t, load_phi_n,
     load_state, to_acc) = ops.functions()
    # the fused kernel (SPARSE) is at its register limit: one thread a row there
    row_stats_serial = ops.row_stats_serial
    zero = acc_t(0.0)
    one = acc_t(1.0)
    neg_inf = acc_t(-np.inf)
    ln2 = acc_t(LN2)
    lse_empty = acc_t(LSE_EMPTY)

    @kernel(fastmath=FASTMATH)
    def sla_forward(q4, k4, v4, lstate4, crit4, info, nq, nk, block_q, block_k,
                    scale, fm, eps, o_s4, o_l4, lse3):
        sa = cuda.shared.array(SA, acc_t)       # Qᵀ / φ(Q)ᵀ chunk   [d][row]
        sb = cuda.shared.array(SB, acc_t)       # Kᵀ chunk, V rows, H_i rows
        sp = cuda.shared.array(SP, acc_t)       # Pᵀ  [key][row]
        sred = cuda.shared.array(SRED, acc_t)   # per-row partials [row][tc]
        srow = cuda.shared.array(SROW, acc_t)   # φ row statistics
        sz = cuda.shared.array(DP, acc_t)       # Z_i chunk
        s = cuda.local.array((RQ, RK), acc_t)
        acc = cuda.local.array((RQ, RD), acc_t)
        m = cuda.local.array(RQ, acc_t)
        l = cuda.local.array(RQ, acc_t)
        dz = cuda.local.array(RQ, acc_t)

        t = cuda.threadIdx.x
        tr = t // TC
        tc = t - tr * TC
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        D = q4.shape[3]
        # one head's views (N, D): fewer shape/stride registers than 4-D indexing
        q = q4[b, h]
        k = k4[b, h]
        v = v4[b, h]
        hz = lstate4[b, h, i]          # this row's [vec(H_i), Z_i]
        crit = crit4[b, h, i]
        o_s = o_s4[b, h]
        o_l = o_l4[b, h]
        lse = lse3[b, h]
        qs = acc_t(scale * LOG2E)
        eps_a = acc_t(eps)
        n_crit = info[0, b, h, i]
        n_marg = info[1, b, h, i]
        q0 = i * block_q
        q1 = min(q0 + block_q, nq)

        for r0 in range(q0, q1, BQ):
            nr = min(BQ, q1 - r0)
            # ------------------------------------------------ sparse branch
            if SPARSE:
                for a in range(RQ):
                    m[a] = neg_inf
                    l[a] = zero
                    for n in range(RD):
                        acc[a, n] = zero
                for ci in range(n_crit):
                    j = crit[ci]
                    k0 = j * block_k
                    k1 = min(k0 + block_k, nk)
                    for c0 in range(k0, k1, BK):
                        nc = min(BK, k1 - c0)
                        for a in range(RQ):
                            for n in range(RK):
                                s[a, n] = zero
                        for d0 in range(0, DP, DC):
                            cuda.syncthreads()
                            load_t(sa, 0, LDQ, q, r0, nr, d0, D, BQ, DC, t, qs)
                            load_t(sb, 0, LDK, k, c0, nc, d0, D, BK, DC, t, one)
                            cuda.syncthreads()
                            mm_s(s, sa, 0, LDQ, sb, 0, LDK, DC, tr, tc)
                        # online softmax: row max across the TC threads of a row
                        for a in range(RQ):
                            mx = neg_inf
                            for n in range(RK):
                                if tc + TC * n < nc:
                                    mx = max(mx, s[a, n])
                            sred[(tr + TR * a) * TC + tc] = mx
                        cuda.syncthreads()
                        for a in range(RQ):
                            row = tr + TR * a
                            m_new = m[a]
                            for u in range(TC):
                                m_new = max(m_new, sred[row * TC + u])
                            alpha = math.exp2(m[a] - m_new)
                            m[a] = m_new
                            ls = zero
                            for n in range(RK):
                                col = tc + TC * n
                                p = zero
                                if col < nc:
                                    p = math.exp2(s[a, n] - m_new)
                                ls += p
                                sp[col * LDQ + row] = p
                            l[a] = l[a] * alpha + ls
                            for n in range(RD):
                                acc[a, n] *= alpha
                        # O += P V, V staged KC rows at a time
                        for kc0 in range(0, nc, KC):
                            nkc = min(KC, nc - kc0)
                            cuda.syncthreads()
                            load_n(sb, 0, DP, v, c0 + kc0, nkc, 0, D, KC, DP, t, one)
                            cuda.syncthreads()
                            mm_o(acc, sp, kc0 * LDQ, LDQ, sb, 0, DP, nkc, tr, tc)
                cuda.syncthreads()
                for a in range(RQ):
                    sred[(tr + TR * a) * TC + tc] = l[a]
                cuda.syncthreads()
                for a in range(RQ):
                    row = tr + TR * a
                    if row < nr:
                        n_row = r0 + row
                        if n_crit > 0:
                            lt = zero
                            for u in range(TC):
                                lt += sred[row * TC + u]
                            inv = one / lt
                            for n in range(RD):
                                col = tc + TC * n
                                if col < D:
                                    o_s[n_row, col] = acc[a, n] * inv
                            if tc == 0:
                                lse[n_row] = (m[a] + math.log2(lt)) * ln2
                        else:
                            for n in range(RD):
                                col = tc + TC * n
                                if col < D:
                                    o_s[n_row, col] = zero
                            if tc == 0:
                                lse[n_row] = lse_empty
            # ------------------------------------------------ linear branch
            if n_marg > 0:
                cuda.syncthreads()
                if SPARSE:
                    row_stats_serial(srow, q, r0, nr, D, BQ, t, fm)
                else:
                    row_stats(srow, q, r0, nr, D, BQ, t, fm, sred)   # sred free: barrier above
                for a in range(RQ):
                    dz[a] = zero
                    for n in range(RD):
                        acc[a, n] = zero
                for d0 in range(0, DP, DC):
                    cuda.syncthreads()
                    load_phi_t(sa, 0, LDQ, q, r0, nr, d0, D, BQ, DC, t, srow, fm)
                    load_state(sb, 0, DP, False, hz, d0 * DP, DC, DP, DP, t)
                    load_state(sz, 0, DC, False, hz, DP * DP + d0, 1, DC, DC, t)
                    cuda.syncthreads()
                    mm_o(acc, sa, 0, LDQ, sb, 0, DP, DC, tr, tc)
                    for a in range(RQ):
                        row = tr + TR * a
                        ds = zero
                        for dd in range(DC):
                            ds += sa[dd * LDQ + row] * sz[dd]
                        dz[a] += ds
                for a in range(RQ):
                    row = tr + TR * a
                    if row < nr:
                        inv = one / (dz[a] + eps_a)
                        for n in range(RD):
                            col = tc + TC * n
                            if col < D:
                                o_l[r0 + row, col] = acc[a, n] * inv
            else:
                for a in range(RQ):
                    row = tr + TR * a
                    if row < nr:
                        for n in range(RD):
                            col = tc + TC * n
                            if col < D:
                                o_l[r0 + row, col] = zero

    return sla_forward


def compute_dtype(in_dtype):
    """float64 for float64 input, float32 for everything else (fp16, bf16, fp32)."""
    return np.dtype(np.float64) if in_dtype == np.dtype(np.float64) else np.dtype(np.float32)


def launch_prep(call, tiles, x, y, n_rows, block, n_state, bmap, mq, mk, fm, want_cols,
                delta_of=None, tc_kind=None):
    """Launch ``prep``; returns the device buffers (states, lists, counts).

    ``tc_kind`` ("bf16" / "f16", the tensor-core path): the states come from the
    tensor-core kernel (``states_tc``, one more launch) and ``prep`` builds only the
    lists (and delta).

    ``info`` arrays are (2, B, H, M) (see ``_prep``): ``row_info[0]`` / ``col_info[0]``
    are the critical counts per row / column, ``[1]`` the marginal counts.
    ``delta_of=(o_s, do_s)`` (backward, tensor-core path) also fills ``delta``
    (B, H, Nq) = rowsum(o_s * do_s).
    """
    B, H = x.shape[0], x.shape[1]
    acc = tiles.acc_dtype
    width = tiles.DP * tiles.DP + tiles.DP
    _, state = call.workspace((B, H, n_state, width), acc)
    _, dummy = call.workspace((1, 1, 1), acc)
    _, row_crit = call.workspace((B, H, mq, max(mk, 1)), np.int32)
    _, row_info = call.workspace((2, B, H, mq), np.int32)
    if want_cols:
        _, col_crit = call.workspace((B, H, mk, max(mq, 1)), np.int32)
        _, col_info = call.workspace((2, B, H, mk), np.int32)
        n_lists = mq + mk
    else:
        col_crit = col_info = row_info
        n_lists = mq
    nt = tiles.NT
    n_list_blocks = -(-n_lists // nt)
    if delta_of is not None:
        o_s, do_s = delta_of
        nq = o_s.shape[2]
        _, delta = call.workspace((B, H, nq), acc)
        n_delta_blocks = -(-nq // nt)
    else:
        o_s = do_s = call.workspace((1, 1, 1, 1), acc)[1]
        delta, nq, n_delta_blocks = dummy, 0, 0
    tc_states = False
    if tc_kind is not None and tc_part("states"):
        from .states_tc import launch_states_tc, states_tc_supported
        tc_states = states_tc_supported(x.shape[3], block)
    n_simt = 0 if tc_states else n_state          # state blocks the SIMT prep computes
    grid = (n_simt + n_list_blocks + n_delta_blocks, H, B)
    make_prep(tiles)[grid, nt, call.stream](
        x, y, n_rows, block, n_simt, state, fm, dummy,
        bmap, mq, mk, 1 if want_cols else 0,
        row_crit, row_info, col_crit, col_info,
        n_list_blocks, o_s, do_s, delta, nq)
    if tc_states:
        launch_states_tc(tc_kind, half_bits(x), half_bits(y), flat(state), B, H, n_rows,
                         x.shape[3], block, fm, call.stream)
    return dict(state=state, dummy=dummy, row_crit=row_crit, row_info=row_info,
                col_crit=col_crit, col_info=col_info, delta=delta)


def marginal_sum(call, bmap, transposed, n_out, n_in, states, out, tc):
    """``out = M · states`` (``_marginal``), on tensor cores (``marginal_tc``: bf16
    hi + lo products, fp32 accumulation) when ``tc`` (the tensor-core path) and the
    states are fp32; the SIMT product otherwise."""
    if tc and np.dtype(states.dtype) == np.float32 and tc_part("marginal"):
        from .marginal_tc import launch_marginal_sum_tc
        launch_marginal_sum_tc(call.stream, bmap, transposed, n_out, n_in, states, out)
    else:
        launch_marginal_sum(call.stream, bmap, transposed, n_out, n_in, states, out)


def row_states(call, bmap, state, mq, mk, tc=False):
    """(B, H, Mq, W) workspace: row i holds [vec(H_i), Z_i], the sum of ``state``
    over row i's marginal key blocks (:func:`marginal_sum`)."""
    B, H, _, W = state.shape
    _, out = call.workspace((B, H, mq, W), state.dtype)
    marginal_sum(call, bmap, False, mq, mk, state, out, tc)
    return out


def flat(x):
    """A flat (1-D) view of a C-contiguous device array."""
    return x.reshape(int(np.prod(x.shape)))


def half_bits(x):
    """Flat int16 view of an fp16 / bf16 device array (bf16 already arrives as int16)."""
    x = flat(x)
    return x if x.dtype == np.int16 else x.view(np.int16)


def half_kind(call, x):
    return "bf16" if call.in_dtype(x) == "bfloat16" else "f16"


def linear_supported(D, block_q):
    """Whether ``linear_tc`` takes this head dim and query block (imported lazily)."""
    from .linear_tc import linear_tc_supported
    return linear_tc_supported(D, block_q)


def call_device(call):
    """The device for ``tc_supported`` (None: the current one)."""
    return call.device_index


def forward(q, k, v, block_map, block_q, block_k, scale, feature_map, eps, *,
            path="auto", tiles=None):
    """SLA forward. Returns ``(o_s, o_l, lse)`` of the same array kind as ``q``.

    o_s, o_l: (B, H, Nq, D); lse: (B, H, Nq); float64 for float64 input, float32
    otherwise. ``feature_map`` is the int code of ``_params.FEATURE_MAPS`` (a name
    is accepted too). ``path``: "auto" | "simt" | "tc" (``_path.py``; "tc" on
    inputs the tensor cores cannot take is a ``ValueError``). ``tiles`` overrides
    the SIMT tile configuration (tests).
    """
    if isinstance(feature_map, str):
        feature_map = FEATURE_MAPS[feature_map]
    call = DeviceCall(q)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    path = resolve_path(path, call.in_dtype(q), D, block_q, block_k, call_device(call))
    Mq, Mk = n_blocks(Nq, block_q), n_blocks(Nk, block_k)
    acc = compute_dtype(call.in_dtype(q))
    T = tiles or choose_tiles(D, acc, block_q, block_k)
    mark("glue")
    with call.device_context():
        dq, dk, dv, dmap = call.dev(q), call.dev(k), call.dev(v), call.dev(block_map)
        ws = launch_prep(call, T, dk, dv, Nk, block_k, Mk, dmap, Mq, Mk,
                         int(feature_map), want_cols=False,
                         tc_kind=half_kind(call, q) if path == "tc" else None)
        mark("fwd prep")
        lstate = row_states(call, dmap, ws["state"], Mq, Mk, tc=path == "tc")
        mark("fwd marginal sum")
        h_os, o_s = call.output((B, H, Nq, D), acc)
        h_ol, o_l = call.output((B, H, Nq, D), acc)
        h_lse, lse = call.output((B, H, Nq), acc)
        if path == "tc":
            from .forward_tc import launch_sparse_forward
            launch_sparse_forward(half_kind(call, q), half_bits(dq), half_bits(dk), half_bits(dv),
                                  flat(ws["row_crit"]), flat(ws["row_info"][0]), flat(o_s),
                                  flat(lse), B, H, Nq, Nk, D, block_q, block_k, float(scale),
                                  call.stream)
            mark("fwd tc sparse")
        if path == "tc" and tc_part("linear") and linear_supported(D, block_q):
            from .linear_tc import launch_linear_forward_tc
            launch_linear_forward_tc(half_kind(call, q), half_bits(dq), lstate,
                                     flat(ws["row_info"][1]), flat(o_l), B, H, Nq, D,
                                     block_q, int(feature_map), float(eps), call.stream)
        else:
            make_forward_simt(T, path == "simt")[(Mq, H, B), T.NT, call.stream](
                dq, dk, dv, lstate, ws["row_crit"], ws["row_info"],
                Nq, Nk, block_q, block_k, float(scale), int(feature_map), float(eps),
                o_s, o_l, lse)
        mark("fwd linear" if path == "tc" else "fwd simt fused")
        return call.result(h_os), call.result(h_ol), call.result(h_lse)
