"""The dense reference for SLA: plain PyTorch, no Numba, the oracle for every backend.

Everything here is written to be read, not to be fast: the block map is expanded
to a token-level mask and attention is computed as full (Nq × Nk) matrices.
Pass float64 tensors to get float64 results and exact gradients through
autograd; numpy arrays are converted to float64 tensors and come back as numpy.

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``:
``q`` (B, H, Nq, D); ``k``, ``v`` (B, H, Nk, D); block map (B, H, Mq, Mk) with
``Mq = ceil(Nq / block_q)``, ``Mk = ceil(Nk / block_k)`` and values
1 (critical), 0 (marginal), -1 (negligible).

Example::

    >>> import torch
    >>> from sla_numba.reference import classify_reference, sla_reference
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    ...            for _ in range(3))
    >>> m = classify_reference(q, k, topk=0.25, skip=0.25, block_q=8, block_k=8)
    >>> tuple(m.shape), m.dtype
    ((1, 2, 5, 5), torch.int8)
    >>> o, o_s, o_l = sla_reference(q, k, v, m, block_q=8, block_k=8)
    >>> torch.allclose(o, o_s + o_l)                 # no projection: O = O_s + O_l
    True
"""

import math

import numpy as np
import torch

from . import _params

__all__ = [
    "pool_blocks",
    "block_scores",
    "classify_reference",
    "expand_block_map",
    "feature_map_fn",
    "sla_reference",
]


# --------------------------------------------------------------------------- helpers
def _as_torch(x, dtype=None):
    """(tensor, was_numpy): numpy arrays become float64 (or ``dtype``) tensors."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(dtype or (torch.float64 if t.is_floating_point() else t.dtype)), True
    if isinstance(x, torch.Tensor):
        return (x if dtype is None else x.to(dtype)), False
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def _pad_rows(x, block):
    """Zero-pad dim -2 of ``x`` to a multiple of ``block`` -> (..., M, block, D)."""
    n = x.shape[-2]
    m = _params.n_blocks(n, block)
    pad = m * block - n
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
    return x.reshape(*x.shape[:-2], m, block, x.shape[-1])


# --------------------------------------------------------------------------- classification
def pool_blocks(x, block):
    """Mean of the valid rows of each block of ``block`` tokens.

    x: (..., N, D) -> (..., ceil(N / block), D). A tail block divides by its true
    row count. Rows are added in row order (one vectorised add per row), in the
    dtype of ``x``: pass float64 to follow the classification rule of
    docs/internals.md bit for bit.
    """
    x, was_np = _as_torch(x)
    n = x.shape[-2]
    xs = _pad_rows(x, block)  # (..., M, block, D)
    acc = xs[..., 0, :]
    for r in range(1, block):  # padded rows add +0.0: no effect
        acc = acc + xs[..., r, :]
    m = xs.shape[-3]
    counts = torch.tensor(
        [min(block, n - i * block) for i in range(m)], dtype=x.dtype, device=x.device
    )
    out = acc / counts[:, None]
    return out.numpy() if was_np else out


def block_scores(q, k, block_q, block_k, scale):
    """Compressed scores ``S[..., i, j] = scale * pool(q)[i] · pool(k)[j]`` in float64.

    q: (..., Nq, D), k: (..., Nk, D) -> (..., Mq, Mk) float64. Pooling in float64,
    products and sum in float64 with d ascending, then times ``scale`` — the exact
    recipe both backends follow (docs/internals.md).
    """
    q, was_np = _as_torch(q, torch.float64)
    k, _ = _as_torch(k, torch.float64)
    pq = pool_blocks(q, block_q)  # (..., Mq, D)
    pk = pool_blocks(k, block_k)  # (..., Mk, D)
    acc = pq[..., :, None, 0] * pk[..., None, :, 0]
    for d in range(1, q.shape[-1]):  # sum over d in ascending order
        acc = acc + pq[..., :, None, d] * pk[..., None, :, d]
    s = float(scale) * acc
    return s.numpy() if was_np else s


def rank_to_map(scores, n_crit, n_skip):
    """Int8 map from scores (..., Mq, Mk): order each row by (score desc, index asc);
    the first ``n_crit`` are 1, the last ``n_skip`` are -1, the rest 0. NaN ranks as -inf.
    """
    scores = torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    mk = scores.shape[-1]
    # A stable descending sort keeps equal scores in ascending index order.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    cls = torch.zeros(mk, dtype=torch.int8)
    cls[:n_crit] = 1
    if n_skip:
        cls[mk - n_skip :] = -1
    out = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    out.scatter_(-1, order, cls.to(scores.device).expand(scores.shape).contiguous())
    return out


def classify_reference(q, k, *, topk, skip, block_q, block_k, scale=None):
    """Block map per SLA_SPEC §1 and docs/internals.md: int8 (B, H, Mq, Mk).

    ``n_crit = min(Mk, max(1, floor(topk·Mk)))`` key blocks per row are critical (1),
    ``n_skip = min(Mk − n_crit, floor(skip·Mk))`` negligible (−1), the rest marginal (0),
    ranked by (score descending, key-block index ascending). Returns numpy for numpy
    input, a torch tensor otherwise.
    """
    was_np = isinstance(q, np.ndarray)
    qt, _ = _as_torch(q)
    kt, _ = _as_torch(k)
    scale = 1.0 / math.sqrt(qt.shape[-1]) if scale is None else float(scale)
    s = block_scores(qt, kt, block_q, block_k, scale)
    n_crit, n_skip = _params.block_counts(s.shape[-1], topk, skip)
    m = rank_to_map(s, n_crit, n_skip)
    return m.numpy() if was_np else m


def expand_block_map(block_map, nq, nk, block_q, block_k):
    """Token-level map (..., nq, nk): entry (r, c) is ``block_map[r // block_q, c // block_k]``."""
    bm, was_np = _as_torch(block_map)
    tok = bm.repeat_interleave(block_q, dim=-2).repeat_interleave(block_k, dim=-1)
    tok = tok[..., :nq, :nk]
    return tok.numpy() if was_np else tok


# --------------------------------------------------------------------------- attention
def feature_map_fn(name):
    """φ by name, applied per token along the last dim (D)."""
    if name == "softmax":
        return lambda x: torch.softmax(x, dim=-1)
    if name == "elu":
        return lambda x: torch.nn.functional.elu(x) + 1.0
    if name == "relu":
        return torch.relu
    raise ValueError(f"feature_map must be one of {sorted(_params.FEATURE_MAPS)}, got {name!r}")


def sla_reference(
    q,
    k,
    v,
    block_map,
    *,
    block_q=64,
    block_k=64,
    feature_map="softmax",
    scale=None,
    eps=_params.EPS,
    proj_weight=None,
    proj_bias=None,
    linear_scope="marginal",
):
    """Dense SLA forward (SLA_SPEC §5) -> ``(o, o_s, o_l)``, each (B, H, Nq, D).

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); block_map: (B, H, Mq, Mk) in {1, 0, -1};
    proj_weight: (D, D), proj_bias: (D,), both optional.

    - ``o_s``: softmax of ``scale · q kᵀ`` over the critical tokens of each row,
      times V; a row with no critical token gives 0.
    - ``o_l``: ``A = (φ(Q) φ(K)ᵀ) ⊙ marginal``, ``o_l = A V / (rowsum(A) + eps)``;
      a row with no marginal token gives 0 (0 / eps). With
      ``linear_scope="global"`` every token counts as marginal here (the published
      thu-ml/SLA code); the sparse branch is unchanged.
    - ``o = o_s + o_l Wᵀ + b`` (``o_s + o_l`` without a projection).

    Torch tensors keep their dtype (pass float64 for an oracle, with autograd);
    numpy arrays are computed in float64 and returned as float64 numpy arrays.

    >>> import torch
    >>> q = k = v = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    >>> m = torch.tensor([[[[1, 0]]]], dtype=torch.int8)      # block 0 critical, 1 marginal
    >>> o, o_s, o_l = sla_reference(q, k, v, m, block_q=4, block_k=2)
    >>> o_s[0, 0, :, 0].tolist(), o_l[0, 0, 0, 0].item() > 0.99
    ([1.0, 1.0, 1.0], True)
    """
    was_np = isinstance(q, np.ndarray)
    q, _ = _as_torch(q)
    k, _ = _as_torch(k)
    v, _ = _as_torch(v)
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bm, _ = _as_torch(block_map)
    tok = expand_block_map(bm.to(q.device), nq, nk, block_q, block_k)  # (B, H, Nq, Nk)
    crit, marg = tok == 1, tok == 0
    if _params.check_linear_scope(linear_scope) == _params.LINEAR_SCOPES["global"]:
        marg = torch.ones_like(marg)

    # Sparse branch: softmax over the critical tokens only.
    s = scale * (q @ k.transpose(-1, -2))
    has_crit = crit.any(dim=-1, keepdim=True)
    s = s.masked_fill(~crit, -math.inf)
    s = s.masked_fill(~has_crit, 0.0)  # rows with no critical token: no NaN softmax
    p = torch.softmax(s, dim=-1).masked_fill(~has_crit, 0.0)
    o_s = p @ v

    # Linear branch: linear attention over the marginal tokens only (all: "global").
    phi = feature_map_fn(feature_map)
    a = phi(q) @ phi(k).transpose(-1, -2)
    a = torch.where(marg, a, torch.zeros((), dtype=a.dtype, device=a.device))
    o_l = (a @ v) / (a.sum(dim=-1, keepdim=True) + eps)

    o = o_s + (o_l if proj_weight is None else o_l @ _as_torch(proj_weight)[0].to(o_l).T)
    if proj_bias is not None:
        o = o + _as_torch(proj_bias)[0].to(o)
    if was_np:
        return o.detach().numpy(), o_s.detach().numpy(), o_l.detach().numpy()
    return o, o_s, o_l
