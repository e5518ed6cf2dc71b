"""SparseLinearAttention and torch.compile."""

import pytest
import strategies as S
import torch
from helpers import assert_close_rms, make, torch_device

import sla_numba
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
    bm = classify_reference(
        q.detach().cpu(),
        k.detach().cpu(),
        **{x: KW[x] for x in ("topk", "skip", "block_q", "block_k")},
    )
    _, e_s, _ = sla_reference(
        *(x.detach().cpu().double() for x in (q, k, v)), bm, block_q=4, block_k=4
    )
    assert_close_rms(out, e_s, 1e-4, "O")


def test_gradients_reach_the_projection_and_inputs(backend):
    layer = sla_numba.SparseLinearAttention(SH.d, backend=backend, **KW).to(torch_device(backend))
    q, k, v = _qkv(backend)
    layer(q, k, v).square().sum().backward()
    for name, t in [
        ("proj.weight", layer.proj.weight),
        ("proj.bias", layer.proj.bias),
        ("q", q),
        ("k", k),
        ("v", v),
    ]:
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # dW = Σ dOᵀ O_l: check it against the reference
    qd, kd, vd = (x.detach().cpu().double() for x in (q, k, v))
    bm = classify_reference(qd, kd, topk=0.3, skip=0.2, block_q=4, block_k=4)
    w = torch.zeros(SH.d, SH.d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(SH.d, dtype=torch.float64, requires_grad=True)
    e, _, _ = sla_reference(
        qd, kd, vd, bm, block_q=4, block_k=4, feature_map="elu", proj_weight=w, proj_bias=b
    )
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


# --------------------------------------------------------------------------- published checkpoints
def _official_state_dict(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "proj_l.weight": 0.3 * torch.randn(d, d, generator=g),
        "proj_l.bias": 0.1 * torch.randn(d, generator=g),
    }


def _official_math(q, k, v, block_map, w, b, block, feature_map):
    """What the published main-branch module computes (float64, dense): block-sparse
    softmax over the top-k blocks, plus ``proj_l`` of linear attention over ALL keys,
    ``φ(q)(φ(K)ᵀV) / (1e-5 + φ(q)·Σφ(k))``."""
    _, o_s, _ = sla_reference(q, k, v, block_map, block_q=block, block_k=block)
    phi = sla_numba.reference.feature_map_fn(feature_map)
    fq, fk = phi(q), phi(k)
    o_l = (fq @ (fk.transpose(-1, -2) @ v)) / (
        1e-5 + (fq * fk.sum(-2, keepdim=True)).sum(-1, keepdim=True)
    )
    return o_s + o_l @ w.T + b


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_official_checkpoint_loads_and_matches(feature_map):
    sd = _official_state_dict(SH.d)
    layer = sla_numba.SparseLinearAttention.from_official(sd, 0.4, feature_map, 4, 4, backend="cpu")
    by_hand = sla_numba.SparseLinearAttention(
        SH.d,
        topk=0.4,
        skip=0.0,
        block_q=4,
        block_k=4,
        feature_map=feature_map,
        linear_scope="global",
        eps=1e-5,
        backend="cpu",
    )
    with torch.no_grad():
        by_hand.proj.weight.copy_(sd["proj_l.weight"])
        by_hand.proj.bias.copy_(sd["proj_l.bias"])
    q, k, v = _qkv("cpu")
    out = layer(q, k, v)
    assert torch.equal(out, by_hand(q, k, v))
    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    bm = classify_reference(qd, kd, topk=0.4, skip=0.0, block_q=4, block_k=4)
    assert (bm != -1).all()  # the published code skips nothing
    expect = _official_math(
        qd, kd, vd, bm, sd["proj_l.weight"].double(), sd["proj_l.bias"].double(), 4, feature_map
    )
    assert_close_rms(out, expect, 1e-4, "O vs the published formula")


def test_official_sla1_branch_is_marginal_and_arguments_are_checked():
    sd = _official_state_dict(SH.d)
    layer = sla_numba.SparseLinearAttention.from_official(sd, 0.4, branch="SLA-1")
    assert (layer.linear_scope, layer.skip, layer.eps, layer.block_q) == ("marginal", 0.0, 1e-5, 64)
    assert torch.equal(layer.proj.weight, sd["proj_l.weight"])
    with pytest.raises(ValueError, match="branch"):
        sla_numba.SparseLinearAttention.from_official(sd, 0.4, branch="dev")
    with pytest.raises(ValueError, match="state_dict"):
        sla_numba.SparseLinearAttention.from_official({"proj.weight": sd["proj_l.weight"]}, 0.4)
    with pytest.raises(ValueError, match="topk"):
        sla_numba.SparseLinearAttention.from_official(sd, 0.0)
    with pytest.raises(ValueError, match="feature_map"):
        sla_numba.SparseLinearAttention.from_official(sd, 0.4, "hedgehog")
    with pytest.raises(TypeError, match="use_bf16"):
        sla_numba.SparseLinearAttention.from_official(sd, 0.4, use_bf16="yes")


def test_layout_and_linear_scope_are_validated_by_name():
    q = torch.zeros(1, 5, 2, 4)
    with pytest.raises(ValueError, match="layout"):
        sla_numba.sla_attention(q, q, q, layout="BNDH")
    with pytest.raises(ValueError, match="linear_scope"):
        sla_numba.sla_attention(q, q, q, linear_scope="all")
    with pytest.raises(ValueError, match="layout"):
        sla_numba.SparseLinearAttention(4, layout="bnhd")
    with pytest.raises(ValueError, match="linear_scope"):
        sla_numba.SparseLinearAttention(4, linear_scope=None)


def test_bnhd_layout_reads_views_and_returns_the_callers_layout():
    """layout="BNHD": (B, N, H, D) in, (B, N, H, D) out, equal to BHND on the transposes."""
    q, k, v = (x.detach() for x in _qkv("cpu"))
    o = sla_numba.sla_attention(q, k, v, backend="cpu", **KW)
    got = sla_numba.sla_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), layout="BNHD", backend="cpu", **KW
    )
    assert got.shape == (SH.b, SH.nq, SH.h, SH.d)
    assert torch.equal(got.transpose(1, 2), o)
    c1 = sla_numba.classify_blocks(
        q, k, backend="cpu", **{x: KW[x] for x in ("topk", "skip", "block_q", "block_k")}
    )
    c2 = sla_numba.classify_blocks(
        q.transpose(1, 2),
        k.transpose(1, 2),
        layout="BNHD",
        backend="cpu",
        **{x: KW[x] for x in ("topk", "skip", "block_q", "block_k")},
    )
    assert torch.equal(c1.map, c2.map)
