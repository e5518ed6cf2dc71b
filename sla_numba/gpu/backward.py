"""SLA backward on the GPU (SLA_SPEC §3): deterministic, no atomics.

Given dO_s (= dO) and dO_l (= dO·W), five launches on the caller's stream:

1. ``prep`` (``simt/states.py``): per key block the linear state h_j, z_j again, and
   the block lists of the map: per query-block row its critical list, per
   key-block column the *reverse index* (query blocks that mark the column
   critical), with counts.
2. ``marginal_sum`` (``simt/marginal.py``): H_i, Z_i of every query-block row.
3. ``dq`` — one CUDA block per (b, h, query block i), BQ rows at a time:
   - per row: ``δs = O_s·dO_s``, ``δl = O_l·dO_l``, ``den = φ(q)·Z_i + eps``
     (kept in small workspaces for steps 3c and 5);
   - a) linear: ``dφ(q) = (dO_l H_iᵀ − δl Z_i) / den``, chained through φ;
   - b) sparse, over the critical list C_i (FlashAttention-2 recomputation):
     ``P = exp(S − lse)``, ``dP = dO_s Vᵀ``, ``dS = P ⊙ (dP − δs)``,
     ``dQ += scale · dS K``;
   - c) after all rows: ``QO_i = Σ_r ĉ_rᵀ dO_l[r]``, ``QD_i = Σ_r ĉ_r δl_r``
     with ``ĉ_r = φ(q_r)/den_r`` (the linear state of the query block, same code as
     h_j with weights). A row without marginal blocks gets QO_i = QD_i = 0.
4. ``marginal_sum`` over the map's columns: ``dH_j = Σ_{i: M[i,j]=0} QO_i``,
   ``dZ_j`` likewise, for every key block j.
5. ``dkdv`` — one CUDA block per (b, h, key block j), BKD key rows at a time:
   - linear: ``dφ(k_c) = v_c dH_jᵀ − dZ_j`` chained through φ into dK,
     ``dV[c] += φ(k_c) dH_j``;
   - sparse, over the query blocks of the reverse index only:
     ``Pᵀ = exp(Sᵀ − lse)``, ``dV += Pᵀ dO_s``, ``dK += scale · dSᵀ Q``.

Every output element is written by exactly one thread: same input, same bits.

Path "tc" (``_path.py``; fp16 / bf16 on compute capability >= 8.0): ``prep`` also
computes ``delta = O_s·dO_s`` per query row; the tensor-core kernels
(``tc/backward.py``) then write the sparse dQ, dK, dV, reading the prep kernel's
critical lists (row_crit + row_info[0]) and reverse index (col_crit +
col_info[0]) straight from the device; finally the linear branch's gradients are
*added* in place by the tensor-core kernels of ``tc/linear_backward.py`` (steps 3a/3c
as ``dq_linear``, the column sums, step 5's linear part as ``dkdv_linear``), or, where
``SLA_NUMBA_TC_OFF`` names ``linear_grad`` or the shape is not theirs, by ``dq`` /
``dkdv`` compiled with ``sparse=False``. Seven launches, still deterministic: each
element has one writer per kernel, in stream order.

Handed the forward's row states (``row_states=``, from ``forward(...,
return_states=True)``), steps 1 and 2 shrink: ``prep`` builds only the lists (and
delta), no key-block state is computed and the row sums are not taken again.
"""

import numpy as np

from .. import config
from .._params import FEATURE_MAPS, n_blocks
from ._arrays import DeviceCall
from ._launch import (
    call_device,
    compute_dtype,
    flat,
    half_bits,
    half_kind,
    launch_prep,
    linear_scope_global,
    linear_supported,
    marginal_sum,
    row_states_layout,
)
from ._launch import row_states as sum_row_states
from ._launcher import launch
from ._path import resolve_path, tc_part
from ._precompile import ahead
from ._stages import mark
from .simt.backward import make_dkdv, make_dq
from .simt.tiles import choose_tiles


def _like_dtype(call, x, like):
    """``x`` converted to ``like``'s dtype with its own library (tensor-core dO)."""
    if call.in_dtype(x) == call.in_dtype(like):
        return x
    if call.kind == "torch":
        return x.to(like.dtype)
    if call.kind in ("cupy", "numpy"):
        return x.astype(like.dtype)
    raise TypeError("path='tc' with numba device arrays needs do_s in q's dtype")


@ahead
def backward(
    q,
    k,
    v,
    o_s,
    o_l,
    lse,
    do_s,
    do_l,
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
    row_states=None,
):
    """SLA backward. Returns ``(dq, dk, dv)`` of the same array kind as ``q``.

    dq like q, dk / dv like k / v, float64 for float64 q, float32 otherwise.
    o_s, o_l, lse, do_s, do_l may be in any float dtype (read as the compute dtype).
    ``path``: "auto" | "simt" | "tc" (``_path.py``), chosen by the same rule as the
    forward's. With "tc" (7 launches): prep (+ delta = rowsum(O_s·dO_s)), row sums,
    tensor-core dQ and dK/dV over the prep kernel's critical lists and reverse index
    (written first), then the SIMT dq / column sums / dkdv compiled without their sparse
    loops, which *add* the linear contributions in place (the column sums between
    dq and dkdv). Deterministic either way. ``linear_scope`` 1 ("global"): the
    linear branch took every key block (``_launch.linear_scope_global``).

    ``row_states``: what ``forward(..., return_states=True)`` returned for the same
    inputs, map, ``linear_scope``, path and switches (not checked beyond its layout):
    the row sums H_i, Z_i of the linear branch. Then the backward computes neither the
    key-block states (prep builds only the lists and delta) nor their row sums: two
    launches fewer on the tensor-core path, and the same gradients bit for bit (the same
    kernels made those sums in the forward). A wrong shape or dtype is a ``ValueError``,
    another array kind or device a ``TypeError``.
    """
    if isinstance(feature_map, str):
        feature_map = FEATURE_MAPS[feature_map]
    fm = int(feature_map)
    call = DeviceCall(q)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    path = resolve_path(path, call.in_dtype(q), D, block_q, block_k, call_device(call))
    tc = path == "tc"
    Mq, Mk = n_blocks(Nq, block_q), n_blocks(Nk, block_k)
    acc = compute_dtype(call.in_dtype(q))
    T = tiles or choose_tiles(D, acc, block_q, block_k)
    W = T.DP * T.DP + T.DP
    if row_states is not None:
        _check_row_states(call, row_states, q, *row_states_layout(B, H, Mq, T))
    mark("glue")
    if tc:
        do_s = _like_dtype(call, do_s, q)
    with call.device_context():
        dev = [call.dev(x) for x in (q, k, v, o_s, o_l, lse, do_s, do_l, block_map)]
        dq_, dk_, dv_, os_, ol_, lse_, dos_, dol_, bmap = dev
        ws = launch_prep(
            call,
            T,
            dk_,
            dv_,
            Nk,
            block_k,
            Mk,
            bmap,
            Mq,
            Mk,
            fm,
            want_cols=True,
            delta_of=(os_, dos_) if tc else None,
            tc_kind=half_kind(call, q) if tc else None,
            states=row_states is None,
        )
        lin_map = linear_scope_global(call, ws, bmap, True) if linear_scope else bmap
        mark("bwd prep")
        if row_states is None:
            lstate = sum_row_states(call, lin_map, ws["state"], Mq, Mk, tc=tc)
            mark("bwd marginal sum (rows)")
        else:  # the forward's (H_i, Z_i): nothing to recompute
            lstate = call.dev(row_states)
        h_dq, dq = call.output((B, H, Nq, D), acc)
        h_dk, dk = call.output((B, H, Nk, D), acc)
        h_dv, dv = call.output((B, H, Nk, D), acc)
        if tc:
            w_ds = ws["delta"]
            lse_f = lse_
            if lse_f.dtype != np.float32:
                lse_f = call.dev(_like_dtype_f32(call, lse))
            from .tc.backward import launch_sparse_backward

            launch_sparse_backward(
                half_kind(call, q),
                half_bits(dq_),
                half_bits(dk_),
                half_bits(dv_),
                half_bits(dos_),
                flat(lse_f),
                flat(w_ds),
                flat(ws["row_crit"]),
                flat(ws["row_info"][0]),
                flat(ws["col_crit"]),
                flat(ws["col_info"][0]),
                flat(dq),
                flat(dk),
                flat(dv),
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
            mark("bwd tc sparse (dq+dkdv)")
        else:
            _, w_ds = call.workspace((B, H, Nq), acc)
        _, dh = call.workspace((B, H, Mk, W), acc)
        if tc and _linear_grad_tc(D, T, block_q, block_k):
            # the linear branch's gradients on tensor cores (tc/linear_backward.py)
            from .tc.linear_backward import launch_dkdv_linear_tc, launch_dq_linear_tc

            # QO_i / QD_i in bf16 (SLA_NUMBA_GRAD_STATES): read only by the column sums
            kind = half_kind(call, q)
            q16 = config.bf16_grad_states(kind) and tc_part("marginal")
            _, qstate = call.workspace((B, H, Mq, W), np.int16 if q16 else acc)
            ol_in, dol_in = _linear_grad_inputs(call, q, o_l, do_l, ol_, dol_)
            launch_dq_linear_tc(
                kind, half_bits(dq_), ol_in, dol_in, flat(lstate), flat(ws["row_info"][1]),
                flat(dq), flat(qstate), B, H, Nq, D, block_q, fm, eps, call.stream,
            )  # fmt: skip
            mark("bwd linear dq")
            marginal_sum(call, lin_map, True, Mk, Mq, qstate, dh, True)
            mark("bwd marginal sum (columns)")
            launch_dkdv_linear_tc(
                kind, half_bits(dk_), half_bits(dv_), flat(dh), flat(ws["col_info"][1]),
                flat(dk), flat(dv), B, H, Nk, D, block_k, fm, call.stream,
            )  # fmt: skip
            mark("bwd linear dkdv")
            return call.result(h_dq), call.result(h_dk), call.result(h_dv)
        _, qstate = call.workspace((B, H, Mq, W), acc)
        # the SIMT dq's per-row workspaces (1 / den and δl; read again by nobody else)
        _, w_inv_den = call.workspace((B, H, Nq), acc)
        _, w_dl = call.workspace((B, H, Nq), acc)
        args = (
            dq_,
            dk_,
            dv_,
            os_,
            ol_,
            lse_,
            dos_,
            dol_,
            lstate,
            ws["row_crit"],
            ws["row_info"],
            Nq,
            Nk,
            block_q,
            block_k,
            float(scale),
            fm,
            float(eps),
            dq,
            w_inv_den,
            w_dl,
            w_ds,
            qstate,
        )
        launch(make_dq(T, not tc), (Mq, H, B), T.NT, call.stream, args)
        mark("bwd linear dq" if tc else "bwd simt dq")
        marginal_sum(call, lin_map, True, Mk, Mq, qstate, dh, tc)
        mark("bwd marginal sum (columns)")
        args = (
            dq_,
            dk_,
            dv_,
            lse_,
            dos_,
            ws["col_crit"],
            ws["col_info"],
            w_ds,
            Nq,
            Nk,
            block_q,
            block_k,
            float(scale),
            fm,
            dk,
            dv,
            dh,
        )
        launch(make_dkdv(T, not tc), (Mk, H, B), T.NT, call.stream, args)
        mark("bwd linear dkdv" if tc else "bwd simt dkdv")
        return call.result(h_dq), call.result(h_dk), call.result(h_dv)


def _check_row_states(call, row_states, q, shape, dtype):
    """``row_states`` as :func:`backward` reads it: the kind of array ``q`` is, on its
    device, C-contiguous, of the forward's row-state ``shape`` and ``dtype``."""
    from ._arrays import array_kind

    try:
        kind = array_kind(row_states)
    except TypeError:
        kind = type(row_states).__name__
    if kind != call.kind:
        raise TypeError(
            f"row_states: a {kind} array where q is {call.kind}: pass the row_states that "
            "forward(..., return_states=True) returned for these inputs"
        )
    got = tuple(int(s) for s in row_states.shape)
    if got != shape:
        raise ValueError(
            f"row_states: shape {got}, expected {shape} (B, H, Mq, DP*DP + DP) for these "
            "inputs: pass what forward(..., return_states=True) returned for them"
        )
    try:
        got_dtype = str(call.in_dtype(row_states))
    except KeyError:  # a torch dtype with no numpy twin
        got_dtype = str(row_states.dtype)
    if got_dtype != str(dtype):
        raise ValueError(f"row_states: dtype {got_dtype}, expected {dtype} (the compute dtype)")
    if call.kind == "torch":
        if row_states.device != q.device:
            raise TypeError(f"row_states: on {row_states.device}, q on {q.device}")
        if not row_states.is_contiguous():
            raise ValueError("row_states: must be C-contiguous")
    elif call.kind == "cupy" and row_states.device.id != q.device.id:
        raise TypeError(f"row_states: on GPU {row_states.device.id}, q on GPU {q.device.id}")


def _linear_grad_tc(D, T, block_q, block_k):
    """Whether the tensor-core path does the linear branch's gradients on tensor cores
    (``tc/linear_backward.py``, the same shapes as the forward's ``tc/linear.py``): states
    of width D*D + D, and not switched off by ``SLA_NUMBA_TC_OFF=linear_grad``."""
    return (
        tc_part("linear_grad")
        and T.DP == D
        and linear_supported(D, block_q)
        and linear_supported(D, block_k)
    )


def _linear_grad_inputs(call, q, o_l, do_l, ol_dev, dol_dev):
    """o_l and do_l as the linear-gradient kernels read them: their half bits (of the
    device views ``ol_dev``, ``dol_dev``) when both are in q's dtype (the torch path's
    bf16 / fp16 outputs and gradients), else fp32 copies."""
    if call.in_dtype(o_l) == call.in_dtype(q) and call.in_dtype(do_l) == call.in_dtype(q):
        return flat(half_bits(ol_dev)), flat(half_bits(dol_dev))
    return (
        flat(call.dev(_like_dtype_f32(call, o_l))),
        flat(call.dev(_like_dtype_f32(call, do_l))),
    )


def _like_dtype_f32(call, x):
    """``x`` as float32 with its own library (the tensor-core kernels read fp32 lse,
    and fp32 o_l / do_l unless both are in q's dtype)."""
    if call.in_dtype(x) == np.float32:
        return x
    if call.kind == "torch":
        return x.float().contiguous()
    if call.kind in ("cupy", "numpy"):
        return x.astype(np.float32)
    raise TypeError(f"path='tc' with numba device arrays: {x.dtype} where float32 is read")
