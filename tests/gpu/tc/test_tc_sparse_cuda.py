"""Tensor-core sparse kernels on a real GPU (skipped without CUDA / under the simulator).

bf16 / fp16 against a float64 dense masked-softmax oracle; for full-critical maps
the error must be at most 2x that of torch's own bf16 SDPA on the same inputs.
"""

import pytest
import torch
from _tc_reference import dense_reference, full_lut, random_lut
from numba import config

from sla_numba._params import LSE_EMPTY


def _has_cuda():
    if config.ENABLE_CUDASIM or not torch.cuda.is_available():
        return False
    from numba import cuda

    return cuda.is_available() and cuda.get_current_device().compute_capability >= (8, 0)


pytestmark = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU with cc >= 8.0")


def _run(q, k, v, do, lut, counts, bq, bk, scale):
    from sla_numba.gpu.tc import backward as backward_tc
    from sla_numba.gpu.tc import forward as forward_tc

    o, lse = forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, scale)
    rev, rcnt = backward_tc.reverse_index(lut, counts, -(-k.shape[2] // bk))
    grads = backward_tc.sparse_backward_tc(
        q, k, v, o, lse, do, lut, counts, rev, rcnt, bq, bk, scale
    )
    torch.cuda.synchronize()
    return o, lse, grads


def _inputs(dtype, B, H, Nq, Nk, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n: torch.randn(B, H, n, D, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(Nq), mk(Nk), mk(Nk), mk(Nq)


def _maxerr(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize(
    "dtype,D,bq,bk,Nq,Nk",
    [
        (torch.bfloat16, 128, 128, 64, 1000, 1000),
        (torch.bfloat16, 64, 64, 64, 777, 1100),
        (torch.float16, 128, 64, 64, 515, 300),
    ],
)
def test_sparse_matches_float64(dtype, D, bq, bk, Nq, Nk):
    from sla_numba.testing import poisoned

    B, H = 2, 3
    q, k, v, do = _inputs(dtype, B, H, Nq, Nk, D, seed=D)
    mq, mk = -(-Nq // bq), -(-Nk // bk)
    lut, counts = random_lut(B, H, mq, mk, 4, seed=D)
    lut, counts = lut.cuda(), counts.cuda()
    scale = D**-0.5
    with poisoned():
        o, lse, (dq, dk, dv) = _run(q, k, v, do, lut, counts, bq, bk, scale)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ro, rlse = dense_reference(qd, kd, vd, lut, counts, bq, bk, scale)
    ro.backward(do.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert _maxerr(o, ro.detach()) < tol
    empty = torch.isinf(rlse.detach())
    assert empty.any()
    assert (lse[empty] == LSE_EMPTY).all() and (o[empty] == 0).all()
    assert _maxerr(lse[~empty], rlse.detach()[~empty]) < 1e-3
    for got, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert torch.isfinite(got).all()
        assert _maxerr(got, want) < 3 * tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("D,bq", [(128, 128), (64, 64)])
def test_full_critical_within_2x_of_torch_sdpa(D, bq):
    B, H, N, bk = 1, 4, 1024, 64
    q, k, v, do = _inputs(torch.bfloat16, B, H, N, N, D, seed=7)
    lut, counts = full_lut(B, H, N // bq, N // bk)
    o, lse, (dq, dk, dv) = _run(q, k, v, do, lut.cuda(), counts.cuda(), bq, bk, D**-0.5)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ro = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
    ro.backward(do.double())
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    tb = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb)
    tb.backward(do)
    pairs = [(o, tb, ro), (dq, qb.grad, qd.grad), (dk, kb.grad, kd.grad), (dv, vb.grad, vd.grad)]
    for ours, torch_bf16, ref in pairs:
        ours_err, torch_err = _maxerr(ours, ref.detach()), _maxerr(torch_bf16, ref.detach())
        assert ours_err <= 2 * torch_err, (ours_err, torch_err)


def test_deterministic_and_on_current_stream():
    B, H, N, D, bq, bk = 1, 2, 600, 64, 64, 64
    q, k, v, do = _inputs(torch.bfloat16, B, H, N, N, D, seed=3)
    lut, counts = random_lut(B, H, -(-N // bq), -(-N // bk), 5, seed=3)
    lut, counts = lut.cuda(), counts.cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        first = _run(q, k, v, do, lut, counts, bq, bk, 0.125)
    second = _run(q, k, v, do, lut, counts, bq, bk, 0.125)
    flat = lambda r: [r[0], r[1], *r[2]]  # noqa: E731
    for a, b in zip(flat(first), flat(second)):
        assert torch.equal(a, b)


def test_kernels_do_not_spill():
    from sla_numba.gpu.tc import backward as backward_tc
    from sla_numba.gpu.tc import forward as forward_tc

    for D, bq in ((128, 128), (64, 64)):
        kernels = [("fwd", forward_tc.make_sparse_forward(D, 64, bq, "bf16").kernel)]
        for which in backward_tc.KERNELS:
            kern = backward_tc.make_sparse_backward(which, D, 64, bq, "bf16").kernel
            kernels.append((which, kern))
        for name, kern in kernels:
            for compiled in kern.overloads.values():
                local = compiled.local_mem_per_thread
                assert local <= 64, (name, D, bq, local)


_CACHE_PROBE = """
import sys
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
from sla_numba.gpu.tc import backward as backward_tc
kern = backward_tc.make_sparse_backward("dq", 64, 64, 64, "f16").kernel
kern.compile(backward_tc.signature("dq"))
print("hits", sum(kern._cache_hits.values()), "misses", sum(kern._cache_misses.values()))
"""


def test_factory_kernels_hit_the_disk_cache_across_processes(tmp_path):
    """A closure kernel's cache key hashes its pickled closure (device functions and the
    intrinsics they call): the pinned intrinsic uuids make it the same in every process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(tmp_path),
        SLA_NUMBA_CACHE_DIR=str(tmp_path),
        PYTHONPATH=root,
    )
    env.pop("SLA_NUMBA_NO_CACHE", None)
    runs = [
        subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.split()[-4:] == ["hits", "0", "misses", "1"], runs[0].stdout
    assert runs[1].stdout.split()[-4:] == ["hits", "1", "misses", "0"], runs[1].stdout
