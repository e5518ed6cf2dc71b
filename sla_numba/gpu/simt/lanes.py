"""Integer reductions over a group of lanes: ``lane_sum`` and ``lane_scan``.

A *group* is ``lanes`` consecutive threads of a block (``lanes`` a power of two).
On a real GPU the group is a whole warp (``lanes == 32``) and both functions are
warp shuffles (``shfl.sync``), no shared memory, no barrier. The CUDA simulator has
no warp shuffles, so there each function has a pure-Python twin: the lanes of the
group meet at a ``threading.Barrier`` and swap their values; the simulator's groups
can then be smaller than 32 (the classification kernels use 4 lanes there).

Every lane of a group must call the same sequence of these functions (the kernels
only call them under group-uniform conditions).

``lane_sum(x, lanes)``: the sum of the int ``x`` over the group, on every lane.
``lane_scan(x, lanes)``: ``(Σ x over the lower lanes, Σ x over the group)``.
"""

import threading

import numpy as np

from .._compat import SIMULATOR, cuda

__all__ = ["lane_sum", "lane_scan"]

if SIMULATOR:
    _lock = threading.Lock()

    class _GroupExchange:
        """The lanes of one simulated group meet here to swap values."""

        def __init__(self, lanes):
            self.barrier = threading.Barrier(lanes)
            self.slots = [0] * lanes

        def swap(self, lane, value):
            self.barrier.wait()  # the previous swap has been read by every lane
            self.slots[lane] = value
            self.barrier.wait()  # every lane has written
            return list(self.slots)

    def _exchange(value, lanes):
        th = threading.current_thread()
        lane, group = th.thread_id % lanes, th.thread_id // lanes
        with _lock:
            table = th._manager.__dict__.setdefault("_sla_lane_exchange", {})
            key = (tuple(th.blockIdx), lanes, group)
            ex = table.get(key)
            if ex is None:
                ex = table[key] = _GroupExchange(lanes)
        return ex.swap(lane, int(value)), lane

    def lane_sum(x, lanes):
        vals, _ = _exchange(x, lanes)
        return sum(vals)

    def lane_scan(x, lanes):
        vals, lane = _exchange(x, lanes)
        return sum(vals[:lane]), sum(vals)

else:
    _FULL = 0xFFFFFFFF

    @cuda.jit(device=True)
    def lane_sum(x, lanes):
        v = np.int32(x)
        o = lanes // 2
        while o > 0:  # butterfly: after log2(lanes) steps every lane has the sum
            v = np.int32(v + cuda.shfl_xor_sync(_FULL, v, o))
            o //= 2
        return v

    @cuda.jit(device=True)
    def lane_scan(x, lanes):
        lane = cuda.threadIdx.x % lanes
        v = np.int32(x)
        o = 1
        while o < lanes:  # Hillis-Steele inclusive scan
            y = cuda.shfl_up_sync(_FULL, v, o)
            if lane >= o:
                v = np.int32(v + y)
            o *= 2
        total = cuda.shfl_sync(_FULL, v, lanes - 1)
        return v - np.int32(x), total
