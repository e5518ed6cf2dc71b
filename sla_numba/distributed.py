"""Context-parallel SLA: Ulysses sequence parallelism over ``torch.distributed``.

A video DiT's sequence can outgrow one GPU. Ulysses-style sequence parallelism
(DeepSpeed-Ulysses, xDiT/USP) splits the *tokens* over the P ranks of a process
group and reshuffles them around attention:

```
rank r holds q, k, v of shape (B, H, n_r, D)        n_r tokens of every head
      │  all-to-all over heads                      (send head group j to rank j)
      ▼
rank r holds (B, H/P, N, D)                          all N = Σ n_r tokens of H/P heads
      │  sla_numba.sla_attention, per head, local   (SLA is per (batch, head): exact)
      ▼
      │  all-to-all back
      ▼
rank r holds o of shape (B, H, n_r, D)
```

The global sequence is the concatenation of the shards in group-rank order
(rank 0's tokens first). Rank r computes heads ``r*H/P .. (r+1)*H/P - 1``.
Because every (batch, head) pair is computed by one rank on its whole sequence,
the result is the single-process ``sla_attention`` of the gathered tensors; with
the Numba CPU kernels, which compute each (batch, head) on its own, it is the same
bits (tests/test_distributed.py checks output, map and every gradient).

Decisions (also in README.md):

* **Uneven tokens are supported, with no padding.** Shards may have different
  lengths (N not divisible by P): the all-to-alls use per-rank split sizes. Blocks
  of ``block_q`` / ``block_k`` tokens are counted over the global sequence, so a
  block may span two ranks' shards; nothing changes in the result.
* **Heads must divide evenly:** H % P != 0 is a ``ValueError`` on every rank.
* **The projection's gradient is partial on each rank, by design.** Rank r applies
  ``proj`` to its own heads' O_l, so its ``proj.grad`` is the gradient from those
  heads only (all tokens, summed over every rank's loss). The ranks' gradients
  add up to the gradient of the sum of the per-rank losses, the same way every
  token-wise parameter of a sequence-parallel model (qkv and output projections,
  MLPs: each sees only its rank's tokens) gets a partial gradient. So no all-reduce
  happens inside: wrap the model in DDP or FSDP2 as usual, and their average gives
  every parameter, ``proj`` included, the gradient of the mean of the per-rank
  losses. Without a wrapper, all-reduce the gradients yourself (all of them, not
  only proj's).
* **Agreement first.** Before any data moves, the ranks all-gather a small
  description of their inputs (shapes, dtype, device, requires_grad, parameters).
  A bad input on one rank, or shapes/parameters that disagree between ranks, is a
  clear error on *every* rank, and the group stays usable afterwards. Errors after
  that point (out of memory on one rank, say) are not coordinated: the process
  group's timeout is what ends a hang then, as for any collective program. Ranks
  that pass *different* groups cannot be detected either (they never meet).
* A group of one rank is the identity: the call is plain ``sla_attention``.

Backends: gloo with CPU tensors (Numba CPU kernels) and NCCL with CUDA tensors
(Numba CUDA kernels); the collectives are ``torch.distributed`` ones only
(``all_gather`` for the agreement, ``all_to_all_single`` for the data).

Example (2 processes on one machine, CPU and gloo; save as ``ex.py`` and run
``torchrun --nproc_per_node 2 ex.py``)::

    import torch, torch.distributed as dist, sla_numba
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)                                   # same full tensors everywhere
    q, k, v = (torch.randn(1, 4, 256, 32) for _ in range(3))
    n = 256 // P                                           # this rank's token shard
    ql, kl, vl = (x[:, :, r * n:(r + 1) * n] for x in (q, k, v))
    o = sla_numba.sla_attention_ulysses(ql, kl, vl, topk=0.25, block_q=32, block_k=32)
    ref = sla_numba.sla_attention(q, k, v, topk=0.25, block_q=32, block_k=32)
    assert torch.equal(o, ref[:, :, r * n:(r + 1) * n])
"""

import torch
import torch.distributed as dist

from . import _params
from .api import _check_proj, _check_qkv, classify_blocks, sla_attention
from .modules import SparseLinearAttention

__all__ = ["sla_attention_ulysses", "classify_blocks_ulysses", "UlyssesSparseLinearAttention"]


# ---------------------------------------------------------------------------
# 1. The group
# ---------------------------------------------------------------------------

_NOT_A_MEMBER = (
    "this process is not a member of group: every rank that calls "
    "sla_attention_ulysses must belong to the group it passes"
)


def _group_info(group):
    """(group, rank in it, its size); a clear error when there is no usable group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sla_attention_ulysses needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (or use sla_attention)"
        )
    if group is None:
        group = dist.group.WORLD
    elif group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives non-members
        raise ValueError(_NOT_A_MEMBER)
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(_NOT_A_MEMBER)
    return group, rank, dist.get_world_size(group)


def _backend_name(group):
    return str(dist.get_backend(group)).lower()


# ---------------------------------------------------------------------------
# 2. Agreement: every rank checks its input, then all ranks compare notes
# ---------------------------------------------------------------------------

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_BACKENDS = list(_params.BACKENDS)

#: What each rank tells the others, in this order (one float64 each).
#: ``nq`` and ``nk`` (the shard lengths) may differ between ranks; the rest must not.
_FIELDS = (
    "ok",
    "nq",
    "nk",
    "batch",
    "heads",
    "head_dim",
    "dtype",
    "device_type",
    "requires_grad",
    "block_map_shape_0",
    "block_map_shape_1",
    "block_map_shape_2",
    "block_map_shape_3",
    "topk",
    "skip",
    "block_q",
    "block_k",
    "feature_map",
    "scale",
    "eps",
    "return_parts",
    "backend",
    "proj",
)
_PER_RANK = ("ok", "nq", "nk")


def _check_local(q, k, v, block_map, proj_weight, proj_bias, params, group):
    """Everything one rank can check alone. Returns this rank's description (a dict)."""
    _check_qkv(q, k, v)  # 4-D floating tensors, shapes/dtypes/devices agree
    if not isinstance(q, torch.Tensor):
        raise TypeError(
            f"q must be a torch tensor for sla_attention_ulysses, got {type(q).__name__}"
        )
    if _backend_name(group) == "nccl" and q.device.type != "cuda":
        raise ValueError(
            f"q is on {q.device} but the group's backend is NCCL, "
            "which needs CUDA tensors (use a gloo group for CPU tensors)"
        )
    B, H, nq, D = q.shape
    topk, skip = _params.check_topk_skip(params["topk"], params["skip"])
    block_q = _params.check_block_size("block_q", params["block_q"])
    block_k = _params.check_block_size("block_k", params["block_k"])
    feature_map = _params.check_feature_map(params["feature_map"])
    scale = _params.check_scale(params["scale"], int(D))
    eps = _params.check_fraction(
        "eps", params["eps"], low=0.0, high=1.0, low_open=True, high_open=False
    )
    _params.check_backend(params["backend"])
    if not isinstance(params["return_parts"], bool):
        raise TypeError(f"return_parts must be a bool, got {type(params['return_parts']).__name__}")
    _check_proj(proj_weight, proj_bias, q, "torch", int(D))
    bm_shape = (0, 0, 0, 0)
    if block_map is not None:
        if not isinstance(block_map, torch.Tensor):
            raise TypeError(
                f"block_map must be a torch tensor like q, got {type(block_map).__name__}"
            )
        if block_map.ndim != 4 or block_map.dtype.is_floating_point or block_map.is_complex():
            raise ValueError(
                f"block_map must be a 4-D integer (int8) tensor, got shape "
                f"{tuple(block_map.shape)} and dtype {block_map.dtype}"
            )
        if block_map.device != q.device:
            raise ValueError(f"block_map is on {block_map.device} but q is on {q.device}")
        if block_map.device.type == "cpu":  # GPU maps are not value-checked (no sync)
            bad = (block_map != 1) & (block_map != 0) & (block_map != -1)
            if bool(bad.any()):
                raise ValueError(
                    "block_map values must be 1 (critical), 0 (marginal) or "
                    f"-1 (negligible), found {int(block_map[bad][0])}"
                )
        bm_shape = tuple(block_map.shape)
    grads = [x is not None and x.requires_grad for x in (q, k, v, proj_weight, proj_bias)]
    grads.append(torch.is_grad_enabled())
    return dict(
        ok=1,
        nq=nq,
        nk=k.shape[2],
        batch=B,
        heads=H,
        head_dim=D,
        dtype=_DTYPES.index(q.dtype),
        device_type=int(q.device.type == "cuda"),
        requires_grad=sum(int(g) << i for i, g in enumerate(grads)),
        block_map_shape_0=bm_shape[0],
        block_map_shape_1=bm_shape[1],
        block_map_shape_2=bm_shape[2],
        block_map_shape_3=bm_shape[3],
        topk=topk,
        skip=skip,
        block_q=block_q,
        block_k=block_k,
        feature_map=feature_map,
        scale=scale,
        eps=eps,
        return_parts=int(params["return_parts"]),
        backend=_BACKENDS.index(params["backend"]),
        proj=int(proj_weight is not None) + 2 * int(proj_bias is not None),
    )


def _describe_device(q, group):
    """Where the small description tensor lives: a device the group's backend takes."""
    if _backend_name(group) == "nccl":
        if isinstance(q, torch.Tensor) and q.device.type == "cuda":
            return q.device
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(q, torch.Tensor):
        return q.device
    return torch.device("cpu")


class _Layout:
    """How the tokens are spread: the agreed facts every all-to-all needs.

    ``nq[r]``, ``nk[r]``: tokens of q and of k / v on rank r (the global sequences
    are their concatenations in rank order); each rank computes ``H // P`` heads.
    """

    def __init__(self, group, rank, size, batch, heads, head_dim, nq, nk):
        self.group, self.rank, self.size = group, rank, size
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.local_heads = heads // size
        self.nq, self.nk = list(nq), list(nk)


def _agree(q, k, v, block_map, proj_weight, proj_bias, params, group, rank, size):
    """All ranks check their inputs, exchange descriptions, and raise together or go on.

    Returns the :class:`_Layout`. Raises on every rank of the group when any rank's
    input is bad or the ranks disagree; no rank is left waiting in a collective.
    """
    error = None
    try:
        mine = _check_local(q, k, v, block_map, proj_weight, proj_bias, params, group)
    except Exception as err:  # noqa: BLE001 - any local failure must reach the others
        error, mine = err, dict.fromkeys(_FIELDS, 0)
    device = _describe_device(q, group)
    row = torch.tensor([float(mine[f]) for f in _FIELDS], dtype=torch.float64, device=device)
    rows = [torch.empty_like(row) for _ in range(size)]
    dist.all_gather(rows, row, group=group)
    table = [dict(zip(_FIELDS, r.tolist())) for r in rows]

    bad = [r for r, t in enumerate(table) if t["ok"] != 1]
    if error is not None:
        raise error
    if bad:
        raise ValueError(
            f"sla_attention_ulysses: rank(s) {bad} of the group rejected their "
            "input (their error says why); every rank raises"
        )
    for field in _FIELDS:
        if field in _PER_RANK:
            continue
        values = [t[field] for t in table]
        if any(x != values[0] for x in values):
            if field == "dtype":
                values = [str(_DTYPES[int(x)]) for x in values]
            shown = ", ".join(f"rank {r}: {x}" for r, x in enumerate(values))
            raise ValueError(
                f"sla_attention_ulysses: {field} differs between the ranks "
                f"({shown}); every rank must pass alike tensors (only the "
                "number of tokens may differ) and the same parameters"
            )
    t0 = table[0]
    B, H, D = int(t0["batch"]), int(t0["heads"]), int(t0["head_dim"])
    if H % size:
        raise ValueError(
            f"q has {H} heads, which cannot be split evenly over the group's "
            f"{size} ranks: the number of heads must be a multiple of the "
            "group size"
        )
    nq = [int(t["nq"]) for t in table]
    nk = [int(t["nk"]) for t in table]
    if block_map is not None:
        mq = _params.n_blocks(sum(nq), int(t0["block_q"]))
        mk = _params.n_blocks(sum(nk), int(t0["block_k"]))
        shape = tuple(int(t0[f"block_map_shape_{i}"]) for i in range(4))
        if shape not in ((B, H, mq, mk), (B, H // size, mq, mk)):
            raise ValueError(
                f"block_map must have shape (B, H, Mq, Mk) = {(B, H, mq, mk)} (all heads) or "
                f"(B, H/P, Mq, Mk) = {(B, H // size, mq, mk)} (this rank's heads), with Mq, "
                f"Mk counted over the global sequence; got {shape}"
            )
    return _Layout(group, rank, size, B, H, D, nq, nk)


# ---------------------------------------------------------------------------
# 3. The two all-to-alls, and their autograd (each is the other's backward)
# ---------------------------------------------------------------------------


def _seq_to_heads(layout, x, counts):
    """(B, H, n_r, D) token shard of every head -> (B, H/P, N, D) all tokens of my heads.

    ``counts[r]`` is rank r's number of tokens of this tensor. Rank r sends its
    tokens of head group j to rank j; what arrives from rank i is i's tokens of my
    heads, and putting them side by side in rank order gives the whole sequence.
    """
    B, P, Hp, D = layout.batch, layout.size, layout.local_heads, layout.head_dim
    n = counts[layout.rank]
    # chunk j of the send buffer = heads j*Hp .. (j+1)*Hp-1 (free for B = 1)
    send = x.reshape(B, P, Hp * n * D).transpose(0, 1).contiguous()
    recv = x.new_empty(B * Hp * sum(counts) * D)
    dist.all_to_all_single(
        recv,
        send.reshape(-1),
        output_split_sizes=[B * Hp * c * D for c in counts],
        input_split_sizes=[B * Hp * n * D] * P,
        group=layout.group,
    )
    pieces = recv.split([B * Hp * c * D for c in counts])
    return torch.cat([p.view(B, Hp, c, D) for p, c in zip(pieces, counts)], dim=2)


def _heads_to_seq(layout, y, counts):
    """(B, H/P, N, D) all tokens of my heads -> (B, H, n_r, D) my tokens of every head.

    The exact reverse of :func:`_seq_to_heads`: rank r sends rank j the tokens of
    j's shard, and stacks what arrives (one head group from each rank) along heads.
    """
    B, P, Hp, D = layout.batch, layout.size, layout.local_heads, layout.head_dim
    n = counts[layout.rank]
    sizes = [B * Hp * c * D for c in counts]
    send = y.new_empty(sum(sizes))
    for chunk, part, c in zip(send.split(sizes), y.split(counts, dim=2), counts):
        chunk.view(B, Hp, c, D).copy_(part)
    recv = y.new_empty(P * B * Hp * n * D)
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=[B * Hp * n * D] * P,
        input_split_sizes=sizes,
        group=layout.group,
    )
    # chunk i came from rank i and holds head group i: (P, B, Hp, n, D) -> (B, H, n, D)
    return recv.view(P, B, Hp, n, D).transpose(0, 1).reshape(B, P * Hp, n, D)


class _SeqToHeads(torch.autograd.Function):
    """Autograd of :func:`_seq_to_heads` for several tensors, one all-to-all each.

    ``counts`` holds one list of per-rank token counts per tensor. The backward is
    the reverse all-to-all of the gradients, in the same fixed order on every rank
    (a gradient autograd did not produce is sent as zeros, so the collectives match).
    """

    @staticmethod
    def forward(ctx, layout, counts, *xs):
        ctx.layout, ctx.counts, ctx.like = layout, counts, (xs[0].dtype, xs[0].device)
        return tuple(_seq_to_heads(layout, x, c) for x, c in zip(xs, counts))

    @staticmethod
    def backward(ctx, *grads):
        L = ctx.layout
        return (
            None,
            None,
            *(
                _heads_to_seq(
                    L, _or_zeros(g, ctx.like, (L.batch, L.local_heads, sum(c), L.head_dim)), c
                )
                for g, c in zip(grads, ctx.counts)
            ),
        )


class _HeadsToSeq(torch.autograd.Function):
    """Autograd of :func:`_heads_to_seq` for several tensors; backward = seq-to-heads."""

    @staticmethod
    def forward(ctx, layout, counts, *ys):
        ctx.layout, ctx.counts, ctx.like = layout, counts, (ys[0].dtype, ys[0].device)
        return tuple(_heads_to_seq(layout, y.contiguous(), c) for y, c in zip(ys, counts))

    @staticmethod
    def backward(ctx, *grads):
        L = ctx.layout
        return (
            None,
            None,
            *(
                _seq_to_heads(
                    L, _or_zeros(g, ctx.like, (L.batch, L.heads, c[L.rank], L.head_dim)), c
                )
                for g, c in zip(grads, ctx.counts)
            ),
        )


def _or_zeros(grad, like, shape):
    """A contiguous gradient, or zeros (``like`` = (dtype, device)) where autograd passed none."""
    if grad is None:
        return torch.zeros(shape, dtype=like[0], device=like[1])
    return grad.contiguous()


# ---------------------------------------------------------------------------
# 4. The public function, the classification, and the module
# ---------------------------------------------------------------------------


def _my_heads(block_map, layout):
    """A map of all H heads -> this rank's H/P heads; a map of H/P heads as it is."""
    if block_map is None or block_map.shape[1] == layout.local_heads:
        return block_map
    h0 = layout.rank * layout.local_heads
    return block_map[:, h0 : h0 + layout.local_heads]


def sla_attention_ulysses(
    q,
    k,
    v,
    *,
    group=None,
    topk=0.05,
    skip=0.10,
    block_q=64,
    block_k=64,
    feature_map="softmax",
    scale=None,
    block_map=None,
    proj_weight=None,
    proj_bias=None,
    return_parts=False,
    backend="auto",
    eps=_params.EPS,
):
    """SLA on a sequence split over the ranks of ``group`` (Ulysses all-to-all).

    Every rank of the group calls this with its token shard; the result is
    :func:`sla_numba.sla_attention` of the whole sequence (the shards concatenated
    in rank order), returned as this rank's shard. Differentiable end to end.

    Parameters
    ----------
    q : (B, H, nq_r, D);  k, v : (B, H, nk_r, D)   torch tensors
        This rank's tokens of every head. B, H, D, dtype and device type must
        agree on all ranks; the token counts nq_r, nk_r may differ between ranks
        (N need not be divisible by P; no padding; n_r >= 1). H must be a multiple of the
        group size P. gloo: CPU tensors; NCCL: CUDA tensors.
    group : torch.distributed.ProcessGroup, default the world group.
    topk, skip, block_q, block_k, feature_map, scale, proj_weight, proj_bias,
    backend, eps
        As in :func:`sla_numba.sla_attention`, identical on every rank. Blocks are
        counted over the global sequence. ``proj_weight`` / ``proj_bias`` are
        applied on each rank to its own heads (see the module docstring for what
        that means for their gradients under DDP / FSDP).
    block_map : int8 tensor, optional
        The map over the *global* sequence, Mq = ceil(sum nq_r / block_q),
        Mk = ceil(sum nk_r / block_k): either (B, H, Mq, Mk) for all heads (the
        same tensor on every rank; each rank uses its heads' rows) or
        (B, H/P, Mq, Mk) for this rank's heads r*H/P .. (r+1)*H/P - 1 (what
        :func:`classify_blocks_ulysses` returns).
    return_parts : bool
        Return this rank's shards of ``(O_s, O_l)`` (before projection) instead of O.

    Returns
    -------
    O (B, H, nq_r, D) like q, or the pair (O_s, O_l) of that shape.

    Raises
    ------
    ValueError / TypeError on every rank of the group when any rank's input is bad,
    when the ranks disagree (shapes other than the token count, dtype, parameters,
    requires_grad) or when H % P != 0. RuntimeError when torch.distributed is not
    initialised; ValueError when this process is not in ``group``.

    Example
    -------
    On every rank of an initialised gloo group of P processes::

        q, k, v = (torch.randn(1, 4, 64, 32) for _ in range(3))  # 64 local tokens
        o = sla_attention_ulysses(q, k, v, topk=0.25, block_q=32, block_k=32)
        o.shape  # torch.Size([1, 4, 64, 32]); the sequence has 64 * P tokens

    (a complete runnable script is in this module's docstring and in
    examples/finetune_distributed.py)
    """
    group, rank, size = _group_info(group)
    kwargs = dict(
        topk=topk,
        skip=skip,
        block_q=block_q,
        block_k=block_k,
        feature_map=feature_map,
        scale=scale,
        eps=eps,
        backend=backend,
    )
    if size == 1:  # a group of one: the all-to-alls are the identity
        return sla_attention(
            q,
            k,
            v,
            block_map=block_map,
            proj_weight=proj_weight,
            proj_bias=proj_bias,
            return_parts=return_parts,
            **kwargs,
        )
    layout = _agree(
        q,
        k,
        v,
        block_map,
        proj_weight,
        proj_bias,
        dict(kwargs, return_parts=return_parts),
        group,
        rank,
        size,
    )
    return _ulysses(
        layout, q, k, v, _my_heads(block_map, layout), proj_weight, proj_bias, return_parts, kwargs
    )


def _ulysses(layout, q, k, v, block_map, proj_weight, proj_bias, return_parts, kwargs):
    """The three steps, on agreed inputs: all-to-all, local SLA, all-to-all back."""
    qh, kh, vh = _SeqToHeads.apply(layout, (layout.nq, layout.nk, layout.nk), q, k, v)
    out = sla_attention(
        qh,
        kh,
        vh,
        block_map=block_map,
        proj_weight=proj_weight,
        proj_bias=proj_bias,
        return_parts=return_parts,
        **kwargs,
    )
    if return_parts:
        return _HeadsToSeq.apply(layout, (layout.nq, layout.nq), *out)
    return _HeadsToSeq.apply(layout, (layout.nq,), out)[0]


def classify_blocks_ulysses(
    q, k, *, group=None, topk=0.05, skip=0.10, block_q=64, block_k=64, scale=None, backend="auto"
):
    """The block map of this rank's heads over the whole sequence.

    Takes the same token shards as :func:`sla_attention_ulysses` (q (B, H, nq_r, D),
    k (B, H, nk_r, D) on each rank of ``group``), moves them to (B, H/P, N, D) with
    the same all-to-all and classifies there. Returns a
    :class:`sla_numba.BlockClassification` whose ``.map`` is (B, H/P, Mq, Mk) for
    heads r*H/P .. (r+1)*H/P - 1: exactly the rows of ``classify_blocks`` on the
    gathered tensors, and a valid ``block_map`` for ``sla_attention_ulysses``.
    Not differentiable (a map has no gradient). Errors as sla_attention_ulysses.

    Example
    -------
    On every rank of an initialised group of P processes::

        c = classify_blocks_ulysses(q, k, topk=0.25, block_q=32, block_k=32)
        o = sla_attention_ulysses(q, k, v, block_map=c.map, block_q=32, block_k=32)
    """
    group, rank, size = _group_info(group)
    kwargs = dict(
        topk=topk, skip=skip, block_q=block_q, block_k=block_k, scale=scale, backend=backend
    )
    if size == 1:
        return classify_blocks(q, k, **kwargs)
    with torch.no_grad():
        layout = _agree(
            q,
            k,
            k,
            None,
            None,
            None,
            dict(kwargs, feature_map="softmax", eps=_params.EPS, return_parts=False),
            group,
            rank,
            size,
        )
        qh, kh = _SeqToHeads.apply(layout, (layout.nq, layout.nk), q, k)
        return classify_blocks(qh, kh, **kwargs)


class _SharedGroup:
    """Holds a process group. ``copy.deepcopy`` of a module (an EMA copy, say) shares
    it: a communicator is not data, and torch cannot copy one."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class UlyssesSparseLinearAttention(SparseLinearAttention):
    """:class:`sla_numba.SparseLinearAttention` over a sequence split across ranks.

    Same parameters and state_dict as the single-process module (``proj``: an fp32
    ``Linear(head_dim, head_dim)``, zero-initialised), so a checkpoint moves between
    the two unchanged. ``forward(q, k, v, block_map=None)`` takes this rank's token
    shards (B, H, n_r, D) and returns its shard of ``O_s + proj(O_l)``; see
    :func:`sla_attention_ulysses` for the rules. ``proj`` is an ordinary parameter:
    its gradient on a rank covers that rank's heads, and DDP / FSDP2's gradient
    average completes it, as for every token-wise parameter (module docstring).
    Wrap this module or a parent with ``fully_shard``, not ``proj`` alone (forward
    reads ``proj.weight`` directly, as the single-process module does).

    Example
    -------
    On every rank of an initialised group of P processes::

        attn = UlyssesSparseLinearAttention(32, topk=0.25, block_q=32, block_k=32)
        model = torch.nn.parallel.DistributedDataParallel(attn)
        out = model(q, k, v)                 # q, k, v: (B, H, n_r, 32) shards
        out.square().mean().backward()       # attn.proj.weight.grad: averaged
    """

    def __init__(self, head_dim, *, group=None, **kwargs):
        super().__init__(head_dim, **kwargs)
        self._group = _SharedGroup(group)

    @property
    def group(self):
        """The process group (None: the world group)."""
        return self._group.group

    @group.setter
    def group(self, group):
        self._group = _SharedGroup(group)

    def forward(self, q, k, v, block_map=None):
        return sla_attention_ulysses(
            q,
            k,
            v,
            group=self.group,
            topk=self.topk,
            skip=self.skip,
            block_q=self.block_q,
            block_k=self.block_k,
            feature_map=self.feature_map,
            scale=self.scale,
            block_map=block_map,
            proj_weight=self.proj.weight,
            proj_bias=self.proj.bias,
            backend=self.backend,
        )
