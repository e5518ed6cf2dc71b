"""Small frictions a new user meets: numpy scalars, uint8 maps, huge blocks, a module fed the
wrong D, double backward, autocast, a GPU that is not there, ahead-of-time compiling."""

import numpy as np
import pytest
import torch

import sla_numba
from sla_numba import _backends, _gpu_check

KW = dict(topk=0.5, skip=0.25, block_q=16, block_k=16, backend="cpu")


def _qkv(n=40, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, n, d)).astype(np.float32) for _ in range(3)]


def test_numpy_scalars_are_numbers():
    q, k, v = _qkv()
    want = sla_numba.sla_attention(q, k, v, scale=0.25, eps=1e-6, **KW)
    got = sla_numba.sla_attention(
        q,
        k,
        v,
        topk=np.float32(0.5),
        skip=np.float64(0.25),
        block_q=np.int64(16),
        block_k=np.int32(16),
        scale=np.float32(0.25),
        eps=np.float64(1e-6),
        backend="cpu",
    )
    np.testing.assert_array_equal(got, want)
    c = sla_numba.classify_blocks(
        q, k, topk=np.float16(0.5), block_q=np.uint8(16), block_k=np.int16(16)
    )
    assert isinstance(c.block_q, int) and c.map.shape == (1, 2, 3, 3)
    attn = sla_numba.SparseLinearAttention(
        np.int64(16), topk=np.float32(0.5), block_q=np.int64(16), block_k=np.int64(16)
    )
    assert attn.head_dim == 16 and type(attn.block_q) is int


@pytest.mark.parametrize(
    "name, value, err",
    [
        ("topk", np.bool_(True), TypeError),
        ("block_q", np.float64(16.0), TypeError),
        ("block_q", True, TypeError),
        ("block_k", np.int64(0), ValueError),
        ("scale", np.float32("nan"), ValueError),
    ],
)
def test_numpy_scalars_are_still_checked(name, value, err):
    q, k, v = _qkv()
    with pytest.raises(err, match=name):
        sla_numba.sla_attention(q, k, v, **{**KW, name: value})


def test_uint8_block_map_is_accepted():
    q, k, v = _qkv()
    m = np.asarray(sla_numba.classify_blocks(q, k, topk=0.5, block_q=16, block_k=16).map)
    m = np.where(m < 0, 0, m)  # uint8 can hold 1 and 0 (critical, marginal)
    want = sla_numba.sla_attention(q, k, v, block_map=m.astype(np.int8), **KW)
    got = sla_numba.sla_attention(q, k, v, block_map=m.astype(np.uint8), **KW)
    np.testing.assert_array_equal(got, want)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    got_t = sla_numba.sla_attention(
        tq, tk, tv, block_map=torch.from_numpy(m.astype(np.uint8)), **KW
    )
    np.testing.assert_array_equal(got_t.numpy(), want)


@pytest.mark.parametrize("block", [2**31 - 1, 2**40])
def test_huge_blocks_are_one_block(block):
    """A block larger than the sequence is one block; buffers are sized by the tokens."""
    q, k, v = _qkv()
    want = sla_numba.sla_attention(q, k, v, topk=1.0, block_q=64, block_k=64, backend="cpu")
    got = sla_numba.sla_attention(q, k, v, topk=1.0, block_q=block, block_k=block, backend="cpu")
    np.testing.assert_array_equal(got, want)


def test_module_names_head_dim():
    attn = sla_numba.SparseLinearAttention(16, block_q=16, block_k=16)
    q = torch.randn(1, 1, 20, 32)
    with pytest.raises(
        ValueError,
        match="q has head_dim 32 but this SparseLinearAttention was built with head_dim=16",
    ):
        attn(q, q, q)


def test_double_backward_is_a_clear_error():
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _qkv())
    out = sla_numba.sla_attention(q, k, v, **KW)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # first order: fine
    assert torch.isfinite(gq).all()
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        gq.sum().backward()


def test_autocast_casts_float32_inputs_like_sdpa():
    """Under torch.autocast, fp32 inputs are cast to the autocast dtype (as SDPA's are):
    the result is exactly the call on bf16 inputs, and gradients flow to the fp32 leaves."""
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sla_numba.sla_attention(q, k, v, **KW)
    assert got.dtype == torch.bfloat16
    want = sla_numba.sla_attention(*(x.detach().bfloat16() for x in (q, k, v)), **KW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as autocast does
        assert (
            sla_numba.sla_attention(*(x.detach().double() for x in (q, k, v)), **KW).dtype
            == torch.float64
        )


def test_autocast_casts_mixed_float32_and_bf16_inputs_like_sdpa():
    """fp32 q, k next to a bf16 v (Wan under CUDA autocast: its q/k RMSNorm runs in
    fp32, to_v's Linear gives bf16): autocast casts each fp32 input, as for SDPA, so
    this is the call on bf16 inputs, not a dtype-mismatch TypeError."""
    q, k, v = (torch.from_numpy(a) for a in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sla_numba.sla_attention(q, k, v.bfloat16(), **KW)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v.bfloat16())
    assert got.dtype == sdpa.dtype == torch.bfloat16
    want = sla_numba.sla_attention(*(x.bfloat16() for x in (q, k, v)), **KW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="v has dtype bfloat16 but q has float32"):
        sla_numba.sla_attention(q, k, v.bfloat16(), **KW)  # outside autocast: refused


def test_missing_numba_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_gpu_check, "numba_cuda_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"numba-cuda is not installed .*sla-numba\[cuda\]"):
        _backends.load_backend("gpu")
    assert "numba-cuda is not installed" in _gpu_check.gpu_problem()


def test_gpu_problem_names_the_cause(monkeypatch):
    """Outside the simulator, a driver/device failure is turned into one sentence."""
    from numba import cuda

    monkeypatch.setattr(_gpu_check, "_simulated", lambda: False)
    monkeypatch.setattr(cuda, "is_available", lambda: False, raising=False)

    class Driver:
        initialization_error = "CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected"

    import types

    fake = types.SimpleNamespace(driver=Driver())
    monkeypatch.setitem(__import__("sys").modules, "numba.cuda.cudadrv.driver", fake)
    monkeypatch.setattr(
        __import__("numba.cuda.cudadrv", fromlist=["x"]), "driver", fake, raising=False
    )
    assert _gpu_check.gpu_problem().startswith("no CUDA device is visible")
    with pytest.raises(RuntimeError, match="backend='gpu' cannot run here: no CUDA device"):
        _gpu_check.require_gpu()


def test_warmup_cpu_runs_forward_and_backward():
    steps = sla_numba.warmup(
        head_dim=16,
        dtypes=["fp32", "bfloat16"],
        backend="cpu",
        block_q=16,
        block_k=16,
        progress=False,
    )
    assert [(s["dtype"], s["stage"]) for s in steps] == [
        ("float32", "forward"),
        ("float32", "backward"),
        ("bfloat16", "forward"),
        ("bfloat16", "backward"),
    ]
    assert all(s["backend"] == "cpu" and s["seconds"] >= 0 for s in steps)


def test_warmup_without_tqdm_prints_a_line_per_step(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    sla_numba.warmup(
        head_dim=8, dtypes="float32", backend="cpu", block_q=16, block_k=16, backward=False
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "sla_numba warmup [1/1] forward for D=8 float32 (cpu): "
    ), err


@pytest.mark.parametrize(
    "bad, err",
    [
        (dict(dtypes="int8"), ValueError),
        (dict(head_dim=0), ValueError),
        (dict(backend="tpu"), ValueError),
    ],
)
def test_warmup_checks_its_arguments(bad, err):
    with pytest.raises(err):
        sla_numba.warmup(**{"head_dim": 16, "dtypes": "float32", "backend": "cpu", **bad})


@pytest.mark.gpu
def test_warmup_gpu_makes_the_real_calls():
    """The GPU warmup is the public forward and torch backward on tiny inputs; here they
    run in the CUDA simulator (on a GPU, they compile the kernels for this D/dtype/blocks)."""
    from helpers import simulator_on

    if not simulator_on() and not torch.cuda.is_available():
        pytest.skip("no GPU and no simulator")
    steps = sla_numba.warmup(
        head_dim=8, dtypes="float32", backend="gpu", block_q=16, block_k=16, progress=False
    )
    assert [(s["stage"], s["backend"]) for s in steps] == [("forward", "gpu"), ("backward", "gpu")]
