"""Backward: gradients w.r.t. q, k, v, proj_weight, proj_bias against reference autograd."""

import numpy as np
import pytest
import strategies as S
import torch
from helpers import assert_close_rms, for_backend, make, rel_rms, tiny
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import sla_numba
from sla_numba import _params
from sla_numba.reference import sla_reference

NAMES = ("q", "k", "v", "proj_weight", "proj_bias")


def _grads(outputs, inputs, upstream):
    """Gradients of ``outputs`` (with ``upstream``) w.r.t. ``inputs``; zeros where unused."""
    gs = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gradients_match_reference(backend, dtype):
    """dq, dk, dv, dW, db of O = O_s + O_l Wᵀ + b on random maps and shapes, every φ,
    both linear scopes, both layouts.

    float64: tight. float32: within 1e-4, or within 2x the error of the same reference run
    in float32 by torch where the problem is worse conditioned (large logits); the relative
    error's floor is larger too, since a small gradient can be the difference of O(1) terms
    (Nk = 1 makes the sparse part of dk exactly 0)."""
    tol, floor = (1e-9, 1e-2) if dtype == torch.float64 else (1e-4, 1e-1)

    @for_backend(backend)
    @given(case=S.cases(tiny=tiny(backend)), data=st.data())
    def prop(case, data):
        sh = case.shape
        w, b = data.draw(S.projections(sh.d))
        scope, layout = data.draw(S.linear_scopes), data.draw(S.layouts)
        w = (
            np.eye(sh.d) + 0.5 * np.random.default_rng(case.seed).standard_normal((sh.d, sh.d))
            if w is None
            else w
        )  # a weight always: dO_l = dO·W differs
        b = np.zeros(sh.d) if b is None else b
        leaves = [
            make(x, "torch", backend, dtype, requires_grad=True) for x in (*case.inputs(), w, b)
        ]
        bm = make(case.block_map, "torch", backend)
        do = torch.from_numpy(np.random.default_rng(case.seed + 1).standard_normal(sh.q_shape))
        o = sla_numba.sla_attention(
            *(S.to_layout(x, layout) for x in leaves[:3]),
            block_q=sh.block_q,
            block_k=sh.block_k,
            feature_map=case.feature_map,
            block_map=bm,
            proj_weight=leaves[3],
            proj_bias=leaves[4],
            backend=backend,
            linear_scope=scope,
            layout=layout,
        )
        o = S.to_layout(o, layout)
        got = _grads([o], leaves, [do.to(o)])
        ref = [x.detach().cpu().double().requires_grad_() for x in leaves]
        e, _, _ = sla_reference(
            *ref[:3],
            bm.cpu(),
            block_q=sh.block_q,
            block_k=sh.block_k,
            feature_map=case.feature_map,
            proj_weight=ref[3],
            proj_bias=ref[4],
            linear_scope=scope,
        )
        expect = _grads([e], ref, [do])
        same = expect
        if dtype != torch.float64:  # the reference in the kernel's precision
            ref32 = [x.detach().cpu().requires_grad_() for x in leaves]
            e32, _, _ = sla_reference(
                *ref32[:3],
                bm.cpu(),
                block_q=sh.block_q,
                block_k=sh.block_k,
                feature_map=case.feature_map,
                proj_weight=ref32[3],
                proj_bias=ref32[4],
                linear_scope=scope,
            )
            same = _grads([e32], ref32, [do.to(e32)])
        for name, g, x, s in zip(NAMES, got, expect, same):
            assert g.dtype == dtype
            t = max(tol, 2 * rel_rms(s, x, floor))
            assert_close_rms(g, x, t, "d" + name, floor=floor)

    prop()


def test_gradients_of_the_parts(backend):
    """return_parts: independent upstream gradients for O_s and O_l, or only one of them."""

    @for_backend(backend)
    @given(case=S.cases(tiny=tiny(backend)), which=st.sampled_from(["both", "o_s", "o_l"]))
    def prop(case, which):
        sh = case.shape
        qkv = [make(x, "torch", backend, requires_grad=True) for x in case.inputs()]
        bm = make(case.block_map, "torch", backend)
        rng = np.random.default_rng(case.seed)
        ups = [torch.from_numpy(rng.standard_normal(sh.q_shape)) for _ in range(2)]
        kw = dict(block_q=sh.block_q, block_k=sh.block_k, feature_map=case.feature_map)
        parts = sla_numba.sla_attention(
            *qkv, block_map=bm, return_parts=True, backend=backend, **kw
        )
        ref_qkv = [x.detach().cpu().requires_grad_() for x in qkv]
        _, *ref_parts = sla_reference(*ref_qkv, bm.cpu(), **kw)
        pick = {"both": [0, 1], "o_s": [0], "o_l": [1]}[which]
        got = _grads([parts[i] for i in pick], qkv, [ups[i].to(qkv[0]) for i in pick])
        expect = _grads([ref_parts[i] for i in pick], ref_qkv, [ups[i] for i in pick])
        for name, g, x in zip("qkv", got, expect):
            assert_close_rms(g, x, 1e-9, "d" + name)

    prop()


# every φ; and once with SLA_NUMBA_SAVE_STATES=1 (the gpu backward then reads the
# forward's row states; the cpu backend ignores the switch)
GRADCHECK_CASES = [(fm, "0") for fm in sorted(_params.FEATURE_MAPS)] + [("elu", "1")]


@pytest.mark.parametrize("feature_map,save_states", GRADCHECK_CASES)
def test_gradcheck(backend, feature_map, save_states, monkeypatch):
    """Finite differences in float64 on a tiny case with every kind of map row
    (under the simulator: smaller still, and gradcheck's fast mode)."""
    monkeypatch.setenv("SLA_NUMBA_SAVE_STATES", save_states)
    rng = np.random.default_rng(7)
    if tiny(backend):
        shapes = [(1, 1, 3, 2), (1, 1, 5, 2), (1, 1, 5, 2), (2, 2), (2,)]
        bm = np.array([[[[1, 0, -1], [-1, 0, 1]]]], dtype=np.int8)
    else:
        shapes = [(1, 2, 5, 3), (1, 2, 7, 3), (1, 2, 7, 3), (3, 3), (3,)]
        bm = np.array(
            [
                [[1, 0, -1, 0], [-1, -1, 0, 0], [1, 1, -1, 1]],
                [[0, 0, 0, 0], [-1, -1, -1, -1], [1, 0, 1, -1]],
            ],
            dtype=np.int8,
        )[None]
    leaves = [make(rng.standard_normal(s), "torch", backend, requires_grad=True) for s in shapes]
    bm = make(bm, "torch", backend)

    def fn(q, k, v, w, b):
        return sla_numba.sla_attention(
            q,
            k,
            v,
            block_q=2,
            block_k=2,
            block_map=bm,
            feature_map=feature_map,
            proj_weight=w,
            proj_bias=b,
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=tiny(backend))


class _CaptureOps(TorchDispatchMode):
    """Records every call of an ``sla_numba::*`` custom op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sla_numba":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


@pytest.mark.parametrize("save_states", ["0", "1"])
def test_opcheck_on_the_custom_ops(backend, save_states, monkeypatch):
    """torch.library.opcheck on the classify / forward / backward ops as the API calls them;
    with SLA_NUMBA_SAVE_STATES=1 the gpu forward op returns its row states (the fake
    kernel's shape and dtype checked against them) and the backward op reads them; the
    cpu backend ignores the switch."""
    monkeypatch.setenv("SLA_NUMBA_SAVE_STATES", save_states)
    sh = S.Shape(1, 1, 5, 6, 2, 2, 2) if tiny(backend) else S.Shape(1, 2, 9, 7, 4, 4, 2)
    q, k, v = (make(x, "torch", backend, requires_grad=True) for x in S.qkv(sh, 3))
    with _CaptureOps() as cap:
        o = sla_numba.sla_attention(
            q,
            k,
            v,
            topk=0.5,
            skip=0.25,
            block_q=sh.block_q,
            block_k=sh.block_k,
            feature_map="elu",
            backend=backend,
        )
        o.sum().backward()
    seen = {func.name() for func, _, _ in cap.calls}
    assert {"sla_numba::classify", "sla_numba::forward", "sla_numba::backward"} <= seen, seen
    saved = backend == "gpu" and save_states == "1"
    for func, args, kwargs in cap.calls:  # (an argument at its default may be left out)
        if func.name() == "sla_numba::forward":
            assert (args[11] if len(args) > 11 else kwargs.get("save_states", False)) == saved
        if func.name() == "sla_numba::backward":
            states = args[16] if len(args) > 16 else kwargs.get("row_states")
            assert (states is not None) == saved
            if saved:
                assert states.shape[:3] == (1, sh.h, sh.mq) and states.dtype == torch.float64
    for func, args, kwargs in cap.calls:
        args = [
            a.detach().clone().requires_grad_(a.is_floating_point() and "forward" in func.name())
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        ]
        torch.library.opcheck(func, args, kwargs)
