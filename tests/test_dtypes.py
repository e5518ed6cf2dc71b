"""Low-precision inputs come back in their dtype, close to the reference; strided inputs work."""

import numpy as np
import pytest
import strategies as S
import torch
from helpers import HAS_CUDA, assert_close_rms, make, tiny, to_f64, tol_for, torch_device

import sla_numba
from sla_numba.reference import classify_reference, sla_reference

SH = S.Shape(2, 2, 37, 29, 16, 8, 8)
SH_TINY = S.Shape(1, 1, 11, 9, 4, 4, 4)  # a GPU backend under the simulator
KW = dict(topk=0.3, skip=0.2, block_q=8, block_k=8)


def _low_precision_cases(backend):
    cases = [("numpy", np.float16), ("torch", torch.float16)]
    if backend == "cpu" or HAS_CUDA:  # the simulator has no bf16
        cases.append(("torch", torch.bfloat16))
    return cases


@pytest.mark.parametrize("feature_map", ["softmax", "relu"])
def test_low_precision_inputs(backend, feature_map):
    """fp16 / bf16 in -> same dtype out; error vs the float64 reference of the rounded inputs
    within the tolerance of that dtype; gradients too (torch)."""
    sh = SH_TINY if tiny(backend) else SH
    kw = dict(KW, block_q=sh.block_q, block_k=sh.block_k)
    for kind, dtype in _low_precision_cases(backend):
        arrays = S.qkv(sh, 1, np.float32)
        leaves = [make(x, kind, backend, dtype, requires_grad=kind == "torch") for x in arrays]
        o = sla_numba.sla_attention(*leaves, feature_map=feature_map, backend=backend, **kw)
        assert o.dtype == leaves[0].dtype and tuple(o.shape) == sh.q_shape, (kind, dtype)
        rounded = [torch.from_numpy(to_f64(x)).requires_grad_() for x in leaves]
        bm = classify_reference(*rounded[:2], **kw)
        e, _, _ = sla_reference(
            *rounded, bm, block_q=sh.block_q, block_k=sh.block_k, feature_map=feature_map
        )
        tol = tol_for(dtype)
        assert_close_rms(o, e, tol, f"O {kind} {dtype}")
        if kind == "torch":
            do = torch.randn(
                sh.q_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
            )
            o.backward(do.to(o))
            e.backward(do)
            for name, x, r in zip("qkv", leaves, rounded):
                assert x.grad.dtype == dtype
                assert_close_rms(x.grad, r.grad, 2 * tol, f"d{name} {dtype}")


def test_non_contiguous_torch_inputs(backend):
    """(B, N, H, D) tensors viewed as (B, H, N, D), a strided slice of D and a broadcast
    (expanded) head axis: same bits as contiguous copies, gradients too."""
    g = torch.Generator().manual_seed(0)
    dev = torch_device(backend)
    n, d = (5, 4) if tiny(backend) else (21, 8)
    q = torch.randn(2, n, 3, d, generator=g).to(dev).transpose(1, 2)  # (2, 3, n, d)
    k = torch.randn(2, 3, n - 2, 2 * d, generator=g).to(dev)[..., ::2]  # stride-2 D
    v = torch.randn(2, 1, n - 2, d, generator=g).to(dev).expand(2, 3, n - 2, d)  # 0-stride H
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    outs = []
    for inputs in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        leaves = [x.detach().clone() if x.is_contiguous() else x.detach() for x in inputs]
        for x in leaves:
            x.requires_grad_()
        o = sla_numba.sla_attention(*leaves, backend=backend, **dict(KW, block_q=4, block_k=4))
        o.backward(torch.ones_like(o))
        outs.append([o.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(["O", "dq", "dk", "dv"], *outs):
        assert torch.equal(a, b), f"{name}: strided inputs give a different result"


def test_non_contiguous_numpy_inputs(backend):
    rng = np.random.default_rng(0)
    n, d = (5, 4) if tiny(backend) else (21, 8)
    q = rng.standard_normal((1, n, 2, d)).astype(np.float32).transpose(0, 2, 1, 3)
    k = rng.standard_normal((1, 2, n - 2, d)).astype(np.float32)[:, :, ::-1]  # negative stride
    v = np.asfortranarray(rng.standard_normal((1, 2, n - 2, d)).astype(np.float32))
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    kw = dict(KW, block_q=4, block_k=4, backend=backend)
    o = sla_numba.sla_attention(q, k, v, **kw)
    o_c = sla_numba.sla_attention(*(np.ascontiguousarray(x) for x in (q, k, v)), **kw)
    np.testing.assert_array_equal(o, o_c)
    m = sla_numba.classify_blocks(q, k, **kw).map
    np.testing.assert_array_equal(
        m, sla_numba.classify_blocks(np.ascontiguousarray(q), np.ascontiguousarray(k), **kw).map
    )
