"""Parameter rules shared by every backend: counts, feature-map codes, checks.

Everything here is plain Python: the API layer calls these once per call,
before any kernel runs, so a bad argument is reported by name and never
reaches a kernel.
"""

import math
import numbers
import operator

import numpy as np

#: Feature maps phi, applied per token along D, and their integer codes for kernels.
FEATURE_MAPS = {"softmax": 0, "elu": 1, "relu": 2}

#: The log-sum-exp stored for a query row that has no critical token.
#: Finite on purpose (no inf arithmetic in kernels); kernels test the critical
#: count, never this value.
LSE_EMPTY = -1.0e30

#: Guard added to the linear-attention denominator phi(q)·Z.
EPS = 1e-6

BACKENDS = ("auto", "cpu", "gpu")

#: Which key blocks the linear branch attends to, and their integer codes for kernels:
#: "marginal" (the paper, SLA-1: the blocks the map marks 0) or "global" (the
#: published thu-ml/SLA main branch: every key block of the row).
LINEAR_SCOPES = {"marginal": 0, "global": 1}

#: Axis orders of q, k, v (and of the output): "BHND" as torch's SDPA,
#: "BNHD" as a DiT's ``view(B, N, H, D)`` and flash_attn.
LAYOUTS = ("BHND", "BNHD")


def n_blocks(n, block):
    """Number of blocks of size ``block`` covering ``n`` tokens (last one may be partial)."""
    return -(-n // block)


def check_fraction(name, value, *, low, high, low_open, high_open):
    """Raise ValueError unless ``value`` is a real number in the given interval."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value:  # NaN (not math.isnan: under torch.compile value may be symbolic)
        raise ValueError(f"{name} must not be NaN")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value}")
    return value


def check_topk_skip(topk, skip):
    """topk in (0, 1], skip in [0, 1); both finite numbers."""
    topk = check_fraction("topk", topk, low=0.0, high=1.0, low_open=True, high_open=False)
    skip = check_fraction("skip", skip, low=0.0, high=1.0, low_open=False, high_open=True)
    return topk, skip


def block_counts(mk, topk, skip):
    """Per query-block row: how many key blocks are critical and how many negligible.

    n_crit = min(Mk, max(1, floor(topk * Mk)))
    n_skip = min(Mk - n_crit, floor(skip * Mk))
    """
    n_crit = min(mk, max(1, int(math.floor(topk * mk))))
    n_skip = min(mk - n_crit, int(math.floor(skip * mk)))
    return n_crit, n_skip


def _is_real(value):
    """A real number: Python int / float or a numpy scalar (np.float32(0.5), np.int64(3)),
    not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_block_size(name, value):
    """A positive integer; numpy integers are accepted (``operator.index``) and returned
    as a Python int."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


#: Blocks up to this size are passed to the kernels as given.
LARGE_BLOCK = 4096


def effective_block(block, n):
    """The block size the kernels get for ``n`` tokens.

    A block larger than both ``n`` and :data:`LARGE_BLOCK` covers all tokens in one
    block, exactly as the smallest power of two >= n (at least 16) does: same map,
    same result. The kernels get that one instead, so buffers sized by the block stay
    small (``block_q=2**31`` used to fail with ``SystemError``). Ordinary block sizes
    are never changed, so the GPU kernel path and tile configuration stay as chosen.
    """
    if block <= max(n, LARGE_BLOCK):
        return block
    return max(16, 1 << max(n - 1, 0).bit_length())


def check_scale(scale, head_dim):
    """Default 1/sqrt(D); otherwise a finite positive-or-negative non-zero float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not _is_real(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a finite positive float, got {scale}")
    return scale


def check_feature_map(feature_map):
    if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    return FEATURE_MAPS[feature_map]


def check_linear_scope(linear_scope):
    if not isinstance(linear_scope, str) or linear_scope not in LINEAR_SCOPES:
        raise ValueError(
            f"linear_scope must be one of {sorted(LINEAR_SCOPES)}, got {linear_scope!r}"
        )
    return LINEAR_SCOPES[linear_scope]


def check_layout(layout):
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_backend(backend):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
