"""CUDA graphs: ``sla_attention`` on CUDA tensors captured with ``torch.cuda.graph``.

On a GPU (skipped without one: the simulator has no streams to capture): after one
warm-up call, the forward, and the forward with its backward (``torch.autograd.grad``
inside the capture, and ``torch.cuda.make_graphed_callables``), are captured; new
values are copied into the static inputs and the graph replayed; every output must
equal, bit for bit, an eager call on the same values. Replays launch nothing through
the launcher (no host work of ours). A capture that meets a kernel not loaded in the
process raises ``CaptureError`` (the logic of that check is tested without a GPU in
test_launcher.py and test_precompile.py). The README's example runs as written.
"""

import importlib

import pytest
import torch
from numba import config

from sla_numba import sla_attention

launcher = importlib.import_module("sla_numba.gpu._launcher")

pytestmark = pytest.mark.skipif(
    bool(config.ENABLE_CUDASIM) or not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

# bf16 takes the tensor-core kernels (cc >= 8.0), fp32 the SIMT ones (the configurations
# of test_launcher.py: kernels other GPU tests load too); N = 300 leaves a partial last
# block; with block 64 (5 key blocks) 1 critical, 1 negligible.
CASES = [(torch.bfloat16, 128), (torch.float32, 64)]
B, H, N = 1, 2, 300
KW = dict(topk=0.25, skip=0.25, backend="gpu")


def _inputs(seed, dtype, D, n=4):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, D, device="cuda", generator=g).to(dtype) for _ in range(n)]


def _capture(fn, *static):
    """Warm ``fn`` up on a side stream (its kernels load), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def _replay(graph, static, values):
    with torch.no_grad():
        for s, x in zip(static, values):
            s.copy_(x)
    before = dict(launcher.counts)
    graph.replay()
    assert launcher.counts == before  # a replay runs no Python of ours
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype,D", CASES)
def test_forward_graph_replays_eager_bits(dtype, D):
    def fwd(q, k, v):
        with torch.no_grad():
            return sla_attention(q, k, v, **KW)

    static = _inputs(0, dtype, D, 3)
    graph, out = _capture(fwd, *static)
    seen = []
    for seed in (1, 2):
        values = _inputs(seed, dtype, D, 3)
        _replay(graph, static, values)
        ref = fwd(*values)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert torch.equal(out, ref)
        seen.append(out.clone())
    assert not torch.equal(seen[0], seen[1])  # the replays did compute anew


@pytest.mark.parametrize("dtype,D", CASES)
def test_forward_backward_graph_replays_eager_bits(dtype, D):
    """Forward and ``torch.autograd.grad`` in one graph (the backward's kernels run on
    the autograd engine's thread, on the capturing stream)."""

    def step(q, k, v, do):
        o = sla_attention(q, k, v, **KW)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    q, k, v, do = _inputs(0, dtype, D)
    static = [x.requires_grad_(True) for x in (q, k, v)] + [do]
    graph, outs = _capture(step, *static)
    for seed in (1, 2):
        values = _inputs(seed, dtype, D)
        _replay(graph, static, values)
        ref = step(*[x.requires_grad_(i < 3) for i, x in enumerate(values)])
        torch.cuda.synchronize()
        for name, got, want in zip(("o", "dq", "dk", "dv"), outs, ref):
            assert torch.isfinite(got).all(), name
            assert torch.equal(got, want), name


def test_make_graphed_callables_gives_eager_bits():
    dtype, D = CASES[0]

    def attn(q, k, v):
        return sla_attention(q, k, v, **KW)

    sample = tuple(x.requires_grad_(True) for x in _inputs(0, dtype, D, 3))
    graphed = torch.cuda.make_graphed_callables(attn, sample)
    values = _inputs(3, dtype, D)
    got_in = [x.clone().requires_grad_(True) for x in values[:3]]
    want_in = [x.clone().requires_grad_(True) for x in values[:3]]
    got = graphed(*got_in)  # replays the forward graph (a static output buffer)
    got.backward(values[3])  # ... and the backward graph
    want = attn(*want_in)
    want.backward(values[3])
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    for a, b in zip(got_in, want_in):
        assert torch.equal(a.grad, b.grad)


def test_capture_without_warm_up_is_a_clear_error(monkeypatch):
    """No kernel loaded (the launcher's table emptied for the test): the capture stops
    at the first launch with ``CaptureError``, and the stream works afterwards."""
    dtype, D = CASES[0]
    q, k, v = _inputs(4, dtype, D, 3)
    with torch.no_grad():
        ref = sla_attention(q, k, v, **KW)
        monkeypatch.setattr(launcher, "_compiled", {})
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(launcher.CaptureError, match="capturing a CUDA graph.*warm-up"):
            with torch.cuda.graph(graph):
                sla_attention(q, k, v, **KW)
        assert launcher._compiled == {}  # nothing was loaded during the capture
        again = sla_attention(q, k, v, **KW)  # outside a capture: loads and runs
    torch.cuda.synchronize()
    assert torch.equal(again, ref)


def test_readme_cuda_graphs_example_runs():
    """The README's "CUDA graphs" example runs as written (its last line asserts that
    the replay equals the eager call)."""
    import os
    import re

    readme = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "README.md")
    with open(readme, encoding="utf-8") as f:
        section = f.read().split("### CUDA graphs", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {}
    exec(compile(block, "README.md", "exec"), env)  # noqa: S102 - our own README
    assert env["o"].shape == (1, 8, 4096, 64) and torch.equal(env["o"], env["ref"])
