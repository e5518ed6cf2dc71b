"""Which kernels do the sparse branch: SIMT (CUDA cores) or tensor cores.

``PATHS = ("auto", "simt", "tc")``:

* ``"simt"`` — the fused SIMT kernels do both branches (any dtype, any D, any
  block sizes; fp32 or fp64 arithmetic);
* ``"tc"`` — the tensor-core kernels (``tc/forward.py`` / ``tc/backward.py``: fp16 /
  bf16 ``mma.sync``, fp32 accumulation) do the sparse branch; the SIMT kernels,
  compiled without their sparse loops, do only the linear branch;
* ``"auto"`` — ``"tc"`` when :func:`tc.forward.tc_supported` holds for the inputs
  (fp16 / bf16, D a multiple of 16 up to 128, block_q in {16, 32, 64, 128},
  block_k in {16, 32, 64}, compute capability >= 8.0), else ``"simt"``.

The environment variable ``SLA_NUMBA_GPU_PATH`` (``simt`` | ``tc`` | ``auto``)
overrides ``"auto"`` (never an explicit ``path=``): ``simt`` forces the SIMT
kernels everywhere, ``tc`` forces the tensor cores and, like an explicit
``path="tc"``, raises ``ValueError`` naming the reason on inputs they cannot take.
There is never a silent fallback from a forced path.

On the ``"tc"`` path the linear branch's heavy products run on tensor cores too:
``states`` (``tc/states.py``: h_j, z_j per key block), ``marginal`` (``tc/marginal.py``:
the sums over marginal blocks), ``linear`` (``tc/linear.py``: the forward's O_l) and
``linear_grad`` (``tc/linear_backward.py``: the backward's linear dq, QO / QD, dk, dv).
``SLA_NUMBA_TC_OFF`` (comma-separated part names) sends named parts back to their
SIMT kernels: a switch for measuring what each part is worth and for isolating a
fault, read on every call (:func:`tc_part`).
"""

from .. import config
from .tc.forward import tc_unsupported_reason

PATHS = config.GPU_PATHS
ENV_VAR = config.GPU_PATH_VAR
TC_PARTS = config.TC_PARTS
TC_OFF_VAR = config.TC_OFF_VAR


def tc_part(name):
    """Whether the tensor-core path runs part ``name`` (one of ``TC_PARTS``) on tensor
    cores: yes unless ``SLA_NUMBA_TC_OFF`` lists it (an unknown name there is a
    ``ValueError``)."""
    off = config.tc_parts_off()
    return name not in off


def env_path():
    """The value of ``SLA_NUMBA_GPU_PATH`` ('auto' when unset or empty)."""
    return config.gpu_path()


def resolve_path(path, dtype, head_dim, block_q, block_k, device=None):
    """'simt' or 'tc' for a requested ``path`` (see the module docstring)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    source = f"path={path!r}"
    if path == "auto":
        forced = env_path()
        if forced == "auto":
            reason = tc_unsupported_reason(dtype, head_dim, block_q, block_k, device)
            return "tc" if reason is None else "simt"
        path, source = forced, f"{ENV_VAR}={forced}"
    if path == "tc":
        reason = tc_unsupported_reason(dtype, head_dim, block_q, block_k, device)
        if reason is not None:
            raise ValueError(
                f"{source}: the tensor-core path cannot take these inputs: "
                f"{reason}. Use path='simt' (or 'auto') instead."
            )
    return path


def select_path(dtype, head_dim, block_q, block_k, device=None):
    """The kernel path the GPU backend uses for these inputs with ``path="auto"``.

    ``dtype``: the input dtype (numpy / torch dtype or name); ``device``: None for
    the current CUDA device, an index or a ``torch.device``. Returns ``"tc"`` or
    ``"simt"``; honours ``SLA_NUMBA_GPU_PATH`` (and raises ``ValueError`` when it
    forces ``tc`` on inputs the tensor cores cannot take).
    """
    return resolve_path("auto", dtype, head_dim, block_q, block_k, device)
