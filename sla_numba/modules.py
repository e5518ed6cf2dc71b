"""``torch.nn`` modules: SLA as a layer with its learnable projection."""

import torch

from . import _params
from .api import sla_attention

#: Branches of the published code (github.com/thu-ml/SLA) and the linear scope of each.
OFFICIAL_BRANCHES = {"main": "global", "SLA-1": "marginal"}

#: The published module's linear-branch guard: ``... / (1e-5 + φ(q)·Σφ(k))``.
OFFICIAL_EPS = 1e-5


class SparseLinearAttention(torch.nn.Module):
    """SLA as a drop-in attention layer with its learnable projection.

    ``forward(q, k, v)`` takes (B, H, N, D) tensors ((B, N, H, D) with
    ``layout="BNHD"``) and returns ``O_s + proj(O_l)`` in the same layout.
    ``proj`` is an fp32 ``nn.Linear(head_dim, head_dim)`` shared by all heads and
    zero-initialised, so an untrained layer computes block-sparse attention
    exactly; fine-tuning teaches it to use O_l. The other arguments are those of
    :func:`sla_numba.sla_attention`. Checkpoints of the published code
    (thu-ml/SLA, TurboDiffusion): :meth:`from_official`.

    Example
    -------
    >>> import torch, sla_numba
    >>> attn = sla_numba.SparseLinearAttention(32, topk=0.25, block_q=16, block_k=16)
    >>> q, k, v = (torch.randn(1, 2, 100, 32, requires_grad=True) for _ in range(3))
    >>> out = attn(q, k, v)
    >>> out.sum().backward()
    >>> out.shape, attn.proj.weight.grad.shape
    (torch.Size([1, 2, 100, 32]), torch.Size([32, 32]))
    """

    def __init__(
        self,
        head_dim: int,
        *,
        topk: float = 0.05,
        skip: float = 0.10,
        block_q: int = 64,
        block_k: int = 64,
        feature_map: str = "softmax",
        scale: "float | None" = None,
        backend: str = "auto",
        linear_scope: str = "marginal",
        layout: str = "BHND",
        eps: float = _params.EPS,
    ) -> None:
        super().__init__()
        head_dim = _params.check_block_size("head_dim", head_dim)
        block_q = _params.check_block_size("block_q", block_q)
        block_k = _params.check_block_size("block_k", block_k)
        topk, skip = _params.check_topk_skip(topk, skip)
        _params.check_feature_map(feature_map)
        _params.check_backend(backend)
        _params.check_linear_scope(linear_scope)
        _params.check_layout(layout)
        _params.check_fraction("eps", eps, low=0.0, high=1.0, low_open=True, high_open=False)
        self.head_dim, self.topk, self.skip = head_dim, topk, skip
        self.block_q, self.block_k = block_q, block_k
        self.feature_map, self.scale, self.backend = feature_map, scale, backend
        self.linear_scope, self.layout, self.eps = linear_scope, layout, eps
        self.proj = torch.nn.Linear(head_dim, head_dim, dtype=torch.float32)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_map: "torch.Tensor | None" = None,
    ) -> torch.Tensor:
        if q.ndim == 4 and int(q.shape[-1]) != self.head_dim:
            raise ValueError(
                f"q has head_dim {int(q.shape[-1])} but this SparseLinearAttention was built "
                f"with head_dim={self.head_dim} (its proj is Linear({self.head_dim}, "
                f"{self.head_dim}))"
            )
        return sla_attention(
            q,
            k,
            v,
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
            eps=self.eps,
            linear_scope=self.linear_scope,
            layout=self.layout,
        )

    @classmethod
    def from_official(
        cls,
        state_dict,
        topk,
        feature_map="softmax",
        BLKQ=64,
        BLKK=64,
        use_bf16=True,
        tie_feature_map_qk=True,
        *,
        branch="main",
        layout="BHND",
        backend="auto",
    ):
        """This package's layer equivalent to a published ``SparseLinearAttention``.

        ``state_dict`` is the published module's (``proj_l.weight`` (D, D),
        ``proj_l.bias`` (D,); a prefix such as ``"blocks.3.attn."`` must be
        stripped first); the other arguments are that module's constructor
        arguments, in its order (``topk`` may be positional, as there). The
        result has ``skip=0`` (the published code skips no block), ``eps=1e-5``
        (its guard) and ``linear_scope="global"`` for ``branch="main"`` (its
        linear term covers every key block) or ``"marginal"`` for
        ``branch="SLA-1"``. The README lists every argument against ours.

        ``use_bf16`` (their compute dtype) and ``tie_feature_map_qk`` are accepted
        and change nothing: this package computes in fp32 (fp64 for fp64 input)
        whatever the input dtype, and its feature maps have no parameters, so tied
        and untied maps are the same function. What differs from the published
        kernels: their ``n_crit = min(Mk, int(topk·Mk))`` may be 0, ours is at
        least 1 (equal whenever ``topk·Mk >= 1``); ties between block scores go to
        the lower index here, arbitrary there; and their products run in bf16/fp16.

        Example
        -------
        >>> import torch, sla_numba
        >>> sd = {"proj_l.weight": torch.randn(32, 32), "proj_l.bias": torch.randn(32)}
        >>> attn = sla_numba.SparseLinearAttention.from_official(sd, 0.25, BLKQ=16, BLKK=16)
        >>> attn.linear_scope, attn.skip, attn.block_q, attn.proj.weight.shape
        ('global', 0.0, 16, torch.Size([32, 32]))
        """
        if not isinstance(branch, str) or branch not in OFFICIAL_BRANCHES:
            raise ValueError(f"branch must be one of {sorted(OFFICIAL_BRANCHES)}, got {branch!r}")
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = {"proj_l.weight", "proj_l.bias"}
        if set(state_dict.keys()) != expected:
            raise ValueError(
                f"state_dict must hold exactly {sorted(expected)} (strip any module prefix), "
                f"got {sorted(state_dict.keys())}"
            )
        weight = state_dict["proj_l.weight"]
        if (
            not isinstance(weight, torch.Tensor)
            or weight.ndim != 2
            or weight.shape[0] != weight.shape[1]
        ):
            raise ValueError(
                "state_dict['proj_l.weight'] must be a square (head_dim, head_dim) "
                f"tensor, got {getattr(weight, 'shape', type(weight).__name__)}"
            )
        for name, value in (("use_bf16", use_bf16), ("tie_feature_map_qk", tie_feature_map_qk)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        layer = cls(
            int(weight.shape[0]),
            topk=topk,
            skip=0.0,
            block_q=BLKQ,
            block_k=BLKK,
            feature_map=feature_map,
            backend=backend,
            layout=layout,
            linear_scope=OFFICIAL_BRANCHES[branch],
            eps=OFFICIAL_EPS,
        )
        layer.proj.load_state_dict({"weight": weight, "bias": state_dict["proj_l.bias"]})
        return layer.to(weight.device)

    def extra_repr(self):
        return (
            f"head_dim={self.head_dim}, topk={self.topk}, skip={self.skip}, "
            f"block_q={self.block_q}, block_k={self.block_k}, "
            f"feature_map={self.feature_map!r}, linear_scope={self.linear_scope!r}, "
            f"layout={self.layout!r}"
        )
