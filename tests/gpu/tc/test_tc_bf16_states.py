"""bf16 linear-branch states (``SLA_NUMBA_STATES=bf16``): the states kernel storing bf16
bits, the marginal sum reading them (one product a tile), and the backend with the switch.

- states: the int16 output must be, bit for bit, the round-to-nearest-even bf16 of what
  the fp32 output of the same kernel holds (the same accumulators, rounded once).
- marginal sum: with S exact in bf16, ``M·S`` has no split error left: only the fp32
  accumulation, ``|out - M·S| <= 2·ceil(n_in/16)·2^-23 · (M·|S|)`` against float64.
- backend: forward and backward with the switch against the same calls without it.
  The sparse branch and the lists do not change (same bits); O_l moves by about a bf16
  rounding of the states (~4e-4 relative, ``tools/states_precision.py``), and so do the
  linear branch's gradients.

Simulator cases are tiny (the tensor-core twins run every warp op in Python); the GPU
cases (cc >= 8.0) use the GPU tiles and the public torch API.
"""

import importlib

import numpy as np
import pytest
from _tc_reference import needs_gpu, needs_sim
from test_tc_marginal import _problem, _reference
from test_tc_states import _inputs

from sla_numba.gpu.tc import marginal as marginal_tc
from sla_numba.gpu.tc import states as states_tc
from sla_numba.gpu.tc.ptx import bf16_bits_to_f32, f32_to_bf16_bits


def _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed):
    """``_problem`` with the states rounded to bf16: (bmap, bits int16, values f32, out)."""
    bmap, states, out = _problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed)
    bits = f32_to_bf16_bits(states).view(np.int16)  # NaN rows past n_in stay NaN
    return bmap, bits, bf16_bits_to_f32(bits).reshape(states.shape), out


def _check_bf16(out, bmap, values, transposed, n_out, n_in):
    ref, mag = _reference(bmap, values, transposed, n_out, n_in)
    got = out[:, :, :n_out].astype(np.float64)
    assert np.isfinite(got).all(), "unwritten (NaN) or non-finite outputs"
    assert np.isnan(out[:, :, n_out:]).all(), "rows >= n_out were written"
    empty = mag == 0
    assert (got[empty] == 0).all()
    rel = float((np.abs(got - ref) / np.where(empty, 1.0, mag)).max())
    bound = 2 * -(-n_in // 16) * 2.0**-23
    assert rel <= bound, (rel, bound)
    return rel


# --------------------------------------------------------------------------- simulator
@needs_sim
@pytest.mark.parametrize(
    "B,H,Mq,Mk,W,n_out,n_in,transposed",
    [(1, 1, 20, 21, 20, 18, 19, False), (2, 1, 9, 14, 22, 13, 7, True)],
)
def test_sim_marginal_reads_bf16_states(B, H, Mq, Mk, W, n_out, n_in, transposed):
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, n_out)
    marginal_tc.launch_marginal_sum_tc(0, bmap, transposed, n_out, n_in, bits, out)
    _check_bf16(out, bmap, values, transposed, n_out, n_in)


@needs_sim
def test_sim_marginal_refuses_odd_width_bf16():
    bmap, bits, _, out = _bf16_problem(1, 1, 4, 4, 21, 4, 4, False, 0)
    with pytest.raises(ValueError, match="even row width"):
        marginal_tc.launch_marginal_sum_tc(0, bmap, False, 4, 4, bits, out)
    with pytest.raises(TypeError):
        marginal_tc.launch_marginal_sum_tc(0, bmap, False, 4, 4, bits.astype(np.int32), out)


@needs_sim
@pytest.mark.parametrize("kind,fm", [("bf16", 0), ("f16", 1)])
def test_sim_states_bf16_output_is_the_rounded_fp32_output(kind, fm):
    B, H, Nk, D, bk = 1, 1, 20, 16, 16
    kb, vb, _, _ = _inputs(kind, B, H, Nk, D, seed=7)
    Mk = -(-Nk // bk)
    f32 = np.full((B, H, Mk + 1, D * D + D), np.nan, np.float32)
    b16 = np.full((B, H, Mk + 1, D * D + D), 0x7FC0, np.int16)  # bf16 NaN: unwritten
    states_tc.launch_states_tc(kind, kb, vb, f32, B, H, Nk, D, bk, fm, 0)
    states_tc.launch_states_tc(kind, kb, vb, b16, B, H, Nk, D, bk, fm, 0)
    want = f32_to_bf16_bits(f32[:, :, :Mk]).view(np.int16)
    assert np.array_equal(b16[:, :, :Mk], want)
    assert (b16[:, :, Mk:] == 0x7FC0).all(), "rows past the last block were written"


@needs_sim
def test_sim_backend_with_bf16_states(monkeypatch):
    """Tiny fp16 problem through gpu.forward / gpu.backward: with the switch the states
    workspace is int16 and the results move only by the states' rounding."""
    gpu = pytest.importorskip("sla_numba.gpu")
    launch_mod = importlib.import_module("sla_numba.gpu._launch")
    B, H, N, D, blk = 1, 1, 40, 16, 16
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.standard_normal((B, H, N, D)).astype(np.float16) for _ in range(4))
    bm = np.array([[[[1, 0, 0], [0, 1, -1], [0, 0, 1]]]], np.int8)
    seen = []
    real = launch_mod.marginal_sum

    def spy(call, bmap, transposed, n_out, n_in, states, out, tc):
        seen.append(np.dtype(states.dtype))
        return real(call, bmap, transposed, n_out, n_in, states, out, tc)

    monkeypatch.setattr(launch_mod, "marginal_sum", spy)
    for mod in ("forward", "backward"):
        monkeypatch.setattr(
            importlib.import_module(f"sla_numba.gpu.{mod}"), "marginal_sum", spy, raising=False
        )
    args = (bm, blk, blk, D**-0.5, 0, 1e-6)
    monkeypatch.setenv("SLA_NUMBA_STATES", "fp32")
    f32 = gpu.forward(q, k, v, *args, path="tc")
    g32 = gpu.backward(q, k, v, *f32, do, do, *args, path="tc")
    assert np.dtype(np.int16) not in seen
    seen.clear()
    monkeypatch.setenv("SLA_NUMBA_STATES", "bf16")
    f16 = gpu.forward(q, k, v, *args, path="tc")
    g16 = gpu.backward(q, k, v, *f16, do, do, *args, path="tc")
    assert np.dtype(np.int16) in seen, "no marginal sum read bf16 states"
    np.testing.assert_array_equal(f16[0], f32[0])  # sparse branch untouched
    np.testing.assert_array_equal(f16[2], f32[2])
    rel = np.linalg.norm(f16[1] - f32[1]) / np.linalg.norm(f32[1])
    assert 0 < rel < 4e-3, rel  # O_l: a bf16 rounding of the states, not more
    for a, b in zip(g16, g32):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 4e-3


def test_switch_values(monkeypatch):
    from sla_numba import config

    monkeypatch.setenv("SLA_NUMBA_STATES", "")
    assert config.states_dtype() == "auto"
    assert config.bf16_states("bf16") and not config.bf16_states("f16")
    monkeypatch.setenv("SLA_NUMBA_STATES", "fp32")
    assert not config.bf16_states("bf16")
    monkeypatch.setenv("SLA_NUMBA_STATES", "BF16")
    assert config.states_dtype() == "bf16" and config.bf16_states("f16")
    monkeypatch.setenv("SLA_NUMBA_STATES", "fp8")
    with pytest.raises(ValueError, match="SLA_NUMBA_STATES"):
        config.states_dtype()


# --------------------------------------------------------------------------- GPU
@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_marginal_bf16_states(transposed):
    from numba import cuda

    B, H, Mq, Mk, W, n_out, n_in = 2, 3, 70, 90, 16512, 67, 85
    if transposed:  # rows of M are map columns: n_out <= Mk, n_in <= Mq
        n_out, n_in = n_in, n_out
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, 1)
    d_out = cuda.to_device(out)
    marginal_tc.launch_marginal_sum_tc(
        0, cuda.to_device(bmap), transposed, n_out, n_in, cuda.to_device(bits), d_out
    )
    cuda.synchronize()
    _check_bf16(d_out.copy_to_host(), bmap, values, transposed, n_out, n_in)


@needs_gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_api_bf16_states_keeps_the_accuracy_rule(monkeypatch, D):
    """Public API, bf16, N = 1000 with tails: o and the gradients with bf16 states within
    2x torch's own bf16 error against float64 (the rule of test_paths), and o_s, lse
    the same bits as with fp32 states."""
    import torch

    import sla_numba
    from sla_numba.reference import sla_reference

    B, H, N, blk = 1, 2, 1000, 64
    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v, do = (
        torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)
    )
    gpu = importlib.import_module("sla_numba.gpu")
    bm = gpu.classify(q, k, 4, 2, blk, blk, D**-0.5)

    def ours(states):
        monkeypatch.setenv("SLA_NUMBA_STATES", states)
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o_s, o_l = sla_numba.sla_attention(
            *xs, block_q=blk, block_k=blk, block_map=bm, return_parts=True, backend="gpu"
        )
        (o_s + o_l).backward(do)
        return [o_s.detach(), o_l.detach()] + [x.grad for x in xs]

    def ref(prec):
        xs = [x.detach().to(prec).requires_grad_() for x in (q, k, v)]
        o, _, _ = sla_reference(*xs, bm.cpu(), block_q=blk, block_k=blk)
        o.backward(do.to(prec))
        return [o.detach()] + [x.grad for x in xs]

    def rel(a, r):
        return ((a.double() - r.double()).norm() / r.double().norm()).item()

    fp32, bf16 = ours("fp32"), ours("bf16")
    assert torch.equal(fp32[0], bf16[0])  # o_s
    exact, same = ref(torch.float64), ref(torch.bfloat16)
    got = [bf16[0] + bf16[1]] + bf16[2:]
    for name, a, t, r in zip(("o", "dq", "dk", "dv"), got, same, exact):
        assert rel(a, r) <= 2 * rel(t, r), (name, rel(a, r), rel(t, r))
