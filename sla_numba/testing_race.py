"""A race detector for kernels run in Numba's CUDA simulator (tests and tools only).

Under the simulator every CUDA thread is a Python thread, so a missing
``cuda.syncthreads()`` shows up only now and then, as a result that changes from
run to run: a flaky test. This module makes such a bug fail every time instead.

While :func:`detect_races` is active, every element access a simulated kernel makes
to a shared array (``cuda.shared.array``, static or dynamic) or to a kernel argument
(global memory) is recorded with the thread that made it, the thread's block, and the
thread's *barrier epoch* (how many ``syncthreads`` it has passed). Two accesses to
one element, at least one a write, by different threads are a race unless a barrier
orders them, that is unless both threads are in the same block and the first access
happened in an earlier epoch. For global memory this also catches two *blocks*
touching one element (nothing orders blocks within a launch; this package's kernels
use no atomics, so every output element must have exactly one writer). Blocks run
one after another in the simulator, which is why such bugs never show as wrong
numbers there: the detector reports them anyway. A read of a shared element that no
thread of the block has written is reported too: shared memory starts undefined on a
GPU (and as whatever ``np.empty`` returns in the simulator, which changes from run to
run: another source of flaky results).

The simulator has no warps, so warp-synchronous code (lanes of one warp exchanging
data without a barrier) is reported too; the kernels of this package do not rely on
it (their warp-level data exchange goes through shuffles or the tensor-core
intrinsics, whose simulator twins synchronise themselves).

Use::

    from sla_numba.testing_race import detect_races
    with detect_races():             # raises DataRace at the first race
        gpu.forward(...)

or set ``SLA_TEST_RACE_CHECK=1`` when running the test suite (tests/conftest.py).
"""

import contextlib
import sys
import threading

import numpy as np


class DataRace(AssertionError):
    """Two accesses to one element, at least one a write, that nothing orders."""


class _State:
    def __init__(self, raise_first):
        self.lock = threading.Lock()
        self.raise_first = raise_first
        self.races = []
        self.launch = None  # the launch being recorded (its fake CUDA module)
        self.block = None  # (launch, block index) whose shared memory is recorded
        # address -> [writer or None, {thread: access}] with access = (block, epoch, where)
        self.shared = {}
        self.glob = {}


_state = None


def _thread():
    """(launch, block index, thread id, barrier epoch) of the calling simulator thread."""
    from numba.cuda.simulator import kernel as sim_kernel

    t = threading.current_thread()
    # one fake CUDA module per launch (the simulator makes a new block manager per block)
    return (
        sim_kernel._get_kernel_context(),
        tuple(getattr(t, "blockIdx", (0, 0, 0))),
        getattr(t, "thread_id", -1),
        getattr(t, "_sla_epoch", 0),
    )


def _address(arr, idx):
    """Byte address of the element ``arr[idx]`` for an all-integer index, else None."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if len(idx) != arr.ndim or not all(isinstance(i, (int, np.integer)) for i in idx):
        return None
    off = arr.__array_interface__["data"][0]
    for i, n, s in zip(idx, arr.shape, arr.strides):
        i = int(i)
        off += (i + n if i < 0 else i) * s
    return off


def _where():
    """file:line of the kernel code making the access (the first frame outside this
    module and the simulator), and the kernel line that called it."""
    f = sys._getframe(2)
    while f is not None and (
        f.f_code.co_filename == __file__ or "simulator" in f.f_code.co_filename
    ):
        f = f.f_back
    if f is None:
        return "?"
    here = f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno}"
    up = f.f_back
    while up is not None and "simulator" in up.f_code.co_filename:
        up = up.f_back
    if (
        up is not None
        and up.f_code.co_name != f.f_code.co_name
        and not up.f_code.co_filename.endswith("threading.py")
    ):
        here += (
            f" in {up.f_code.co_name} ({up.f_code.co_filename.rsplit('/', 2)[-1]}:{up.f_lineno})"
        )
    return here


def _ordered(first, second):
    """Whether a barrier orders access ``first`` before ``second`` (same block,
    earlier epoch). Accesses are (block, epoch, where)."""
    return first[0] == second[0] and first[1] < second[1]


def _check(cells, addr, me, access, write, shared):
    """Record one access to byte ``addr``; return what it races with, or None.
    Returns ("uninitialised",) for a read of a shared byte nobody wrote, else
    (other thread, its access, "read" | "write")."""
    cell = cells.get(addr)
    if cell is None:
        cell = cells[addr] = [None, {}]
    writer, readers = cell
    race = None
    if shared and not write and writer is None:
        race = ("uninitialised",)
    elif writer is not None and writer[0] != me and not _ordered(writer[1], access):
        race = (writer[0], writer[1], "write")
    elif write:
        for other, acc in readers.items():
            if other != me and not _ordered(acc, access):
                race = (other, acc, "read")
                break
    if write:
        cell[0] = (me, access)
        readers.clear()
    else:
        readers[me] = access
    return race


def _record(arr, idx, write, shared):
    """Record an element access of a simulated kernel; raise or collect a race.

    Memory is tracked by byte address, since one buffer can be seen through views of
    different element sizes (the tensor-core kernels read their dynamic shared memory
    as int16 and write it as int32)."""
    st = _state
    if st is None:
        return
    addr = _address(arr, idx)
    if addr is None:
        return
    launch, block, tid, epoch = _thread()
    me = (block, tid)
    with st.lock:
        if st.launch is not launch:
            st.launch, st.glob = launch, {}
        if shared and st.block != (launch, block):  # blocks run one at a time
            st.block, st.shared = (launch, block), {}
        cells = st.shared if shared else st.glob
        where = _where() if (write and st.raise_first) else None
        access = (block, epoch, where)
        race = None
        for byte in range(addr, addr + arr.itemsize):
            race = _check(cells, byte, me, access, write, shared) or race
        if race is None:
            return
        if race == ("uninitialised",):
            msg = (
                f"shared-memory read of element {idx} of a {arr.dtype} array "
                f"{arr.shape} that no thread of block {block} wrote (thread {tid}, "
                f"epoch {epoch}, at {_where()}): shared memory starts undefined"
            )
        else:
            other, acc, other_kind = race
            msg = (
                f"{'shared' if shared else 'global'}-memory race: "
                f"{'write' if write else 'read'} of element {idx} of a {arr.dtype} "
                f"array {arr.shape} by block {block} thread {tid} (epoch {epoch}) at "
                f"{_where()}, after a {other_kind} by block {other[0]} thread "
                f"{other[1]} (epoch {acc[1]})"
                + (f" at {acc[2]}" if acc[2] else "")
                + " with no barrier between"
            )
        st.races.append(msg)
        if st.raise_first:
            raise DataRace(msg)


class _Tracked(np.ndarray):
    """A shared array whose element reads and writes are recorded."""

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        if not isinstance(out, np.ndarray) or out.ndim == 0:
            _record(self, idx, False, True)
        return out

    def __setitem__(self, idx, value):
        if not isinstance(super().__getitem__(idx), np.ndarray):
            _record(self, idx, True, True)
        super().__setitem__(idx, value)


class _TrackedLocal(np.ndarray):
    """A thread's local array that knows which elements were written: reading one
    that was not is reported (local memory starts undefined, and in the simulator as
    whatever ``np.empty`` returns: NaN left over from a poisoned buffer, say)."""

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        mask = getattr(self, "_sla_written", None)
        if mask is not None and (not isinstance(out, np.ndarray) or out.ndim == 0):
            if not mask[idx] and _state is not None:
                _, block, tid, epoch = _thread()
                msg = (
                    f"local-array read of element {idx} of a {self.dtype} array "
                    f"{self.shape} before any write (block {block} thread {tid}, at "
                    f"{_where()}): local memory starts undefined"
                )
                _state.races.append(msg)
                if _state.raise_first:
                    raise DataRace(msg)
        return out

    def __setitem__(self, idx, value):
        mask = getattr(self, "_sla_written", None)
        if mask is not None:
            mask[idx] = True
        super().__setitem__(idx, value)


@contextlib.contextmanager
def detect_races(raise_first=True):
    """Record the memory accesses of simulated kernels launched inside the block.

    Yields the list of races found. With ``raise_first`` the first race raises
    :class:`DataRace` inside the kernel thread (the simulator re-raises it at the
    launch); otherwise every race is collected and nothing raises.
    """
    global _state
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.cudadrv import devicearray

    from .gpu._compat import simulator_shared_array

    shared_array = kernelapi.FakeCUDAShared.array
    local_array = kernelapi.FakeCUDALocal.array
    syncthreads = sim_kernel.BlockThread.syncthreads
    inner = devicearray.FakeWithinKernelCUDAArray
    get_item, set_item = inner.__getitem__, inner.__setitem__

    def tracked_array(self, shape, dtype, alignment=None):
        # the package's thread-safe allocation (sla_numba.gpu._compat), keyed by the
        # kernel line two frames up (this function sits between)
        return simulator_shared_array(self, shape, dtype, alignment, depth=2).view(_Tracked)

    def tracked_local(self, shape, dtype, alignment=None):
        arr = local_array(self, shape, dtype, alignment).view(_TrackedLocal)
        arr._sla_written = np.zeros(arr.shape, np.bool_)
        return arr

    def counted_syncthreads(self):
        syncthreads(self)
        self._sla_epoch = getattr(self, "_sla_epoch", 0) + 1

    def global_get(self, idx):
        out = get_item(self, idx)
        if not isinstance(out, (np.ndarray, inner)):
            _record(self._item._ary, idx, False, False)
        return out

    def global_set(self, idx, value):
        ary = self._item._ary
        if not isinstance(ary[idx], np.ndarray):
            _record(ary, idx, True, False)
        set_item(self, idx, value)

    _state = _State(raise_first)
    kernelapi.FakeCUDAShared.array = tracked_array
    kernelapi.FakeCUDALocal.array = tracked_local
    sim_kernel.BlockThread.syncthreads = counted_syncthreads
    inner.__getitem__, inner.__setitem__ = global_get, global_set
    try:
        yield _state.races
    finally:
        kernelapi.FakeCUDAShared.array = shared_array
        kernelapi.FakeCUDALocal.array = local_array
        sim_kernel.BlockThread.syncthreads = syncthreads
        inner.__getitem__, inner.__setitem__ = get_item, set_item
        _state = None
