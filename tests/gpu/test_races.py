"""Every GPU kernel under the simulator's race detector (sla_numba.testing_race).

Under the CUDA simulator a missing ``syncthreads`` shows only as a result that changes
now and then (a flaky test). Here each kernel path runs on awkward tiny shapes with the
detector on, which fails at the first pair of unordered accesses to one element (one a
write), at the first read of shared memory the block never wrote, and at two blocks
touching one element, and at a read of a local-array element the thread never wrote
(local and shared memory start undefined; in the simulator as whatever ``np.empty``
returns, which changes from run to run). Simulator only: on a GPU the real hardware decides.

A detector that cannot fail would prove nothing, so the first tests feed it kernels
with a planted race / uninitialised read / two writers and check that it reports each.
"""

import numpy as np
import pytest
from numba import config, cuda

from sla_numba import _params
from sla_numba.testing_race import DataRace, detect_races

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="simulator-only tool"),
]


# --------------------------------------------------------------------------- the detector
def _run(kernel, *arrays, blocks=1, threads=4):
    kernel[blocks, threads](*arrays)


@cuda.jit
def _missing_barrier(out):
    s = cuda.shared.array(4, np.float32)
    t = cuda.threadIdx.x
    s[t] = t
    out[t] = s[(t + 1) % 4]  # reads a neighbour's write: no barrier between


@cuda.jit
def _with_barrier(out):
    s = cuda.shared.array(4, np.float32)
    t = cuda.threadIdx.x
    s[t] = t
    cuda.syncthreads()
    out[t] = s[(t + 1) % 4]


@cuda.jit
def _uninitialised(out):
    s = cuda.shared.array(8, np.float32)
    t = cuda.threadIdx.x
    s[t] = t  # elements 4..7 are never written
    cuda.syncthreads()
    out[t] = s[t + 4]


@cuda.jit
def _unwritten_local(out):
    acc = cuda.local.array(2, np.float32)
    acc[0] = 1.0  # acc[1] is never written
    out[cuda.threadIdx.x] = acc[0] + acc[1]


@cuda.jit
def _two_blocks_one_element(out):
    if cuda.threadIdx.x == 0:
        out[0] = cuda.blockIdx.x  # every block writes element 0


def test_detector_reports_a_missing_barrier():
    with pytest.raises(DataRace, match="shared-memory"):  # a race or an unwritten read
        with detect_races():
            _run(_missing_barrier, np.zeros(4, np.float32))


def test_detector_accepts_the_barrier():
    out = np.zeros(4, np.float32)
    with detect_races() as races:
        _run(_with_barrier, out)
    assert races == [] and out.tolist() == [1, 2, 3, 0]


def test_detector_reports_an_uninitialised_shared_read():
    with pytest.raises(DataRace, match="no thread of block"):
        with detect_races():
            _run(_uninitialised, np.zeros(4, np.float32))


def test_detector_reports_an_unwritten_local_read():
    with pytest.raises(DataRace, match="local-array read"):
        with detect_races():
            _run(_unwritten_local, np.zeros(4, np.float32))


def test_detector_reports_two_blocks_writing_one_element():
    with pytest.raises(DataRace, match="global-memory race"):
        with detect_races():
            _run(_two_blocks_one_element, np.zeros(1, np.float32), blocks=2)


# --------------------------------------------------------------------------- the simulator
@cuda.jit
def _block_sum(out):
    s = cuda.shared.array(8, np.float32)
    t = cuda.threadIdx.x
    s[t] = 1.0
    cuda.syncthreads()
    acc = 0.0
    for i in range(8):
        acc += s[i]
    out[t] = acc


def _slow_empty(monkeypatch, module):
    """Make ``np.empty`` in ``module`` slow, as a loaded machine can: threads reaching a
    ``cuda.shared.array`` line together then overlap in its lookup-or-create."""
    import time
    import types

    slow = types.SimpleNamespace(**{n: getattr(np, n) for n in dir(np) if not n.startswith("__")})

    def empty(*a, **kw):
        time.sleep(0.02)
        return np.empty(*a, **kw)

    slow.empty = empty
    monkeypatch.setattr(module, "np", slow)


def test_simulator_shared_arrays_are_shared_when_threads_race(monkeypatch):
    """numba-cuda's simulator creates a shared array without a lock, so threads that
    reach the line together can get different arrays (the suite's old rare flake);
    sla_numba.gpu._compat installs a locked version. Both are run here with the race
    window widened: the original must show the bug (else this test proves nothing),
    the installed one must not."""
    from numba.cuda.simulator import kernelapi

    from sla_numba.gpu import _compat

    _slow_empty(monkeypatch, kernelapi)
    _slow_empty(monkeypatch, _compat)
    out = np.zeros(8, np.float32)
    monkeypatch.setattr(kernelapi.FakeCUDAShared, "array", _compat.UNLOCKED_SHARED_ARRAY)
    _block_sum[1, 8](out)
    assert not (out == 8).all(), "the unlocked original did not race: the test is void"
    monkeypatch.setattr(kernelapi.FakeCUDAShared, "array", _compat.simulator_shared_array)
    _block_sum[1, 8](out)
    assert (out == 8).all(), out


# --------------------------------------------------------------------------- the kernels
def _inputs(nq, nk, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, n, d)).astype(dtype) for n in (nq, nk, nk)]


def _map(nq, nk, bq, bk, seed=1):
    """A map with every kind of row: mixed, no critical block, no marginal block."""
    rng = np.random.default_rng(seed)
    mq, mk = _params.n_blocks(nq, bq), _params.n_blocks(nk, bk)
    m = rng.choice(np.array([1, 0, -1], np.int8), size=(1, 2, mq, mk))
    m[0, 0, 0] = 0  # no critical block
    m[0, 1, 0] = 1  # no marginal block
    return m


@pytest.mark.parametrize(
    "path,dtype,shape",
    [
        ("simt", np.float32, (19, 21, 8, 4, 4)),  # tails on both axes
        ("simt", np.float64, (9, 13, 5, 8, 4)),  # odd D, Nq < block rows
        ("tc", np.float16, (20, 37, 16, 16, 16)),  # the tensor-core twins
    ],
)
def test_kernels_have_no_races(path, dtype, shape):
    from sla_numba import gpu

    nq, nk, d, bq, bk = shape
    q, k, v = _inputs(nq, nk, d, dtype)
    m = _map(nq, nk, bq, bk)
    scale = d**-0.5
    with detect_races():
        mk = _params.n_blocks(nk, bk)
        gpu.classify(q, k, *_params.block_counts(mk, 0.3, 0.2), bq, bk, scale)
        o_s, o_l, lse = gpu.forward(q, k, v, m, bq, bk, scale, "elu", 1e-6, path=path)
        do = np.random.default_rng(2).standard_normal(q.shape).astype(dtype)
        gpu.backward(q, k, v, o_s, o_l, lse, do, do, m, bq, bk, scale, "elu", 1e-6, path=path)
