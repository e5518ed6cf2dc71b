"""Processes and threads: a forked child can use sla_numba after its parent did, and two
threads can call it at once (sla_numba/_threads.py says how).

Each case runs in a fresh interpreter (the threading layer is chosen once per process,
and a failure here kills or hangs a process), with a timeout: a hang fails the test.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = """
import numpy as np
import sla_numba

def inputs(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, 70, 16)).astype(np.float32) for _ in range(3)]

def attend(seed):
    q, k, v = inputs(seed)
    return sla_numba.sla_attention(q, k, v, topk=0.5, skip=0.25, block_q=16, block_k=16,
                                   backend="cpu")
"""


def _run(body, env=None, timeout=420):
    code = COMMON + textwrap.dedent(body)
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in [full_env.get("PYTHONPATH")] if p]
    )
    full_env.update(env or {})
    try:
        res = subprocess.run(
            [sys.executable, "-c", code],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for more than {timeout} s")
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX only")
def test_forked_children_can_use_it_after_the_parent():
    out = _run("""
        import multiprocessing as mp, os
        expect = [attend(s) for s in range(3)]          # the parent uses the kernels first
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map_async(attend, range(3)).get(timeout=300)
        assert all(np.array_equal(a, b) for a, b in zip(got, expect))
        pid = os.fork()                                  # and a bare fork
        if pid == 0:
            os._exit(0 if np.array_equal(attend(0), expect[0]) else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        import numba
        print("ok", numba.threading_layer())
    """)
    assert out.startswith("ok"), out


@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_two_threads_at_once(layer):
    """Two threads calling at the same time; under ``workqueue`` (not thread-safe in
    Numba) this aborted the process before the kernel lock."""
    out = _run(
        """
        import threading
        expect = {s: attend(s) for s in (1, 2)}
        errors, barrier = [], threading.Barrier(2)
        def work(seed):
            try:
                barrier.wait()
                for _ in range(20):
                    if not np.array_equal(attend(seed), expect[seed]):
                        errors.append(seed)
            except Exception as err:  # reported below
                errors.append(repr(err))
        threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
        for t in threads: t.start()
        for t in threads: t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert errors == [], errors
        import numba
        print("ok", numba.threading_layer())
    """,
        env={"NUMBA_THREADING_LAYER": layer} if layer else None,
    )
    assert out.startswith("ok"), out
    if layer:
        assert out.split()[1] == layer
