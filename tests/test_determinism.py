"""Same input, same bits: maps, outputs and gradients, run after run."""

import numpy as np
import strategies as S
import torch
from helpers import make, tiny

import sla_numba


def _run(backend, sh, arrays, bm):
    leaves = [make(x, "torch", backend, requires_grad=True) for x in arrays]
    kw = dict(topk=0.3, skip=0.2, block_q=sh.block_q, block_k=sh.block_k, backend=backend)
    cls = sla_numba.classify_blocks(*leaves[:2], **kw)
    o = sla_numba.sla_attention(
        *leaves[:3], proj_weight=leaves[3], proj_bias=leaves[4], block_map=bm, **kw
    )
    o.backward(torch.ones_like(o))
    outs = [cls.map, cls.lut, o] + [x.grad for x in leaves]
    return [x.detach().cpu().clone() for x in outs]


def test_bitwise_repeatable(backend):
    # big enough for several parallel chunks on the CPU, tiny under the simulator
    sh = S.Shape(1, 1, 9, 7, 3, 4, 2) if tiny(backend) else S.Shape(2, 3, 150, 130, 32, 16, 16)
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(s).astype(np.float32)
        for s in (sh.q_shape, sh.k_shape, sh.k_shape, (sh.d, sh.d), (sh.d,))
    ]
    bm = make(S.random_block_map(sh, 0), "torch", backend)
    first = _run(backend, sh, arrays, bm)
    for _ in range(2):
        again = _run(backend, sh, arrays, bm)
        for name, a, b in zip(["map", "lut", "o", "dq", "dk", "dv", "dW", "db"], first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"
