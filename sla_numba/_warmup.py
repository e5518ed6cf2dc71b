"""Compile the kernels ahead of time: :func:`warmup` and ``python -m sla_numba warmup``.

Numba compiles a kernel on its first call with a new configuration and caches it
on disk. The configuration that matters:

* CPU: the compute dtype (float32 for fp16 / bf16 / fp32 inputs, float64 for fp64);
* GPU: the input dtype (it picks the SIMT or tensor-core path), the head dimension
  D and the block sizes (compile-time constants of the kernels).

:func:`warmup` makes exactly the calls a real forward and backward make -- the
public :func:`sla_numba.sla_attention` and torch's autograd, on tiny inputs of the
requested D, dtype, block sizes and feature map (4 key blocks: one critical, two
marginal, one negligible, and a partial last block) -- so whatever those calls
compile is compiled, and nothing is imitated. Run it once after installing (or in
a container build step); later processes load the kernels from the disk cache.
"""

import sys
import time

import numpy as np

from . import _params
from ._compile_log import quiet

#: accepted dtype spellings -> the canonical name
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float64": "float64",
    "fp64": "float64",
    "f64": "float64",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def canonical_dtype(dtype):
    """'float32', 'float64', 'float16' or 'bfloat16' for a name, numpy or torch dtype."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in DTYPE_NAMES:
        raise ValueError(
            f"dtypes: unknown dtype {dtype!r}; use one of "
            "float32, float64, float16, bfloat16 (or fp32, fp64, fp16, bf16)"
        )
    return DTYPE_NAMES[name]


def _tiny_inputs(torch, d, dtype, block_q, block_k, device, grad):
    """q (1, 1, 2·block_q - 1, D), k and v (1, 1, 4·block_k - 1, D), seeded."""
    gen = torch.Generator().manual_seed(0)
    nq, nk = 2 * block_q - 1, 4 * block_k - 1
    out = []
    for n in (nq, nk, nk):
        x = torch.randn(1, 1, n, d, generator=gen).to(device=device, dtype=getattr(torch, dtype))
        out.append(x.requires_grad_(grad))
    return out


def _steps(head_dims, dtypes, backward):
    stages = ("forward", "backward") if backward else ("forward",)
    return [(d, dt, st) for d in head_dims for dt in dtypes for st in stages]


def _progress(steps, enabled):
    """tqdm when it is installed (the notebooks extra has it); else a line per step."""
    if not enabled:
        return steps, None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return steps, "lines"
    return tqdm(steps, desc="sla_numba warmup", unit="step", file=sys.stderr), "tqdm"


def warmup(
    head_dim: "int | list[int]" = 64,
    dtypes: "str | list[str]" = ("float32",),
    backend: str = "auto",
    *,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    backward: bool = True,
    progress: bool = True,
) -> "list[dict]":
    """Compile the SLA kernels for these configurations now (first calls then run at speed).

    Parameters
    ----------
    head_dim : int or list of int
        Head dimensions D to compile for (GPU kernels are specialised on D).
    dtypes : str or list of str
        Input dtypes: "float32", "float64", "float16", "bfloat16" (or fp32, fp64,
        fp16, bf16). bf16 / fp16 on the GPU take the tensor-core path when it applies.
    backend : "auto" | "cpu" | "gpu"
        "auto": the GPU when torch sees one, else the CPU.
    block_q, block_k, feature_map
        As in :func:`sla_numba.sla_attention` (use the values your model uses).
    backward : bool
        Also compile the backward kernels (needs torch).
    progress : bool
        A progress bar on stderr (tqdm when installed, else one line per step).

    Returns
    -------
    list of dict, one per step: ``head_dim``, ``dtype``, ``stage``, ``backend``, ``seconds``.

    Example
    -------
    >>> import sla_numba
    >>> steps = sla_numba.warmup(head_dim=16, dtypes="float32", backend="cpu",
    ...                          block_q=16, block_k=16, progress=False)
    >>> [(s["stage"], s["backend"]) for s in steps]
    [('forward', 'cpu'), ('backward', 'cpu')]
    """
    from .api import sla_attention

    head_dims = [head_dim] if not isinstance(head_dim, (list, tuple)) else list(head_dim)
    head_dims = [_params.check_block_size("head_dim", d) for d in head_dims]
    if isinstance(dtypes, str) or not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes]
    dtypes = [canonical_dtype(d) for d in dtypes]
    block_q = _params.check_block_size("block_q", block_q)
    block_k = _params.check_block_size("block_k", block_k)
    _params.check_feature_map(feature_map)
    _params.check_backend(backend)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None and (backward or "bfloat16" in dtypes):
        raise RuntimeError(
            "warmup of the backward kernels and of bfloat16 needs torch; "
            "pass backward=False and numpy dtypes, or install torch"
        )

    if backend == "auto":
        backend = "gpu" if torch is not None and torch.cuda.is_available() else "cpu"
    device = "cpu"
    if backend == "gpu":
        from ._gpu_check import require_gpu

        device = require_gpu()  # "cuda", or "cpu" under the CUDA simulator

    kw = dict(
        topk=0.25,
        skip=0.25,
        block_q=block_q,
        block_k=block_k,
        feature_map=feature_map,
        backend=backend,
    )
    steps, mode = _progress(_steps(head_dims, dtypes, backward), progress)
    n_steps = len(_steps(head_dims, dtypes, backward))
    done = []
    for i, (d, dtype, stage) in enumerate(steps, 1):
        label = f"{stage} for D={d} {dtype} ({backend})"
        if mode == "tqdm":
            steps.set_postfix_str(label)
        t0 = time.perf_counter()
        with quiet():  # the bar says it; no "compiling ..." lines in between
            if torch is None:
                rng = np.random.default_rng(0)
                q = rng.standard_normal((1, 1, 2 * block_q - 1, d)).astype(dtype)
                kv = rng.standard_normal((1, 1, 4 * block_k - 1, d)).astype(dtype)
                sla_attention(q, kv, kv, **kw)
            else:
                q, k, v = _tiny_inputs(
                    torch, d, dtype, block_q, block_k, device, grad=stage == "backward"
                )
                if stage == "forward":
                    with torch.no_grad():
                        sla_attention(q, k, v, **kw)
                else:
                    sla_attention(q, k, v, **kw).float().square().sum().backward()
                if device == "cuda":
                    torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        done.append(dict(head_dim=d, dtype=dtype, stage=stage, backend=backend, seconds=seconds))
        if mode == "lines":
            print(
                f"sla_numba warmup [{i}/{n_steps}] {label}: {seconds:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    if mode == "tqdm":
        steps.close()
    return done
