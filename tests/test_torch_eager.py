"""Eager calls skip torch's custom-op layer (``torch_ops.py``, section 3).

The eager way (an autograd.Function over the same implementations) and the custom ops
(``SLA_NUMBA_TORCH_OPS=always``) must give the same bits: outputs and every gradient,
on awkward shapes; the eager way must not be taken where torch needs the ops.
"""

import pytest
import torch
from helpers import simulator_on

import sla_numba
from sla_numba import torch_ops


def _spy_eager(monkeypatch):
    taken = []
    real = torch_ops._eager

    def spy(*tensors):
        taken.append(real(*tensors))
        return taken[-1]

    monkeypatch.setattr(torch_ops, "_eager", spy)
    return taken


def _run(dtype, proj, return_parts):
    g = torch.Generator().manual_seed(7)
    B, H, Nq, Nk, D = 2, 3, 37, 45, 8
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Nk, D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(D, D, generator=g, dtype=dtype, requires_grad=True) if proj else None
    out = sla_numba.sla_attention(
        q, k, v, topk=0.3, skip=0.2, block_q=16, block_k=16, proj_weight=w,
        return_parts=return_parts, backend="cpu",
    )  # fmt: skip
    outs = out if return_parts else (out,)
    loss = sum(
        (o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
        for o in outs
    )
    loss.backward()
    grads = [t.grad for t in (q, k, v, w) if t is not None]
    return [o.detach() for o in outs] + grads


@pytest.mark.parametrize(
    "dtype,proj,return_parts",
    [(torch.float32, False, False), (torch.float64, True, False), (torch.float32, False, True)],
)
def test_eager_and_custom_op_ways_give_the_same_bits(monkeypatch, dtype, proj, return_parts):
    taken = _spy_eager(monkeypatch)
    monkeypatch.delenv("SLA_NUMBA_TORCH_OPS", raising=False)
    eager = _run(dtype, proj, return_parts)
    assert taken and all(taken), taken  # classify and forward went the eager way
    taken.clear()
    monkeypatch.setenv("SLA_NUMBA_TORCH_OPS", "always")
    ops = _run(dtype, proj, return_parts)
    assert taken and not any(taken), taken
    assert len(eager) == len(ops)
    for a, b in zip(eager, ops):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_custom_ops_are_used_where_torch_needs_them(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.zeros(1, 1, 4, 8)
    assert torch_ops._eager(x, x)
    with FakeTensorMode():
        assert not torch_ops._eager(x, x)  # a dispatch mode is active
    assert torch_ops._eager(x, torch.nn.Parameter(x))  # a leaf parameter is plain

    class Sub(torch.Tensor):
        pass

    assert not torch_ops._eager(x, x.as_subclass(Sub))  # a tensor subclass
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not torch_ops._eager(x, x)
    monkeypatch.undo()
    monkeypatch.setenv("SLA_NUMBA_TORCH_OPS", "always")
    assert not torch_ops._eager(x, x)
    monkeypatch.setenv("SLA_NUMBA_TORCH_OPS", "sometimes")
    with pytest.raises(ValueError, match="SLA_NUMBA_TORCH_OPS"):
        torch_ops._eager(x, x)


def test_eager_way_refuses_double_backward():
    q, k, v = (torch.randn(1, 1, 20, 8, requires_grad=True) for _ in range(3))
    o = sla_numba.sla_attention(q, k, v, topk=0.5, skip=0.0, block_q=8, block_k=8, backend="cpu")
    (gq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        gq.sum().backward()


def _forward_nodes(grad_fn):
    """The autograd nodes of the SLA forward op (eager: ``_EagerForward``; ops: torch's
    generated node) reachable from ``grad_fn``."""
    seen, stack, found = set(), [grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Forward" in type(node).__name__ or "forward" in type(node).__name__:
            found.append(node)
        stack += [f for f, _ in node.next_functions]
    return found


@pytest.mark.gpu
@pytest.mark.skipif(not simulator_on(), reason="host tensors with backend='gpu': simulator only")
def test_saved_row_states_same_bits_both_ways(monkeypatch):
    """SLA_NUMBA_SAVE_STATES=1 on the gpu backend (simulated without a GPU): the forward
    keeps one tensor more for the backward (the row states; none more with 0), the
    backend backward receives it, and the output and gradients are the same bits as
    with 0, the eager way and through the custom ops alike."""
    gpu = pytest.importorskip("sla_numba.gpu")
    monkeypatch.setenv("SLA_NUMBA_COMPILE_WORKERS", "0")
    received = []
    real = gpu.backward

    def spy(*args, **kwargs):
        received.append(kwargs.get("row_states"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu, "backward", spy)

    def run(save, ops):
        monkeypatch.setenv("SLA_NUMBA_SAVE_STATES", save)
        monkeypatch.setenv("SLA_NUMBA_TORCH_OPS", ops)
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 2, n, 8, generator=g, requires_grad=True) for n in (20, 21, 21))
        o = sla_numba.sla_attention(
            q, k, v, topk=0.4, skip=0.2, block_q=8, block_k=8, feature_map="softmax",
            backend="gpu",
        )  # fmt: skip
        (node,) = _forward_nodes(o.grad_fn)
        n_saved = len(node.saved_tensors)
        o.square().sum().backward()
        return n_saved, [o.detach(), q.grad, k.grad, v.grad]

    n_plain, plain = run("0", "auto")
    assert n_plain == 7 and received == [None]
    for ops in ("auto", "always"):
        received.clear()
        n_saved, got = run("1", ops)
        assert n_saved == 8, ops
        (states,) = received
        assert states is not None and states.shape[:3] == (1, 2, 3) and states.dtype.itemsize == 4
        for a, b in zip(got, plain):
            assert torch.equal(a, b), ops
    received.clear()
    n_ops, _ = run("0", "always")
    assert n_ops == 7 and received == [None]

    # no backward can follow (no_grad): the forward is not asked for its states
    asked = []
    real_fwd = gpu.forward
    monkeypatch.setattr(gpu, "forward", lambda *a, **kw: (asked.append(kw), real_fwd(*a, **kw))[1])
    monkeypatch.setenv("SLA_NUMBA_SAVE_STATES", "1")
    q = torch.randn(1, 1, 16, 8)
    with torch.no_grad():
        sla_numba.sla_attention(q, q, q, topk=0.5, skip=0.0, block_q=8, block_k=8, backend="gpu")
    assert asked == [{}]
