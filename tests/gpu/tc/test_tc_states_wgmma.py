"""The key-block states on Hopper wgmma (``sla_numba/gpu/tc/states_wgmma.py``,
``SLA_NUMBA_STATES_KERNEL=wgmma``) and the transpose-A flag of ``wgmma.make_wgmma_ss``.

1. numpy: φ stored ``[c][d]`` in 128-byte-swizzled chunks is, through an MN-major
   descriptor (``trans = 1``), wgmma's A = φᵀ of each warpgroup's m64 tile and k-step;
   V stored the same way with the ones chunk after it is B = [V | 1] of N = D + 8;
   the descriptor with LBO and SBO exchanged reads something else.
2. Simulator (the warpgroup twins): the kernel against float64 (bound of
   tests/gpu/tc/test_tc_states.py: 1e-4 relative to Σ|φ||v| with the split; bf16
   states add their rounding; the register kernel of ``tc/states.py`` is too slow under
   the simulator at these sizes: compared on the GPU, part 4), Nk tails, several key blocks a CTA
   (both V stages reused), NaN after the keys in the k / v buffers (must not leak), all
   three feature maps, fp16 and bf16 inputs, fp32 and bf16 states, D 64 and 128, split
   and plain φ; states NaN-poisoned with a spare key-block row that must stay untouched.
   The race detector. The switch through ``launch_states_tc`` and its fallback; the
   errors.
3. Real PTX for sm_90a (a CUDA compiler, no GPU): 8 wgmma m64n(D+8)k16 a key block, no
   ``.local``, no spills (``tools/check_states_wgmma_ptx.py``).
4. A GPU of compute capability 9.0: against the staged kernel and float64.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tc_reference import SIM, needs_sim
from helpers import needs_cuda_compiler
from test_tc_states import _inputs, check

from sla_numba import config
from sla_numba.gpu.tc import states as states_tc
from sla_numba.gpu.tc import states_wgmma as SW
from sla_numba.gpu.tc import wgmma as W
from sla_numba.gpu.tc.ptx import bf16_bits_to_f32

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NAN16 = np.int16(0x7FC0)  # bf16 bits of a quiet NaN: the poison of int16 states


def _hopper():
    if SIM or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() == (9, 0)


#: The launcher's own checks run only where the kernel could (else it names the device).
needs_sim_or_hopper = pytest.mark.skipif(
    not (SIM or _hopper()), reason="needs the simulator or a GPU of compute capability 9.0"
)


# ---------------------------------------------------------------------------
# 1. Layouts (numpy)
# ---------------------------------------------------------------------------


def _store_tile(smem, base, tile):
    """A (64, cols) tile of 16-bit values as the kernel lays it out: cols/64 chunks of
    8 KiB, 16-byte pieces at ``sw128_offset``."""
    rows, cols = tile.shape
    for dc in range(cols // 64):
        for r in range(rows):
            for p in range(8):
                at = (base + dc * SW.CHUNK_BYTES + W.sw128_offset(r, p)) // 2
                smem[at : at + 8] = tile[r, 64 * dc + 8 * p : 64 * dc + 8 * p + 8]


@pytest.mark.parametrize("D", [64, 128])
def test_descriptors_read_phi_transposed_and_v_with_ones(D):
    rng = np.random.default_rng(D)
    lay = SW.smem_layout(D)
    smem = np.zeros(lay["bytes"] // 2, np.uint16)
    phi = rng.integers(0, 1 << 16, size=(64, D), dtype=np.uint16)  # [c][d]
    v = rng.integers(0, 1 << 16, size=(64, D), dtype=np.uint16)  # [c][e]
    one = np.uint16(0x3F80)
    _store_tile(smem, lay["hi"], phi)
    vs = lay["v"][1]
    _store_tile(smem, vs, np.concatenate([v, np.full((64, 64), one, np.uint16)], axis=1))
    hi = int(SW.desc_hi(SW.LBO, SW.SBO))
    for w in range(D // 64):  # warpgroup w: m64 tile d in [64w, 64w + 64)
        for kk in range(4):
            da = ((lay["hi"] + w * SW.CHUNK_BYTES + kk * 2048) >> 4) | hi
            a = W.decode_operand(smem, da, 64, trans=1)  # (M, 16)
            assert np.array_equal(a, phi[16 * kk : 16 * kk + 16, 64 * w : 64 * w + 64].T)
    for kk in range(4):
        db = ((vs + kk * 2048) >> 4) | hi
        bt = W.decode_operand(smem, db, D + 8, trans=1)  # (N, 16): B^T
        assert np.array_equal(bt[:D], v[16 * kk : 16 * kk + 16].T)
        assert (bt[D:] == one).all()
    swapped = W.make_desc(lay["hi"], SW.SBO, SW.LBO)
    assert not np.array_equal(W.decode_operand(smem, swapped, 64, trans=1), phi[:16, :64].T)


def test_make_wgmma_ss_flags():
    with pytest.raises(ValueError, match="trans_a"):
        W.make_wgmma_ss("bf16", 64, trans_a=2)
    with pytest.raises(ValueError, match="trans_b"):
        W.make_wgmma_ss("bf16", 64, trans_b=2)
    same = W.make_wgmma_ss("bf16", 136, trans_b=1, trans_a=1)
    assert same is W.make_wgmma_ss("bf16", 136, trans_b=1, trans_a=1)


# ---------------------------------------------------------------------------
# 2. Simulator
# ---------------------------------------------------------------------------


def _buffers(kind, B, H, Nk, D, seed):
    """k, v bits with NaN after the B*H*Nk*D values the kernel may read (the flat views
    the launchers take are longer), and their float64 values."""
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed)
    nan = np.int16(0x7FC0) if kind == "bf16" else np.int16(0x7E00)
    tail = np.full(64 * D, nan, np.int16)
    return np.concatenate([kb.ravel(), tail]), np.concatenate([vb.ravel(), tail]), k64, v64


def _state(B, H, Mk, D, out_bf16):
    shape = (B, H, Mk + 1, D * D + D)
    return np.full(shape, NAN16, np.int16) if out_bf16 else np.full(shape, np.nan, np.float32)


def _f32(state):
    return bf16_bits_to_f32(state).astype(np.float32) if state.dtype == np.int16 else state


SIM_CASES = [  # kind, B, H, Nk, D, fm, out_bf16, split, blocks a CTA, φ MN-major, vs registers
    ("bf16", 1, 1, 150, 64, 0, False, True, 2, True, False),  # 3 blocks: CTAs of 2 and 1
    ("f16", 1, 2, 40, 64, 1, True, True, None, True, False),  # 2 heads of one short block
    ("bf16", 1, 1, 70, 128, 2, True, False, 2, True, False),  # two warpgroups, plain φ
    ("f16", 1, 1, 100, 64, 0, False, True, 2, False, False),  # φ stored [d][c]: A K-major
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nk,D,fm,out_bf16,split,nper,trans_a,vs_reg", SIM_CASES)
def test_sim_against_float64_and_register_kernel(
    kind, B, H, Nk, D, fm, out_bf16, split, nper, trans_a, vs_reg
):
    """Against float64; against the register kernel of ``tc/states.py`` only where
    ``vs_reg`` (no case in CI: that kernel takes 80-100 s of simulated mma at D = 64,
    block_k = 64 on the CI machine; the GPU test compares with the staged kernel at real
    sizes; by hand, f16 / Nk 150 / elu+1 / bf16 states gave the same bits)."""
    kb, vb, k64, v64 = _buffers(kind, B, H, Nk, D, seed=Nk)
    Mk = -(-Nk // 64)
    got = _state(B, H, Mk, D, out_bf16)
    SW.launch_states_wgmma(kind, kb, vb, got, B, H, Nk, D, 64, fm, 0, split, nper, trans_a)
    spare = got[:, :, Mk:]
    assert (spare.view(np.int16) == NAN16).all() if out_bf16 else np.isnan(spare).all()
    tol = 1e-4 if split else 4e-3
    if out_bf16:  # + the rounding of the states to bf16 (as the register kernel's)
        tol += 2.0**-8
    check(_f32(got), k64, v64, 64, fm, tol)
    if not vs_reg:
        return
    ref = _state(B, H, Mk, D, out_bf16)
    states_tc.launch_states_tc(
        kind, kb, vb, ref, B, H, Nk, D, 64, fm, 0, tiles=(2, 2), split=split, variant="registers"
    )
    if out_bf16:  # same φ hi / lo; sums in another order: at most one bf16 ulp apart
        ulp = np.abs(got.astype(np.int32) - ref.astype(np.int32))[:, :, :Mk]
        assert ulp.max() <= 1, ulp.max()
    else:
        scale = np.abs(ref[:, :, :Mk]).max()
        assert np.abs(got - ref)[:, :, :Mk].max() <= 1e-5 * scale


@needs_sim
def test_sim_no_races():
    """One warpgroup, bf16 states, two key blocks in one CTA under the race
    detector: φ read from a K tile before its copy landed, the K tile or a V stage refilled
    while still read, the staging area written before every warp's wgmma finished or
    copied out before every lane staged its part, the next φ over a staging area still
    being copied out: a race. (The detector sees the threads' shared-memory accesses
    and the cp.async twins, not the wgmma twins' reads; hence the zeroed accumulators.)
    fp32 states (two staging passes) were run the same way by hand: no race."""
    from sla_numba.testing_race import detect_races

    kind, B, H, Nk, D, fm = "bf16", 1, 1, 100, 64, 0
    kb, vb, k64, v64 = _buffers(kind, B, H, Nk, D, seed=3)
    got = _state(B, H, 2, D, True)
    with detect_races():
        SW.launch_states_wgmma(kind, kb, vb, got, B, H, Nk, D, 64, fm, 0, True, 2)
    check(_f32(got), k64, v64, 64, fm, 1e-4 + 2.0**-8)


@needs_sim
def test_switch_takes_wgmma_where_it_applies(monkeypatch):
    calls = []
    real = SW.launch_states_wgmma

    def spy(*args, **kwargs):
        calls.append(args[7])  # D
        return real(*args, **kwargs)

    monkeypatch.setattr(SW, "launch_states_wgmma", spy)
    monkeypatch.setenv(config.STATES_KERNEL_VAR, "wgmma")
    for D, Nk in ((64, 64), (16, 20)):  # D 16: not the wgmma kernel's, auto's choice runs
        kb, vb, k64, v64 = _buffers("bf16", 1, 1, Nk, D, seed=D)
        state = _state(1, 1, -(-Nk // 64), D, False)
        states_tc.launch_states_tc("bf16", kb, vb, state, 1, 1, Nk, D, 64, 2, 0)
        check(state, k64, v64, 64, 2, 1e-4)
    assert calls == [64]
    monkeypatch.setenv(config.STATES_KERNEL_VAR, "wgmm")
    with pytest.raises(ValueError, match=config.STATES_KERNEL_VAR):
        config.states_kernel()


@pytest.mark.parametrize(
    "D,bk,what", [(32, 64, "head_dim 32"), (128, 32, "block_k 32"), (96, 64, "head_dim 96")]
)
def test_errors_name_the_argument(D, bk, what):
    kb = np.zeros(D * 64, np.int16)
    state = np.zeros((1, 1, 1, D * D + D), np.float32)
    with pytest.raises(ValueError, match=what):
        SW.launch_states_wgmma("bf16", kb, kb, state, 1, 1, 64, D, bk, 0, 0)


@needs_sim_or_hopper
def test_errors_kind_fm_dtype_alignment():
    D = 64
    kb = np.zeros(D * 64 + 8, np.int16)
    state = np.zeros((1, 1, 1, D * D + D), np.float32)
    with pytest.raises(ValueError, match="inputs"):
        SW.launch_states_wgmma("f32", kb, kb, state, 1, 1, 64, D, 64, 0, 0)
    with pytest.raises(ValueError, match="feature map"):
        SW.launch_states_wgmma("bf16", kb, kb, state, 1, 1, 64, D, 64, 3, 0)
    with pytest.raises(TypeError, match="state"):
        SW.launch_states_wgmma("bf16", kb, kb, state.astype(np.float64), 1, 1, 64, D, 64, 0, 0)
    with pytest.raises(ValueError, match="blocks"):
        SW.launch_states_wgmma("bf16", kb, kb, state, 1, 1, 200, D, 64, 0, 0)
    base = kb[(16 - kb.ctypes.data % 16) // 2 % 8 :]  # 16-byte aligned
    odd = base[1:]  # 2 bytes off
    with pytest.raises(ValueError, match="alignment"):
        SW.launch_states_wgmma("bf16", odd, base, state, 1, 1, 64, D, 64, 0, 0)


# ---------------------------------------------------------------------------
# 3. Real PTX for sm_90a (no GPU)
# ---------------------------------------------------------------------------


@needs_cuda_compiler
def test_ptx_sm90a_wgmma_count_no_local_no_spills():
    pytest.importorskip(
        "cuda.bindings.nvjitlink", reason="needs numba-cuda's CUDA wheels (nvJitLink)"
    )
    import json

    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler
    tool = os.path.join(ROOT, "tools", "check_states_wgmma_ptx.py")
    proc = subprocess.run(
        [sys.executable, tool, "--quick"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reps = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(reps) == 2
    for rep in reps:
        assert "error" not in rep, rep
        assert rep["target"] == "sm_90a" and rep["n"] == [str(rep["D"] + 8)], rep
        assert rep["wgmma"] == (8 if rep["split"] else 4) and rep["local"] == 0, rep
        assert 0 < rep["regs"] <= 128 and rep["spill"] == [0, 0], rep


# ---------------------------------------------------------------------------
# 4. A Hopper GPU
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
@pytest.mark.parametrize("kind,D,Nk,fm", [("bf16", 128, 1000, 0), ("f16", 64, 777, 1)])
@pytest.mark.parametrize("out_bf16", [True, False])
@pytest.mark.parametrize("trans_a", [True, False])
def test_gpu_matches_staged_kernel_and_float64(kind, D, Nk, fm, out_bf16, trans_a):
    B, H = 1, 3
    kb, vb, k64, v64 = _buffers(kind, B, H, Nk, D, seed=1)
    Mk = -(-Nk // 64)
    dt = torch.int16 if out_bf16 else torch.float32
    outs = []
    k, v = torch.from_numpy(kb).cuda(), torch.from_numpy(vb).cuda()
    for variant in ("wgmma", "staged"):
        st = torch.from_numpy(_state(B, H, Mk, D, out_bf16)).cuda()
        if variant == "wgmma":  # directly: no silent fallback
            SW.launch_states_wgmma(kind, k, v, st, B, H, Nk, D, 64, fm, 0, trans_a=trans_a)
        else:
            states_tc.launch_states_tc(kind, k, v, st, B, H, Nk, D, 64, fm, 0, variant=variant)
        torch.cuda.synchronize()
        outs.append(st.cpu().numpy())
        assert outs[-1].dtype == np.dtype(np.int16 if dt == torch.int16 else np.float32)
    got, ref = outs
    check(_f32(got), k64, v64, 64, fm, 1e-4 + (2.0**-8 if out_bf16 else 0))
    if out_bf16:
        assert np.abs(got.astype(np.int32) - ref.astype(np.int32))[:, :, :Mk].max() <= 1
    else:
        assert np.abs(got - ref)[:, :, :Mk].max() <= 1e-5 * np.abs(ref[:, :, :Mk]).max()
