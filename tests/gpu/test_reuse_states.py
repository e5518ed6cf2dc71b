"""The backward reusing the forward's row states (``gpu.forward(return_states=True)`` →
``gpu.backward(row_states=...)``), under the CUDA simulator (tiny shapes with tails).

* the same gradients, bit for bit, as the backward that recomputes the states: the
  forward's row sums come from the same kernels on the same inputs (simt path in fp32,
  tc path in fp16; marginal and global linear scope);
* the backward really skips the work: no tensor-core states launch, no SIMT state
  blocks in ``prep`` (its runtime count is 0), no row marginal sum; the column sums
  (dH_j) still run;
* a bad ``row_states`` is refused, naming the argument;
* on a real GPU (skipped without one): bf16 torch tensors through ``sla_attention``
  with ``SLA_NUMBA_SAVE_STATES`` 0 and 1 give the same bits, on the tensor-core path.

Outputs are poisoned (NaN) by the session fixture, the returned row states included:
an element the forward does not write fails the comparisons.
"""

import importlib

import numpy as np
import pytest
from helpers import assert_tensor_core_path, needs_real_gpu
from numba import config

from sla_numba import _params

gpu = pytest.importorskip("sla_numba.gpu")
_launch = importlib.import_module("sla_numba.gpu._launch")
tc_states = importlib.import_module("sla_numba.gpu.tc.states")
simt_states = importlib.import_module("sla_numba.gpu.simt.states")

pytestmark = pytest.mark.gpu
sim_only = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="simulator sizes")


def _map(mq, mk):
    """Row 0: no critical block; row 1: all critical (no marginal); the rest mixed."""
    m = np.zeros((1, 1, mq, mk), np.int8)
    m[..., 0, -1] = -1
    m[..., 1, :] = 1
    for i in range(2, mq):
        m[0, 0, i, i % mk] = 1
        m[0, 0, i, (i + 1) % mk] = -1
    return m


def _inputs(dtype, Nq=40, Nk=37, D=16, bq=16, bk=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, n, D)).astype(dtype) for n in (Nq, Nk, Nk))
    do_s, do_l = (rng.standard_normal((1, 1, Nq, D)).astype(dtype) for _ in range(2))
    bm = _map(_params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk))
    return q, k, v, do_s, do_l, bm


@pytest.fixture
def spy(monkeypatch):
    """Records the stages that make key-block states and row sums: the tensor-core
    states launches, the SIMT prep's state-block count, and every marginal sum
    (transposed: the backward's column sums)."""
    seen = {"tc_states": 0, "prep_state_blocks": [], "sums": []}
    real_states = tc_states.launch_states_tc
    real_sum = _launch.marginal_sum
    real_launch = _launch.launch
    prep_kernels = set()

    def states(*a, **kw):
        seen["tc_states"] += 1
        return real_states(*a, **kw)

    def marginal_sum(call, bmap, transposed, *a, **kw):
        seen["sums"].append("columns" if transposed else "rows")
        return real_sum(call, bmap, transposed, *a, **kw)

    def launch(kernel, grid, nt, stream, args):
        if kernel in prep_kernels:
            seen["prep_state_blocks"].append(args[4])  # n_state, a runtime count
        return real_launch(kernel, grid, nt, stream, args)

    real_make_prep = _launch.make_prep

    def make_prep(tiles):
        k = real_make_prep(tiles)
        prep_kernels.add(k)
        return k

    monkeypatch.setattr(tc_states, "launch_states_tc", states)
    monkeypatch.setattr(_launch, "marginal_sum", marginal_sum)
    monkeypatch.setattr(_launch, "launch", launch)
    monkeypatch.setattr(_launch, "make_prep", make_prep)
    bwd = importlib.import_module("sla_numba.gpu.backward")
    monkeypatch.setattr(bwd, "marginal_sum", marginal_sum)
    monkeypatch.setenv("SLA_NUMBA_COMPILE_WORKERS", "0")  # one run a call, no dry run
    monkeypatch.delenv("SLA_NUMBA_GPU_PATH", raising=False)

    def reset():
        seen.update(tc_states=0, prep_state_blocks=[], sums=[])

    seen["reset"] = reset
    return seen


# dtype, path, linear scope, Nq, Nk (tails on both axes; the tensor-core twins are slow
# under the simulator: two blocks a side there)
CASES = [
    (np.float32, "simt", 0, 40, 37),
    (np.float32, "simt", 1, 40, 37),
    (np.float16, "tc", 1, 20, 21),
]


@sim_only
@pytest.mark.parametrize("dtype,path,scope,Nq,Nk", CASES)
def test_reused_states_give_the_same_gradients_and_skip_the_work(spy, dtype, path, scope, Nq, Nk):
    D = 16
    q, k, v, do_s, do_l, bm = _inputs(dtype, Nq=Nq, Nk=Nk, D=D)
    args = (q, k, v, bm, 16, 16, 0.3, 1, 1e-6, scope)
    o_s, o_l, lse, rs = gpu.forward(*args, path=path, return_states=True)
    if path == "simt":  # asking for the states changes nothing (the same code on tc)
        for a, b in zip((o_s, o_l, lse), gpu.forward(*args, path=path)):
            np.testing.assert_array_equal(a, b)
    assert rs.dtype == np.float32 and rs.shape[:3] == (1, 1, bm.shape[2])
    assert not np.isnan(rs).any()  # every element written (outputs start as NaN)
    if path == "tc":
        assert rs.shape[3] == D * D + D

    bwd = (q, k, v, o_s, o_l, lse, do_s, do_l, bm, 16, 16, 0.3, 1, 1e-6, scope)
    spy["reset"]()
    recomputed = gpu.backward(*bwd, path=path)
    mk = bm.shape[3]
    assert spy["sums"] == ["rows", "columns"]
    assert spy["tc_states"] == (1 if path == "tc" else 0)
    assert spy["prep_state_blocks"] == [0 if path == "tc" else mk]

    spy["reset"]()
    reused = gpu.backward(*bwd, path=path, row_states=rs)
    assert spy["sums"] == ["columns"], "the backward summed the rows' states again"
    assert spy["tc_states"] == 0, "the backward recomputed the key-block states"
    assert spy["prep_state_blocks"] == [0]
    for name, a, b in zip(("dq", "dk", "dv"), reused, recomputed):
        assert not np.isnan(a).any(), name
        np.testing.assert_array_equal(a, b, err_msg=name)


@sim_only
def test_bad_row_states_are_refused():
    q, k, v, do_s, do_l, bm = _inputs(np.float32, Nq=20, Nk=20)
    o_s, o_l, lse, rs = gpu.forward(q, k, v, bm, 16, 16, 0.3, 1, 1e-6, return_states=True)
    bwd = (q, k, v, o_s, o_l, lse, do_s, do_l, bm, 16, 16, 0.3, 1, 1e-6)
    with pytest.raises(ValueError, match="row_states: shape"):
        gpu.backward(*bwd, row_states=rs[:, :, :1])
    with pytest.raises(ValueError, match="row_states: shape"):
        gpu.backward(*bwd, row_states=rs[..., :-1].copy())
    with pytest.raises(ValueError, match="row_states: dtype"):
        gpu.backward(*bwd, row_states=rs.astype(np.float64))
    with pytest.raises(TypeError, match="row_states"):
        gpu.backward(*bwd, row_states=rs.tolist())
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="row_states: a torch array where q is numpy"):
        gpu.backward(*bwd, row_states=torch.from_numpy(rs))


@needs_real_gpu
@pytest.mark.parametrize("scope", ["marginal", "global"])
def test_cuda_bf16_saved_states_same_bits(monkeypatch, scope):
    """Tensor-core path, D 64, 64-token blocks, 300 / 450 tokens (partial last blocks):
    output and dq, dk, dv with the switch on equal those with it off, bit for bit, and
    the backend backward received the states (fp32, (B, H, Mq, D*D + D))."""
    import torch

    assert_tensor_core_path(torch.bfloat16, 64, 64, 64)
    import sla_numba

    received = []
    real = gpu.backward
    monkeypatch.setattr(
        gpu, "backward", lambda *a, **kw: (received.append(kw.get("row_states")), real(*a, **kw))[1]
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(2, 3, n, 64, device="cuda", generator=g) for n in (300, 450, 450)]
    do = torch.randn(2, 3, 300, 64, device="cuda", generator=g).to(torch.bfloat16)

    def run(save):
        monkeypatch.setenv("SLA_NUMBA_SAVE_STATES", save)
        q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in x)
        o = sla_numba.sla_attention(
            q, k, v, topk=0.4, skip=0.2, feature_map="elu", linear_scope=scope, backend="gpu"
        )
        o.backward(do)
        return [o.detach(), q.grad, k.grad, v.grad]

    off = run("0")
    assert received == [None]
    on = run("1")
    states = received[1]
    assert states is not None and states.dtype == torch.float32
    assert tuple(states.shape) == (2, 3, 5, 64 * 64 + 64)
    for name, a, b in zip(("o", "dq", "dk", "dv"), on, off):
        assert torch.equal(a, b), name
