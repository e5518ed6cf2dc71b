"""The pipelined linear-branch gradient kernels (``make_dq_linear_kernel`` /
``make_dkdv_linear_kernel`` with ``pipelined=True``, ``SLA_NUMBA_LINEAR_GRAD=pipelined``)
against the register kernels, bit for bit.

Both variants run the same mma on the same shared tiles in the same order (only how
and when the state's chunks reach shared memory changes), so every output must have
the same bits, not just be close. dq / dk / dv start from random values (the kernels
add into them) with NaN-poisoned spare values past the end; qstate starts
NaN-poisoned (every element must be written).

Simulator (NUMBA_ENABLE_CUDASIM=1): tiny shapes picked for the corners of the
pipeline: one chunk (no prefetch inside the loop), two chunks, three (an odd count:
dk / dv's pass 2 starts in buffer 1), block tails, a warp with no rows (block 32, 8
rows left), blocks without marginal partners, feature maps 0 / 1 / 2, bf16 / fp16,
o_l / do_l as fp32 or half bits. The ``ptx`` twin of the 16-byte load refuses an
unaligned offset. Whole file: ~1 min on one core.
GPU (cc >= 8.0): the Wan2.1 sizes (B*H = 12, 512 blocks of 64, D = 128, bf16), same
bits, and the times of both (``pytest -s``).
"""

import numpy as np
import pytest
from _tc_reference import half_values, needs_gpu, needs_sim
from test_tc_linear_backward import _n_marg, _poisoned_flat, _states

from sla_numba import config
from sla_numba.gpu.tc import linear_backward as lb
from sla_numba.gpu.tc import ptx

EPS = 1e-6


# --------------------------------------------------------------------------- problems
def _dq_inputs(kind, l_half, B, H, Nq, D, bq, fm, zero_blocks, seed):
    rng = np.random.default_rng(seed)
    Mq = -(-Nq // bq)
    qb, _ = half_values(rng.standard_normal((B, H, Nq, D)) * 1.5, kind)
    ol = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    dol = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    if l_half:
        ol, _ = half_values(ol, kind)
        dol, _ = half_values(dol, kind)
    lstate = _states(rng, B, H, Mq, D, fm)
    n_marg = _n_marg(rng, B, H, Mq, zero_blocks)
    dq = _poisoned_flat(rng.standard_normal((B, H, Nq, D)).astype(np.float32))
    qstate = np.full(lstate.size, np.nan, np.float32)
    return [qb, ol, dol, lstate, n_marg, dq, qstate]


def _dkdv_inputs(kind, B, H, Nk, D, bk, zero_blocks, seed):
    rng = np.random.default_rng(seed)
    Mk = -(-Nk // bk)
    kb, _ = half_values(rng.standard_normal((B, H, Nk, D)) * 1.5, kind)
    vb, _ = half_values(rng.standard_normal((B, H, Nk, D)), kind)
    dh = (rng.standard_normal((B, H, Mk, D * D + D)) * 0.3).astype(np.float32)
    n_marg = _n_marg(rng, B, H, Mk, zero_blocks)
    dk = _poisoned_flat(rng.standard_normal((B, H, Nk, D)).astype(np.float32))
    dv = _poisoned_flat(rng.standard_normal((B, H, Nk, D)).astype(np.float32))
    return [kb, vb, dh, n_marg, dk, dv]


def _same_bits(ref, got, what):
    r, g = ref.view(np.uint32), got.view(np.uint32)
    assert np.array_equal(r, g), f"{what}: {int((r != g).sum())} of {ref.size} values differ"


def _dq_both(kind, l_half, B, H, Nq, D, bq, fm, hk, zero_blocks=(1,), seed=0, dev=None):
    """(register kernel's (dq, qstate), pipelined kernel's), each from its own copy of
    the same inputs. ``dev``: None (numpy, simulator) or ``numba.cuda``."""
    args = _dq_inputs(kind, l_half, B, H, Nq, D, bq, fm, zero_blocks, seed)
    outs = []
    for pipe in (False, True):
        a = [x.copy() for x in args]
        if dev is not None:
            a = [dev.to_device(x) for x in a]
        lb.launch_dq_linear_tc(kind, *a, B, H, Nq, D, bq, fm, EPS, 0, hk=hk, pipeline=pipe)
        if dev is not None:
            dev.synchronize()
            a = [x.copy_to_host() for x in a]
        outs.append((a[5], a[6]))
    return outs


def _dkdv_both(kind, B, H, Nk, D, bk, fm, hk, zero_blocks=(1,), seed=0, dev=None):
    args = _dkdv_inputs(kind, B, H, Nk, D, bk, zero_blocks, seed)
    outs = []
    for pipe in (False, True):
        a = [x.copy() for x in args]
        if dev is not None:
            a = [dev.to_device(x) for x in a]
        lb.launch_dkdv_linear_tc(kind, *a, B, H, Nk, D, bk, fm, 0, hk=hk, pipeline=pipe)
        if dev is not None:
            dev.synchronize()
            a = [x.copy_to_host() for x in a]
        outs.append((a[4], a[5]))
    return outs


def _check_dq(outs, n):
    (dq_r, qs_r), (dq_p, qs_p) = outs
    assert np.isnan(dq_p[n:]).all(), "dq written past its last row"
    assert not np.isnan(dq_p[:n]).any() and not np.isnan(qs_p).any(), "an output was not written"
    _same_bits(dq_r, dq_p, "dq")
    _same_bits(qs_r, qs_p, "qstate")


def _check_dkdv(outs, n):
    (dk_r, dv_r), (dk_p, dv_p) = outs
    assert np.isnan(dk_p[n:]).all() and np.isnan(dv_p[n:]).all(), "written past the last row"
    assert not np.isnan(dk_p[:n]).any() and not np.isnan(dv_p[:n]).any()
    _same_bits(dk_r, dk_p, "dk")
    _same_bits(dv_r, dv_p, "dv")


# --------------------------------------------------------------------------- host-only
def test_kernel_choice_follows_switch_and_alignment(monkeypatch):
    """None follows the switch; an explicit flag wins; a state that does not start on
    a 16-byte boundary takes the register kernel whatever was asked."""
    buf = np.zeros(64, np.float32)
    off = (-buf.ctypes.data // 4) % 4  # first 16-byte aligned element
    aligned, skewed = buf[off : off + 32], buf[off + 1 : off + 33]
    monkeypatch.delenv(config.LINEAR_GRAD_VAR, raising=False)
    assert lb.use_pipelined(None, aligned) is True
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "registers")
    assert lb.use_pipelined(None, aligned) is False
    assert lb.use_pipelined(True, aligned) is True
    monkeypatch.setenv(config.LINEAR_GRAD_VAR, "pipelined")
    assert lb.use_pipelined(None, aligned) is True
    assert lb.use_pipelined(False, aligned) is False
    assert lb.use_pipelined(None, skewed) is False
    assert lb.use_pipelined(True, skewed) is False


def test_prefetch_slots():
    # Wan sizes: D = 128, 32 columns a chunk, 128 threads: 1024 quads, 8 a thread
    assert lb.prefetch_slots(128, 32, 128) == 8
    assert lb.prefetch_slots(16, 16, 128) == 1  # 64 quads: half the threads idle
    assert lb.prefetch_slots(48, 16, 64) == 3


@needs_sim
def test_twin_refuses_unaligned_load():
    a = np.arange(16, dtype=np.float32)
    assert ptx.ldg_v4_f32(a, 4) == (4.0, 5.0, 6.0, 7.0)
    with pytest.raises(ValueError, match="aligned"):
        ptx.ldg_v4_f32(a, 6)


# --------------------------------------------------------------------------- simulator
# kind, o_l / do_l half bits, B, H, N, D, block, fm, hk (D / hk chunks), zero blocks
SIM_DQ = [
    ("bf16", True, 1, 1, 40, 32, 16, 0, 16, (1,)),  # two chunks, tail, a dead block
    ("f16", False, 1, 1, 21, 48, 16, 1, 16, (0,)),  # three chunks, fp32 dO_l (split)
    ("bf16", False, 1, 1, 40, 16, 32, 2, 16, ()),  # one chunk, a warp without rows
]
SIM_DKDV = [
    ("bf16", 1, 1, 40, 32, 16, 0, 16, (1,)),  # two chunks: pass 2 starts in buffer 0
    ("f16", 1, 1, 21, 48, 16, 1, 16, (0,)),  # three: pass 2 starts in buffer 1
    ("bf16", 1, 1, 40, 16, 32, 2, 16, ()),  # one chunk, a warp without rows
]


@needs_sim
@pytest.mark.parametrize("kind,l_half,B,H,N,D,bq,fm,hk,zero", SIM_DQ)
def test_sim_dq_same_bits(kind, l_half, B, H, N, D, bq, fm, hk, zero):
    outs = _dq_both(kind, l_half, B, H, N, D, bq, fm, hk, zero, seed=D + fm)
    _check_dq(outs, B * H * N * D)


@needs_sim
@pytest.mark.parametrize("kind,B,H,N,D,bk,fm,hk,zero", SIM_DKDV)
def test_sim_dkdv_same_bits(kind, B, H, N, D, bk, fm, hk, zero):
    outs = _dkdv_both(kind, B, H, N, D, bk, fm, hk, zero, seed=D + fm)
    _check_dkdv(outs, B * H * N * D)


@needs_sim
@pytest.mark.parametrize("pipe", [False, True])
def test_sim_bf16_qstate_is_the_rounded_fp32_qstate(pipe):
    """``SLA_NUMBA_GRAD_STATES=bf16``: an int16 qstate holds, for every value, the bits
    of the fp32 kernel's value rounded to bf16 (nearest even); dq is unchanged."""
    kind, l_half, B, H, N, D, bq, fm, hk, zero = SIM_DQ[0]
    args = _dq_inputs(kind, l_half, B, H, N, D, bq, fm, zero, seed=3)
    a32 = [x.copy() for x in args]
    a16 = [x.copy() for x in args]
    a16[6] = np.full(args[6].size, -1, np.int16)  # 0xFFFF: a bf16 NaN, must be overwritten
    for a in (a32, a16):
        lb.launch_dq_linear_tc(kind, *a, B, H, N, D, bq, fm, EPS, 0, hk=hk, pipeline=pipe)
    _same_bits(a32[5], a16[5], "dq")
    want = ptx.f32_to_bf16_bits(a32[6]).view(np.int16)
    assert not np.isnan(a32[6]).any()
    assert np.array_equal(a16[6], want), f"{int((a16[6] != want).sum())} values differ"


# --------------------------------------------------------------------------- GPU
def _time_ms(fn, dev, reps=10):
    fn()
    dev.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = dev.event(), dev.event()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(dev.event_elapsed_time(e0, e1))
    return float(np.median(times))


@needs_gpu
@pytest.mark.parametrize("fm", [0])
def test_gpu_wan_sizes_same_bits_and_times(fm):
    """B*H = 12, N = 32760 (512 blocks of 64, the last one 56 rows), D = 128, bf16, bf16
    o_l / do_l: same bits; prints both kernels' times (register first)."""
    from numba import cuda

    B, H, N, D, blk = 1, 12, 32760, 128, 64
    outs = _dq_both("bf16", True, B, H, N, D, blk, fm, None, (1, 7), seed=fm, dev=cuda)
    _check_dq(outs, B * H * N * D)
    outs = _dkdv_both("bf16", B, H, N, D, blk, fm, None, (1, 7), seed=fm, dev=cuda)
    _check_dkdv(outs, B * H * N * D)

    qargs = [cuda.to_device(x) for x in _dq_inputs("bf16", True, B, H, N, D, blk, fm, (1,), 0)]
    kargs = [cuda.to_device(x) for x in _dkdv_inputs("bf16", B, H, N, D, blk, (1,), 0)]
    for pipe in (False, True):
        t_dq = _time_ms(
            lambda: lb.launch_dq_linear_tc(
                "bf16", *qargs, B, H, N, D, blk, fm, EPS, 0, pipeline=pipe
            ),
            cuda,
        )
        t_kv = _time_ms(
            lambda: lb.launch_dkdv_linear_tc("bf16", *kargs, B, H, N, D, blk, fm, 0, pipeline=pipe),
            cuda,
        )
        print(
            f"\nfm={fm} {'pipelined' if pipe else 'registers'}: dq {t_dq:.3f} ms, dkdv {t_kv:.3f} ms"
        )


@needs_gpu
@pytest.mark.parametrize("kind,D,block", [("f16", 64, 64), ("bf16", 48, 32), ("bf16", 96, 128)])
def test_gpu_other_shapes_same_bits(kind, D, block):
    from numba import cuda

    N = block * 5 + 7
    for l_half in (True, False):
        _check_dq(_dq_both(kind, l_half, 2, 3, N, D, block, 0, None, dev=cuda), 6 * N * D)
    _check_dkdv(_dkdv_both(kind, 2, 3, N, D, block, 1, None, dev=cuda), 6 * N * D)


@needs_sim
def test_sim_pipelined_kernels_have_no_races():
    """Under the simulator's race detector (``sla_numba.testing_race``): two chunks a
    pass, so every buffer is written while the other is read, and dk / dv's pass 2
    starts from the chunk pass 1 left behind; a missing barrier or a store into the
    buffer still being read is reported."""
    from sla_numba.testing_race import detect_races

    B, H, N, D, blk, hk = 1, 1, 20, 32, 16, 16
    qa = _dq_inputs("bf16", True, B, H, N, D, blk, 0, (), 5)
    ka = _dkdv_inputs("bf16", B, H, N, D, blk, (), 5)
    with detect_races():
        lb.launch_dq_linear_tc("bf16", *qa, B, H, N, D, blk, 0, EPS, 0, hk=hk, pipeline=True)
        lb.launch_dkdv_linear_tc("bf16", *ka, B, H, N, D, blk, 0, 0, hk=hk, pipeline=True)
    assert not np.isnan(qa[6]).any() and not np.isnan(ka[5][: B * H * N * D]).any()
