"""The staged and pipelined key-block states kernels (``make_states_kernel_staged``,
``make_states_kernel_pipelined``, ``SLA_NUMBA_STATES_KERNEL=staged|pipelined``)
against the register kernel, bit for bit.

All three compute φ with the same operations on the same input values, split it into
the same hi / lo pairs and give every output as one lane's fixed sequence of mma over
the same k-steps; the new kernels only move K and V into shared memory with 16-byte
cp.async (the pipelined one a block ahead, several blocks a CTA) and the result out
through a shared tile. So the outputs must have the same bits, not just be close.
States start NaN-poisoned (int16 states: a NaN bf16 pattern), with a spare key-block row
that must stay untouched.

Simulator (NUMBA_ENABLE_CUDASIM=1; about 20 s of simulated threads in all): D = 16 / 32,
block_k = 16 / 32 / 64, Nk tails, full blocks and a single short block, all three
feature maps, bf16 and fp16 inputs, fp32 and int16 (bf16) states, split and plain φ, 1-
and 4-warp tiles (softmax shuffles over 8 lanes), two φ passes and a skipped k-step,
1 / 2 / 3 blocks a pipelined CTA (a CTA whose last block is past Nk; both V stages
reused), the alignment fallback, the switch through the launcher and through the
backend's prep launch, and the race detector. ``SLA_NUMBA_STATES_KERNEL``'s values and
default: tests/test_config.py. GPU (cc >= 8.0): the Wan2.1 sizes (bits and the times,
``pytest -s``), tails, fp16, fp32 states.
"""

import numpy as np
import pytest
from _tc_reference import gpu_ms, needs_gpu, needs_sim
from test_tc_states import _inputs, check

from sla_numba import config
from sla_numba.gpu.tc import states as states_tc
from sla_numba.gpu.tc.ptx import bf16_bits_to_f32

#: bf16 bits of a quiet NaN: the poison of int16 (bf16) states.
NAN16 = np.int16(0x7FC0)


def _state(B, H, Mk, D, out_bf16):
    """A poisoned state buffer with one spare key-block row (Mk + 1 rows)."""
    shape = (B, H, Mk + 1, D * D + D)
    return np.full(shape, NAN16, np.int16) if out_bf16 else np.full(shape, np.nan, np.float32)


def _run(kind, kb, vb, B, H, Nk, D, bk, fm, tiles, split, out_bf16, variant, nper=None):
    Mk = -(-Nk // bk)
    state = _state(B, H, Mk, D, out_bf16)
    states_tc.launch_states_tc(
        kind, kb, vb, state, B, H, Nk, D, bk, fm, 0, tiles=tiles, split=split,
        variant=variant, blocks_per_cta=nper,
    )  # fmt: skip
    spare = state[:, :, Mk:]
    assert (spare.view(np.int16) == NAN16).all() if out_bf16 else np.isnan(spare).all(), (
        "the spare key-block row was written"
    )
    return state


def _same_bits(ref, got):
    r, g = ref.view(np.uint8), got.view(np.uint8)
    assert np.array_equal(r, g), f"{int((ref != got).sum())} of {ref.size} state values differ"


def _as_f32(state):
    return bf16_bits_to_f32(state).astype(np.float32) if state.dtype == np.int16 else state


@pytest.fixture
def variants_run(monkeypatch):
    """The variant of every kernel ``launch_states_tc`` fetches, in order."""
    made = []
    real = states_tc.get_states_kernel

    def spy(*args):
        made.append(args[-1])
        return real(*args)

    monkeypatch.setattr(states_tc, "get_states_kernel", spy)
    return made


# --------------------------------------------------------------------------- everywhere
def test_geometry_and_checks():
    """The result tile fits the input tiles' 52 KiB at the GPU default (bf16 states in one
    pass, fp32 in two); bad configurations refused."""
    tiles = states_tc.choose_tiles(128, 8)
    for ob in (True, False):
        G = states_tc.staged_geometry(128, 64, tiles, ob)
        assert G["smem_bytes"] == 3 * 64 * 136 * 2  # the register kernel's
        assert (G["ZOFF"] + G["ZW"]) * 4 <= G["smem_bytes"]
        assert G["OPASS"] == (1 if ob else 2)
    for D in range(16, 129, 16):
        t = states_tc.choose_tiles(D, 8)
        k = states_tc.make_states_kernel_staged("bf16", D, 64, t, True, True)
        assert k.threads == 32 * t[0] * t[1] and k.smem_bytes <= 227 * 1024
    G = states_tc.pipelined_geometry(128, 64, tiles, True)
    assert G["smem_bytes"] == 35072 + 3 * 64 * 136 * 2  # 85.3 KiB: two CTAs an SM
    assert 2 * (G["smem_bytes"] + 1024) <= 228 * 1024
    for bad in (("bf16", 72, 64, (1, 1)), ("bf16", 64, 128, (1, 1)), ("fp8", 64, 64, (1, 1))):
        for make in (states_tc.make_states_kernel_staged, states_tc.make_states_kernel_pipelined):
            with pytest.raises(ValueError):
                make(*bad)


# --------------------------------------------------------------------------- simulator
SIM_CASES = [  # kind, B, H, Nk, D, block_k, fm, tiles, split, out_bf16, pipelined CTA blocks
    ("bf16", 1, 2, 21, 16, 16, 0, (1, 1), True, False, 3),  # tail of 5 rows; 2 of 3 run
    ("f16", 1, 1, 48, 16, 16, 1, (1, 1), True, True, 3),  # 3 full blocks: stage 0 reused
    ("f16", 1, 1, 13, 32, 16, 0, (2, 2), True, False, 2),  # one short block, 4 warps
    ("bf16", 1, 1, 40, 16, 64, 2, (1, 1), False, True, 2),  # plain φ, 2 φ passes, no k-step 3
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nk,D,block_k,fm,tiles,split,out_bf16,nper", SIM_CASES)
def test_sim_same_bits_as_register_kernel(
    kind, B, H, Nk, D, block_k, fm, tiles, split, out_bf16, nper
):
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=Nk + D)
    args = (kind, kb, vb, B, H, Nk, D, block_k, fm, tiles, split, out_bf16)
    ref = _run(*args, "registers")
    tol = (4e-3 if not split else 1e-4) if not out_bf16 else 8e-3
    for variant in ("staged", "pipelined"):
        got = _run(*args, variant, nper)
        check(_as_f32(got), k64, v64, block_k, fm, tol)  # written everywhere, accurate
        _same_bits(ref, got)


@needs_sim
def test_sim_misaligned_inputs_take_the_register_kernel(variants_run):
    """k 2 bytes past a 16-byte boundary: cp.async would be misaligned, so the launcher
    runs the register kernel (the twin checks offsets relative to the array start only,
    so this is the launcher's address check); same bits either way."""
    kind, B, H, Nk, D, bk, fm = "bf16", 1, 1, 16, 16, 16, 1
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=4)
    buf = np.empty(kb.size + 16, np.int16)
    first = (-buf.ctypes.data // 2) % 8
    k_off = buf[first + 1 : first + 1 + kb.size]
    k_off[:] = kb.reshape(-1)
    ref = _run(kind, kb, vb, B, H, Nk, D, bk, fm, None, True, False, "registers")
    for variant in ("staged", "pipelined"):
        got = _run(kind, k_off, vb, B, H, Nk, D, bk, fm, None, True, False, variant)
        _same_bits(ref, got)
    assert variants_run == ["registers"] * 3
    with pytest.raises(ValueError, match="variant"):
        _run(kind, kb, vb, B, H, Nk, D, bk, fm, None, True, False, "fast")
    with pytest.raises(ValueError, match="blocks_per_cta"):
        _run(kind, kb, vb, B, H, Nk, D, bk, fm, None, True, False, "pipelined", 0)


@needs_sim
def test_sim_switch_selects_the_kernel(monkeypatch):
    """``SLA_NUMBA_STATES_KERNEL`` builds and runs the kernel it names; unset, the
    register kernel."""
    made = []
    for name in ("make_states_kernel", "make_states_kernel_staged", "make_states_kernel_pipelined"):
        real = getattr(states_tc, name)

        def spy(*args, real=real, name=name):
            made.append(name)
            return real(*args)

        monkeypatch.setattr(states_tc, name, spy)
    monkeypatch.setattr(states_tc, "_kernels", {})
    kind, B, H, Nk, D, bk, fm = "bf16", 1, 1, 16, 16, 16, 2
    kb, vb, _, _ = _inputs(kind, B, H, Nk, D, seed=8)
    monkeypatch.delenv(config.STATES_KERNEL_VAR, raising=False)
    ref = _run(kind, kb, vb, B, H, Nk, D, bk, fm, None, True, True, None)
    assert made == ["make_states_kernel"]
    for env in ("staged", "pipelined"):
        monkeypatch.setenv(config.STATES_KERNEL_VAR, env)
        got = _run(kind, kb, vb, B, H, Nk, D, bk, fm, None, True, True, None)
        assert made[-1] == ("make_states_kernel_" + env)
        _same_bits(ref, got)
    assert len(made) == 3


@needs_sim
@pytest.mark.parametrize(
    "variant,out_bf16,Nk,bk",
    [("staged", True, 29, 32), ("pipelined", False, 35, 16)],
)
def test_sim_no_races(variant, out_bf16, Nk, bk):
    """Two warps under the race detector (staged: one short block of 32 rows, where a
    thread's φ slice of K is another thread's copy; pipelined: three blocks a CTA, fp32
    states in two result passes; both share the result-tile epilogue): a φ
    row read before its K pieces landed, a V tile read before its copy was waited for,
    the K tile or a V stage refilled while a warp still reads it, the result tile
    written while a warp still reads the φ / V tiles or copied out before every warp
    stored it: a race."""
    from sla_numba.testing_race import detect_races

    kind, B, H, D, fm = "bf16", 1, 1, 32, 0
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=5)
    with detect_races():
        got = _run(kind, kb, vb, B, H, Nk, D, bk, fm, (2, 1), True, out_bf16, variant, 3)
    check(_as_f32(got), k64, v64, bk, fm, 8e-3 if out_bf16 else 1e-4)


# --------------------------------------------------------------------------- real GPU
GPU_VARIANTS = [("registers", None), ("staged", None), ("pipelined", 1), ("pipelined", 4),
                ("pipelined", 8), ("pipelined", 16)]  # fmt: skip


def _gpu_both(kind, kb, vb, B, H, Nk, D, bk, fm, out_bf16, reps=0):
    """States (host) and times (ms, or None) of each of ``GPU_VARIANTS`` (variant,
    blocks a pipelined CTA)."""
    from numba import cuda

    dk, dv = cuda.to_device(kb), cuda.to_device(vb)
    Mk = -(-Nk // bk)
    outs, times = [], []
    for variant, nper in GPU_VARIANTS:
        d = cuda.to_device(_state(B, H, Mk, D, out_bf16))

        def run(d=d, variant=variant, nper=nper):
            states_tc.launch_states_tc(
                kind, dk, dv, d, B, H, Nk, D, bk, fm, 0, variant=variant, blocks_per_cta=nper
            )

        run()
        cuda.synchronize()
        outs.append(d.copy_to_host())
        times.append(gpu_ms(run, reps) if reps else None)
    for o in outs:
        spare = o[:, :, Mk:]
        assert (spare.view(np.int16) == NAN16).all() if out_bf16 else np.isnan(spare).all()
    return outs, times


GPU_CASES = [  # kind, B, H, Nk, D, block_k, fm, out_bf16
    ("bf16", 2, 3, 64 * 5 + 37, 128, 64, 0, True),
    ("bf16", 2, 3, 64 * 5 + 37, 128, 64, 1, False),
    ("f16", 2, 3, 64 * 5 + 37, 64, 64, 2, False),
    ("f16", 1, 2, 32 * 3 + 5, 96, 32, 0, True),
    ("bf16", 1, 2, 16 * 7 + 3, 32, 16, 1, False),
]


@needs_gpu
@pytest.mark.parametrize("kind,B,H,Nk,D,block_k,fm,out_bf16", GPU_CASES)
def test_gpu_same_bits_as_register_kernel(kind, B, H, Nk, D, block_k, fm, out_bf16):
    kb, vb, k64, v64 = _inputs(kind, B, H, Nk, D, seed=D + fm)
    outs, _ = _gpu_both(kind, kb, vb, B, H, Nk, D, block_k, fm, out_bf16)
    check(_as_f32(outs[1]), k64, v64, block_k, fm, 8e-3 if out_bf16 else 1e-4)
    for got in outs[1:]:
        _same_bits(outs[0], got)


@needs_gpu
def test_gpu_wan_sizes_same_bits():
    """B = 1, H = 12, Nk = 32760, D = 128, block_k = 64, bf16 inputs and bf16 states (the
    Wan2.1 forward): same bits; both times printed (``-s``)."""
    B, H, Nk, D, bk, fm = 1, 12, 32760, 128, 64, 0
    rng = np.random.default_rng(1)
    kb, vb = (
        ((rng.standard_normal((B, H, Nk, D), dtype=np.float32) * s).view(np.uint32) >> 16)
        .astype(np.uint16)
        .view(np.int16)
        for s in (1.5, 1.0)
    )
    outs, times = _gpu_both("bf16", kb, vb, B, H, Nk, D, bk, fm, True, reps=20)
    assert np.isfinite(_as_f32(outs[0][:, :, :-1])).all()
    for got in outs[1:]:
        _same_bits(outs[0], got)
    names = [v if n is None else f"{v} x{n}" for v, n in GPU_VARIANTS]
    print("\nWan sizes: " + ", ".join(f"{n} {t:.3f} ms" for n, t in zip(names, times)))


@needs_sim
def test_sim_backend_prep_takes_the_switched_kernel(monkeypatch, variants_run):
    """The backend's prep launch (``_launch.launch_prep`` on the tensor-core path, as the
    forward and the backward call it: its own device copies and workspace, ``variant``
    left to the switch) with ``SLA_NUMBA_STATES_KERNEL=pipelined`` runs the pipelined
    kernel (its k, v and state pass the alignment check), and the states it computed
    have the bits of the register kernel's for the same inputs."""
    from sla_numba.gpu._arrays import DeviceCall
    from sla_numba.gpu._launch import launch_prep
    from sla_numba.gpu.simt.tiles import choose_tiles

    B, H, Nk, D, bk, fm = 1, 1, 37, 16, 16, 0  # three key blocks, a tail
    kb, vb, _, _ = _inputs("f16", B, H, Nk, D, seed=3)
    k, v = kb.view(np.float16), vb.view(np.float16)
    Mk = -(-Nk // bk)
    calls = []
    real = states_tc.launch_states_tc

    def spy(kind, kbits, vbits, state, *rest, **kw):
        real(kind, kbits, vbits, state, *rest, **kw)
        calls.append((kind, np.array(kbits), np.array(vbits), np.array(state), rest, kw))

    monkeypatch.setattr(states_tc, "launch_states_tc", spy)
    monkeypatch.setenv(config.STATES_KERNEL_VAR, "pipelined")
    call = DeviceCall(k)
    tiles = choose_tiles(D, np.float32, bk, bk)
    bmap = call.dev(np.zeros((B, H, 1, Mk), np.int8))
    launch_prep(call, tiles, call.dev(k), call.dev(v), Nk, bk, Mk, bmap, 1, Mk, fm,
                want_cols=False, tc_kind="f16")  # fmt: skip
    assert variants_run == ["pipelined"] and len(calls) == 1
    kind, kbits, vbits, got, rest, kw = calls[0]
    assert kind == "f16" and kw == {}  # the variant came from the switch
    ref = np.full_like(got, np.nan) if got.dtype == np.float32 else np.full_like(got, NAN16)
    real(kind, kbits, vbits, ref, *rest, variant="registers")
    assert variants_run == ["pipelined", "registers"]
    _same_bits(ref, got)
