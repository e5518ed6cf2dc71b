"""Tensor-core key-block states (``sla_numba.gpu.tc.states``) against float64 numpy.

For each key block j: ``h_j = φ(K_j)ᵀ V_j`` (D x D) and ``z_j = Σ_r φ(K_j)`` over the
block's valid rows, in ``state[b, h, j] = [vec(h_j), z_j]``. The reference is float64
on the same half-precision inputs; errors are measured relative to ``Σ_r |φ||v|``
(h) and ``Σ_r φ`` (z). Bounds: φ split into half hi + lo: ~2^-16 (bf16) per term
plus fp32 accumulation, asserted <= 1e-4; φ in one bf16 (``split=False``): <= 4e-3.

Simulator (NUMBA_ENABLE_CUDASIM=1): 1-warp tiles (and one 4-warp case), D = 16 / 32,
block_k = 16, tail blocks, all three feature maps; `state` NaN-poisoned (with a spare
block row that must stay NaN). GPU (cc >= 8.0): D = 64 / 128, block_k = 64, bf16 and
fp16, plus the SIMT prep kernel's states when available.
"""

import numpy as np
import pytest
from _tc_reference import needs_gpu, needs_sim, phi64

from sla_numba.gpu.tc import states as states_tc
from sla_numba.gpu.tc.ptx import bf16_bits_to_f32, f32_to_bf16_bits


# --------------------------------------------------------------------------- reference
def _inputs(kind, B, H, Nk, D, seed, scale=1.5):
    """(k_bits, v_bits, k64, v64): int16 bits and their exact float64 values."""
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((B, H, Nk, D)) * scale).astype(np.float32)
    v = rng.standard_normal((B, H, Nk, D)).astype(np.float32)
    if kind == "bf16":
        kb, vb = f32_to_bf16_bits(k).view(np.int16), f32_to_bf16_bits(v).view(np.int16)
        k64, v64 = bf16_bits_to_f32(kb).astype(np.float64), bf16_bits_to_f32(vb).astype(np.float64)
    else:
        kb, vb = k.astype(np.float16).view(np.int16), v.astype(np.float16).view(np.int16)
        k64, v64 = kb.view(np.float16).astype(np.float64), vb.view(np.float16).astype(np.float64)
    return kb, vb, k64, v64


def reference(k64, v64, block_k, fm):
    """(h, z, h_abs): float64 (B, H, Mk, D, D), (B, H, Mk, D), Σ|φ||v|."""
    B, H, Nk, D = k64.shape
    Mk = -(-Nk // block_k)
    p = phi64(k64, fm)
    pad = Mk * block_k - Nk
    p = np.concatenate([p, np.zeros((B, H, pad, D))], axis=2).reshape(B, H, Mk, block_k, D)
    v = np.concatenate([v64, np.zeros((B, H, pad, D))], axis=2).reshape(B, H, Mk, block_k, D)
    h = np.einsum("bhjrd,bhjre->bhjde", p, v)
    ha = np.einsum("bhjrd,bhjre->bhjde", np.abs(p), np.abs(v))
    return h, p.sum(axis=3), ha


def check(state, k64, v64, block_k, fm, tol):
    """Max errors (h relative to Σ|φ||v|, z relative to Σφ); asserts <= tol, spare row NaN."""
    B, H, Nk, D = k64.shape
    h, z, ha = reference(k64, v64, block_k, fm)
    Mk = h.shape[2]
    st = np.asarray(state, dtype=np.float64)
    assert np.isnan(st[:, :, Mk:]).all(), "rows past the last block were written"
    st = st[:, :, :Mk]
    assert not np.isnan(st).any(), "unwritten (NaN) state elements"
    gh = st[..., : D * D].reshape(h.shape)
    gz = st[..., D * D :]
    floor = 1e-30
    eh = float(np.max(np.abs(gh - h) / np.maximum(ha, floor)))
    ez = float(np.max(np.abs(gz - z) / np.maximum(np.abs(z), floor)))
    assert eh <= tol and ez <= tol, (eh, ez)
    return eh, ez


def simt_states(k64, v64, block_k, fm):
    """The SIMT prep kernel's states (fp32 tiles) for the same values, as numpy
    (B, H, Mk, W): ``forward.launch_prep`` on fp32 copies (exact: half values)."""
    from sla_numba.gpu._arrays import DeviceCall
    from sla_numba.gpu._launch import launch_prep
    from sla_numba.gpu.simt.tiles import choose_tiles

    B, H, Nk, D = k64.shape
    Mk = -(-Nk // block_k)
    k32, v32 = k64.astype(np.float32), v64.astype(np.float32)
    call = DeviceCall(k32)
    T = choose_tiles(D, np.float32, block_k, block_k)
    bmap = np.full((B, H, 1, Mk), -1, np.int8)
    ws = launch_prep(
        call,
        T,
        call.dev(k32),
        call.dev(v32),
        Nk,
        block_k,
        Mk,
        call.dev(bmap),
        1,
        Mk,
        fm,
        want_cols=False,
    )
    return call.result(ws["state"])


def run(kind, B, H, Nk, D, block_k, fm, seed=0, tiles=None, split=True):
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed)
    Mk = -(-Nk // block_k)
    state = np.full((B, H, Mk + 1, D * D + D), np.nan, np.float32)
    states_tc.launch_states_tc(
        kind, kb, vb, state, B, H, Nk, D, block_k, fm, 0, tiles=tiles, split=split
    )
    return state, k64, v64


# --------------------------------------------------------------------------- host-only
def test_supported_and_tiles():
    assert states_tc.states_tc_supported(64, 64)
    assert states_tc.states_tc_supported(128, 16)
    assert not states_tc.states_tc_supported(72, 64)
    assert not states_tc.states_tc_supported(64, 128)
    assert states_tc.choose_tiles(128, 8) == (4, 2)
    assert states_tc.choose_tiles(64, 8) == (2, 2)
    assert states_tc.choose_tiles(32, 1) == (1, 1)
    for D in range(16, 129, 16):
        WR, WC = states_tc.choose_tiles(D, 8)
        G = states_tc.geometry(D, 64, (WR, WC))
        assert 8 * G["MT"] * G["NP"] <= 64 and G["C"] % 2 == 0
        kern = states_tc.make_states_kernel("bf16", D, 64, (WR, WC))
        assert (kern.threads, kern.smem_bytes) == (G["NT"], 3 * 64 * (D + 8) * 2)
    # tools/check_tc_ptx.py finds these counts in the PTX (those of the generated kernel)
    assert states_tc.ops_per_block(128, 64, (4, 2)) == (144, 32)
    assert states_tc.ops_per_block(128, 64, (4, 2), split=False) == (72, 24)
    with pytest.raises(ValueError):
        states_tc.make_states_kernel("bf16", 64, 64, (3, 1))  # 3 does not divide 64/16


# --------------------------------------------------------------------------- simulator
SIM_CASES = [  # kind, B, H, Nk, D, block_k, fm, tiles
    ("bf16", 1, 2, 21, 16, 16, 0, (1, 1)),
    ("f16", 2, 1, 27, 16, 16, 1, (1, 1)),
    ("bf16", 1, 1, 19, 32, 16, 2, (1, 1)),
    ("f16", 1, 1, 13, 32, 16, 0, (2, 2)),
    ("bf16", 1, 1, 40, 16, 32, 1, (1, 1)),
    ("f16", 1, 1, 100, 16, 64, 0, (1, 1)),  # 2 φ passes, k-step 3 of block 1 skipped
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nk,D,block_k,fm,tiles", SIM_CASES)
def test_sim_matches_float64(kind, B, H, Nk, D, block_k, fm, tiles):
    state, k64, v64 = run(kind, B, H, Nk, D, block_k, fm, seed=Nk, tiles=tiles)
    eh, ez = check(state, k64, v64, block_k, fm, 1e-4)
    print(f"\n{kind} D={D} bk={block_k} fm={fm}: h err {eh:.2e}, z err {ez:.2e}")


@needs_sim
def test_sim_matches_simt_prep():
    kind, B, H, Nk, D, bk, fm = "bf16", 1, 1, 20, 16, 16, 0
    state, k64, v64 = run(kind, B, H, Nk, D, bk, fm, seed=5)
    ref = simt_states(k64, v64, bk, fm)
    _, _, ha = reference(k64, v64, bk, fm)
    Mk = ref.shape[2]
    dh = np.abs(state[:, :, :Mk, : D * D] - ref[..., : D * D]).reshape(ha.shape) / ha
    assert float(dh.max()) <= 1e-4
    np.testing.assert_allclose(state[:, :, :Mk, D * D :], ref[..., D * D :], rtol=1e-4)


@needs_sim
def test_sim_flat_state_and_argument_checks():
    kind, B, H, Nk, D, bk, fm = "f16", 1, 1, 16, 16, 16, 2
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=11)
    state = np.full((B, H, 2, D * D + D), np.nan, np.float32)
    states_tc.launch_states_tc(kind, kb, vb, state.reshape(-1), B, H, Nk, D, bk, fm, 0)
    check(state, k64, v64, bk, fm, 1e-4)
    with pytest.raises(ValueError):
        states_tc.launch_states_tc(kind, kb, vb, state[:, :, :0], B, H, Nk, D, bk, fm, 0)
    with pytest.raises(ValueError):
        states_tc.launch_states_tc(kind, kb, vb, state, B, H, Nk, 24, bk, fm, 0)
    with pytest.raises(TypeError):
        states_tc.launch_states_tc(kind, kb, vb, state.astype(np.float64), B, H, Nk, D, bk, fm, 0)


@needs_sim
def test_sim_plain_bf16_phi():
    state, k64, v64 = run("bf16", 1, 1, 20, 16, 16, 0, seed=3, split=False)
    eh, ez = check(state, k64, v64, 16, 0, 4e-3)
    print(f"\nplain bf16 φ: h err {eh:.2e}, z err {ez:.2e}")


# --------------------------------------------------------------------------- GPU
GPU_CASES = [(kind, D, fm) for kind in ("bf16", "f16") for D in (64, 128) for fm in (0, 1, 2)]


@needs_gpu
@pytest.mark.parametrize("kind,D,fm", GPU_CASES)
def test_gpu_matches_float64(kind, D, fm):
    from numba import cuda

    B, H, Nk, bk = 2, 3, 64 * 5 + 37, 64
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=D + fm)
    Mk = -(-Nk // bk)
    host = np.full((B, H, Mk + 1, D * D + D), np.nan, np.float32)
    dstate = cuda.to_device(host)
    states_tc.launch_states_tc(
        kind, cuda.to_device(kb), cuda.to_device(vb), dstate, B, H, Nk, D, bk, fm, 0
    )
    cuda.synchronize()
    got = dstate.copy_to_host()
    eh, ez = check(got, k64, v64, bk, fm, 1e-4)
    print(f"\n{kind} D={D} fm={fm}: h err {eh:.2e}, z err {ez:.2e}")
    # plain (one half φ), bf16 only: looser bound
    if kind == "bf16":
        d2 = cuda.to_device(host)
        states_tc.launch_states_tc(
            kind, cuda.to_device(kb), cuda.to_device(vb), d2, B, H, Nk, D, bk, fm, 0, split=False
        )
        e2 = check(d2.copy_to_host(), k64, v64, bk, fm, 4e-3)
        print(f"   plain bf16 φ: h err {e2[0]:.2e}, z err {e2[1]:.2e}")
    # deterministic
    d3 = cuda.to_device(host)
    states_tc.launch_states_tc(
        kind, cuda.to_device(kb), cuda.to_device(vb), d3, B, H, Nk, D, bk, fm, 0
    )
    np.testing.assert_array_equal(d3.copy_to_host(), got)
    # the SIMT prep kernel's fp32 states (same half inputs)
    ref = simt_states(k64, v64, bk, fm)
    _, _, ha = reference(k64, v64, bk, fm)
    dh = np.abs(got[:, :, :Mk, : D * D] - ref[..., : D * D]).reshape(ha.shape)
    dh /= np.maximum(ha, 1e-30)
    dz = np.abs(got[:, :, :Mk, D * D :] - ref[..., D * D :])
    dz /= np.maximum(np.abs(ref[..., D * D :]), 1e-30)
    print(f"   vs SIMT prep: h {dh.max():.2e}, z {dz.max():.2e}")
    assert float(dh.max()) <= 1e-4 and float(dz.max()) <= 1e-4


@needs_gpu
@pytest.mark.parametrize("D,block_k", [(32, 16), (48, 32), (96, 64), (16, 64)])
def test_gpu_other_shapes(D, block_k):
    from numba import cuda

    B, H, Nk = 1, 2, block_k * 3 + 5
    kb, vb, k64, v64 = _inputs("bf16", B, H, Nk, D, seed=D)
    Mk = -(-Nk // block_k)
    dstate = cuda.to_device(np.full((B, H, Mk + 1, D * D + D), np.nan, np.float32))
    states_tc.launch_states_tc(
        "bf16", cuda.to_device(kb), cuda.to_device(vb), dstate, B, H, Nk, D, block_k, 0, 0
    )
    check(dstate.copy_to_host(), k64, v64, block_k, 0, 1e-4)


@needs_gpu
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_gpu_timing_large(kind):
    """A large shape (B=1, H=12, Nk=16384, D=128, block_k=64): sampled blocks against
    float64, and kernel times of the tensor-core and SIMT (fp32 inputs) states printed
    (``pytest -s``); nothing asserted on speed."""
    import time

    from numba import cuda

    from sla_numba.gpu._arrays import DeviceCall
    from sla_numba.gpu._launch import launch_prep
    from sla_numba.gpu.simt.tiles import choose_tiles

    B, H, Nk, D, bk, fm = 1, 12, 16384, 128, 64, 0
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=7)
    Mk = Nk // bk
    dk, dv = cuda.to_device(kb), cuda.to_device(vb)
    dstate = cuda.device_array((B, H, Mk, D * D + D), np.float32)

    def timed(fn, reps=10):
        fn()
        cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e3

    t_tc = timed(lambda: states_tc.launch_states_tc(kind, dk, dv, dstate, B, H, Nk, D, bk, fm, 0))
    got = dstate.copy_to_host()
    # sampled blocks against float64
    sel = [0, 1, Mk // 2, Mk - 1]
    for j in sel:
        ks, vs = k64[:, :, j * bk : (j + 1) * bk], v64[:, :, j * bk : (j + 1) * bk]
        h, z, ha = reference(ks, vs, bk, fm)
        g = got[:, :, j : j + 1].astype(np.float64)
        eh = np.max(np.abs(g[..., : D * D].reshape(h.shape) - h) / np.maximum(ha, 1e-30))
        ez = np.max(np.abs(g[..., D * D :] - z) / np.maximum(np.abs(z), 1e-30))
        assert eh <= 1e-4 and ez <= 1e-4, (j, eh, ez)
    k32 = cuda.to_device(k64.astype(np.float32))
    v32 = cuda.to_device(v64.astype(np.float32))
    bmap = cuda.to_device(np.full((B, H, 1, Mk), -1, np.int8))
    call = DeviceCall(k32)
    T = choose_tiles(D, np.float32, bk, bk)
    t_simt = timed(
        lambda: launch_prep(call, T, k32, v32, Nk, bk, Mk, bmap, 1, Mk, fm, want_cols=False)
    )
    gb = (2 * B * H * Nk * D * 2 + B * H * Mk * (D * D + D) * 4) / 1e9
    print(
        f"\nstates {kind} B={B} H={H} Nk={Nk} D={D} bk={bk}: tensor cores {t_tc:.3f} ms "
        f"({gb / t_tc * 1e3:.0f} GB/s of k, v, state), SIMT prep (fp32 in, + its list blocks) "
        f"{t_simt:.3f} ms"
    )
