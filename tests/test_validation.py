"""Bad input: a ValueError / TypeError naming the argument. NaN input: the documented behaviour."""

import re

import numpy as np
import pytest
import strategies as S
import torch
from helpers import HAS_CUDA, make, simulator_on, to_numpy

import sla_numba

rng = np.random.default_rng(0)
Q = rng.standard_normal((1, 2, 10, 4)).astype(np.float32)
K = rng.standard_normal((1, 2, 12, 4)).astype(np.float32)
V = rng.standard_normal((1, 2, 12, 4)).astype(np.float32)
MAP = np.zeros((1, 2, 3, 3), np.int8)  # block_q = block_k = 4 below
KW = dict(block_q=4, block_k=4)


# (id, argument named in the message, exception type(s), keyword overrides of the call)
ATTENTION_CASES = [
    ("q-rank3", "q", ValueError, dict(q=Q[0])),
    ("k-rank5", "k", ValueError, dict(k=K[None])),
    ("v-rank2", "v", ValueError, dict(v=V[0, 0])),
    ("k-batch", "k", ValueError, dict(k=np.concatenate([K, K]))),
    ("k-heads", "k", ValueError, dict(k=K[:, :1])),
    ("k-headdim", "k", ValueError, dict(k=K[..., :3])),
    ("v-headdim", "v", ValueError, dict(v=V[..., :3])),
    ("v-tokens", "v", ValueError, dict(v=V[:, :, :11])),
    ("k-dtype", "k", TypeError, dict(k=K.astype(np.float64))),
    ("v-dtype", "v", TypeError, dict(v=V.astype(np.float16))),
    ("q-int", "q", TypeError, dict(q=Q.astype(np.int32))),
    ("k-int", "k", TypeError, dict(k=K.astype(np.int64))),
    ("q-list", "q", TypeError, dict(q=Q.tolist())),
    ("k-torch-q-numpy", "k", TypeError, dict(k=torch.from_numpy(K))),
    ("q-empty-tokens", "q", ValueError, dict(q=Q[:, :, :0])),
    ("k-empty-tokens", "k", ValueError, dict(k=K[:, :, :0], v=V[:, :, :0])),
    ("q-empty-batch", "q", ValueError, dict(q=Q[:0], k=K[:0], v=V[:0])),
    ("q-headdim-0", "q", ValueError, dict(q=Q[..., :0], k=K[..., :0], v=V[..., :0])),
    ("topk-0", "topk", ValueError, dict(topk=0.0)),
    ("topk-neg", "topk", ValueError, dict(topk=-0.1)),
    ("topk-big", "topk", ValueError, dict(topk=1.5)),
    ("topk-nan", "topk", ValueError, dict(topk=float("nan"))),
    ("topk-str", "topk", TypeError, dict(topk="0.1")),
    ("skip-neg", "skip", ValueError, dict(skip=-0.1)),
    ("skip-1", "skip", ValueError, dict(skip=1.0)),
    ("skip-nan", "skip", ValueError, dict(skip=float("nan"))),
    ("block_q-0", "block_q", ValueError, dict(block_q=0)),
    ("block_q-neg", "block_q", ValueError, dict(block_q=-4)),
    ("block_q-float", "block_q", TypeError, dict(block_q=4.0)),
    ("block_k-0", "block_k", ValueError, dict(block_k=0)),
    ("block_k-bool", "block_k", TypeError, dict(block_k=True)),
    ("feature_map", "feature_map", ValueError, dict(feature_map="gelu")),
    ("feature_map-none", "feature_map", ValueError, dict(feature_map=None)),
    ("backend", "backend", ValueError, dict(backend="tpu")),
    ("backend-none", "backend", ValueError, dict(backend=None)),
    ("scale-0", "scale", ValueError, dict(scale=0.0)),
    ("scale-nan", "scale", ValueError, dict(scale=float("nan"))),
    ("scale-inf", "scale", ValueError, dict(scale=float("inf"))),
    ("scale-str", "scale", TypeError, dict(scale="1")),
    ("eps-neg", "eps", ValueError, dict(eps=-1e-6)),
    ("eps-nan", "eps", ValueError, dict(eps=float("nan"))),
    ("block_map-shape", "block_map", ValueError, dict(block_map=MAP[:, :, :2])),
    ("block_map-shape-k", "block_map", ValueError, dict(block_map=MAP[..., :2])),
    ("block_map-float", "block_map", TypeError, dict(block_map=MAP.astype(np.float32))),
    ("block_map-values", "block_map", ValueError, dict(block_map=MAP + 2)),
    (
        "block_map-value-minus2",
        "block_map",
        ValueError,
        dict(block_map=np.where(np.arange(3) == 1, -2, 0).astype(np.int8) + MAP),
    ),
    ("block_map-torch", "block_map", TypeError, dict(block_map=torch.from_numpy(MAP))),
    ("proj_weight-shape", "proj_weight", ValueError, dict(proj_weight=np.ones((4, 5), np.float32))),
    ("proj_weight-rank", "proj_weight", ValueError, dict(proj_weight=np.ones(4, np.float32))),
    ("proj_weight-int", "proj_weight", TypeError, dict(proj_weight=np.ones((4, 4), np.int32))),
    ("proj_weight-torch", "proj_weight", TypeError, dict(proj_weight=torch.ones(4, 4))),
    (
        "proj_bias-shape",
        "proj_bias",
        ValueError,
        dict(proj_weight=np.ones((4, 4), np.float32), proj_bias=np.ones(5, np.float32)),
    ),
    ("proj_bias-alone", "proj_bias", ValueError, dict(proj_bias=np.ones(4, np.float32))),
    ("return_parts", "return_parts", TypeError, dict(return_parts="yes")),
]


def _expect_error(fn, name, exc, **kwargs):
    with pytest.raises(exc) as info:
        fn(**kwargs)
    assert re.search(rf"\b{name}\b", str(info.value)), (
        f"message does not name {name!r}: {info.value}"
    )


@pytest.mark.parametrize(
    "name, exc, changes", [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES]
)
def test_sla_attention_rejects(name, exc, changes):
    args = dict(q=Q, k=K, v=V, **KW)
    args.update(changes)
    _expect_error(sla_numba.sla_attention, name, exc, **args)


@pytest.mark.parametrize(
    "name, exc, changes", [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES]
)
def test_sla_attention_rejects_torch(name, exc, changes):
    """The same bad arguments, passed as torch tensors."""
    conv = {
        key: (
            torch.from_numpy(np.ascontiguousarray(val))
            if isinstance(val, np.ndarray)
            else np.asarray(val)
            if isinstance(val, torch.Tensor)
            else val
        )
        for key, val in changes.items()
    }
    args = dict(q=torch.from_numpy(Q), k=torch.from_numpy(K), v=torch.from_numpy(V), **KW)
    args.update(conv)
    _expect_error(sla_numba.sla_attention, name, exc, **args)


CLASSIFY_CASES = [
    c
    for c in ATTENTION_CASES
    if c[1] in ("q", "k", "topk", "skip", "block_q", "block_k", "backend", "scale")
    and "v" not in c[3]
]


@pytest.mark.parametrize(
    "name, exc, changes", [c[1:] for c in CLASSIFY_CASES], ids=[c[0] for c in CLASSIFY_CASES]
)
def test_classify_blocks_rejects(name, exc, changes):
    args = dict(q=Q, k=K, **KW)
    args.update(changes)
    _expect_error(sla_numba.classify_blocks, name, exc, **args)


@pytest.mark.parametrize(
    "name, changes",
    [
        ("head_dim", dict(head_dim=0)),
        ("topk", dict(topk=2.0)),
        ("skip", dict(skip=-1.0)),
        ("block_q", dict(block_q=0)),
        ("block_k", dict(block_k=1.5)),
        ("feature_map", dict(feature_map="tanh")),
        ("backend", dict(backend="npu")),
    ],
)
def test_module_rejects(name, changes):
    args = dict(head_dim=4)
    args.update(changes)
    _expect_error(sla_numba.SparseLinearAttention, name, (ValueError, TypeError), **args)


@pytest.mark.skipif(simulator_on(), reason="the simulator lets backend='gpu' take host tensors")
def test_gpu_backend_refuses_host_torch_tensors():
    q, k, v = (torch.from_numpy(x) for x in (Q, K, V))
    _expect_error(
        sla_numba.sla_attention,
        "backend",
        (ValueError, RuntimeError),
        q=q,
        k=k,
        v=v,
        backend="gpu",
        **KW,
    )


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_devices_must_match():
    q, k, v = (torch.from_numpy(x) for x in (Q, K, V))
    _expect_error(sla_numba.sla_attention, "k", ValueError, q=q.cuda(), k=k, v=v.cuda(), **KW)
    _expect_error(
        sla_numba.sla_attention,
        "block_map",
        ValueError,
        q=q.cuda(),
        k=k.cuda(),
        v=v.cuda(),
        block_map=torch.from_numpy(MAP),
        **KW,
    )
    _expect_error(
        sla_numba.sla_attention,
        "backend",
        ValueError,
        q=q.cuda(),
        k=k.cuda(),
        v=v.cuda(),
        backend="cpu",
        **KW,
    )


# --------------------------------------------------------------------------- NaN / Inf
def _nan_setup(backend, where):
    sh = S.Shape(1, 1, 8, 12, 3, 4, 4)  # Mq = 2, Mk = 3
    q, k, v = S.qkv(sh, 4, np.float32)
    {"q": q, "k": k, "v": v}[where][0, 0, 5, 1] = np.nan  # q row 5 / key token 5 (block 1)
    bm = np.array(
        [
            [
                [
                    [1, 0, -1],  # query block 0: key block 1 marginal
                    [-1, 1, 0],
                ]
            ]
        ],
        np.int8,
    )  # query block 1: key block 1 critical
    return sh, [make(x, "torch", backend, requires_grad=True) for x in (q, k, v)], bm


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_to_the_rows_that_use_it(backend, where):
    """docs/algorithm.md §4: not checked, no crash; the rows whose critical or marginal sets
    touch a NaN come out NaN (a NaN query row: that row, and only that row)."""
    sh, leaves, bm = _nan_setup(backend, where)
    for block_map in (make(bm, "torch", backend), None):
        o = sla_numba.sla_attention(
            *leaves,
            topk=0.34,
            skip=0.34,
            block_q=4,
            block_k=4,
            block_map=block_map,
            backend=backend,
        )
        o.sum().backward()  # no crash in the backward either
        bad = np.isnan(to_numpy(o)).any(-1)[0, 0]
        if where == "q":
            np.testing.assert_array_equal(bad, np.arange(8) == 5)
        elif block_map is not None:  # key block 1 is marginal or critical in every row
            assert bad.all(), bad


def test_inf_input_does_not_crash(backend):
    sh, leaves, bm = _nan_setup(backend, "k")
    with torch.no_grad():
        for x in leaves:
            x.nan_to_num_(posinf=np.inf)
        leaves[0][0, 0, 2, 0] = np.inf
        leaves[1][0, 0, 0, 2] = -np.inf
    o = sla_numba.sla_attention(
        *leaves, topk=0.34, skip=0.34, block_q=4, block_k=4, backend=backend
    )
    o.sum().backward()
    assert tuple(o.shape) == sh.q_shape
