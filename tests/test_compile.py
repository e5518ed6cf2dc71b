"""torch.compile and opcheck on the attention code of a DiT.

A DiT makes q, k, v from one Linear and ``view(B, N, H, D).transpose(1, 2)``:
non-contiguous tensors, and a sequence length that changes between calls. The
custom ops must compile there (fake kernels with the real strides; block counts
computed inside the op, so a symbolic N needs no Python arithmetic), forward and
backward, with ``fullgraph=True``, equal to eager.
"""

import math

import pytest
import torch
import torch._dynamo.testing
from helpers import assert_tensor_core_path, needs_real_gpu

import sla_numba
import sla_numba.torch_ops  # noqa: F401  (registers the sla_numba:: ops)

H, D, BLOCK = 2, 8, 4
KW = dict(topk=0.3, skip=0.2, block_q=BLOCK, block_k=BLOCK, feature_map="elu")


class DiTAttention(torch.nn.Module):
    """The attention of a DiT block: qkv Linear -> heads -> SLA -> out Linear."""

    def __init__(self, layout, heads=H, head_dim=D, **sla_kw):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.out = torch.nn.Linear(heads * head_dim, heads * head_dim)
        self.attn = sla_numba.SparseLinearAttention(head_dim, layout=layout, **(sla_kw or KW))
        with torch.no_grad():  # a "fine-tuned" projection: O_l counts
            self.attn.proj.weight.copy_(0.5 * torch.randn(head_dim, head_dim))
        self.layout, self.heads, self.head_dim = layout, heads, head_dim

    def forward(self, x):
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.layout == "BHND":  # (B, N, H, D) -> transposed view (B, H, N, D)
            q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))
            o = self.attn(q, k, v).transpose(1, 2)
        else:  # (B, N, H, D) views as they are
            q, k, v = (t.view(B, N, H, D) for t in (q, k, v))
            o = self.attn(q, k, v)
        return self.out(o.reshape(B, N, H * D))


def _run(model, x):
    x = x.detach().requires_grad_()
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y, grads


@pytest.mark.slow
@pytest.mark.parametrize(
    "compiler,layout", [("aot_eager", "BHND"), ("aot_eager", "BNHD"), ("inductor", "BHND")]
)
def test_dit_attention_compiles_with_dynamic_sequence_length(compiler, layout):
    model = DiTAttention(layout)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiles = []
    for n in (37, 53):  # two lengths, neither a multiple of the block
        x = torch.randn(2, n, H * D)
        y_eager, g_eager = _run(model, x)
        y, g = _run(compiled, x)
        compiles.append(counter.frame_count)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the first call compiles; the second length must reuse that symbolic-N graph
    assert compiles[0] >= 1 and compiles[1] == compiles[0], f"recompiled: {compiles}"


def test_block_counts_inside_the_op_follow_the_rule():
    """The classify op takes topk / skip and derives the counts from the concrete Mk
    (so a symbolic N compiles): at every Mk the map must have exactly
    ``n_crit = min(Mk, max(1, floor(topk·Mk)))`` critical and
    ``n_skip = min(Mk − n_crit, floor(skip·Mk))`` negligible blocks per row, the
    float product floored as before."""
    q = torch.randn(1, 1, 8, 4)
    for topk, skip in [(0.05, 0.10), (0.3, 0.2), (0.29, 0.7), (1.0, 0.0), (0.999, 0.001)]:
        for mk in range(1, 41):
            k = torch.randn(1, 1, 2 * mk - 1, 4)  # last key block partial
            m = torch.ops.sla_numba.classify(q, k, topk, skip, 2, 2, 0.5, "cpu")
            n_crit = min(mk, max(1, math.floor(topk * mk)))
            n_skip = min(mk - n_crit, math.floor(skip * mk))
            assert m.shape[-1] == mk
            assert ((m == 1).sum(-1) == n_crit).all(), (topk, mk)
            assert ((m == -1).sum(-1) == n_skip).all(), (skip, mk)


def _noncontiguous_qkv(nq=9, nk=7, requires_grad=False):
    """q, k, v as a DiT makes them: (B, N, H, D) storage seen as (B, H, N, D)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 4).transpose(1, 2) for n in (nq, nk, nk))
    assert not q.is_contiguous()
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_opcheck_on_non_contiguous_inputs():
    """opcheck each custom op with transposed-view inputs (fake vs real strides,
    schema, autograd registration)."""
    q, k, v = _noncontiguous_qkv(requires_grad=True)
    bm = torch.ops.sla_numba.classify(q.detach(), k.detach(), 0.5, 0.25, 2, 2, 0.5, "cpu")
    torch.library.opcheck(
        torch.ops.sla_numba.classify.default, (q.detach(), k.detach(), 0.5, 0.25, 2, 2, 0.5, "cpu")
    )
    for scope in (0, 1):
        fwd_args = (q, k, v, bm, 2, 2, 0.5, 1, 1e-6, scope, "cpu")
        torch.library.opcheck(torch.ops.sla_numba.forward.default, fwd_args)
        o_s, o_l, lse, _ = torch.ops.sla_numba.forward(*fwd_args)
        do_s, do_l = (torch.randn(1, 9, 2, 4).transpose(1, 2) for _ in range(2))
        torch.library.opcheck(
            torch.ops.sla_numba.backward.default,
            (
                q.detach(),
                k.detach(),
                v.detach(),
                o_s.detach(),
                o_l.detach(),
                lse.detach(),
                do_s,
                do_l,
                bm,
                2,
                2,
                0.5,
                1,
                1e-6,
                scope,
                "cpu",
            ),
        )


# --------------------------------------------------------------------------- CUDA tensors
# The same DiT attention on a real GPU in bf16 (backend "gpu"): head_dim 64 and 64-token
# blocks, so the tensor-core kernels run; 300 and 450 tokens (5 and 8 key blocks, the
# last partial) with 2 critical, 2 marginal, 1 negligible (3, 3, 2 at 450) blocks per row.
GPU_KW = dict(topk=0.4, skip=0.25, block_q=64, block_k=64, feature_map="elu", backend="gpu")
GPU_H, GPU_D = 2, 64


def _dit_bf16_cuda(layout):
    model = DiTAttention(layout, heads=GPU_H, head_dim=GPU_D, **GPU_KW).cuda()
    model.qkv.to(torch.bfloat16)  # the model's Linears in bf16; attn.proj stays fp32
    model.out.to(torch.bfloat16)
    return model


def _rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


@pytest.mark.gpu
@pytest.mark.slow
@needs_real_gpu
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_dit_attention_compiles_on_cuda_bf16(layout):
    """Inductor, fullgraph, dynamic N, CUDA bf16: forward and backward equal eager to
    1e-2 relative RMS (about one bf16 ulp), not bit for bit. The SLA ops are opaque
    to Inductor and deterministic, but Inductor may rewrite the bf16 code around them
    (a bias add taken out of the matmul and fused into the following square, a
    reduction in another order), rounding at other points than eager, so elements
    may differ by an ulp (the CPU dry run of this test: up to 3.4e-3). A wrong
    stride, block count or gradient moves the result by O(1)."""
    assert_tensor_core_path(torch.bfloat16, GPU_D, 64, 64)
    model = _dit_bf16_cuda(layout)
    assert model.attn.proj.weight.dtype == torch.float32
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiles = []
    for n in (300, 450):
        x = torch.randn(2, n, GPU_H * GPU_D, device="cuda", dtype=torch.bfloat16)
        y_eager, g_eager = _run(model, x)
        y, g = _run(compiled, x)
        compiles.append(counter.frame_count)
        assert y.dtype == torch.bfloat16 and y.shape == y_eager.shape
        names = ["y", "x", *(name for name, _ in model.named_parameters())]
        errs = {}
        for name, a, b in zip(names, (y, *g), (y_eager, *g_eager)):
            assert torch.isfinite(a).all(), name
            errs[name] = _rel_err(a, b)
        print(f"N={n}: compiled vs eager rel-RMS", {k: f"{e:.1e}" for k, e in errs.items()})
        worst = max(errs, key=errs.get)
        assert errs[worst] <= 1e-2, f"N={n} {worst}: compiled vs eager rel-RMS {errs[worst]:.2e}"
    assert compiles[0] >= 1 and compiles[1] == compiles[0], f"recompiled: {compiles}"


@pytest.mark.gpu
@needs_real_gpu
def test_opcheck_on_cuda_bf16_non_contiguous_inputs():
    """opcheck each custom op with CUDA bf16 transposed views, D = 64, 64-token blocks
    (the tensor-core path), Nq = 100 and Nk = 130 (partial last blocks)."""
    assert_tensor_core_path(torch.bfloat16, GPU_D, 64, 64)
    torch.manual_seed(1)
    q, k, v = (
        torch.randn(1, n, 2, GPU_D, device="cuda").to(torch.bfloat16).transpose(1, 2)
        for n in (100, 130, 130)
    )
    assert not q.is_contiguous()
    cls_args = (q, k, 0.34, 0.34, 64, 64, GPU_D**-0.5, "gpu")  # 1 / 1 / 1 of 3 blocks
    torch.library.opcheck(torch.ops.sla_numba.classify.default, cls_args)
    bm = torch.ops.sla_numba.classify(*cls_args)
    assert bm.is_cuda and bm.shape == (1, 2, 2, 3)
    assert [(bm == c).sum().item() for c in (1, 0, -1)] == [4, 4, 4]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    for scope in (0, 1):
        fwd_args = (q, k, v, bm, 64, 64, GPU_D**-0.5, 1, 1e-6, scope, "gpu")
        torch.library.opcheck(torch.ops.sla_numba.forward.default, fwd_args)
        o_s, o_l, lse, _ = (t.detach() for t in torch.ops.sla_numba.forward(*fwd_args))
        assert o_s.dtype == torch.bfloat16 and lse.dtype == torch.float32
        do_s, do_l = (
            torch.randn(1, 100, 2, GPU_D, device="cuda").to(torch.bfloat16).transpose(1, 2)
            for _ in range(2)
        )
        bwd_args = (q.detach(), k.detach(), v.detach(), o_s, o_l, lse, do_s, do_l, bm)
        torch.library.opcheck(
            torch.ops.sla_numba.backward.default,
            (*bwd_args, 64, 64, GPU_D**-0.5, 1, 1e-6, scope, "gpu"),
        )
