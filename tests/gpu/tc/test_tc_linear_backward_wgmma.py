"""The wgmma kernels of the linear branch's gradients (``gpu/tc/linear_backward_wgmma.py``).

1. numpy: the layout of dH_j in shared memory (``_sw``) read through the kernel's two
   descriptors is dH's column block as B of ``v·dH_jᵀ`` (K-major) and its row block as
   B of ``φ·dH_j`` (MN-major); the transpose-A reading ``tc/wgmma.py`` gained.
2. Simulator: ``make_wgmma_ss`` with both transpose flags against numpy (the twins'
   plumbing of the flags); the kernel against float64 (``ref_dkdv`` of
   test_tc_linear_backward.py, same tolerance): a partial last block, a block without
   marginal partners whose dH row is NaN (must not leak), bf16 / fp16, D 64 / 128, the
   three feature maps; dk / dv start random with NaN spare values past the end.
   dq_linear through ``SLA_NUMBA_LINEAR_GRAD=wgmma`` and test_tc_linear_backward.py's
   ``run_dq`` (float64 dq and qstate, NaN-poisoned qstate, zero rows of dead blocks);
   bf16 qstate = the fp32 kernel's rounded.
3. The switch: ``SLA_NUMBA_LINEAR_GRAD=wgmma`` sends what the kernel takes to it and
   the rest to the pipelined kernels; the launcher refuses what it does not take.
4. A GPU of compute capability 9.0: Wan-like sizes against the pipelined kernel and
   float64.

Whole file on the simulator: ~35 s on one core (the warpgroup twins are 128 Python
threads a CTA).
"""

import numpy as np
import pytest
from _tc_reference import SIM, half_values, needs_sim
from numba import cuda, float32, int16
from test_tc_linear_backward import EPS, TOL, _err, _poisoned_flat, _states, ref_dkdv, run_dq

from sla_numba import config
from sla_numba.gpu.tc import linear_backward as lb
from sla_numba.gpu.tc import linear_backward_wgmma as lw
from sla_numba.gpu.tc import wgmma as W


# --------------------------------------------------------------------------- 1. layouts
def _store(D_rows, x, CB):
    """x (rows, D) uint16 written at ``_sw`` offsets (bytes) into a flat 16-bit array."""
    rows, D = x.shape
    smem = np.zeros((D // 64) * CB // 2, np.uint16)
    for r in range(rows):
        for c in range(D):
            smem[lw._sw(r, c, CB) // 2] = x[r, c]
    return smem


@needs_sim  # (``lw._sw`` is a device function: plain Python only under the simulator)
@pytest.mark.parametrize("D", [64, 128])
def test_dh_layout_read_both_ways(D):
    rng = np.random.default_rng(D)
    dh = rng.integers(0, 1 << 16, size=(D, D), dtype=np.uint16)  # [d][e]
    CX = D * 128
    smem = _store(D, dh, CX)
    for r in range(D):  # _sw is the swizzle of tc/wgmma.py
        for p in range(8):
            assert lw._sw(r, 8 * p, CX) == W.sw128_offset(r, p)
    hi_k = int(W.desc_hi(lw.K_LBO, lw.SBO))
    hi_t = int(W.desc_hi(CX, lw.SBO))
    for ks in range(D // 16):
        # pass 1: B(k = e, n = d) = dH[d, e]: the decoded (N, 16) is dH[:, 16ks : 16ks + 16]
        kx = (ks >> 2) * CX + (ks & 3) * 32
        got = W.decode_operand(smem, (kx >> 4) | hi_k, D, 0)
        assert np.array_equal(got, dh[:, 16 * ks : 16 * ks + 16])
        # pass 2: B(k = d, n = e) = dH[d, e]: (N, 16) is dH[16ks : 16ks + 16, :]ᵀ
        got = W.decode_operand(smem, ((ks * 2048) >> 4) | hi_t, D, 1)
        assert np.array_equal(got, dh[16 * ks : 16 * ks + 16, :].T)
    if D == 128:  # LBO and SBO exchanged read something else
        bad = W.make_desc(0, lw.SBO, CX)
        assert not np.array_equal(W.decode_operand(smem, bad, D, 1), dh[:16].T)


@needs_sim  # (as above)
def test_transposed_a_reads_an_mn_major_tile():
    """A (64 x 16, k-step ks) from a stored [k][m] tile of 64 columns: MN-major."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 1 << 16, size=(64, 64), dtype=np.uint16)  # [k][m]
    smem = _store(64, x, 64 * 128)
    for ks in range(4):
        got = W.decode_operand(smem, W.make_desc(ks * 2048, 64 * 128, 1024), 64, 1)
        assert np.array_equal(got, x[16 * ks : 16 * ks + 16, :].T)  # (M, 16)


def test_transpose_flags_are_checked():
    with pytest.raises(ValueError, match="trans_a=2"):
        W.make_wgmma_ss("bf16", 64, 0, 2)
    with pytest.raises(ValueError, match="trans_b=2"):
        W.make_wgmma_ss("bf16", 64, 2)


@needs_sim
def test_sim_wgmma_ss_with_both_transposes():
    """D (64 x 64) = Aᵀ-stored A · MN-major B through the twin of ``make_wgmma_ss(..., 1,
    1)``: A stored [k][m], B stored [k][n], one k-step each of 16, two k-steps summed."""
    from sla_numba.gpu.tc.ptx import f32_to_bf16_bits

    rng = np.random.default_rng(2)
    a = rng.standard_normal((32, 64)).astype(np.float32)  # [k][m]
    b = rng.standard_normal((32, 64)).astype(np.float32)  # [k][n]
    ab = f32_to_bf16_bits(a).view(np.uint16)
    bb = f32_to_bf16_bits(b).view(np.uint16)
    smem0 = np.concatenate([_store(32, ab, 8192), _store(32, bb, 8192)]).view(np.int16)
    mm = W.make_wgmma_ss("bf16", 64, trans_b=1, trans_a=1)
    hi = int(W.desc_hi(8192, 1024))

    @cuda.jit
    def kern(src, out):
        smem = cuda.shared.array(8192, int16)
        acc = cuda.local.array((8, 4), float32)
        tid = cuda.threadIdx.x
        for i in range(tid, 8192, 128):
            smem[i] = src[i]
        cuda.syncthreads()
        for ks in range(2):
            mm(smem, acc, (ks * 2048 >> 4) | hi, ((8192 + ks * 2048) >> 4) | hi, ks)
        W.wg_commit()
        W.wg_wait(acc, 32, 0)
        for n in range(8):
            for e in range(4):
                out[tid, 4 * n + e] = acc[n, e]

    out = np.full((128, 32), np.nan, np.float32)
    kern[1, 128](smem0, out)
    rows, cols = W.acc_coords(64)
    want = (ab.view(np.int16).astype(np.int32) << 16).view(np.float32).astype(np.float64)
    want_b = (bb.view(np.int16).astype(np.int32) << 16).view(np.float32).astype(np.float64)
    ref = want.T @ want_b  # (64 m, 64 n)
    assert np.allclose(out, ref[rows, cols], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 2. simulator
def _inputs(kind, B, H, N, D, zero_blocks, seed):
    rng = np.random.default_rng(seed)
    M = -(-N // 64)
    kb, k64 = half_values(rng.standard_normal((B, H, N, D)) * 1.5, kind)
    vb, v64 = half_values(rng.standard_normal((B, H, N, D)), kind)
    dh = (rng.standard_normal((B, H, M, D * D + D)) * 0.3).astype(np.float32)
    n_marg = rng.integers(1, 4, (B, H, M)).astype(np.int32)
    for j in zero_blocks:
        n_marg[:, :, j] = 0
        dh[:, :, j] = np.nan  # a block without partners: its dH must not be read
    base = rng.standard_normal((B, H, N, D)).astype(np.float32)
    return kb, k64, vb, v64, dh, n_marg, base


def _check(kind, B, H, N, D, fm, zero_blocks, seed, launch):
    kb, k64, vb, v64, dh, n_marg, base = _inputs(kind, B, H, N, D, zero_blocks, seed)
    dk, dv = _poisoned_flat(base), _poisoned_flat(base)
    launch(kind, kb, vb, dh, n_marg, dk, dv, B, H, N, D, 64, fm, 0)
    n = base.size
    assert np.isnan(dk[n:]).all() and np.isnan(dv[n:]).all(), "written past the last row"
    ddk, sk, ddv, sv = ref_dkdv(k64, v64, np.nan_to_num(dh), n_marg, 64, fm)
    e_dk = _err(dk[:n].reshape(base.shape), base, ddk, sk)
    e_dv = _err(dv[:n].reshape(base.shape), base, ddv, sv)
    assert e_dk <= TOL and e_dv <= TOL, (e_dk, e_dv)
    return dk, dv


# kind, B, H, N, D, fm, blocks without partners
SIM_CASES = [
    ("bf16", 1, 1, 100, 64, 0, (), True),  # a full block and a partial one (36 rows)
    ("bf16", 1, 1, 40, 64, 0, (), False),  # φ in tiles of its own
    ("f16", 1, 1, 70, 64, 1, (0,), True),  # v split; a dead block (NaN dH); 6 rows left
    ("f16", 1, 1, 40, 64, 2, (), False),
    ("bf16", 1, 1, 24, 128, 2, (), True),  # D = 128 (two column chunks); 24 rows
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,N,D,fm,zero,share", SIM_CASES)
def test_sim_dkdv_wgmma_matches_float64(kind, B, H, N, D, fm, zero, share):
    def launch(*a):
        lw.launch_dkdv_linear_wgmma(*a, pf=8, share=share)

    _check(kind, B, H, N, D, fm, zero, D + fm, launch)


# kind, o_l / do_l half bits, N, D, fm, dead blocks
SIM_DQ = [
    ("bf16", True, 150, 64, 0, (1,), True),  # bf16 dO_l exact; a dead block; 22 rows left
    ("f16", False, 40, 64, 1, (), False),  # fp32 dO_l, split; ĉ in tiles of its own
    ("bf16", False, 40, 128, 2, (), True),  # D = 128: two m64 tiles of QO_i
]


@needs_sim
@pytest.mark.parametrize("kind,l_half,N,D,fm,zero,share", SIM_DQ)
def test_sim_dq_wgmma_matches_float64(monkeypatch, kind, l_half, N, D, fm, zero, share):
    built = []
    real = lw.make_dq_linear_wgmma

    def make(*a):
        built.append(a)
        return real(*a, pf=8, share=share)

    monkeypatch.setattr(lw, "make_dq_linear_wgmma", make)
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "wgmma")
    e_dq, e_qs, _ = run_dq(kind, l_half, 1, 1, N, D, 64, fm, seed=D + fm, zero_blocks=zero)
    assert built, "the wgmma kernel did not run"
    assert e_dq <= TOL and e_qs <= TOL, (e_dq, e_qs)


@needs_sim
def test_sim_dq_bf16_qstate_is_the_rounded_fp32_qstate():
    from sla_numba.gpu.tc.ptx import f32_to_bf16_bits

    B, H, N, D, fm = 1, 1, 40, 64, 0
    rng = np.random.default_rng(4)
    qb, _ = half_values(rng.standard_normal((B, H, N, D)) * 1.5, "bf16")
    ol, _ = half_values(rng.standard_normal((B, H, N, D)), "bf16")
    dol, _ = half_values(rng.standard_normal((B, H, N, D)), "bf16")
    lstate = _states(rng, B, H, 1, D, fm)
    nm = np.ones((B, H, 1), np.int32)
    dq32 = _poisoned_flat(rng.standard_normal((B, H, N, D)).astype(np.float32))
    dq16 = dq32.copy()
    qs32 = np.full(lstate.size, np.nan, np.float32)
    qs16 = np.full(lstate.size, -1, np.int16)  # 0xFFFF: a bf16 NaN, must be overwritten
    for dq, qs in ((dq32, qs32), (dq16, qs16)):
        lw.launch_dq_linear_wgmma("bf16", qb, ol, dol, lstate, nm, dq, qs, B, H, N, D, 64, fm, EPS, 0)  # fmt: skip
    assert np.array_equal(dq32.view(np.uint32), dq16.view(np.uint32))
    assert not np.isnan(qs32).any()
    want = f32_to_bf16_bits(qs32).view(np.int16)
    assert np.array_equal(qs16, want), f"{int((qs16 != want).sum())} values differ"


# --------------------------------------------------------------------------- 3. switch
def test_switch_sends_what_the_kernel_takes(monkeypatch):
    calls = []
    monkeypatch.setattr(lw, "launch_dkdv_linear_wgmma", lambda *a: calls.append(a[10]))
    fake = lb.LinearGradKernel(None, 0, 0)
    monkeypatch.setattr(lb, "get_dkdv_linear_kernel", lambda *a: calls.append(("mma", a)) or fake)
    monkeypatch.setattr(lb._tc_build, "launch", lambda *a: None)
    buf = np.zeros(2 * (128 * 128 + 128) + 4, np.float32)
    off = (-buf.ctypes.data // 4) % 4
    f32 = np.zeros(2 * 64 * 128, np.float32)
    i16 = np.zeros(2 * 64 * 128, np.int16)
    nm = np.ones(2, np.int32)

    def go(D, block, dh=None, **kw):
        dh = buf[off : off + 2 * (D * D + D)] if dh is None else dh
        lb.launch_dkdv_linear_tc("bf16", i16, i16, dh, nm, f32, f32, 1, 1, 64, D, block, 0, 0, **kw)

    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "wgmma")
    go(128, 64)
    go(64, 64)
    assert calls == [128, 64]
    calls.clear()
    go(32, 64)  # D 32: not the wgmma kernel's
    go(128, 32)  # block 32
    go(128, 64, dh=buf[off + 1 : off + 1 + 2 * (128 * 128 + 128)])  # dh not 16-byte aligned
    go(128, 64, pipeline=True)  # an explicit kernel choice wins
    assert [c[0] for c in calls] == ["mma"] * 4
    assert calls[0][1][-1] is True  # ... the pipelined one
    calls.clear()
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "pipelined")
    go(128, 64)
    assert [c[0] for c in calls] == ["mma"]
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "wgmmaa")
    with pytest.raises(ValueError, match=config.LINEAR_GRAD_VAR):
        go(128, 64)


def test_switch_sends_dq_to_the_wgmma_kernel(monkeypatch):
    calls = []
    fake = lb.LinearGradKernel(None, 0, 0)
    monkeypatch.setattr(lw, "make_dq_linear_wgmma", lambda *a: calls.append(("wg", a)) or fake)
    monkeypatch.setattr(lb, "get_dq_linear_kernel", lambda *a: calls.append(("mma", a)) or fake)
    monkeypatch.setattr(lb._tc_build, "launch", lambda *a: None)
    D = 128
    buf = np.zeros(2 * (D * D + D) + 4, np.float32)
    off = (-buf.ctypes.data // 4) % 4
    st = buf[off : off + 2 * (D * D + D)]  # two blocks' states (block 32 needs them)
    i16 = np.zeros(64 * D, np.int16)
    f32 = np.zeros(64 * D, np.float32)
    nm = np.ones(2, np.int32)

    def go(block=64, **kw):
        lb.launch_dq_linear_tc("bf16", i16, i16, i16, st, nm, f32, st.copy(), 1, 1, 64, D, block, 0, EPS, 0, **kw)  # fmt: skip

    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "wgmma")
    go()
    go(block=32)
    go(pipeline=False)
    assert [c[0] for c in calls] == ["wg", "mma", "mma"]
    assert calls[0][1] == ("bf16", D, True, False)  # kind, D, l_half, q_bf16
    calls.clear()
    monkeypatch.delenv(config.LINEAR_GRAD_VAR)
    go()
    go(pipeline="wgmma")
    assert [c[0] for c in calls] == ["mma", "wg"]


def test_launcher_refuses_what_it_does_not_take():
    a = np.zeros(64 * 96, np.int16)
    f = np.zeros(64 * 96, np.float32)
    dh = np.zeros(96 * 96 + 96, np.float32)
    with pytest.raises(ValueError, match="head_dim 96"):
        lw.launch_dkdv_linear_wgmma("bf16", a, a, dh, np.ones(1, np.int32), f, f, 1, 1, 64, 96, 64, 0, 0)  # fmt: skip
    with pytest.raises(ValueError, match="block 32"):
        lw.launch_dkdv_linear_wgmma("bf16", a, a, dh, np.ones(2, np.int32), f, f, 1, 1, 64, 64, 32, 0, 0)  # fmt: skip
    assert lw.wgmma_unsupported_reason("f32", 64, 64).startswith("kind")
    st = np.zeros(96 * 96 + 96, np.float32)
    with pytest.raises(ValueError, match="head_dim 96"):
        lw.launch_dq_linear_wgmma("bf16", a, a, a, st, np.ones(1, np.int32), f, st.copy(), 1, 1, 64, 96, 64, 0, EPS, 0)  # fmt: skip


# --------------------------------------------------------------------------- 4. Hopper
def _hopper():
    if SIM:
        return False
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
@pytest.mark.parametrize("kind,D,fm", [("bf16", 128, 0), ("f16", 64, 1), ("bf16", 64, 2)])
def test_gpu_matches_pipelined_and_float64(kind, D, fm):
    B, H, N = 2, 3, 64 * 9 - 5
    kb, k64, vb, v64, dh, n_marg, base = _inputs(kind, B, H, N, D, (2,), seed=D + fm)
    outs = []
    for wg in (True, False):
        dk, dv = _poisoned_flat(base), _poisoned_flat(base)
        a = [cuda.to_device(x) for x in (kb, vb, dh, n_marg, dk, dv)]
        if wg:
            lw.launch_dkdv_linear_wgmma(kind, *a, B, H, N, D, 64, fm, 0)
        else:
            lb.launch_dkdv_linear_tc(kind, *a, B, H, N, D, 64, fm, 0, pipeline=True)
        cuda.synchronize()
        outs.append((a[4].copy_to_host(), a[5].copy_to_host()))
    n = base.size
    ddk, sk, ddv, sv = ref_dkdv(k64, v64, np.nan_to_num(dh), n_marg, 64, fm)
    (dk_w, dv_w), (dk_p, dv_p) = outs
    assert np.isnan(dk_w[n:]).all() and np.isnan(dv_w[n:]).all()
    for got, inc, sc in ((dk_w, ddk, sk), (dv_w, ddv, sv)):
        assert _err(got[:n].reshape(base.shape), base, inc, sc) <= TOL
    # the two kernels: the same products summed in another order
    assert np.abs(dk_w[:n] - dk_p[:n]).max() <= 1e-4 * np.abs(dk_p[:n]).max()
    assert np.abs(dv_w[:n] - dv_p[:n]).max() <= 1e-4 * np.abs(dv_p[:n]).max()


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
@pytest.mark.parametrize(
    "kind,l_half,D,fm", [("bf16", True, 128, 0), ("f16", False, 64, 1), ("bf16", False, 64, 2)]
)
def test_gpu_dq_matches_pipelined_and_float64(monkeypatch, kind, l_half, D, fm):
    """dq and qstate of the wgmma kernel: float64 (``run_dq``) and the pipelined kernel."""
    B, H, N = 2, 3, 64 * 9 - 5
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "wgmma")
    e_dq, e_qs, (dq_w, qs_w) = run_dq(kind, l_half, B, H, N, D, 64, fm, seed=D, dev=cuda)
    assert e_dq <= TOL and e_qs <= TOL, (e_dq, e_qs)
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "pipelined")
    _, _, (dq_p, qs_p) = run_dq(kind, l_half, B, H, N, D, 64, fm, seed=D, dev=cuda)
    n = B * H * N * D
    assert np.abs(dq_w[:n] - dq_p[:n]).max() <= 1e-4 * np.abs(dq_p[:n]).max()
    assert np.abs(qs_w - qs_p).max() <= 1e-4 * np.abs(qs_p).max()
