"""``torch.nn`` modules: SLA as a layer with its learnable projection."""
import torch

from . import _params
from .api import sla_attention


class SparseLinearAttention(torch.nn.Module):
    """SLA as a drop-in attention layer with its learnable projection.

    ``forward(q, k, v)`` takes (B, H, N, D) tensors and returns
    ``O_s + proj(O_l)``. ``proj`` is an fp32 ``nn.Linear(head_dim, head_dim)``
    shared by all heads and zero-initialised, so an untrained layer computes
    block-sparse attention exactly; fine-tuning teaches it to use O_l.

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

    def __init__(self, head_dim: int, *, topk: float = 0.05, skip: float = 0.10,
                 block_q: int = 64, block_k: int = 64, feature_map: str = "softmax",
                 scale: "float | None" = None, backend: str = "auto") -> None:
        super().__init__()
        head_dim = _params.check_block_size("head_dim", head_dim)
        block_q = _params.check_block_size("block_q", block_q)
        block_k = _params.check_block_size("block_k", block_k)
        topk, skip = _params.check_topk_skip(topk, skip)
        _params.check_feature_map(feature_map)
        _params.check_backend(backend)
        self.head_dim, self.topk, self.skip = head_dim, topk, skip
        self.block_q, self.block_k = block_q, block_k
        self.feature_map, self.scale, self.backend = feature_map, scale, backend
        self.proj = torch.nn.Linear(head_dim, head_dim, dtype=torch.float32)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_map: "torch.Tensor | None" = None) -> torch.Tensor:
        if q.ndim == 4 and int(q.shape[-1]) != self.head_dim:
            raise ValueError(
                f"q has head_dim {int(q.shape[-1])} but this SparseLinearAttention was built "
                f"with head_dim={self.head_dim} (its proj is Linear({self.head_dim}, "
                f"{self.head_dim}))")
        return sla_attention(
            q, k, v, topk=self.topk, skip=self.skip, block_q=self.block_q,
            block_k=self.block_k, feature_map=self.feature_map, scale=self.scale,
            block_map=block_map, proj_weight=self.proj.weight, proj_bias=self.proj.bias,
            backend=self.backend)

    def extra_repr(self):
        return (f"head_dim={self.head_dim}, topk={self.topk}, skip={self.skip}, "
                f"block_q={self.block_q}, block_k={self.block_k}, "
                f"feature_map={self.feature_map!r}")
