"""SLA written a second way: numpy, block by block, exactly as SLA_SPEC §2 and §3 state it.

Independent of ``sla_numba.reference`` (dense masks, autograd): the tests check the two
agree, so the oracle is itself checked, and the spec's backward formulas (the ones the
kernels implement) are checked against autograd. Slow loops; tiny shapes only.
"""

import numpy as np

from sla_numba._params import LSE_EMPTY


def _phi(name, x):
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "elu":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(name)


def _phi_backward(name, x, y, dy):
    """dx from dy through y = φ(x) (SLA_SPEC §3)."""
    if name == "softmax":
        return y * (dy - (dy * y).sum(axis=-1, keepdims=True))
    if name == "elu":
        return dy * np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))
    return dy * (x > 0)


def _tokens(blocks, block, n):
    idx = [np.arange(j * block, min((j + 1) * block, n)) for j in blocks]
    return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)


def forward(q, k, v, bm, block_q, block_k, feature_map, scale, eps):
    """-> o_s, o_l, lse (lse = LSE_EMPTY on rows with no critical token)."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    o_s, o_l = np.zeros_like(q), np.zeros_like(q)
    lse = np.full(q.shape[:3], LSE_EMPTY)
    for b in range(B):
        for h in range(H):
            pk = _phi(feature_map, k[b, h])
            hj = [
                pk[_tokens([j], block_k, nk)].T @ v[b, h, _tokens([j], block_k, nk)]
                for j in range(bm.shape[3])
            ]
            zj = [pk[_tokens([j], block_k, nk)].sum(axis=0) for j in range(bm.shape[3])]
            for i in range(bm.shape[2]):
                rows = _tokens([i], block_q, nq)
                crit = _tokens(np.flatnonzero(bm[b, h, i] == 1), block_k, nk)
                marg = np.flatnonzero(bm[b, h, i] == 0)
                if crit.size:
                    s = scale * q[b, h, rows] @ k[b, h, crit].T
                    m = s.max(axis=1, keepdims=True)
                    p = np.exp(s - m)
                    o_s[b, h, rows] = (p @ v[b, h, crit]) / p.sum(axis=1, keepdims=True)
                    lse[b, h, rows] = m[:, 0] + np.log(p.sum(axis=1))
                if marg.size:
                    Hi = sum(hj[j] for j in marg)
                    Zi = sum(zj[j] for j in marg)
                    pq = _phi(feature_map, q[b, h, rows])
                    o_l[b, h, rows] = (pq @ Hi) / (pq @ Zi + eps)[:, None]
    return o_s, o_l, lse


def backward(q, k, v, o_s, o_l, lse, do_s, do_l, bm, block_q, block_k, feature_map, scale, eps):
    """-> dq, dk, dv by the formulas of SLA_SPEC §3 (dO_s, dO_l given)."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    mq, mk = bm.shape[2:]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for h in range(H):
            Q, K, V = q[b, h], k[b, h], v[b, h]
            pq, pk = _phi(feature_map, Q), _phi(feature_map, K)
            dpq, dpk = np.zeros_like(pq), np.zeros_like(pk)
            blk = [_tokens([j], block_k, nk) for j in range(mk)]
            hj = [pk[t].T @ V[t] for t in blk]
            zj = [pk[t].sum(axis=0) for t in blk]
            QO = np.zeros((mq, D, D))
            QD = np.zeros((mq, D))
            for i in range(mq):
                rows = _tokens([i], block_q, nq)
                # sparse branch, FlashAttention-2 style
                crit = _tokens(np.flatnonzero(bm[b, h, i] == 1), block_k, nk)
                if crit.size:
                    s = scale * Q[rows] @ K[crit].T
                    p = np.exp(s - lse[b, h, rows][:, None])
                    dp = do_s[b, h, rows] @ V[crit].T
                    delta = (o_s[b, h, rows] * do_s[b, h, rows]).sum(axis=1, keepdims=True)
                    ds = p * (dp - delta)
                    dq[b, h, rows] += scale * ds @ K[crit]
                    dk[b, h, crit] += scale * ds.T @ Q[rows]
                    dv[b, h, crit] += p.T @ do_s[b, h, rows]
                # linear branch, query side
                marg = np.flatnonzero(bm[b, h, i] == 0)
                if marg.size:
                    Hi = sum(hj[j] for j in marg)
                    Zi = sum(zj[j] for j in marg)
                    den = pq[rows] @ Zi + eps
                    dl = (o_l[b, h, rows] * do_l[b, h, rows]).sum(axis=1)
                    c_hat = pq[rows] / den[:, None]
                    dpq[rows] = (do_l[b, h, rows] @ Hi.T - dl[:, None] * Zi) / den[:, None]
                    QO[i] = c_hat.T @ do_l[b, h, rows]
                    QD[i] = c_hat.T @ dl
            # linear branch, key side
            for j in range(mk):
                users = np.flatnonzero(bm[b, h, :, j] == 0)
                dH = QO[users].sum(axis=0)
                dZ = QD[users].sum(axis=0)
                t = blk[j]
                dpk[t] = V[t] @ dH.T - dZ
                dv[b, h, t] += pk[t] @ dH
            dq[b, h] += _phi_backward(feature_map, Q, pq, dpq)
            dk[b, h] += _phi_backward(feature_map, K, pk, dpk)
    return dq, dk, dv
