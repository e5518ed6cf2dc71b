"""The pipelined linear-branch forward kernel (``make_linear_kernel_pipelined``,
``SLA_NUMBA_LINEAR=pipelined``) against the register-staged kernel, bit for bit.

Both kernels split the same fp32 values of H_i and Z_i into the same bf16 hi / lo pairs
and give every output as one lane's fixed sequence of mma over the k-steps in ascending
d1 with the same operands; only when and how H_i reaches shared memory differs. So the
outputs must have the same bits, not just be close. o_l starts NaN-poisoned, with spare
values past the last row that must stay NaN.

Simulator (NUMBA_ENABLE_CUDASIM=1): D = 16 / 32 / 48, block_q = 16 / 32 / 64, tails
(Nq not a multiple of block_q, a block whose rows leave a warp idle), blocks with
n_marg = 0, all three feature maps, bf16 and fp16, one to three chunks of H_i (three:
the chunk buffers alternate, buffer 0 is refilled), chunks that do not spread evenly
over the threads, the 16-byte load path and the scalar one (lstate not 16-byte aligned),
and the race detector. GPU (cc >= 8.0): the Wan2.1 sizes (bits and both times,
``pytest -s``), tails, fp16, the launch bound.
"""

import numpy as np
import pytest
from _tc_reference import gpu_ms, needs_gpu, needs_sim
from test_tc_linear import EPS, check, make_inputs

from sla_numba import config
from sla_numba.gpu.tc import linear as linear_tc


def _launch(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, hk, pipeline, spare=64):
    """o_l (B, H, Nq, D) from a NaN-poisoned flat buffer whose ``spare`` extra values must
    stay NaN."""
    n = B * H * Nq * D
    out = np.full(n + spare, np.nan, np.float32)
    linear_tc.launch_linear_forward_tc(
        kind, qb, lstate, n_marg, out, B, H, Nq, D, bq, fm, EPS, 0, hk=hk, pipeline=pipeline
    )
    assert np.isnan(out[n:]).all(), "values past the last row were written"
    return out[:n].reshape(B, H, Nq, D)


def _same_bits(ref, got):
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), (
        f"{int((ref.view(np.uint32) != got.view(np.uint32)).sum())} of {ref.size} outputs differ"
    )


def _offset_copy(x, elems):
    """A flat copy of ``x`` starting ``elems`` float32 past a 16-byte boundary."""
    buf = np.empty(x.size + 8, np.float32)
    first = (-buf.ctypes.data // 4) % 4  # first 16-byte aligned element
    view = buf[first + elems : first + elems + x.size]
    view[:] = x.reshape(-1)
    return view


# --------------------------------------------------------------------------- everywhere
def test_shared_memory_and_checks():
    """φ hi / lo plus two chunk buffers: at the GPU default (D 128, block 64, HK 32)
    69.6 KiB, three CTAs an SM; HK 16: the register kernel's 52.2 KiB. Bad chunks refused."""
    assert linear_tc.pipelined_smem_bytes(128, 64, 32) == (2 * 64 + 4 * 32) * 136 * 2
    assert 3 * (linear_tc.pipelined_smem_bytes(128, 64, 32) + 1024) <= 228 * 1024
    assert (
        linear_tc.pipelined_smem_bytes(128, 64, 16)
        == linear_tc.make_linear_kernel("bf16", 128, 64, 32).smem_bytes
    )
    for D in range(16, 129, 16):
        for bq in linear_tc.BLOCKS:
            k = linear_tc.make_linear_kernel_pipelined("bf16", D, bq, linear_tc.chunk_rows(D, 32))
            assert k.threads == 2 * bq and k.smem_bytes <= 227 * 1024
    for bad in (("bf16", 64, 64, 48), ("bf16", 64, 16, 64), ("fp8", 64, 64, 32)):
        with pytest.raises(ValueError):
            linear_tc.make_linear_kernel_pipelined(*bad)


def test_switch_and_alignment_select_the_kernel(monkeypatch):
    """Unset switch or ``pipelined`` or ``pipeline=True``: the pipelined kernel, with
    16-byte loads only where lstate's address is 16-byte aligned; ``registers``: the
    register kernel."""
    taken = []

    class _Taken(Exception):
        pass

    def spy(name):
        def get(kind, D, bq, hk=None, *rest):
            taken.append((name,) + tuple(rest))
            raise _Taken

        return get

    monkeypatch.setattr(linear_tc, "get_linear_kernel", spy("registers"))
    monkeypatch.setattr(linear_tc, "get_linear_kernel_pipelined", spy("pipelined"))
    B, H, Nq, D, bq, fm = 1, 1, 16, 16, 16, 2
    qb, _, lstate, n_marg = make_inputs("bf16", B, H, Nq, D, bq, fm, seed=0, zero_blocks=())
    out = np.empty(B * H * Nq * D, np.float32)
    for env, pipe, ls in (
        ("", None, _offset_copy(lstate, 0)),
        ("pipelined", None, _offset_copy(lstate, 0)),
        ("registers", True, _offset_copy(lstate, 1)),
        ("registers", None, _offset_copy(lstate, 0)),
    ):
        monkeypatch.setenv(config.LINEAR_VAR, env)
        with pytest.raises(_Taken):
            linear_tc.launch_linear_forward_tc(
                "bf16", qb, ls, n_marg, out, B, H, Nq, D, bq, fm, EPS, 0, pipeline=pipe
            )
    assert taken == [  # (fp32 o_l: out_kind "f32")
        ("pipelined", True, None, "f32"),
        ("pipelined", True, None, "f32"),
        ("pipelined", False, None, "f32"),
        ("registers", "f32"),
    ]


# --------------------------------------------------------------------------- simulator
SIM_CASES = [  # kind, B, H, Nq, D, block_q, fm, hk
    ("bf16", 1, 1, 37, 16, 16, 0, 16),  # 3 blocks, block 1 zeros, tail of 5 rows; 1 chunk
    ("f16", 1, 2, 13, 32, 16, 1, 16),  # 2 chunks (both buffers), one short block a head
    ("bf16", 1, 1, 29, 32, 16, 2, 32),  # one chunk of 32 rows (2 k-steps)
    ("f16", 1, 1, 40, 16, 32, 0, 16),  # 2 warps; block 1 (8 rows): warp 1 idle
    ("bf16", 1, 1, 20, 48, 16, 1, 16),  # 3 chunks: buffer 0 refilled after chunk 0
    ("bf16", 1, 1, 70, 16, 64, 2, 16),  # 4 warps, 64 units a chunk < 128 threads
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nq,D,block_q,fm,hk", SIM_CASES)
def test_sim_same_bits_as_register_kernel(kind, B, H, Nq, D, block_q, fm, hk):
    zero = (1,) if Nq > 2 * block_q else ()
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, block_q, fm, Nq + D, zero)
    args = (kind, qb, lstate, n_marg, B, H, Nq, D, block_q, fm, hk)
    ref = _launch(*args, pipeline=False)
    got = _launch(*args, pipeline=True)
    check(got, q64, lstate, n_marg, block_q, fm)  # written, zeros where n_marg = 0, accurate
    _same_bits(ref, got)


@needs_sim
def test_sim_scalar_loads_and_all_zero_blocks():
    """lstate 4 bytes past a 16-byte boundary (scalar loads; the 16-byte twin would raise
    on it): same bits; every n_marg 0: exact zeros, nothing past the rows written."""
    kind, B, H, Nq, D, bq, fm, hk = "f16", 1, 1, 21, 48, 16, 0, 16
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, bq, fm, seed=9, zero_blocks=())
    ls1 = _offset_copy(lstate, 1)
    args = (kind, qb, ls1, n_marg, B, H, Nq, D, bq, fm, hk)
    ref = _launch(*args, pipeline=False)
    got = _launch(*args, pipeline=True)
    check(got, q64, lstate, n_marg, bq, fm)
    _same_bits(ref, got)
    with pytest.raises(ValueError, match="misaligned"):  # the twin checks the offsets
        linear_tc.ld_nc_v4_f32(ls1, 6)
    zeros = _launch(kind, qb, ls1, np.zeros_like(n_marg), B, H, Nq, D, bq, fm, hk, True)
    assert (zeros == 0.0).all()


@needs_sim
def test_sim_switch_selects_the_kernel(monkeypatch):
    """``SLA_NUMBA_LINEAR=pipelined`` builds and runs the pipelined kernel."""
    made = []
    real = linear_tc.get_linear_kernel_pipelined

    def spy(*args):
        made.append(args)
        return real(*args)

    monkeypatch.setattr(linear_tc, "get_linear_kernel_pipelined", spy)
    kind, B, H, Nq, D, bq, fm = "bf16", 1, 1, 16, 16, 16, 1
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, bq, fm, seed=2, zero_blocks=())
    monkeypatch.setenv(config.LINEAR_VAR, "registers")
    ref = _launch(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, None, None)
    assert not made
    monkeypatch.setenv(config.LINEAR_VAR, "pipelined")
    got = _launch(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, None, None)
    assert len(made) == 1
    _same_bits(ref, got)


@needs_sim
def test_sim_no_races():
    """Three chunks, two warps under the race detector: a chunk buffer refilled while a
    warp still reads it, or read before every thread stored it, is a race."""
    from sla_numba.testing_race import detect_races

    kind, B, H, Nq, D, bq, fm = "bf16", 1, 1, 30, 48, 32, 2
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, bq, fm, seed=5, zero_blocks=())
    with detect_races():
        got = _launch(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, 16, True)
    check(got, q64, lstate, n_marg, bq, fm)


# --------------------------------------------------------------------------- real GPU
def _gpu_both(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, variants, reps=0, ls_off=0):
    """Outputs (host, flat) and times (ms, or None) of the register kernel and each
    pipelined variant (``(hk, min_blocks)``) on the GPU; lstate ``ls_off`` floats past a
    256-byte boundary."""
    from numba import cuda

    dq, dn = cuda.to_device(qb), cuda.to_device(n_marg)
    dl_buf = cuda.to_device(np.concatenate([np.zeros(ls_off, np.float32), lstate.reshape(-1)]))
    dl = dl_buf[ls_off:]
    n = B * H * Nq * D
    outs, times = [], []
    for var in [None] + list(variants):
        d = cuda.to_device(np.full(n + 64, np.nan, np.float32))
        hk, mb = (None, None) if var is None else var

        def run(var=var, d=d, hk=hk, mb=mb):
            linear_tc.launch_linear_forward_tc(
                kind, dq, dl, dn, d, B, H, Nq, D, bq, fm, EPS, 0,
                hk=hk, pipeline=var is not None, min_blocks=mb,
            )  # fmt: skip

        run()
        cuda.synchronize()
        outs.append(d.copy_to_host())
        assert np.isnan(outs[-1][n:]).all()
        times.append(gpu_ms(run, reps) if reps else None)
    return [o[:n] for o in outs], times


GPU_CASES = [  # kind, B, H, Nq, D, block_q, fm, lstate offset (floats)
    ("bf16", 2, 3, 64 * 5 + 37, 128, 64, 0, 0),  # tails, zero blocks
    ("f16", 2, 3, 64 * 5 + 37, 64, 64, 1, 0),
    ("bf16", 1, 2, 128 * 3 + 5, 96, 128, 2, 0),  # HK = chunk_rows(96, 32) = 32, 8 warps
    ("bf16", 1, 2, 16 * 7 + 3, 32, 16, 0, 0),  # one warp
    ("bf16", 2, 3, 64 * 5 + 37, 128, 64, 1, 1),  # lstate 4 bytes off: scalar loads
]
GPU_VARIANTS = [(None, None), (16, 0), (32, 0), (32, 3)]  # (hk, min_blocks); 0: unbounded


@needs_gpu
@pytest.mark.parametrize("kind,B,H,Nq,D,block_q,fm,ls_off", GPU_CASES)
def test_gpu_same_bits_as_register_kernel(kind, B, H, Nq, D, block_q, fm, ls_off):
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, block_q, fm, D + fm, (1, 4))
    outs, _ = _gpu_both(
        kind, qb, lstate, n_marg, B, H, Nq, D, block_q, fm, GPU_VARIANTS, ls_off=ls_off
    )
    check(outs[1].reshape(B, H, Nq, D), q64, lstate, n_marg, block_q, fm)
    for got in outs[1:]:
        _same_bits(outs[0], got)


@needs_gpu
def test_gpu_wan_sizes_same_bits():
    """B = 1, H = 12, Nq = 32760, D = 128, block_q = 64, bf16, every block live: every
    pipelined variant's bits equal the register kernel's; the times printed (``-s``)."""
    B, H, Nq, D, bq, fm = 1, 12, 32760, 128, 64, 0
    Mq = -(-Nq // bq)
    rng = np.random.default_rng(1)
    qb = (
        ((rng.standard_normal((B, H, Nq, D), dtype=np.float32) * 1.5).view(np.uint32) >> 16)
        .astype(np.uint16)
        .view(np.int16)
    )
    lstate = rng.standard_normal((B, H, Mq, D * D + D), dtype=np.float32)
    lstate[..., D * D :] = np.abs(lstate[..., D * D :]) * 8  # positive denominators
    n_marg = np.ones((B, H, Mq), np.int32)
    outs, times = _gpu_both("bf16", qb, lstate, n_marg, B, H, Nq, D, bq, fm, GPU_VARIANTS, 20)
    assert np.isfinite(outs[0]).all()
    for got in outs[1:]:
        _same_bits(outs[0], got)
    names = ["registers"] + [f"pipelined hk={hk} minCTA={mb}" for hk, mb in GPU_VARIANTS]
    print("\nWan sizes: " + ", ".join(f"{n} {t:.3f} ms" for n, t in zip(names, times)))


@needs_sim
def test_sim_chunk_size_does_not_change_the_bits():
    """The k-steps run in ascending d1 whatever the chunk: the pipelined kernel with
    16-row chunks gives the register kernel's bits with 32-row chunks."""
    kind, B, H, Nq, D, bq, fm = "bf16", 1, 1, 19, 32, 16, 0
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, bq, fm, seed=7, zero_blocks=())
    ref = _launch(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, 32, False)
    got = _launch(kind, qb, lstate, n_marg, B, H, Nq, D, bq, fm, 16, True)
    check(got, q64, lstate, n_marg, bq, fm)
    _same_bits(ref, got)
