"""Kernel paths of the GPU backend: "simt" vs "tc" (tensor cores) vs the float64 reference.

Simulator half (tiny fp16 shapes; the tensor-core twins are slow, so D 16 / 32 and
blocks 16 / 32 only): both paths through ``gpu.forward`` / ``gpu.backward``, with
tails, a row with no critical block, a row with no marginal block and two feature
maps; ``select_path`` rules, the ``SLA_NUMBA_GPU_PATH`` override and the
``ValueError`` of a forced "tc" on fp32. A spy on the tensor-core launchers proves
which path ran.

Real-GPU half (skipped without CUDA): bf16 / fp16 torch tensors through the public
``sla_numba.sla_attention`` with autograd, where "auto" must pick the tensor cores,
against float64 with the issue's bound (at most 2x the error of the same SLA
computed by torch in the input precision); CuPy fp16 input through the backend.
"""

import importlib
import math

import numpy as np
import pytest
import torch
from helpers import backend_err as _err  # noqa: E402
from helpers import reference_grads as _reference_grads
from numba import config

from sla_numba import _params
from sla_numba.config import bf16_states
from sla_numba.reference import sla_reference

gpu = pytest.importorskip("sla_numba.gpu")
gpu_path = importlib.import_module("sla_numba.gpu._path")
forward_tc = importlib.import_module("sla_numba.gpu.tc.forward")
backward_tc = importlib.import_module("sla_numba.gpu.tc.backward")

pytestmark = pytest.mark.gpu
SIM = bool(config.ENABLE_CUDASIM)


@pytest.fixture
def spy(monkeypatch):
    """Counts launches of the tensor-core forward / backward (and still runs them)."""
    calls = {"fwd": 0, "bwd": 0}
    f0, b0 = forward_tc.launch_sparse_forward, backward_tc.launch_sparse_backward

    def f(*a, **kw):
        calls["fwd"] += 1
        return f0(*a, **kw)

    def b(*a, **kw):
        calls["bwd"] += 1
        return b0(*a, **kw)

    monkeypatch.setattr(forward_tc, "launch_sparse_forward", f)
    monkeypatch.setattr(backward_tc, "launch_sparse_backward", b)
    monkeypatch.delenv(gpu_path.ENV_VAR, raising=False)
    # one run a call: a first call with compile workers also makes a dry run, which
    # calls the launch helpers too (gpu/_precompile.py; tested in test_precompile.py)
    monkeypatch.setenv("SLA_NUMBA_COMPILE_WORKERS", "0")
    return calls


# --------------------------------------------------------------------------- rules
def test_select_path_rules(monkeypatch):
    monkeypatch.delenv(gpu_path.ENV_VAR, raising=False)
    dev_ok = forward_tc._tc_build.device_ok(None)
    tc = "tc" if dev_ok else "simt"
    assert gpu.select_path("bfloat16", 128, 64, 64) == tc
    assert gpu.select_path(torch.bfloat16, 64, 64, 64) == tc
    assert gpu.select_path(np.float16, 64, 128, 64) == tc
    assert gpu.select_path(np.float32, 64, 64, 64) == "simt"
    assert gpu.select_path("float64", 64, 64, 64) == "simt"
    assert gpu.select_path("bfloat16", 40, 64, 64) == "simt"  # D not a multiple of 16
    assert gpu.select_path("bfloat16", 256, 64, 64) == "simt"  # D too large
    assert gpu.select_path("bfloat16", 64, 96, 64) == "simt"  # block_q
    assert gpu.select_path("bfloat16", 64, 64, 128) == "simt"  # block_k
    assert gpu.PATHS == ("auto", "simt", "tc")


def test_env_override(monkeypatch):
    env = gpu_path.ENV_VAR
    assert env == "SLA_NUMBA_GPU_PATH"
    monkeypatch.setenv(env, "simt")
    assert gpu.select_path("bfloat16", 64, 64, 64) == "simt"
    monkeypatch.setenv(env, "auto")
    assert gpu.select_path(np.float32, 64, 64, 64) == "simt"
    monkeypatch.setenv(env, "tc")
    with pytest.raises(ValueError, match="float32"):
        gpu.select_path(np.float32, 64, 64, 64)
    with pytest.raises(ValueError, match="SLA_NUMBA_GPU_PATH"):
        gpu.select_path(np.float32, 64, 64, 64)
    monkeypatch.setenv(env, "cuda-cores")
    with pytest.raises(ValueError, match="SLA_NUMBA_GPU_PATH"):
        gpu.select_path("bfloat16", 64, 64, 64)
    # an explicit path is never overridden
    monkeypatch.setenv(env, "tc")
    assert gpu_path.resolve_path("simt", "bfloat16", 64, 64, 64) == "simt"


def test_forced_tc_on_fp32_raises_and_bad_path(spy):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 8, 16)).astype(np.float32)
    bm = np.ones((1, 1, 1, 1), np.int8)
    with pytest.raises(ValueError, match="float32"):
        gpu.forward(q, q, q, bm, 16, 16, 0.25, 0, 1e-6, path="tc")
    with pytest.raises(ValueError, match="tensor-core"):
        gpu.backward(q, q, q, q, q, q[..., 0], q, q, bm, 16, 16, 0.25, 0, 1e-6, path="tc")
    with pytest.raises(ValueError, match="block_k"):
        h = q.astype(np.float16)
        gpu.forward(h, h, h, bm, 16, 8, 0.25, 0, 1e-6, path="tc")
    with pytest.raises(ValueError, match="path must be one of"):
        gpu.forward(q, q, q, bm, 16, 16, 0.25, 0, 1e-6, path="cuda")
    assert spy == {"fwd": 0, "bwd": 0}


# --------------------------------------------------------------------------- simulator
# B, H, Nq, Nk, D, bq, bk, feature map, path asked for "tc" (explicit or auto), linear scope
SIM_CASES = [
    (1, 1, 40, 37, 16, 16, 16, "softmax", "tc", 0),  # tails on both axes, Nq != Nk
    (1, 1, 40, 37, 32, 32, 16, "elu", "auto", 0),  # two m-tiles a warp; auto picks tc
    (1, 1, 40, 37, 16, 16, 16, "relu", "tc", 1),  # linear_scope="global"
]


def _map(mq, mk, seed):
    """Row 0: no critical block; row 1: no marginal block (all critical); rest random
    with at least one critical and one marginal block."""
    rng = np.random.default_rng(seed)
    m = rng.integers(-1, 2, size=(1, 1, mq, mk)).astype(np.int8)
    m[..., 0, :] = 0
    m[..., 0, -1] = -1
    m[..., 1, :] = 1
    for i in range(2, mq):
        m[0, 0, i, i % mk] = 1
        m[0, 0, i, (i + 1) % mk] = 0
    return m


@pytest.mark.skipif(not SIM, reason="simulator twins of the tensor-core kernels")
@pytest.mark.parametrize("B,H,Nq,Nk,D,bq,bk,fm,path,scope", SIM_CASES)
def test_tc_vs_simt_vs_reference_simulated(spy, B, H, Nq, Nk, D, bq, bk, fm, path, scope):
    rng = np.random.default_rng(D + Nq)
    q, k, v = (rng.standard_normal((B, H, n, D)).astype(np.float16) for n in (Nq, Nk, Nk))
    do_s, do_l = (rng.standard_normal((B, H, Nq, D)).astype(np.float16) for _ in range(2))
    mq, mk = _params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk)
    bm = _map(mq, mk, D)
    scale = 0.9 / math.sqrt(D)
    code = _params.FEATURE_MAPS[fm]

    scope_name = "global" if scope else "marginal"
    f_tc = gpu.forward(q, k, v, bm, bq, bk, scale, code, 1e-6, scope, path=path)
    assert spy["fwd"] == 1
    f_simt = gpu.forward(q, k, v, bm, bq, bk, scale, code, 1e-6, scope, path="simt")
    assert spy["fwd"] == 1
    _, r_s, r_l = sla_reference(
        q, k, v, bm, block_q=bq, block_k=bk, feature_map=fm, scale=scale, linear_scope=scope_name
    )
    assert all(x.dtype == np.float32 for x in f_tc)
    assert _err(f_tc[0], r_s) < 2e-3 and _err(f_simt[0], r_s) < 1e-5
    np.testing.assert_array_equal(f_tc[0][0, 0, :bq], 0.0)  # row without critical block
    # linear branch: the same SIMT fp32 kernel, but the tc path sums the states over
    # marginal blocks on tensor cores (bf16 hi + lo, ~2^-16 relative a term); with
    # SLA_NUMBA_STATES=bf16 the states themselves are rounded to bf16 (2^-9 a term;
    # measured up to 1.2e-3 on these few-block maps)
    if bf16_states("f16"):
        assert _err(f_tc[1], r_l) < 4e-3
    else:
        assert _err(f_tc[1], r_l) < 1e-5
        np.testing.assert_allclose(f_tc[1], f_simt[1], rtol=1e-4, atol=1e-5)
    if not scope:
        np.testing.assert_array_equal(f_tc[1][0, 0, bq : 2 * bq], 0.0)  # row without marginal block
    np.testing.assert_allclose(f_tc[2], f_simt[2], rtol=1e-4, atol=1e-4)

    g_tc = gpu.backward(q, k, v, *f_tc, do_s, do_l, bm, bq, bk, scale, code, 1e-6, scope, path=path)
    assert spy["bwd"] == 1
    g_simt = gpu.backward(
        q, k, v, *f_simt, do_s, do_l, bm, bq, bk, scale, code, 1e-6, scope, path="simt"
    )
    assert spy["bwd"] == 1
    ref = _reference_grads(q, k, v, bm, bq, bk, scale, fm, do_s, do_l, scope_name)
    for a, s, r in zip(g_tc, g_simt, ref):
        assert a.dtype == np.float32
        assert _err(s, r) < 1e-5
        assert _err(a, r) < 3e-3
    if D > 16:
        return
    # determinism of the combined path
    g2 = gpu.backward(q, k, v, *f_tc, do_s, do_l, bm, bq, bk, scale, code, 1e-6, scope, path=path)
    for a, b in zip(g_tc, g2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not SIM, reason="simulator")
def test_env_simt_override_runs_simt(spy, monkeypatch):
    monkeypatch.setenv(gpu_path.ENV_VAR, "simt")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 16, 16)).astype(np.float16)
    bm = np.array([[[[1]]]], np.int8)
    o_s, _, _ = gpu.forward(q, q, q, bm, 16, 16, 0.25, 0, 1e-6)
    assert spy["fwd"] == 0
    _, r_s, _ = sla_reference(q, q, q, bm, block_q=16, block_k=16, scale=0.25)
    assert _err(o_s, r_s) < 1e-5


# --------------------------------------------------------------------------- real GPU
def _has_cuda():
    if SIM or not torch.cuda.is_available():
        return False
    from numba import cuda

    return cuda.is_available() and cuda.get_current_device().compute_capability >= (8, 0)


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU with cc >= 8.0")


def _rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-6)).item()


@needs_cuda
@pytest.mark.parametrize(
    "dtype,D", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 64)]
)
def test_sla_attention_autograd_auto_picks_tc(spy, dtype, D):
    """Public API, torch autograd, tails (N = 1000); O and dq/dk/dv vs float64 within
    2x the error of the same SLA computed by torch in ``dtype``."""
    import sla_numba

    B, H, N, blk = 1, 2, 1000, 64
    assert gpu.select_path(dtype, D, blk, blk) == "tc"
    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", generator=g).to(dtype) for _ in range(4))
    w = 0.3 * torch.randn(D, D, device="cuda", generator=g)
    mq = _params.n_blocks(N, blk)
    n_crit, n_skip = _params.block_counts(mq, 0.25, 0.25)
    bm = gpu.classify(q, k, n_crit, n_skip, blk, blk, D**-0.5)
    bm[0, 0, 0] = 0  # a row with no critical block
    bm[0, 0, 1] = 1  # a row with no marginal block
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = sla_numba.sla_attention(
        *leaves, block_q=blk, block_k=blk, block_map=bm, proj_weight=w, backend="gpu"
    )
    o.backward(do)
    torch.cuda.synchronize()
    assert spy["fwd"] >= 1 and spy["bwd"] >= 1
    assert o.dtype == dtype and all(x.grad.dtype == dtype for x in leaves)

    def ref(prec):
        xs = [x.detach().to(prec).requires_grad_() for x in (q, k, v)]
        out, _, _ = sla_reference(*xs, bm.cpu(), block_q=blk, block_k=blk, proj_weight=w.to(prec))
        out.backward(do.to(prec))
        return [out.detach()] + [x.grad for x in xs]

    exact = ref(torch.float64)
    same_prec = ref(dtype)
    ours = [o.detach()] + [x.grad for x in leaves]
    # torch in fp16 can overflow where we do not (e.g. the linear branch's gradient
    # 1/(0 + eps)^2 on a row without marginal blocks is inf in fp16): a non-finite
    # same-precision result gives way to a fixed bound of a few fp16/bf16 ulps.
    floor = 4e-3 if dtype == torch.float16 else 3e-2
    for name, a, t, r in zip(("o", "dq", "dk", "dv"), ours, same_prec, exact):
        assert torch.isfinite(a).all(), name
        e_ours, e_torch = _rel(a, r), _rel(t, r)
        if not math.isfinite(e_torch):
            e_torch = floor / 2
        assert e_ours <= 2 * e_torch, (name, e_ours, e_torch)


@needs_cuda
def test_tc_and_simt_agree_on_torch_bf16_side_stream(spy):
    B, H, N, D, blk = 1, 2, 300, 128, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, do = (
        torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)
    )
    bm = gpu.classify(q, k, 2, 1, blk, blk, D**-0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f_tc = gpu.forward(q, k, v, bm, blk, blk, D**-0.5, 0, 1e-6)
        g_tc = gpu.backward(q, k, v, *f_tc, do, do, bm, blk, blk, D**-0.5, 0, 1e-6)
        f_s = gpu.forward(q, k, v, bm, blk, blk, D**-0.5, 0, 1e-6, path="simt")
        g_s = gpu.backward(q, k, v, *f_s, do, do, bm, blk, blk, D**-0.5, 0, 1e-6, path="simt")
    side.synchronize()
    assert spy == {"fwd": 1, "bwd": 1}
    # linear branch: fp32 SIMT both, but the marginal sums on tensor cores, from bf16
    # states by default for bf16 inputs (a bf16 rounding of each state)
    assert _rel(f_tc[1], f_s[1]) < (4e-3 if bf16_states("bf16") else 1e-5)
    for a, b in zip((*f_tc[:1], *g_tc), (*f_s[:1], *g_s)):
        assert _rel(a, b) < 1e-2


@needs_cuda
def test_cupy_fp16_forward_uses_tc():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    B, H, N, D, blk = 1, 2, 200, 64, 64
    q, k, v = (rng.standard_normal((B, H, N, D)).astype(np.float16) for _ in range(3))
    bm = np.array(
        [[[[1, 0, -1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]]] * H, np.int8
    ).reshape(B, H, 4, 4)
    assert gpu.select_path(np.float16, D, blk, blk) == "tc"
    outs = gpu.forward(
        *(cp.asarray(x) for x in (q, k, v)), cp.asarray(bm), blk, blk, 0.125, 0, 1e-6
    )
    assert isinstance(outs[0], cp.ndarray)
    _, r_s, r_l = sla_reference(q, k, v, bm, block_q=blk, block_k=blk, scale=0.125)
    assert _err(cp.asnumpy(outs[0]), r_s) < 2e-3
    assert _err(cp.asnumpy(outs[1]), r_l) < 1e-4


@pytest.mark.skipif(not SIM, reason="simulator twins of the tensor-core kernels")
def test_tc_parts_can_be_sent_back_to_simt(monkeypatch):
    """SLA_NUMBA_TC_OFF=states,marginal,linear: the tc path's linear branch is then the
    SIMT code end to end, bit for bit the simt path's O_l; an unknown part is a
    ValueError."""
    B, H, Nq, Nk, D, bq, bk = 1, 1, 24, 21, 16, 16, 16
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((B, H, n, D)).astype(np.float16) for n in (Nq, Nk, Nk))
    bm = _map(_params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk), D)
    code = _params.FEATURE_MAPS["softmax"]
    monkeypatch.setenv("SLA_NUMBA_TC_OFF", "states, marginal,linear")
    f_tc = gpu.forward(q, k, v, bm, bq, bk, 0.25, code, 1e-6, path="tc")
    f_simt = gpu.forward(q, k, v, bm, bq, bk, 0.25, code, 1e-6, path="simt")
    np.testing.assert_array_equal(f_tc[1], f_simt[1])
    monkeypatch.setenv("SLA_NUMBA_TC_OFF", "states,nonsense")
    with pytest.raises(ValueError, match="SLA_NUMBA_TC_OFF"):
        gpu.forward(q, k, v, bm, bq, bk, 0.25, code, 1e-6, path="tc")


@pytest.mark.skipif(not SIM, reason="simulator twins of the tensor-core kernels")
def test_linear_grad_part_on_and_off_agree(monkeypatch):
    """The tc path's backward adds the linear gradients with the tensor-core kernels
    (``tc/linear_backward.py``, both launched once) unless SLA_NUMBA_TC_OFF names
    ``linear_grad`` (then the SIMT dq / dkdv, neither launched); the two agree to the
    hi / lo splits' precision."""
    from sla_numba.gpu.tc import linear_backward as lb

    B, H, Nq, Nk, D, bq, bk = 1, 1, 20, 21, 16, 16, 16  # two blocks a side, tails
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((B, H, n, D)).astype(np.float16) for n in (Nq, Nk, Nk))
    bm = _map(_params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk), D)
    code = _params.FEATURE_MAPS["elu"]
    o_s, o_l, lse = gpu.forward(q, k, v, bm, bq, bk, 0.25, code, 1e-6, path="tc")
    do_s = rng.standard_normal(q.shape).astype(np.float16)
    do_l = rng.standard_normal(q.shape).astype(np.float32)
    calls = []
    for name in ("launch_dq_linear_tc", "launch_dkdv_linear_tc"):
        real = getattr(lb, name)
        monkeypatch.setattr(
            lb, name, lambda *a, _r=real, _n=name, **kw: (calls.append(_n), _r(*a, **kw))[1]
        )
    args = (q, k, v, o_s, o_l, lse, do_s, do_l, bm, bq, bk, 0.25, code, 1e-6)
    monkeypatch.setenv("SLA_NUMBA_TC_OFF", "")
    g_tc = gpu.backward(*args, path="tc")
    assert calls == ["launch_dq_linear_tc", "launch_dkdv_linear_tc"]
    monkeypatch.setenv("SLA_NUMBA_TC_OFF", "linear_grad")
    g_simt = gpu.backward(*args, path="tc")
    assert len(calls) == 2, "linear_grad switched off, but its kernels ran"
    for a, b in zip(g_tc, g_simt):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 1e-4, rel
