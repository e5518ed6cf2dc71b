"""``fill``: every element of a flat device array set to one value (one launch)."""

from .._compat import cuda, kernel

FILL_THREADS = 256


@kernel()
def fill(x, value):
    """x[i] = value for every i of the 1-D array x (a grid-stride loop)."""
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, x.shape[0], step):
        x[i] = value
