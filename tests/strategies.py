"""Hypothesis strategies: awkward shapes, inputs, block maps, classification parameters.

Arrays come from a drawn seed (numpy's generator) rather than element by element:
fast to generate, and a failing example still shrinks through the shape and the seed.
"""

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from sla_numba import _params


@dataclass(frozen=True)
class Shape:
    b: int
    h: int
    nq: int
    nk: int
    d: int
    block_q: int
    block_k: int

    @property
    def mq(self):
        return _params.n_blocks(self.nq, self.block_q)

    @property
    def mk(self):
        return _params.n_blocks(self.nk, self.block_k)

    @property
    def q_shape(self):
        return (self.b, self.h, self.nq, self.d)

    @property
    def k_shape(self):
        return (self.b, self.h, self.nk, self.d)

    @property
    def map_shape(self):
        return (self.b, self.h, self.mq, self.mk)


#: Token counts that hit the edge cases: 1, below a block, exact multiples, tails.
_N = st.one_of(st.sampled_from([1, 2, 7, 8, 15, 16, 17, 33, 64, 65]), st.integers(1, 80))
_D = st.sampled_from([1, 2, 3, 5, 8, 16, 17, 32, 64])
_BLOCK = st.sampled_from([1, 2, 3, 4, 5, 8, 16, 64])


@st.composite
def shapes(draw, tiny=False):
    """Attention shapes, Nq independent of Nk. ``tiny``: simulator-sized (GPU under CI)."""
    if tiny:
        return Shape(
            draw(st.integers(1, 2)),
            1,
            draw(st.integers(1, 20)),
            draw(st.integers(1, 20)),
            draw(st.sampled_from([1, 3, 4, 8])),
            draw(st.sampled_from([2, 4, 8])),
            draw(st.sampled_from([2, 4, 8])),
        )
    return Shape(
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(_N),
        draw(_N),
        draw(_D),
        draw(_BLOCK),
        draw(_BLOCK),
    )


def qkv(shape, seed, dtype=np.float64, spread=1.0):
    """Random q, k, v (numpy, C-contiguous) for ``shape``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape.q_shape) * spread
    k = rng.standard_normal(shape.k_shape) * spread
    v = rng.standard_normal(shape.k_shape)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


seeds = st.integers(0, 2**32 - 1)
spreads = st.sampled_from([0.25, 1.0, 3.0])

#: Kinds of block-map row, so that every special case shows up often.
ROW_KINDS = (
    "mixed",
    "mixed",
    "mixed",
    "no_critical",
    "no_marginal",
    "all_negligible",
    "all_critical",
    "all_marginal",
)


def random_block_map(shape, seed):
    """int8 (B, H, Mq, Mk) map mixing row kinds: some rows with no critical block,
    some with no marginal block, some all negligible, ..."""
    rng = np.random.default_rng(seed)
    out = np.empty(shape.map_shape, dtype=np.int8)
    for idx in np.ndindex(*shape.map_shape[:-1]):
        kind = ROW_KINDS[rng.integers(len(ROW_KINDS))]
        choices = {
            "mixed": [1, 0, -1],
            "no_critical": [0, -1],
            "no_marginal": [1, -1],
            "all_negligible": [-1],
            "all_critical": [1],
            "all_marginal": [0],
        }[kind]
        out[idx] = rng.choice(choices, size=shape.mk)
    return out


@st.composite
def block_maps(draw, shape):
    return random_block_map(shape, draw(seeds))


topks = st.one_of(
    st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0, exclude_min=True)
)
skips = st.one_of(st.sampled_from([0.0, 0.1, 0.3]), st.floats(0.0, 1.0, exclude_max=True))
feature_maps = st.sampled_from(sorted(_params.FEATURE_MAPS))
linear_scopes = st.sampled_from(sorted(_params.LINEAR_SCOPES))
layouts = st.sampled_from(_params.LAYOUTS)


def to_layout(x, layout):
    """(B, H, N, D) array or tensor as the API reads it in ``layout``: a view."""
    return x if layout == "BHND" else x.swapaxes(1, 2)


@dataclass(frozen=True)
class Case:
    """One random attention problem: a shape, its inputs' seed, a block map."""

    shape: Shape
    seed: int
    spread: float
    block_map: np.ndarray
    feature_map: str

    def inputs(self, dtype=np.float64):
        return qkv(self.shape, self.seed, dtype, self.spread)

    def __repr__(self):  # the map is reproducible from the printout's shape and is short
        return (
            f"Case({self.shape}, seed={self.seed}, spread={self.spread}, "
            f"feature_map={self.feature_map!r}, block_map=\n{self.block_map!r})"
        )


@st.composite
def cases(draw, tiny=False, feature_map=None):
    """A shape, inputs and a random block map (rows without critical / marginal blocks included)."""
    shape = draw(shapes(tiny))
    fm = feature_map or draw(feature_maps)
    return Case(shape, draw(seeds), draw(spreads), draw(block_maps(shape)), fm)


@st.composite
def projections(draw, d, dtype=np.float64):
    """(proj_weight (D, D), proj_bias (D,)) or Nones."""
    kind = draw(st.sampled_from(["none", "weight", "both"]))
    if kind == "none":
        return None, None
    rng = np.random.default_rng(draw(seeds))
    w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal(d).astype(dtype) if kind == "both" else None
    return w, b
