"""Tensor-core linear-branch output (``sla_numba.gpu.tc.linear``) against float64 numpy.

``O_l[r] = φ(q_r)·H_i / (φ(q_r)·Z_i + eps)`` for the rows r of query block i with
``n_marg[b, h, i] > 0``, zeros otherwise. The reference is float64 on the same inputs
(q's half values, the fp32 lstate). Errors: relative RMS over the computed rows
(``||got - ref|| / ||ref||``) and the largest element error relative to its row's
scale ``(|φ|·|H|)[e] / den`` — both asserted <= 1e-4 (bf16 hi + lo splits of φ and H:
~1e-5 expected). Blocks with n_marg = 0 must be exact zeros; o_l is NaN-poisoned, with
spare values past the last row that must stay NaN.

Simulator (NUMBA_ENABLE_CUDASIM=1): D = 16 / 32, block_q = 16 / 32, tails, all three
feature maps, H_i staged in 1 or 2 chunks, plus the SIMT forward's o_l. GPU (cc >= 8.0):
D = 64 / 128, block_q = 64, bf16 and fp16, determinism, SIMT comparison, a timing print.
"""

import numpy as np
import pytest
from _tc_reference import half_values, needs_gpu, needs_sim, phi64

from sla_numba.gpu.tc import linear as linear_tc

EPS = 1e-6


# --------------------------------------------------------------------------- inputs
def make_inputs(kind, B, H, Nq, D, block_q, fm, seed, zero_blocks=(1,), nk=24):
    """q bits / float64, lstate fp32 (B, H, Mq, W) built as real states (φ(K)ᵀV, Σφ(K)
    over ``nk`` random keys a block), n_marg int32 (B, H, Mq) with the listed blocks 0."""
    rng = np.random.default_rng(seed)
    Mq = -(-Nq // block_q)
    qb, q64 = half_values((rng.standard_normal((B, H, Nq, D)) * 1.5).astype(np.float32), kind)
    k = rng.standard_normal((B, H, Mq, nk, D)) * 1.5
    v = rng.standard_normal((B, H, Mq, nk, D))
    pk = phi64(k, fm)
    h = np.einsum("bhjrd,bhjre->bhjde", pk, v).reshape(B, H, Mq, D * D)
    lstate = np.concatenate([h, pk.sum(axis=3)], axis=-1).astype(np.float32)
    n_marg = rng.integers(1, 4, (B, H, Mq)).astype(np.int32)
    for j in zero_blocks:
        if j < Mq:
            n_marg[:, :, j] = 0
    return qb, q64, lstate, n_marg


def reference(q64, lstate, n_marg, block_q, fm, eps=EPS):
    """(out, scale): float64 O_l (B, H, Nq, D) and each element's error scale
    (|φ|·|H|)[e] / |den| (1 where n_marg == 0)."""
    B, H, Nq, D = q64.shape
    ls = lstate.astype(np.float64)
    blk = np.arange(Nq) // block_q
    Hm = ls[..., : D * D].reshape(B, H, -1, D, D)[:, :, blk]  # (B, H, Nq, D, D)
    Z = ls[..., D * D : D * D + D][:, :, blk]  # (B, H, Nq, D)
    p = phi64(q64, fm)
    den = np.einsum("bhrd,bhrd->bhr", p, Z) + eps
    out = np.einsum("bhrd,bhrde->bhre", p, Hm) / den[..., None]
    scale = np.einsum("bhrd,bhrde->bhre", np.abs(p), np.abs(Hm)) / np.abs(den)[..., None]
    live = (n_marg[:, :, blk] > 0)[..., None]
    return np.where(live, out, 0.0), np.where(live, scale, 1.0)


def check(got, q64, lstate, n_marg, block_q, fm, tol=1e-4):
    """Asserts zeros / NaN rules and errors <= tol; returns (rms, max) errors."""
    B, H, Nq, D = q64.shape
    got = np.asarray(got).astype(np.float64)
    assert not np.isnan(got).any(), "unwritten (NaN) o_l elements"
    ref, scale = reference(q64, lstate, n_marg, block_q, fm)
    blk = np.arange(Nq) // block_q
    dead = np.broadcast_to((n_marg[:, :, blk] <= 0)[..., None], got.shape)
    assert (got[dead] == 0.0).all(), "a block with n_marg = 0 is not exact zeros"
    rms = float(np.sqrt(np.sum((got - ref) ** 2) / max(np.sum(ref**2), 1e-300)))
    emax = float(np.max(np.abs(got - ref) / np.maximum(scale, 1e-300)))
    assert rms <= tol and emax <= tol, (rms, emax)
    return rms, emax


def launch_np(kind, qb, lstate, n_marg, B, H, Nq, D, block_q, fm, hk=None, spare=64):
    """Launch on numpy arrays with a NaN-poisoned flat o_l of ``spare`` extra values,
    which must stay NaN; returns o_l (B, H, Nq, D)."""
    n = B * H * Nq * D
    out = np.full(n + spare, np.nan, np.float32)
    linear_tc.launch_linear_forward_tc(
        kind, qb, lstate, n_marg, out, B, H, Nq, D, block_q, fm, EPS, 0, hk=hk
    )
    assert np.isnan(out[n:]).all(), "values past the last row were written"
    return out[:n].reshape(B, H, Nq, D)


def run(kind, B, H, Nq, D, block_q, fm, seed=0, hk=None, zero_blocks=(1,)):
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, block_q, fm, seed, zero_blocks)
    o_l = launch_np(kind, qb, lstate, n_marg, B, H, Nq, D, block_q, fm, hk=hk)
    return o_l, q64, lstate, n_marg


# --------------------------------------------------------------------------- host-only
def test_supported_and_source():
    assert linear_tc.linear_tc_supported(128, 64)
    assert linear_tc.linear_tc_supported(16, 128)
    assert not linear_tc.linear_tc_supported(72, 64)
    assert not linear_tc.linear_tc_supported(64, 48)
    assert not linear_tc.linear_tc_supported(144, 64)
    assert linear_tc.chunk_rows(128, 32) == 32
    assert linear_tc.chunk_rows(48, 32) == 16
    assert linear_tc.chunk_rows(16, 32) == 16
    assert linear_tc.ops_per_chunk(128, 32) == (100, 38)  # tools/check_tc_ptx.py
    for D in range(16, 129, 16):
        for bq in linear_tc.BLOCKS:
            k = linear_tc.make_linear_kernel("bf16", D, bq, linear_tc.chunk_rows(D, 32))
            assert k.threads == 2 * bq and k.smem_bytes <= 227 * 1024
    with pytest.raises(ValueError):
        linear_tc.make_linear_kernel("bf16", 64, 64, 48)  # 48 does not divide 64
    with pytest.raises(ValueError):
        linear_tc.make_linear_kernel("fp8", 64, 64, 32)


# --------------------------------------------------------------------------- simulator
SIM_CASES = [  # kind, B, H, Nq, D, block_q, fm, hk
    ("bf16", 1, 1, 37, 16, 16, 0, 16),  # 3 blocks, block 1 zeros, tail of 5 rows
    ("f16", 1, 2, 13, 32, 16, 1, 16),  # H_i in 2 chunks, one short block per head
    ("bf16", 1, 1, 29, 32, 16, 2, 32),  # one chunk of 32 rows (2 k-steps)
    ("f16", 1, 1, 40, 16, 32, 0, 16),  # 2 warps; block 1 (8 rows): warp 1 idle
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nq,D,block_q,fm,hk", SIM_CASES)
def test_sim_matches_float64(kind, B, H, Nq, D, block_q, fm, hk):
    zero = (1,) if Nq > 2 * block_q else ()
    o_l, q64, lstate, n_marg = run(kind, B, H, Nq, D, block_q, fm, seed=Nq, hk=hk, zero_blocks=zero)
    rms, emax = check(o_l, q64, lstate, n_marg, block_q, fm)
    print(f"\n{kind} D={D} bq={block_q} fm={fm}: rms {rms:.2e}, max {emax:.2e}")


@needs_sim
def test_sim_flat_views_and_argument_checks():
    kind, B, H, Nq, D, bq, fm = "bf16", 1, 1, 16, 16, 16, 2
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, bq, fm, seed=4, zero_blocks=())
    # lstate / n_marg with a spare block (Mq = 2 > 1 needed)
    lstate2 = np.concatenate([lstate, lstate], axis=2)
    n2 = np.concatenate([n_marg, n_marg], axis=2)
    o_l = launch_np(kind, qb.reshape(-1), lstate2.reshape(-1), n2.reshape(-1), B, H, Nq, D, bq, fm)
    check(o_l, q64, lstate, n_marg, bq, fm)
    out = np.zeros(B * H * Nq * D, np.float32)
    with pytest.raises(ValueError):
        linear_tc.launch_linear_forward_tc(
            kind, qb, lstate, n_marg, out, B, H, Nq, 24, bq, fm, EPS, 0
        )
    with pytest.raises(ValueError):
        linear_tc.launch_linear_forward_tc(
            kind, qb, lstate, n_marg, out, B, H, 40, D, bq, fm, EPS, 0
        )
    with pytest.raises(TypeError):
        linear_tc.launch_linear_forward_tc(
            kind, qb, lstate.astype(np.float64), n_marg, out, B, H, Nq, D, bq, fm, EPS, 0
        )
    with pytest.raises(TypeError):
        linear_tc.launch_linear_forward_tc(
            kind, qb, lstate, n_marg.astype(np.int64), out, B, H, Nq, D, bq, fm, EPS, 0
        )


def simt_pieces(q32, k32, v32, bmap, block_q, block_k, fm):
    """The SIMT forward's o_l and the lstate / n_marg it used (numpy): ``forward`` with
    path="simt", and ``launch_prep`` + ``row_states`` again for its row states."""
    from sla_numba.gpu._arrays import DeviceCall
    from sla_numba.gpu._launch import launch_prep, row_states
    from sla_numba.gpu.forward import forward
    from sla_numba.gpu.simt.tiles import choose_tiles

    B, H, Nq, D = q32.shape
    Nk = k32.shape[2]
    Mq, Mk = bmap.shape[2], bmap.shape[3]
    _, o_l, _ = forward(q32, k32, v32, bmap, block_q, block_k, D**-0.5, fm, EPS, path="simt")
    call = DeviceCall(q32)
    T = choose_tiles(D, np.float32, block_q, block_k)
    dmap = call.dev(bmap)
    ws = launch_prep(
        call, T, call.dev(k32), call.dev(v32), Nk, block_k, Mk, dmap, Mq, Mk, fm, want_cols=False
    )
    lstate = row_states(call, dmap, ws["state"], Mq, Mk)
    info = call.result(ws["row_info"])
    return np.asarray(o_l), call.result(lstate), np.ascontiguousarray(info[1])


def simt_case(kind, B, H, Nq, Nk, D, block_q, block_k, fm, seed):
    rng = np.random.default_rng(seed)
    qb, q64 = half_values((rng.standard_normal((B, H, Nq, D)) * 1.5).astype(np.float32), kind)
    _, k64 = half_values(rng.standard_normal((B, H, Nk, D)).astype(np.float32), kind)
    _, v64 = half_values(rng.standard_normal((B, H, Nk, D)).astype(np.float32), kind)
    Mq, Mk = -(-Nq // block_q), -(-Nk // block_k)
    bmap = rng.choice(np.array([-1, 0, 0, 1], np.int8), (B, H, Mq, Mk))
    bmap[:, :, 0, 0] = 1
    bmap[:, :, 0, 1:] = 0  # block 0: marginal blocks
    if Mq > 1:
        bmap[:, :, 1, :] = -1  # block 1: no marginal block (zeros)
        bmap[:, :, 1, 0] = 1
    f32 = np.float32
    o_simt, lstate, n_marg = simt_pieces(
        q64.astype(f32), k64.astype(f32), v64.astype(f32), bmap, block_q, block_k, fm
    )
    return qb, q64, o_simt, lstate, n_marg


def compare_simt(got, o_simt, q64, lstate, n_marg, block_q, fm, tol=1e-4):
    ref, scale = reference(q64, lstate, n_marg, block_q, fm)
    d = np.abs(got.astype(np.float64) - o_simt) / np.maximum(scale, 1e-300)
    rms = float(
        np.sqrt(np.sum((got.astype(np.float64) - o_simt) ** 2) / max(np.sum(ref**2), 1e-300))
    )
    e_simt = float(np.sqrt(np.sum((o_simt - ref) ** 2) / max(np.sum(ref**2), 1e-300)))
    assert rms <= tol and float(d.max()) <= tol, (rms, float(d.max()))
    return rms, float(d.max()), e_simt


@needs_sim
def test_sim_matches_simt_forward():
    kind, B, H, Nq, Nk, D, bq, bk, fm = "bf16", 1, 1, 20, 40, 16, 16, 16, 0
    qb, q64, o_simt, lstate, n_marg = simt_case(kind, B, H, Nq, Nk, D, bq, bk, fm, seed=2)
    assert n_marg[0, 0, 0] > 0 and n_marg[0, 0, 1] == 0
    out = launch_np(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm)
    assert (out[:, :, 16:] == 0).all()
    rms, emax, e_simt = compare_simt(out, o_simt, q64, lstate, n_marg, bq, fm)
    print(f"\nvs SIMT: rms {rms:.2e}, max {emax:.2e} (SIMT vs float64 rms {e_simt:.2e})")


# --------------------------------------------------------------------------- GPU
GPU_CASES = [(kind, D, fm) for kind in ("bf16", "f16") for D in (64, 128) for fm in (0, 1, 2)]


@needs_gpu
@pytest.mark.parametrize("kind,D,fm", GPU_CASES)
def test_gpu_matches_float64(kind, D, fm):
    from numba import cuda

    B, H, Nq, bq = 2, 3, 64 * 5 + 37, 64
    qb, q64, lstate, n_marg = make_inputs(
        kind, B, H, Nq, D, bq, fm, seed=D + fm, zero_blocks=(1, 4)
    )
    dq, dl, dn = cuda.to_device(qb), cuda.to_device(lstate), cuda.to_device(n_marg)
    n = B * H * Nq * D
    outs = []
    for _ in range(2):
        d = cuda.to_device(np.full(n + 64, np.nan, np.float32))
        linear_tc.launch_linear_forward_tc(kind, dq, dl, dn, d, B, H, Nq, D, bq, fm, EPS, 0)
        cuda.synchronize()
        outs.append(d.copy_to_host())
        assert np.isnan(outs[-1][n:]).all()
    np.testing.assert_array_equal(outs[0], outs[1])  # deterministic
    rms, emax = check(outs[0][:n].reshape(B, H, Nq, D), q64, lstate, n_marg, bq, fm)
    print(f"\n{kind} D={D} fm={fm}: rms {rms:.2e}, max {emax:.2e}")


@needs_gpu
@pytest.mark.parametrize("D,block_q", [(32, 16), (48, 32), (96, 128), (16, 64)])
def test_gpu_other_shapes(D, block_q):
    from numba import cuda

    B, H, Nq, fm = 1, 2, block_q * 3 + 5, 0
    qb, q64, lstate, n_marg = make_inputs("bf16", B, H, Nq, D, block_q, fm, seed=D)
    d = cuda.to_device(np.full((B, H, Nq, D), np.nan, np.float32))
    linear_tc.launch_linear_forward_tc(
        "bf16",
        cuda.to_device(qb),
        cuda.to_device(lstate),
        cuda.to_device(n_marg),
        d,
        B,
        H,
        Nq,
        D,
        block_q,
        fm,
        EPS,
        0,
    )
    check(d.copy_to_host(), q64, lstate, n_marg, block_q, fm)


@needs_gpu
@pytest.mark.parametrize("kind,D", [("bf16", 128), ("f16", 64)])
def test_gpu_matches_simt_forward(kind, D):
    from numba import cuda

    B, H, Nq, Nk, bq, bk, fm = 1, 2, 64 * 3 + 11, 64 * 4 + 3, 64, 64, 1
    qb, q64, o_simt, lstate, n_marg = simt_case(kind, B, H, Nq, Nk, D, bq, bk, fm, seed=D)
    d = cuda.to_device(np.full((B, H, Nq, D), np.nan, np.float32))
    linear_tc.launch_linear_forward_tc(
        kind,
        cuda.to_device(qb),
        cuda.to_device(lstate),
        cuda.to_device(n_marg),
        d,
        B,
        H,
        Nq,
        D,
        bq,
        fm,
        EPS,
        0,
    )
    rms, emax, e_simt = compare_simt(d.copy_to_host(), o_simt, q64, lstate, n_marg, bq, fm)
    print(
        f"\n{kind} D={D} vs SIMT: rms {rms:.2e}, max {emax:.2e} (SIMT vs float64 rms {e_simt:.2e})"
    )


@needs_gpu
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_gpu_timing_large(kind):
    """B=1, H=12, Nq=32760, D=128, block_q=64: kernel time printed (``pytest -s``),
    sampled rows against float64; nothing asserted on speed."""
    import time

    from numba import cuda

    B, H, Nq, D, bq, fm = 1, 12, 32760, 128, 64, 0
    Mq = -(-Nq // bq)
    rng = np.random.default_rng(1)
    qb, q64 = half_values((rng.standard_normal((B, H, Nq, D)) * 1.5).astype(np.float32), kind)
    # states: a few distinct real ones, tiled (building Mq of them in numpy is slow)
    _, _, ls8, _ = make_inputs(kind, B, H, 8 * bq, D, bq, fm, seed=3, zero_blocks=())
    lstate = np.ascontiguousarray(np.tile(ls8, (1, 1, -(-Mq // 8), 1))[:, :, :Mq])
    n_marg = np.ones((B, H, Mq), np.int32)
    dq, dl, dn = cuda.to_device(qb), cuda.to_device(lstate), cuda.to_device(n_marg)
    d = cuda.device_array((B, H, Nq, D), np.float32)

    def launch():
        linear_tc.launch_linear_forward_tc(kind, dq, dl, dn, d, B, H, Nq, D, bq, fm, EPS, 0)

    launch()
    cuda.synchronize()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        launch()
    cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    got = d.copy_to_host()
    rows = np.array([0, 1, 63, 64, 5000, Nq - 1])
    ref, scale = reference(
        q64[:, :, rows], lstate[:, :, rows // bq], np.ones((B, H, len(rows)), np.int32), 1, fm
    )
    err = np.max(np.abs(got[:, :, rows] - ref) / scale)
    assert err <= 1e-4, err
    gb = (B * H * Nq * D * (2 + 4) + B * H * Mq * (D * D + D) * 4) / 1e9
    print(
        f"\nlinear_tc {kind} B={B} H={H} Nq={Nq} D={D} bq={bq}: {ms:.3f} ms "
        f"({gb / ms * 1e3:.0f} GB/s of q, lstate, o_l); sampled max err {err:.2e}"
    )
