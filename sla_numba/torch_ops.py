"""The torch boundary: custom ops, their autograd, and the ``nn.Module``.

Three layers, as in FlashAttention's interface:

1. raw kernels registered with ``torch.library.custom_op`` (``sla_numba::classify``,
   ``sla_numba::forward``, ``sla_numba::backward``) with fake (meta) kernels, so
   ``torch.compile(fullgraph=True)`` sees through them and ``opcheck`` passes;
2. ``register_autograd`` on the forward op: it saves exactly what the backward
   kernel needs (q, k, v, the map, O_s, O_l and the LSE; with
   ``SLA_NUMBA_SAVE_STATES=1`` on the gpu backend also the linear branch's row
   states H_i, Z_i, which the backward then does not recompute);
3. :func:`sla_attention` below, which the public :func:`sla_numba.sla_attention`
   (in :mod:`sla_numba.api`) calls for torch tensors: it adds the projection
   ``O_l Wᵀ + b`` in plain torch, so autograd gives dW and db and passes
   ``dO_l = dO · W`` on. The ``nn.Module`` is in :mod:`sla_numba.modules`.

Imports run one way: api -> torch_ops -> backends (this module never imports the API).

The ops take ``backend`` ("cpu" or "gpu") as an argument; the API has already
resolved it. The cpu backend reads numpy views of the tensors (fp16/bf16 are
converted to fp32 first); the gpu backend takes torch CUDA tensors directly.
"""

import numpy as np
import torch

from . import config
from ._backends import compute_dtype, load_backend
from ._compile_log import describe, notice
from ._params import block_counts, n_blocks

_TORCH_DTYPE = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int8): torch.int8,
}


def _to_numpy(t, dtype=None):
    """A C-contiguous numpy array of a CPU tensor (fp16/bf16 → fp32).

    A non-contiguous tensor (the transposed view of a DiT's q, k, v) is copied
    here, once, by torch (multi-threaded, together with any dtype conversion);
    a contiguous one in the compute dtype is shared, not copied.
    """
    if dtype is None:
        dtype = compute_dtype(str(t.dtype).replace("torch.", ""))
    return t.detach().cpu().to(_TORCH_DTYPE[np.dtype(dtype)]).contiguous().numpy()


def _run(backend, fn_name, tensors, *args, **kwargs):
    """Call ``backend.fn_name`` on tensors; returns torch tensors on q's device.
    Keyword arguments are passed on; a tensor among them is handed over as the
    tensors are."""
    device = tensors[0].device
    mod = load_backend(backend)
    label = describe(
        fn_name, tensors[0].shape[-1], str(tensors[0].dtype).replace("torch.", ""), backend
    )
    if device.type == "cuda":
        # The gpu backend reads torch CUDA tensors directly (any float dtype),
        # launches on torch's current stream and allocates with torch.
        kw = {n: x.contiguous() if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()}
        with notice(label):
            return getattr(mod, fn_name)(*[t.contiguous() for t in tensors], *args, **kw)
    # Host tensors: numpy views. With backend="gpu" this only happens under the
    # CUDA simulator (the API refuses it otherwise); the gpu backend then copies.
    arrays = [_to_numpy(t, np.int8 if t.dtype == torch.int8 else None) for t in tensors]
    kw = {n: _to_numpy(x) if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()}
    with notice(label):
        outs = getattr(mod, fn_name)(*arrays, *args, **kw)
    if isinstance(outs, tuple):
        return tuple(torch.from_numpy(np.asarray(o)) for o in outs)
    return torch.from_numpy(np.asarray(outs))


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# 1. Custom ops
# ---------------------------------------------------------------------------


@torch.library.custom_op("sla_numba::classify", mutates_args=())
def _classify_op(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: float,
    skip: float,
    block_q: int,
    block_k: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    return _classify_impl(q, k, topk, skip, block_q, block_k, scale, backend)


def _classify_impl(q, k, topk, skip, block_q, block_k, scale, backend):
    # The block counts are computed here, where the sizes are plain ints: under
    # torch.compile with dynamic shapes Nk is symbolic outside the op, and
    # floor(topk * Mk) cannot be taken of a symbol.
    n_crit, n_skip = block_counts(n_blocks(k.shape[2], block_k), topk, skip)
    return _run(backend, "classify", [q, k], n_crit, n_skip, block_q, block_k, scale)


@_classify_op.register_fake
def _(q, k, topk, skip, block_q, block_k, scale, backend):
    B, H, Nq, _ = q.shape
    Mq, Mk = n_blocks(Nq, block_q), n_blocks(k.shape[2], block_k)
    return q.new_empty((B, H, Mq, Mk), dtype=torch.int8)


@torch.library.custom_op("sla_numba::forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    feature_map: int,
    eps: float,
    linear_scope: int,
    backend: str,
    save_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(
        q, k, v, block_map, block_q, block_k, scale, feature_map, eps, linear_scope, backend,
        save_states,
    )  # fmt: skip


def _forward_impl(
    q, k, v, block_map, block_q, block_k, scale, feature_map, eps, linear_scope, backend,
    save_states=False,
):  # fmt: skip
    """(o_s, o_l, lse, row_states): ``row_states`` is the gpu forward's linear-branch row
    sums (``gpu.forward(return_states=True)``) with ``save_states``, else an empty
    tensor (nothing is kept)."""
    _check_save_states(save_states, backend)
    outs = _run(
        backend,
        "forward",
        [q, k, v, block_map],
        block_q,
        block_k,
        scale,
        feature_map,
        eps,
        linear_scope,
        **({"return_states": True} if save_states else {}),
        # CUDA fp16 / bf16: O_s, O_l come back in q's dtype (the tensor-core sparse kernel
        # writes them so; the same bits as the .to() below would give)
        **({"half_out": True} if _half_cuda(q, backend) else {}),
    )
    o_s, o_l, lse = outs[:3]
    states = outs[3].to(q.device) if save_states else q.new_empty(0, dtype=_lse_dtype(q))
    return (
        o_s.to(device=q.device, dtype=q.dtype),
        o_l.to(device=q.device, dtype=q.dtype),
        lse.to(device=q.device, dtype=_lse_dtype(q)),
        states,
    )


def _half_cuda(q, backend):
    return backend == "gpu" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _check_save_states(save_states, backend):
    if save_states and backend != "gpu":
        raise ValueError(
            f"save_states=True with backend={backend!r}: only the gpu backend's forward "
            "hands back its row states (the cpu kernels never materialise them)"
        )


def _row_states_fake(q, block_q, block_k):
    """An empty tensor shaped as the gpu forward's row states (``gpu.forward.row_states_shape``)."""
    from .gpu.forward import row_states_shape

    B, H, Nq, D = q.shape
    dtype = str(q.dtype).replace("torch.", "")
    shape, np_dtype = row_states_shape(B, H, Nq, int(D), dtype, block_q, block_k)
    return q.new_empty(shape, dtype=_TORCH_DTYPE[np_dtype])


# The fake kernels describe the real outputs exactly, strides included: the real
# ops return fresh C-contiguous tensors whatever the strides of their inputs (a
# transposed q is read through a contiguous copy), so ``new_empty(shape)``, not
# ``empty_like`` (which would copy a permuted input's strides).
@_forward_op.register_fake
def _(
    q, k, v, block_map, block_q, block_k, scale, feature_map, eps, linear_scope, backend,
    save_states=False,
):  # fmt: skip
    _check_save_states(save_states, backend)
    if save_states:
        states = _row_states_fake(q, block_q, block_k)
    else:
        states = q.new_empty(0, dtype=_lse_dtype(q))
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        q.new_empty(q.shape[:3], dtype=_lse_dtype(q)),
        states,
    )


@torch.library.custom_op("sla_numba::backward", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_s: torch.Tensor,
    o_l: torch.Tensor,
    lse: torch.Tensor,
    do_s: torch.Tensor,
    do_l: torch.Tensor,
    block_map: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    feature_map: int,
    eps: float,
    linear_scope: int,
    backend: str,
    row_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(
        q, k, v, o_s, o_l, lse, do_s, do_l, block_map,
        block_q, block_k, scale, feature_map, eps, linear_scope, backend, row_states,
    )  # fmt: skip


def _backward_impl(
    q, k, v, o_s, o_l, lse, do_s, do_l, block_map,
    block_q, block_k, scale, feature_map, eps, linear_scope, backend, row_states=None,
):  # fmt: skip
    """``row_states``: the forward's (``save_states``), or None: the backward recomputes them."""
    if row_states is not None:
        _check_save_states(True, backend)
    dq, dk, dv = _run(
        backend,
        "backward",
        [q, k, v, o_s, o_l, lse, do_s, do_l, block_map],
        block_q,
        block_k,
        scale,
        feature_map,
        eps,
        linear_scope,
        **({} if row_states is None else {"row_states": row_states}),
    )
    return (
        dq.to(device=q.device, dtype=q.dtype),
        dk.to(device=q.device, dtype=k.dtype),
        dv.to(device=q.device, dtype=v.dtype),
    )


@_backward_op.register_fake
def _(
    q,
    k,
    v,
    o_s,
    o_l,
    lse,
    do_s,
    do_l,
    block_map,
    block_q,
    block_k,
    scale,
    feature_map,
    eps,
    linear_scope,
    backend,
    row_states=None,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------
# 2. Autograd of the forward op
# ---------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, block_map, block_q, block_k, scale, feature_map, eps, linear_scope, backend = inputs[
        :11
    ]
    save_states = inputs[11] if len(inputs) > 11 else False
    o_s, o_l, lse, states = output
    # the row states only when asked for (SLA_NUMBA_SAVE_STATES): else nothing extra
    ctx.save_for_backward(q, k, v, block_map, o_s, o_l, lse, *([states] if save_states else []))
    ctx.params = (block_q, block_k, scale, feature_map, eps, linear_scope, backend)
    ctx.mark_non_differentiable(states)


def _backward(ctx, grad_o_s, grad_o_l, _grad_lse, _grad_states=None, backward=None):
    q, k, v, block_map, o_s, o_l, lse, *states = ctx.saved_tensors
    # A branch the caller did not use has no gradient: it contributes zero.
    grad_o_s = torch.zeros_like(o_s) if grad_o_s is None else grad_o_s.contiguous()
    grad_o_l = torch.zeros_like(o_l) if grad_o_l is None else grad_o_l.contiguous()
    dq, dk, dv = (backward or torch.ops.sla_numba.backward)(
        q, k, v, o_s, o_l, lse, grad_o_s, grad_o_l, block_map, *ctx.params, *states
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "sla_numba: double backward (a gradient of SLA's gradient, e.g. torch.autograd.grad "
        "with create_graph=True followed by another backward) is not supported; the "
        "backward kernels compute first-order gradients only"
    )


def _setup_backward_context(ctx, inputs, output):
    pass


# First-order backward with create_graph=True still works; only differentiating the
# backward itself raises, with the sentence above instead of "no autograd formula".
_backward_op.register_autograd(_no_double_backward, setup_context=_setup_backward_context)


# ---------------------------------------------------------------------------
# 3. The eager way: the same kernels without the custom-op layer
# ---------------------------------------------------------------------------
# The custom ops are what torch.compile, torch.export, FakeTensor and opcheck need. In a
# plain eager call they only cost: torch's wrapper of a custom op takes ~120-250 µs a
# call on the H200 machine's host (tools/host_overhead.py, BENCHMARKS.md), and its very
# first call imports torch._dynamo (1.2 s on the CI machine, ~4 s on the H200 machine,
# where torch's site-packages keep no bytecode). So an eager call -- not traced by
# torch.compile, no dispatch or function mode active (FakeTensor, make_fx, ...), no
# functorch transform, plain tensors -- runs the same implementations through the
# autograd.Function below: same kernels, same saved tensors, same gradients (tests
# compare the two ways bit for bit). ``SLA_NUMBA_TORCH_OPS=always`` sends every call
# through the custom ops.


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no __torch_function__ / dispatch of their own


def _eager(*tensors):
    """Whether this call may skip the custom-op layer (see above)."""
    if torch.compiler.is_compiling() or config.torch_ops() == "always":
        return False  # (is_compiling first: dynamo folds it, and never reads the env)
    try:
        if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
            return False
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return False
    except AttributeError:  # another torch's internals: take the custom ops
        return False
    return all(type(t) in _PLAIN for t in tensors)


class _EagerForward(torch.autograd.Function):
    """``sla_numba::forward`` and its autograd (section 2) as one autograd.Function."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_o_s, grad_o_l, grad_lse, grad_states):
        grads = _backward(ctx, grad_o_s, grad_o_l, grad_lse, grad_states, backward=_backward_impl)
        if torch.is_grad_enabled():  # create_graph=True: dq, dk, dv get a graph node
            incoming = [g for g in (grad_o_s, grad_o_l) if g is not None]
            grads = (*_RefuseDoubleBackward.apply(*grads[:3], *incoming), *grads[3:])
        return grads


class _RefuseDoubleBackward(torch.autograd.Function):
    """dq, dk, dv as a function of the incoming gradients (returned as they are):
    differentiating them raises, as the autograd of ``sla_numba::backward`` does."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *incoming):
        return dq, dk, dv

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, *grads)


# ---------------------------------------------------------------------------
# 4. What the API and the module call
# ---------------------------------------------------------------------------


def classify(q, k, topk, skip, block_q, block_k, scale, backend):
    """Block map of torch tensors q, k (B, H, N, D) (validated by the API)."""
    op = _classify_impl if _eager(q, k) else torch.ops.sla_numba.classify
    return op(q.detach(), k.detach(), topk, skip, block_q, block_k, scale, backend)


def _together(fn, block_map, q):
    """``fn(block_map)``: classification and forward, run so that a first call on a
    GPU compiles the kernels of both side by side (``gpu/_precompile.py``)."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return fn(block_map)
    from .gpu._precompile import run_ahead

    dtype = str(q.dtype).replace("torch.", "")
    with notice(describe("forward", q.shape[-1], dtype, "gpu")):
        return run_ahead(fn, block_map)


def autocast_inputs(q, k, v):
    """q, k, v as ``torch.autocast`` hands them to SDPA: under autocast on q's device
    each float32 tensor is cast to the autocast dtype, the others are left alone.

    Each one on its own, as autocast does: q and k in fp32 next to a bf16 v (on a
    GPU autocast runs an RMSNorm of q and k, e.g. Wan's, in fp32) meet in bf16.
    Called by the API before it checks that the dtypes agree.
    """
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return q, k, v
    low = torch.get_autocast_dtype(dev)
    return tuple(
        x.to(low) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x
        for x in (q, k, v)
    )


def sla_attention(
    q,
    k,
    v,
    block_map,
    topk,
    skip,
    block_q,
    block_k,
    scale,
    feature_map,
    eps,
    linear_scope,
    proj_weight,
    proj_bias,
    return_parts,
    backend,
):
    """torch path of :func:`sla_numba.sla_attention` (arguments already validated;
    q, k, v in the (B, H, N, D) axis order, any strides).

    Under ``torch.autocast`` float32 inputs are cast to the autocast dtype first (as
    autocast does for SDPA), so the output has that dtype and, on a GPU, bf16/fp16
    take the tensor-core path; float64 inputs are left alone, as autocast does.
    """
    q, k, v = autocast_inputs(q, k, v)

    def classify_and_forward(block_map):
        if block_map is None:
            block_map = classify(q, k, topk, skip, block_q, block_k, scale, backend)
        else:
            block_map = block_map.to(torch.int8).contiguous()
        eager = _eager(q, k, v, block_map)
        forward = _EagerForward.apply if eager else torch.ops.sla_numba.forward
        return forward(
            q, k, v, block_map, block_q, block_k, scale, feature_map, eps, linear_scope, backend,
            save,
        )  # fmt: skip

    # keep the gpu forward's row states for the backward (SLA_NUMBA_SAVE_STATES): only
    # when a backward can follow, else the forward frees them as before
    save = (
        backend == "gpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
        and config.save_states()
    )
    o_s, o_l, _, _ = _together(classify_and_forward, block_map, q)
    if return_parts:
        return o_s, o_l
    if proj_weight is not None:
        o_l = torch.nn.functional.linear(o_l.to(proj_weight.dtype), proj_weight, proj_bias).to(
            q.dtype
        )
    return o_s + o_l
