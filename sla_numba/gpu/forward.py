"""SLA forward on the GPU: sparse FlashAttention over critical blocks + linear attention.

Shapes: q (B, H, Nq, D); k, v (B, H, Nk, D); block_map int8 (B, H, Mq, Mk).

Three launches, all on the caller's stream:

1. ``prep`` (``simt/states.py``): per key block j, the linear state
   ``h_j = φ(K_j)ᵀ V_j`` (D x D) and ``z_j = Σ_rows φ(K_j)`` (D); in the same
   launch, per query-block row i, its critical list C_i and counts.
2. ``marginal_sum`` (``simt/marginal.py``): for every row i at once,
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

The products all run through one register-tile micro-kernel (``simt/tiles.make_mm``).

``path`` (``_path.py``) selects who does the sparse branch: ``"simt"`` — the fused
kernel above does both branches; ``"tc"`` — the tensor-core kernel
(``tc/forward.py``, fp16 / bf16 ``mma.sync``) writes O_s and lse, reading the prep
kernel's critical lists as its LUT (``row_crit`` + ``row_info[0]``: no host work,
no sync); the linear branch runs on tensor cores too (docs/internals.md): the
states from ``tc/states.py``, their marginal sums from ``tc/marginal.py``, O_l from
``tc/linear.py`` — each sent back to its SIMT kernel (for O_l: the fused kernel
compiled with ``sparse=False``) where ``SLA_NUMBA_TC_OFF`` names it; ``"auto"``
(default) — ``"tc"`` whenever the inputs allow it. Launches with ``"tc"``: prep
(lists), states, marginal sum, tc sparse, linear (5).
"""

import numpy as np

from .._params import FEATURE_MAPS, n_blocks
from ._arrays import DeviceCall
from ._launch import (
    call_device,
    compute_dtype,
    flat,
    half_bits,
    half_kind,
    half_pairs,
    launch_prep,
    linear_scope_global,
    linear_supported,
    row_states,
    row_states_layout,
)
from ._launcher import launch
from ._path import resolve_path, tc_part
from ._precompile import ahead
from ._stages import mark
from .simt.forward import make_forward_simt
from .simt.tiles import choose_tiles


@ahead
def forward(
    q,
    k,
    v,
    block_map,
    block_q,
    block_k,
    scale,
    feature_map,
    eps,
    linear_scope=0,
    *,
    path="auto",
    tiles=None,
    return_states=False,
    half_out=False,
):
    """SLA forward. Returns ``(o_s, o_l, lse)`` of the same array kind as ``q``.

    o_s, o_l: (B, H, Nq, D); lse: (B, H, Nq); float64 for float64 input, float32
    otherwise. ``feature_map`` is the int code of ``_params.FEATURE_MAPS`` (a name
    is accepted too). ``path``: "auto" | "simt" | "tc" (``_path.py``; "tc" on
    inputs the tensor cores cannot take is a ``ValueError``). ``tiles`` overrides
    the SIMT tile configuration (tests). ``linear_scope`` 1 ("global"): the linear
    branch takes every key block (``_launch.linear_scope_global``).

    ``return_states=True``: ``(o_s, o_l, lse, row_states)``, with ``row_states`` the
    linear branch's row sums this forward computed anyway, ``[vec(H_i), Z_i]`` per
    query block (B, H, Mq, DP*DP + DP) in the compute dtype (DP: the head dim padded for
    the SIMT tiles, D when D is a multiple of 16). Hand it to :func:`backward`
    (``row_states=``) and the backward skips the states and their row sums. The
    forward's work is the same; it only writes that buffer, which it keeps otherwise
    as a workspace (docs/internals.md, "Reusing the forward's row states").

    ``half_out=True`` (fp16 / bf16 inputs; what the torch bridge asks for): o_s and o_l
    come back in q's dtype, rounded to nearest even -- the bits of converting the
    float32 results, which is what a caller does next anyway. The tensor-core sparse and
    linear kernels write 16-bit O_s and O_l straight away (half the bytes, and no
    conversion pass); other kernels' float32 results are converted here. lse stays
    float32.

    Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``)::

        import numpy as np
        from sla_numba import gpu
        x = np.random.default_rng(0).standard_normal((1, 1, 32, 16)).astype(np.float32)
        bm = np.array([[[[1, 0], [0, 1]]]], np.int8)
        o_s, o_l, lse, rs = gpu.forward(x, x, x, bm, 16, 16, 0.25, 0, 1e-6, return_states=True)
        rs.shape                                   # (1, 1, 2, 16 * 16 + 16)
        grads = gpu.backward(x, x, x, o_s, o_l, lse, x, x, bm, 16, 16, 0.25, 0, 1e-6,
                             row_states=rs)
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
    half = bool(half_out) and acc == np.float32 and call.in_dtype(q) != np.float32
    if half and call.kind == "numba":
        raise ValueError("half_out=True takes torch, CuPy or numpy inputs, not Numba arrays")
    half_s = half and path == "tc"  # the tensor-core sparse kernels write 16-bit O_s
    mark("glue")
    with call.device_context():
        dq, dk, dv, dmap = call.dev(q), call.dev(k), call.dev(v), call.dev(block_map)
        ws = launch_prep(
            call,
            T,
            dk,
            dv,
            Nk,
            block_k,
            Mk,
            dmap,
            Mq,
            Mk,
            int(feature_map),
            want_cols=False,
            tc_kind=half_kind(call, q) if path == "tc" else None,
        )
        lin_map = linear_scope_global(call, ws, dmap, False) if linear_scope else dmap
        mark("fwd prep")
        h_rs = keep = None
        if return_states:  # the row sums written to a buffer handed back to the caller
            h_rs, keep = call.output(*row_states_layout(B, H, Mq, T))
        lstate = row_states(call, lin_map, ws["state"], Mq, Mk, tc=path == "tc", out=keep)
        mark("fwd marginal sum")
        h_os, o_s = (
            call.output_like(q, (B, H, Nq, D)) if half_s else call.output((B, H, Nq, D), acc)
        )
        tc_lin = path == "tc" and tc_part("linear") and linear_supported(D, block_q)
        half_l = half and tc_lin  # ... and the tensor-core linear kernels 16-bit O_l
        h_ol, o_l = (
            call.output_like(q, (B, H, Nq, D)) if half_l else call.output((B, H, Nq, D), acc)
        )
        h_lse, lse = call.output((B, H, Nq), acc)
        if path == "tc":
            from .tc.forward import launch_sparse_forward

            launch_sparse_forward(
                half_kind(call, q),
                half_bits(dq),
                half_bits(dk),
                half_bits(dv),
                flat(ws["row_crit"]),
                flat(ws["row_info"][0]),
                half_pairs(o_s) if half_s else flat(o_s),
                flat(lse),
                B,
                H,
                Nq,
                Nk,
                D,
                block_q,
                block_k,
                float(scale),
                call.stream,
            )
            mark("fwd tc sparse")
        if tc_lin:
            from .tc.linear import launch_linear_forward_tc

            launch_linear_forward_tc(
                half_kind(call, q),
                half_bits(dq),
                lstate,
                flat(ws["row_info"][1]),
                half_pairs(o_l) if half_l else flat(o_l),
                B,
                H,
                Nq,
                D,
                block_q,
                int(feature_map),
                float(eps),
                call.stream,
            )
        else:
            kernel = make_forward_simt(T, path == "simt")
            args = (
                dq,
                dk,
                dv,
                lstate,
                ws["row_crit"],
                ws["row_info"],
                Nq,
                Nk,
                block_q,
                block_k,
                float(scale),
                int(feature_map),
                float(eps),
                o_s,
                o_l,
                lse,
            )
            launch(kernel, (Mq, H, B), T.NT, call.stream, args)
        mark("fwd linear" if path == "tc" else "fwd simt fused")
        if half:  # written as 16-bit values already (half_s, half_l), or rounded here
            outs = (call.result_like(h_os, q), call.result_like(h_ol, q), call.result(h_lse))
        else:
            outs = (call.result(h_os), call.result(h_ol), call.result(h_lse))
        return (*outs, call.result(h_rs)) if return_states else outs


def row_states_shape(B, H, Nq, D, in_dtype, block_q, block_k):
    """Shape and numpy dtype of ``forward(..., return_states=True)``'s ``row_states``
    for q (B, H, Nq, D) of dtype ``in_dtype`` (a numpy dtype or "bfloat16"): (B, H, Mq,
    DP*DP + DP) in the compute dtype. What the torch bridge's fake kernel returns.

    >>> row_states_shape(1, 2, 100, 64, "bfloat16", 64, 64)
    ((1, 2, 2, 4160), dtype('float32'))
    """
    acc = compute_dtype(in_dtype)
    return row_states_layout(B, H, n_blocks(Nq, block_q), choose_tiles(D, acc, block_q, block_k))
