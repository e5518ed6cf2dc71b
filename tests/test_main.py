"""The main job (``python -m sla_numba``): runs end to end and reports what it measured."""
import io

import numpy as np

from sla_numba import __main__ as main_job
from sla_numba import reference


def test_main_job_table_is_consistent():
    out = io.StringIO()
    args = main_job.argparse.Namespace(
        batch=1, heads=2, frames=2, height=8, width=8, dim=16, block=16, topk=0.25,
        skip=0.25, backend="cpu", repeats=1, seed=0)
    rows = main_job.run(args, out=out)
    text = out.getvalue()
    assert "critical / marginal / negligible" in text
    # 128 tokens in blocks of 16: Mk = 8, n_crit = 2, n_skip = 2 -> 25 % / 50 % / 25 %
    assert rows["critical / marginal / negligible"] == "25.0 % / 50.0 % / 25.0 %"
    errs = [float(rows[k]) for k in rows if k.startswith("error vs dense")]
    assert len(errs) == 3 and all(np.isfinite(e) and e >= 0 for e in errs)
    assert rows["speed-up of SLA over dense"].endswith("x")


def test_video_like_input_is_local_attention():
    """The demo input has the structure SLA is built for: the critical blocks hold
    far more of each query's attention mass than their share of the keys (on
    unstructured random data the two would be about equal)."""
    q, k, v = main_job.video_like_qkv(1, 1, 2, 8, 8, 16, seed=0)
    scale = 1 / np.sqrt(16)
    dense = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(dense - dense.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    block_map = reference.classify_reference(q, k, topk=0.25, skip=0.0, block_q=16, block_k=16)
    mask = reference.expand_block_map(np.asarray(block_map), 128, 128, 16, 16) == 1
    crit_mass = (p * mask).sum(-1).mean()
    share = mask.mean()                     # 25 % of the keys
    assert crit_mass > 1.5 * share, (crit_mass, share)


def test_fit_projection_recovers_a_known_projection():
    rng = np.random.default_rng(0)
    o_s = rng.standard_normal((1, 2, 300, 8))
    o_l = rng.standard_normal((1, 2, 300, 8))
    w = rng.standard_normal((8, 8))
    b = rng.standard_normal(8)
    target = o_s + o_l @ w.T + b
    w_fit, b_fit = main_job.fit_projection(o_s, o_l, target, ridge=0.0)
    np.testing.assert_allclose(w_fit, w, atol=1e-8)
    np.testing.assert_allclose(b_fit, b, atol=1e-8)
