"""Tensor-core linear-branch backward (``sla_numba.gpu.tc.linear_backward``) against
float64 numpy.

dq kernel, per query block i with n_marg > 0 and its rows r (module doc)::

    dq[r]  += J_φ(q_r)ᵀ (dO_l[r] H_iᵀ − δl_r Z_i) / den_r
    qstate  = [vec(Σ_r ĉ_rᵀ dO_l[r]), Σ_r ĉ_r δl_r],   ĉ_r = φ(q_r) / den_r

dk / dv kernel, per key block j with n_marg > 0 and its rows c::

    dk[c] += J_φ(k_c)ᵀ (v_c dH_jᵀ − dZ_j),   dv[c] += φ(k_c) dH_j

The inputs are random (δl from a random O_l: the formulas do not need a consistent
forward); dq / dk / dv start from random values (the kernels add) and the flat
buffers carry NaN-poisoned spare values past the end, which must stay NaN; qstate
starts NaN-poisoned (every element must be written, zero rows for n_marg = 0).
Errors are measured against each element's scale (the same sums with absolute
values), asserted <= 1e-4 (bf16 hi + lo splits: ~1e-5 expected).

Simulator (NUMBA_ENABLE_CUDASIM=1): D = 16 / 32, block 16 / 32, tails, all three
feature maps, bf16 / fp16, o_l / do_l as fp32 or as half bits, one or two chunks.
GPU (cc >= 8.0): D = 64 / 128, block 64 (and 128 / 16), determinism.
"""

import numpy as np
import pytest
from _tc_reference import half_values, needs_gpu, needs_sim, phi64

from sla_numba.gpu.tc import linear_backward as lb

EPS = 1e-6
TOL = 1e-4


# --------------------------------------------------------------------------- inputs
def _vjp_phi(x, g, fm):
    """J_φ(x)ᵀ g, row-wise (float64)."""
    if fm == 0:
        p = phi64(x, 0)
        return p * (g - np.sum(p * g, axis=-1, keepdims=True))
    if fm == 1:
        return g * np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))
    return g * (x > 0)


def _states(rng, B, H, M, D, fm):
    """fp32 (B, H, M, D*D + D) rows [vec(X), z] built like real states (positive z)."""
    k = rng.standard_normal((B, H, M, 12, D)) * 1.5
    v = rng.standard_normal((B, H, M, 12, D))
    pk = phi64(k, fm)
    x = np.einsum("bhjrd,bhjre->bhjde", pk, v).reshape(B, H, M, D * D)
    return np.concatenate([x, pk.sum(axis=3)], axis=-1).astype(np.float32)


def _n_marg(rng, B, H, M, zero_blocks):
    n = rng.integers(1, 4, (B, H, M)).astype(np.int32)
    for j in zero_blocks:
        if j < M:
            n[:, :, j] = 0
    return n


def _rows_of_blocks(a, N, block):
    """(B, H, M, ...) -> (B, H, N, ...) by each row's block."""
    return a[:, :, np.arange(N) // block]


# --------------------------------------------------------------------------- references
def ref_dq(q64, ol64, dol64, lstate, n_marg, block_q, fm):
    """(ddq, ddq_scale, qstate, qstate_scale) in float64: the increment of dq and the
    expected qstate, each with an element-wise error scale."""
    B, H, Nq, D = q64.shape
    ls = lstate.astype(np.float64)
    Hm = _rows_of_blocks(ls[..., : D * D].reshape(B, H, -1, D, D), Nq, block_q)
    Z = _rows_of_blocks(ls[..., D * D :], Nq, block_q)
    live = _rows_of_blocks(n_marg, Nq, block_q) > 0
    p = phi64(q64, fm)
    den = np.einsum("bhrd,bhrd->bhr", p, Z) + EPS
    dl = np.sum(ol64 * dol64, axis=-1)
    dphi = (np.einsum("bhre,bhrde->bhrd", dol64, Hm) - dl[..., None] * Z) / den[..., None]
    dphi_s = (
        np.einsum("bhre,bhrde->bhrd", np.abs(dol64), np.abs(Hm)) + np.abs(dl[..., None] * Z)
    ) / den[..., None]
    ddq = np.where(live[..., None], _vjp_phi(q64, dphi, fm), 0.0)
    # scale of the chain: |φ'|·scale, plus softmax's φ·(Σ|φ dφ|)
    if fm == 0:
        ddq_s = p * (dphi_s + np.sum(p * dphi_s, axis=-1, keepdims=True))
    else:
        ddq_s = np.abs(_vjp_phi(q64, dphi_s, fm))
    c = p / den[..., None]
    Mq = lstate.shape[2]
    blk = np.arange(Nq) // block_q
    qs = np.zeros((B, H, Mq, D * D + D))
    qs_s = np.zeros_like(qs)
    for i in range(Mq):
        rows = blk == i
        if not rows.any():
            continue
        ci, di, dli = c[:, :, rows], dol64[:, :, rows], dl[:, :, rows]
        qo = np.einsum("bhrd,bhre->bhde", ci, di).reshape(B, H, D * D)
        qo_s = np.einsum("bhrd,bhre->bhde", ci, np.abs(di)).reshape(B, H, D * D)
        qd = np.einsum("bhrd,bhr->bhd", ci, dli)
        qd_s = np.einsum("bhrd,bhr->bhd", ci, np.abs(dli))
        on = (n_marg[:, :, i] > 0)[..., None]
        qs[:, :, i] = np.where(on, np.concatenate([qo, qd], -1), 0.0)
        qs_s[:, :, i] = np.concatenate([qo_s, qd_s], -1)
    return ddq, ddq_s + 1e-30, qs, qs_s + 1e-30


def ref_dkdv(k64, v64, dh, n_marg, block_k, fm):
    """(ddk, ddk_scale, ddv, ddv_scale) in float64: the increments of dk and dv."""
    B, H, Nk, D = k64.shape
    d = dh.astype(np.float64)
    dH = _rows_of_blocks(d[..., : D * D].reshape(B, H, -1, D, D), Nk, block_k)
    dZ = _rows_of_blocks(d[..., D * D :], Nk, block_k)
    live = (_rows_of_blocks(n_marg, Nk, block_k) > 0)[..., None]
    p = phi64(k64, fm)
    dphi = np.einsum("bhce,bhcde->bhcd", v64, dH) - dZ
    dphi_s = np.einsum("bhce,bhcde->bhcd", np.abs(v64), np.abs(dH)) + np.abs(dZ)
    ddk = np.where(live, _vjp_phi(k64, dphi, fm), 0.0)
    if fm == 0:
        ddk_s = p * (dphi_s + np.sum(p * dphi_s, axis=-1, keepdims=True))
    else:
        ddk_s = np.abs(_vjp_phi(k64, dphi_s, fm))
    ddv = np.where(live, np.einsum("bhcd,bhcde->bhce", p, dH), 0.0)
    ddv_s = np.einsum("bhcd,bhcde->bhce", p, np.abs(dH))
    return ddk, ddk_s + 1e-30, ddv, ddv_s + 1e-30


def _err(got, base, inc, scale):
    """Largest |got - (base + inc)| relative to the increment's scale, once the rounding
    of the final fp32 sum ``base + inc`` (half an ulp of the larger, 2^-24 relative; a
    margin of 2^-23 taken) is allowed: an increment much smaller than the value it is
    added to cannot be seen more precisely than that (measured on the H200: an element
    with a 5e-4 scale beside |dq| ~ 4 showed 1.5e-4 before this allowance)."""
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), "NaN: an element was not written / poisoned input read"
    want = base.astype(np.float64) + inc
    add_ulp = 2.0**-23 * np.maximum(np.abs(want), np.abs(base))
    return float(np.max(np.maximum(np.abs(got - want) - add_ulp, 0.0) / scale))


# --------------------------------------------------------------------------- runs
SPARE = 32


def _poisoned_flat(values, spare=SPARE):
    out = np.full(values.size + spare, np.nan, np.float32)
    out[: values.size] = values.ravel()
    return out


def run_dq(kind, l_half, B, H, Nq, D, bq, fm, seed=0, hk=None, zero_blocks=(1,), dev=None):
    """Launch the dq kernel on fresh random inputs; returns the max errors (dq, qstate).
    ``dev``: None for numpy arrays (simulator), else ``numba.cuda`` (real GPU)."""
    rng = np.random.default_rng(seed)
    Mq = -(-Nq // bq)
    qb, q64 = half_values(rng.standard_normal((B, H, Nq, D)) * 1.5, kind)
    ol = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    dol = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    if l_half:
        ol, ol64 = half_values(ol, kind)
        dol, dol64 = half_values(dol, kind)
    else:
        ol64, dol64 = ol.astype(np.float64), dol.astype(np.float64)
    lstate = _states(rng, B, H, Mq, D, fm)
    n_marg = _n_marg(rng, B, H, Mq, zero_blocks)
    dq0 = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    dq = _poisoned_flat(dq0)
    qstate = np.full(lstate.size, np.nan, np.float32)
    args = [qb, ol, dol, lstate, n_marg, dq, qstate]
    if dev is not None:
        args = [dev.to_device(a) for a in args]
    lb.launch_dq_linear_tc(kind, *args, B, H, Nq, D, bq, fm, EPS, 0, hk=hk)
    if dev is not None:
        dev.synchronize()
        dq, qstate = args[5].copy_to_host(), args[6].copy_to_host()
    assert np.isnan(dq[dq0.size :]).all(), "dq written past its last row"
    ddq, ddq_s, qs, qs_s = ref_dq(q64, ol64, dol64, lstate, n_marg, bq, fm)
    e_dq = _err(dq[: dq0.size].reshape(dq0.shape), dq0, ddq, ddq_s)
    qstate = qstate.reshape(qs.shape)
    dead = n_marg <= 0
    assert (qstate[dead] == 0.0).all(), "qstate of a block without marginal keys is not zero"
    e_qs = _err(qstate, np.zeros_like(qs), qs, qs_s)
    return e_dq, e_qs, (dq, qstate)


def run_dkdv(kind, B, H, Nk, D, bk, fm, seed=0, hk=None, zero_blocks=(1,), dev=None):
    """Launch the dk / dv kernel on fresh random inputs; returns the max errors."""
    rng = np.random.default_rng(seed)
    Mk = -(-Nk // bk)
    kb, k64 = half_values(rng.standard_normal((B, H, Nk, D)) * 1.5, kind)
    vb, v64 = half_values(rng.standard_normal((B, H, Nk, D)), kind)
    dh = (rng.standard_normal((B, H, Mk, D * D + D)) * 0.3).astype(np.float32)
    n_marg = _n_marg(rng, B, H, Mk, zero_blocks)
    dk0 = rng.standard_normal((B, H, Nk, D)).astype(np.float32)
    dv0 = rng.standard_normal((B, H, Nk, D)).astype(np.float32)
    dk, dv = _poisoned_flat(dk0), _poisoned_flat(dv0)
    args = [kb, vb, dh, n_marg, dk, dv]
    if dev is not None:
        args = [dev.to_device(a) for a in args]
    lb.launch_dkdv_linear_tc(kind, *args, B, H, Nk, D, bk, fm, 0, hk=hk)
    if dev is not None:
        dev.synchronize()
        dk, dv = args[4].copy_to_host(), args[5].copy_to_host()
    n = dk0.size
    assert np.isnan(dk[n:]).all() and np.isnan(dv[n:]).all(), "written past the last row"
    ddk, ddk_s, ddv, ddv_s = ref_dkdv(k64, v64, dh, n_marg, bk, fm)
    e_dk = _err(dk[:n].reshape(dk0.shape), dk0, ddk, ddk_s)
    e_dv = _err(dv[:n].reshape(dv0.shape), dv0, ddv, ddv_s)
    return e_dk, e_dv, (dk, dv)


# --------------------------------------------------------------------------- host-only
def test_supported_and_argument_checks():
    assert lb.linear_grad_tc_supported(128, 64) and lb.linear_grad_tc_supported(16, 16)
    assert not lb.linear_grad_tc_supported(136, 64) and not lb.linear_grad_tc_supported(24, 64)
    assert not lb.linear_grad_tc_supported(64, 48)
    B, H, N, D = 1, 1, 16, 16
    q = np.zeros((B, H, N, D), np.int16)
    f = np.zeros((B, H, N, D), np.float32)
    st = np.zeros((B, H, 1, D * D + D), np.float32)
    nm = np.ones((B, H, 1), np.int32)
    with pytest.raises(ValueError, match="kind"):
        lb.launch_dq_linear_tc("fp8", q, f, f, st, nm, f, st.copy(), B, H, N, D, 16, 0, EPS, 0)
    with pytest.raises(ValueError, match="feature map"):
        lb.launch_dq_linear_tc("bf16", q, f, f, st, nm, f, st.copy(), B, H, N, D, 16, 5, EPS, 0)
    with pytest.raises(TypeError, match="o_l and do_l"):
        lb.launch_dq_linear_tc("bf16", q, f, q, st, nm, f, st.copy(), B, H, N, D, 16, 0, EPS, 0)
    with pytest.raises(ValueError, match="blocks"):
        lb.launch_dq_linear_tc("bf16", q, f, f, st, nm, f, st.copy(), B, H, 40, D, 16, 0, EPS, 0)
    with pytest.raises(TypeError, match="float32"):
        lb.launch_dkdv_linear_tc(
            "bf16", q, q, st.astype(np.float64), nm, f, f, B, H, N, D, 16, 0, 0
        )
    with pytest.raises(ValueError, match="not supported"):
        lb.launch_dkdv_linear_tc("bf16", q, q, st, nm, f, f, B, H, N, D, 48, 0, 0)


# --------------------------------------------------------------------------- simulator
SIM_DQ = [
    # kind, l_half, B, H, Nq, D, bq, fm, hk
    ("bf16", True, 1, 2, 37, 16, 16, 0, None),
    ("bf16", False, 1, 1, 40, 32, 16, 1, 16),
    ("f16", True, 1, 1, 21, 32, 32, 2, None),
    ("f16", False, 2, 1, 16, 16, 16, 0, None),
]


@needs_sim
@pytest.mark.parametrize("kind,l_half,B,H,Nq,D,bq,fm,hk", SIM_DQ)
def test_sim_dq_matches_float64(kind, l_half, B, H, Nq, D, bq, fm, hk):
    e_dq, e_qs, _ = run_dq(kind, l_half, B, H, Nq, D, bq, fm, seed=D + fm, hk=hk)
    assert e_dq <= TOL and e_qs <= TOL, (e_dq, e_qs)


SIM_DKDV = [
    # kind, B, H, Nk, D, bk, fm, hk
    ("bf16", 1, 2, 37, 16, 16, 0, None),
    ("bf16", 1, 1, 40, 32, 16, 2, 16),
    ("f16", 1, 1, 21, 32, 32, 1, None),
    ("f16", 2, 1, 16, 16, 16, 0, None),
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nk,D,bk,fm,hk", SIM_DKDV)
def test_sim_dkdv_matches_float64(kind, B, H, Nk, D, bk, fm, hk):
    e_dk, e_dv, _ = run_dkdv(kind, B, H, Nk, D, bk, fm, seed=D + fm, hk=hk)
    assert e_dk <= TOL and e_dv <= TOL, (e_dk, e_dv)


# --------------------------------------------------------------------------- GPU
GPU_CASES = [(kind, D, fm) for kind in ("bf16", "f16") for D in (64, 128) for fm in (0, 1, 2)]


@needs_gpu
@pytest.mark.parametrize("kind,D,fm", GPU_CASES)
def test_gpu_matches_float64(kind, D, fm):
    from numba import cuda

    N, bq = 64 * 5 + 37, 64
    for l_half in (True, False):
        e1, e2, (dq_a, qs_a) = run_dq(kind, l_half, 2, 3, N, D, bq, fm, seed=D, dev=cuda)
        assert e1 <= TOL and e2 <= TOL, (l_half, e1, e2)
        _, _, (dq_b, qs_b) = run_dq(kind, l_half, 2, 3, N, D, bq, fm, seed=D, dev=cuda)
        np.testing.assert_array_equal(dq_a, dq_b)  # deterministic
        np.testing.assert_array_equal(qs_a, qs_b)
    e1, e2, (dk_a, dv_a) = run_dkdv(kind, 2, 3, N, D, bq, fm, seed=D, dev=cuda)
    assert e1 <= TOL and e2 <= TOL, (e1, e2)
    _, _, (dk_b, dv_b) = run_dkdv(kind, 2, 3, N, D, bq, fm, seed=D, dev=cuda)
    np.testing.assert_array_equal(dk_a, dk_b)
    np.testing.assert_array_equal(dv_a, dv_b)


@needs_gpu
@pytest.mark.parametrize("D,block", [(32, 16), (48, 32), (96, 128), (16, 64)])
def test_gpu_other_shapes(D, block):
    from numba import cuda

    N = block * 3 + 5
    e1, e2, _ = run_dq("bf16", True, 1, 2, N, D, block, 0, seed=D, dev=cuda)
    e3, e4, _ = run_dkdv("bf16", 1, 2, N, D, block, 0, seed=D, dev=cuda)
    assert max(e1, e2, e3, e4) <= TOL, (e1, e2, e3, e4)
