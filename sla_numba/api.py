"""The public functions: ``classify_blocks`` and ``sla_attention``.

This layer does three things and nothing else:

1. validate every argument once, naming the one that is wrong;
2. pick the backend (``"cpu"`` or ``"gpu"``) -- an explicit request is obeyed or
   refused with an error, never swapped for another backend;
3. hand the arrays to that backend (numpy / CuPy directly, torch through the
   custom ops in :mod:`sla_numba.torch_ops` so autograd and ``torch.compile``
   work) and combine the two branches: ``O = O_s + O_l Wᵀ + b``.

The kernels themselves live in :mod:`sla_numba.cpu` and :mod:`sla_numba.gpu`,
twins that follow the contract written in ``docs/internals.md``.
"""

import dataclasses
import importlib
from typing import Any

import numpy as np

from . import _params
from ._backends import compute_dtype, load_backend
from ._compile_log import describe, notice
from ._gpu_check import require_gpu
from ._kinds import FLOAT_DTYPES, array_kind, device_of, dtype_name, is_on_gpu

#: numpy array, torch tensor or CuPy array (torch and CuPy are optional imports)
Array = Any

# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _check_tensor(name, x, kind=None):
    """A 4-D floating array (B, H, N, D) with no empty axis; returns its kind."""
    k = array_kind(x)
    if k is None:
        raise TypeError(
            f"{name} must be a numpy array, torch tensor or CuPy array, got {type(x).__name__}"
        )
    if kind is not None and k != kind:
        raise TypeError(
            f"{name} is a {k} array but q is a {kind} array; pass all inputs from one library"
        )
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (B, H, N, D), got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):  # no int(): sizes may be symbolic under torch.compile
        raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")
    dt = dtype_name(x, k)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating array ({', '.join(FLOAT_DTYPES)}), got {dt}")
    return k


def _check_qkv(q, k, v):
    """Shapes, dtypes and devices of q (B,H,Nq,D), k and v (B,H,Nk,D) agree."""
    kind = _check_tensor("q", q)
    _check_tensor("k", k, kind)
    _check_tensor("v", v, kind)
    B, H, _, D = q.shape
    for name, x in (("k", k), ("v", v)):
        b, h, _, d = x.shape
        if b != B or h != H:
            raise ValueError(f"{name} has batch/heads {(b, h)} but q has {(B, H)}")
        if d != D:
            raise ValueError(f"{name} has head_dim {d} but q has {D}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v has {v.shape[2]} tokens but k has {k.shape[2]}")
    dq = dtype_name(q, kind)
    for name, x in (("k", k), ("v", v)):
        if dtype_name(x, kind) != dq:
            raise TypeError(f"{name} has dtype {dtype_name(x, kind)} but q has {dq}")
        if device_of(x, kind) != device_of(q, kind):
            raise ValueError(f"{name} is on {device_of(x, kind)} but q is on {device_of(q, kind)}")
    return kind


def _to_bhnd(name, x, layout):
    """``x`` in the (B, H, N, D) axis order: a view (no copy) for layout "BNHD"."""
    if layout == "BHND" or array_kind(x) is None or x.ndim != 4:
        return x  # nothing to swap; _check_tensor reports what is wrong
    return x.swapaxes(1, 2)


def _resolve_backend(backend, q, kind):
    """Turn ``backend`` into 'cpu' or 'gpu' for these inputs, or refuse clearly."""
    _params.check_backend(backend)
    on_gpu = is_on_gpu(q, kind)
    if backend == "auto":
        return "gpu" if on_gpu else "cpu"
    if backend == "cpu" and on_gpu:
        raise ValueError(
            f"backend='cpu' needs host arrays, but q is on {device_of(q, kind)}; "
            "move the inputs to the CPU or use backend='gpu'"
        )
    if backend == "gpu" and not on_gpu:
        if kind == "torch" and not _gpu_simulated():
            raise ValueError(
                "backend='gpu' needs CUDA tensors, but q is on cpu; "
                "move the inputs with .cuda() or use backend='cpu'"
            )
        # numpy arrays are copied to the device and back by the gpu backend
        # (and under the CUDA simulator, torch CPU tensors too, for tests).
        # No device, no driver, no numba-cuda: one RuntimeError saying which.
        require_gpu()
    return backend


def _gpu_simulated():
    try:
        from numba import config
    except ImportError:  # pragma: no cover - numba is a hard dependency
        return False
    return bool(config.ENABLE_CUDASIM)


def _check_block_map(block_map, q, kind, shape):
    """``block_map``: integer (B, H, Mq, Mk) array of 1 / 0 / -1, like q."""
    k = array_kind(block_map)
    if k != kind:
        raise TypeError(f"block_map must be a {kind} array like q, got {type(block_map).__name__}")
    if tuple(int(s) for s in block_map.shape) != shape:
        raise ValueError(
            f"block_map must have shape (B, H, Mq, Mk) = {shape}, got {tuple(block_map.shape)}"
        )
    dt = dtype_name(block_map, k)
    if not (dt.startswith("int") or dt.startswith("uint")):
        raise TypeError(f"block_map must be an integer array (int8), got {dt}")
    if device_of(block_map, k) != device_of(q, kind):
        raise ValueError(
            f"block_map is on {device_of(block_map, k)} but q is on {device_of(q, kind)}"
        )
    # Checking the values of a GPU array would force a device->host sync;
    # there, values other than 1 / 0 count as negligible (documented).
    if not is_on_gpu(block_map, k):
        host = block_map.detach().numpy() if k == "torch" else block_map
        bad = (host != 1) & (host != 0) & (host != -1)
        if bad.any():
            raise ValueError(
                "block_map values must be 1 (critical), 0 (marginal) or -1 (negligible), "
                f"found {host[bad].flat[0]}"
            )


def _check_proj(proj_weight, proj_bias, q, kind, D):
    for name, x, shape in (("proj_weight", proj_weight, (D, D)), ("proj_bias", proj_bias, (D,))):
        if x is None:
            continue
        if array_kind(x) != kind:
            raise TypeError(f"{name} must be a {kind} array like q, got {type(x).__name__}")
        if tuple(int(s) for s in x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if dtype_name(x, kind) not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be floating, got {dtype_name(x, kind)}")
        if device_of(x, kind) != device_of(q, kind):
            raise ValueError(f"{name} is on {device_of(x, kind)} but q is on {device_of(q, kind)}")
    if proj_bias is not None and proj_weight is None:
        raise ValueError("proj_bias given without proj_weight")


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockClassification:
    """Result of :func:`classify_blocks`.

    Attributes
    ----------
    map : int8 array (B, H, Mq, Mk)
        1 critical (exact softmax attention), 0 marginal (linear attention),
        -1 negligible (skipped).
    lut : int32 array (B, H, Mq, n_crit)
        The critical key-block indices of each query-block row, ascending.
    n_crit, n_skip : int
        Critical and negligible key blocks per row.
    block_q, block_k : int
        Block sizes the map was made with.
    """

    map: Any
    lut: Any
    n_crit: int
    n_skip: int
    block_q: int
    block_k: int


def critical_lut(block_map, n_crit):
    """Ascending critical key-block indices per row, (B, H, Mq, n_crit), int32.

    A stable sort of "is this block not critical?" puts the critical blocks first,
    in index order. Works unchanged on numpy, torch and CuPy arrays.
    """
    kind = array_kind(block_map)
    if kind == "torch":
        import torch

        order = torch.argsort((block_map != 1).to(torch.int8), dim=-1, stable=True)
        return order[..., :n_crit].to(torch.int32).contiguous()
    xp = np if kind == "numpy" else importlib.import_module("cupy")
    order = xp.argsort((block_map != 1).astype(np.int8), axis=-1, kind="stable")
    return xp.ascontiguousarray(order[..., :n_crit].astype(np.int32))


def _block(name, block, n):
    """A checked block size, made small when it exceeds both the tokens and
    ``_params.LARGE_BLOCK`` (``_params.effective_block``). Only such huge blocks look at
    the token count, so ordinary ones stay plain ints under torch.compile's symbolic
    sizes."""
    block = _params.check_block_size(name, block)
    if block > _params.LARGE_BLOCK:
        block = _params.effective_block(block, int(n))
    return block


def _prepare_params(q, k, topk, skip, block_q, block_k, scale):
    topk, skip = _params.check_topk_skip(topk, skip)
    block_q = _block("block_q", block_q, q.shape[2])
    block_k = _block("block_k", block_k, k.shape[2])
    scale = _params.check_scale(scale, int(q.shape[-1]))
    return topk, skip, block_q, block_k, scale


def _counts(k, topk, skip, block_k):
    """(n_crit, n_skip) for keys k (B, H, Nk, D); concrete sizes only (the torch
    path leaves this to its classify op, so a symbolic Nk compiles)."""
    return _params.block_counts(_params.n_blocks(int(k.shape[2]), block_k), topk, skip)


def classify_blocks(
    q: Array,
    k: Array,
    *,
    topk: float = 0.05,
    skip: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    scale: "float | None" = None,
    backend: str = "auto",
    layout: str = "BHND",
) -> BlockClassification:
    """Sort key blocks, per query block, into critical / marginal / negligible.

    Query and key blocks are mean-pooled; the block score is
    ``S[i, j] = scale * pq[i] · pk[j]``. In each row the ``n_crit`` best blocks
    are critical, the ``n_skip`` worst negligible, the rest marginal; ties go to
    the lower key-block index. ``n_crit = min(Mk, max(1, floor(topk*Mk)))`` and
    ``n_skip = min(Mk - n_crit, floor(skip*Mk))``.

    Parameters
    ----------
    q : (B, H, Nq, D) array;  k : (B, H, Nk, D) array (numpy, torch or CuPy).
    topk : float in (0, 1];  skip : float in [0, 1).
    block_q, block_k : int >= 1; scale : float, default 1/sqrt(D).
    backend : "auto" | "cpu" | "gpu".
    layout : "BHND" (default) | "BNHD" (q, k given as (B, N, H, D)); the map is
        (B, H, Mq, Mk) either way.

    Returns
    -------
    BlockClassification with ``.map`` (int8, (B, H, Mq, Mk)) and ``.lut``
    (int32, (B, H, Mq, n_crit)), arrays of the same library as ``q``.

    Example
    -------
    >>> import numpy as np, sla_numba
    >>> q = np.random.default_rng(0).standard_normal((1, 2, 256, 32), dtype=np.float32)
    >>> c = sla_numba.classify_blocks(q, q, topk=0.25, skip=0.25, block_q=64, block_k=64)
    >>> c.map.shape, c.lut.shape, int((c.map == 1).sum(-1).max())
    ((1, 2, 4, 4), (1, 2, 4, 1), 1)
    """
    _params.check_layout(layout)
    q, k = _to_bhnd("q", q, layout), _to_bhnd("k", k, layout)
    kind = _check_tensor("q", q)
    _check_tensor("k", k, kind)
    if tuple(int(s) for s in k.shape[:2]) != tuple(int(s) for s in q.shape[:2]):
        raise ValueError(f"k has batch/heads {tuple(k.shape[:2])} but q has {tuple(q.shape[:2])}")
    if int(k.shape[3]) != int(q.shape[3]):
        raise ValueError(f"k has head_dim {int(k.shape[3])} but q has {int(q.shape[3])}")
    if dtype_name(k, kind) != dtype_name(q, kind):
        raise TypeError(f"k has dtype {dtype_name(k, kind)} but q has {dtype_name(q, kind)}")
    if device_of(k, kind) != device_of(q, kind):
        raise ValueError(f"k is on {device_of(k, kind)} but q is on {device_of(q, kind)}")
    topk, skip, block_q, block_k, scale = _prepare_params(q, k, topk, skip, block_q, block_k, scale)
    n_crit, n_skip = _counts(k, topk, skip, block_k)
    backend = _resolve_backend(backend, q, kind)
    if kind == "torch":
        from . import torch_ops

        block_map = torch_ops.classify(q, k, topk, skip, block_q, block_k, scale, backend)
    else:
        mod = load_backend(backend)
        with notice(describe("classify", int(q.shape[-1]), dtype_name(q, kind), backend)):
            block_map = mod.classify(
                *_host_inputs(kind, backend, q, k), n_crit, n_skip, block_q, block_k, scale
            )
    return BlockClassification(
        block_map, critical_lut(block_map, n_crit), n_crit, n_skip, block_q, block_k
    )


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def _host_inputs(kind, backend, *arrays):
    """numpy/CuPy arrays as the backend wants them: C-contiguous; for the CPU
    kernels also in the compute dtype (the GPU kernels read fp16 themselves, and
    fp16 is what sends them down the tensor-core path)."""
    if kind == "cupy":
        import cupy

        return [cupy.ascontiguousarray(a) for a in arrays]
    if backend == "gpu":
        return [np.ascontiguousarray(a) for a in arrays]
    return [np.ascontiguousarray(a, dtype=compute_dtype(np.dtype(a.dtype).name)) for a in arrays]


def sla_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    topk: float = 0.05,
    skip: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    scale: "float | None" = None,
    block_map: "Array | None" = None,
    proj_weight: "Array | None" = None,
    proj_bias: "Array | None" = None,
    return_parts: bool = False,
    backend: str = "auto",
    eps: float = _params.EPS,
    linear_scope: str = "marginal",
    layout: str = "BHND",
) -> "Array | tuple[Array, Array]":
    """Sparse-Linear Attention: ``O = O_s + O_l Wᵀ + b``.

    Per query block, the critical key blocks get exact softmax attention (O_s),
    the marginal ones linear attention with feature map φ (O_l), the negligible
    ones nothing. Without ``proj_weight``, W is the identity and b is 0.

    Parameters
    ----------
    q : (B, H, Nq, D);  k, v : (B, H, Nk, D)
        numpy arrays, torch tensors (CPU or CUDA) or CuPy arrays, all alike.
        float16 / bfloat16 (torch) / float32 / float64; computed in float32
        (float64 for float64 input) and returned in the input dtype.
    topk, skip : float
        Shares of key blocks per row that are critical / negligible
        (see :func:`classify_blocks`). Ignored when ``block_map`` is given.
    block_q, block_k : int
        Token block sizes.
    feature_map : "softmax" | "elu" | "relu"
        φ of the linear branch, applied per token along D.
    scale : float, default 1/sqrt(D).
    block_map : int8 (B, H, Mq, Mk), optional
        Use this map (1 / 0 / -1) instead of classifying.
    proj_weight : (D, D), proj_bias : (D,), optional
        The learnable projection of the linear branch (``nn.Linear`` layout).
    return_parts : bool
        Return ``(O_s, O_l)`` (before projection) instead of O.
    backend : "auto" | "cpu" | "gpu"
        "auto" picks by where the inputs live; an explicit choice is never
        replaced by another backend.
    eps : float
        Guard of the linear branch's denominator.
    linear_scope : "marginal" | "global"
        Key blocks of the linear branch: the marginal ones (default, the paper)
        or all of them (the published thu-ml/SLA code; docs/algorithm.md).
    layout : "BHND" | "BNHD"
        Axis order of q, k, v and of the output: (B, H, N, D) (default, as SDPA)
        or (B, N, H, D) (as ``x.view(B, N, H, D)`` in a DiT, and flash_attn).
        "BNHD" inputs are read as transposed views and O is returned as one;
        ``block_map`` is (B, H, Mq, Mk) in both.

    Returns
    -------
    O (B, H, Nq, D) (or (B, Nq, H, D) with layout="BNHD"), or (O_s, O_l); same
    library, device and dtype as ``q``.
    torch outputs are differentiable w.r.t. q, k, v, proj_weight, proj_bias.

    Example
    -------
    >>> import numpy as np, sla_numba
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 200, 32), dtype=np.float32) for _ in range(3))
    >>> o = sla_numba.sla_attention(q, k, v, topk=0.25, skip=0.25, block_q=32, block_k=32)
    >>> o.shape, o.dtype
    ((1, 2, 200, 32), dtype('float32'))
    """
    _params.check_layout(layout)
    q, k, v = (_to_bhnd(n, x, layout) for n, x in (("q", q), ("k", k), ("v", v)))
    if array_kind(q) == "torch":  # under torch.autocast: fp32 -> autocast dtype, as for SDPA
        from . import torch_ops

        q, k, v = torch_ops.autocast_inputs(q, k, v)
    kind = _check_qkv(q, k, v)
    B, H, Nq, D = q.shape  # not int(): sizes may be symbolic under torch.compile
    Nk = k.shape[2]
    fm = _params.check_feature_map(feature_map)
    scope = _params.check_linear_scope(linear_scope)
    eps = _params.check_fraction("eps", eps, low=0.0, high=1.0, low_open=True, high_open=False)
    topk, skip, block_q, block_k, scale = _prepare_params(q, k, topk, skip, block_q, block_k, scale)
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")
    backend = _resolve_backend(backend, q, kind)
    map_shape = (B, H, _params.n_blocks(Nq, block_q), _params.n_blocks(Nk, block_k))
    if block_map is not None:
        _check_block_map(block_map, q, kind, map_shape)
    _check_proj(proj_weight, proj_bias, q, kind, D)

    if kind == "torch":
        from . import torch_ops

        out = torch_ops.sla_attention(
            q,
            k,
            v,
            block_map,
            topk,
            skip,
            block_q,
            block_k,
            scale,
            fm,
            eps,
            scope,
            proj_weight,
            proj_bias,
            return_parts,
            backend,
        )
    else:
        out = _sla_host(
            kind,
            backend,
            q,
            k,
            v,
            block_map,
            topk,
            skip,
            block_q,
            block_k,
            scale,
            fm,
            eps,
            scope,
            proj_weight,
            proj_bias,
            return_parts,
        )
    if layout == "BNHD":  # back to the caller's axis order (a view)
        return tuple(o.swapaxes(1, 2) for o in out) if return_parts else out.swapaxes(1, 2)
    return out


def _sla_host(
    kind,
    backend,
    q,
    k,
    v,
    block_map,
    topk,
    skip,
    block_q,
    block_k,
    scale,
    fm,
    eps,
    scope,
    proj_weight,
    proj_bias,
    return_parts,
):
    """numpy / CuPy path of :func:`sla_attention` (arguments already validated)."""
    mod = load_backend(backend)
    qc, kc, vc = _host_inputs(kind, backend, q, k, v)
    xp = np if kind == "numpy" else importlib.import_module("cupy")

    def classify_and_forward(block_map):
        if block_map is None:
            n_crit, n_skip = _counts(k, topk, skip, block_k)
            block_map = mod.classify(qc, kc, n_crit, n_skip, block_q, block_k, scale)
        block_map = xp.ascontiguousarray(block_map.astype(np.int8, copy=False))
        return mod.forward(qc, kc, vc, block_map, block_q, block_k, scale, fm, eps, scope)

    with notice(describe("forward", int(q.shape[-1]), dtype_name(q, kind), backend)):
        if kind == "cupy":  # a first call compiles both stages' kernels side by side
            from .gpu._precompile import run_ahead

            o_s, o_l, _ = run_ahead(classify_and_forward, block_map)
        else:
            o_s, o_l, _ = classify_and_forward(block_map)
    out_dtype = q.dtype
    if return_parts:
        return o_s.astype(out_dtype), o_l.astype(out_dtype)
    if proj_weight is not None:
        o_l = o_l @ proj_weight.astype(o_l.dtype).T
        if proj_bias is not None:
            o_l += proj_bias.astype(o_l.dtype)
    o_s += o_l  # o_s is a fresh buffer of the backend's: add in place
    return o_s.astype(out_dtype, copy=False)


def kernel_path(q: Array, *, block_q: int = 64, block_k: int = 64, backend: str = "auto") -> str:
    """Which kernels :func:`sla_attention` runs for inputs like ``q``.

    Returns ``"cpu"`` (Numba CPU kernels), ``"gpu:simt"`` (Numba CUDA kernels on
    CUDA cores, fp32/fp64 arithmetic) or ``"gpu:tc"`` (the sparse branch on tensor
    cores through ``mma.sync``: fp16/bf16 inputs, D a multiple of 16 up to 128,
    block_q in {16, 32, 64, 128}, block_k in {16, 32, 64}, compute capability >= 8.0).
    The environment variable ``SLA_NUMBA_GPU_PATH=simt|tc`` forces a GPU path.

    Example
    -------
    >>> import numpy as np, sla_numba
    >>> sla_numba.kernel_path(np.zeros((1, 1, 8, 16), np.float32))
    'cpu'
    """
    kind = _check_tensor("q", q)
    block_q = _params.check_block_size("block_q", block_q)
    block_k = _params.check_block_size("block_k", block_k)
    backend = _resolve_backend(backend, q, kind)
    if backend == "cpu":
        return "cpu"
    gpu = load_backend("gpu")
    device = q.device if kind == "torch" and is_on_gpu(q, kind) else None
    return "gpu:" + gpu.select_path(q.dtype, int(q.shape[-1]), block_q, block_k, device)
