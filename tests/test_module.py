"""SparseLinearAttention and torch.compile."""
import pytest
import torch

import sla_numba
import strategies as S
from helpers import assert_close_rms, make, torch_device
from sla_numba.reference import classify_reference, sla_reference

SH = S.Shape(1, 2, 19, 21, 8, 4, 4)
KW = dict(topk=0.3, skip=0.2, block_q=4, block_k=4, feature_map="elu")


def _qkv(backend, dtype=torch.float32):
    return [make(x, "torch", backend, dtype, requires_grad=True) for x in S.qkv(SH, 0)]


def test_untrained_layer_is_block_sparse_attention(backend):
    layer = sla_numba.SparseLinearAttention(SH.d, backend=backend, **KW).to(torch_device(backend))
    assert layer.proj.weight.dtype == torch.float32 and layer.proj.bias.dtype == torch.float32
    assert not layer.proj.weight.any() and not layer.proj.bias.any()
    q, k, v = _qkv(backend)
    out = layer(q, k, v)
    o_s, _ = sla_numba.sla_attention(q, k, v, return_parts=True, backend=backend, **KW)
    assert torch.equal(out, o_s)
    bm = classify_reference(q.detach().cpu(), k.detach().cpu(), **{x: KW[x] for x in (
        "topk", "skip", "block_q", "block_k")})
    _, e_s, _ = sla_reference(*(x.detach().cpu().double() for x in (q, k, v)), bm,
                              block_q=4, block_k=4)
    assert_close_rms(out, e_s, 1e-4, "O")


def test_gradients_reach_the_projection_and_inputs(backend):
    layer = sla_numba.SparseLinearAttention(SH.d, backend=backend, **KW).to(torch_device(backend))
    q, k, v = _qkv(backend)
    layer(q, k, v).square().sum().backward()
    for name, t in [("proj.weight", layer.proj.weight), ("proj.bias", layer.proj.bias),
                    ("q", q), ("k", k), ("v", v)]:
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # dW = Σ dOᵀ O_l: check it against the reference
    qd, kd, vd = (x.detach().cpu().double() for x in (q, k, v))
    bm = classify_reference(qd, kd, topk=0.3, skip=0.2, block_q=4, block_k=4)
    w = torch.zeros(SH.d, SH.d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(SH.d, dtype=torch.float64, requires_grad=True)
    e, _, _ = sla_reference(qd, kd, vd, bm, block_q=4, block_k=4, feature_map="elu",
                            proj_weight=w, proj_bias=b)
    e.square().sum().backward()
    assert_close_rms(layer.proj.weight.grad, w.grad, 1e-4, "dW")
    assert_close_rms(layer.proj.bias.grad, b.grad, 1e-4, "db")


def test_a_trained_projection_changes_the_output(backend):
    layer = sla_numba.SparseLinearAttention(SH.d, backend=backend, **KW).to(torch_device(backend))
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(SH.d))
    q, k, v = _qkv(backend)
    o_s, o_l = sla_numba.sla_attention(q, k, v, return_parts=True, backend=backend, **KW)
    assert_close_rms(layer(q, k, v), o_s + o_l, 1e-6, "O with W = I")


@pytest.mark.slow
def test_torch_compile_fullgraph():
    q, k, v = _qkv("cpu")
    w = torch.randn(SH.d, SH.d, requires_grad=True)

    def f(q, k, v, w):
        return sla_numba.sla_attention(q, k, v, proj_weight=w, **KW).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_out = f(q, k, v, w)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v, w))
    out = compiled(q, k, v, w)
    grads = torch.autograd.grad(out, (q, k, v, w))
    assert torch.equal(out, eager_out)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)
