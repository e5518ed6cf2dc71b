"""First calls compile their GPU kernels side by side (``gpu/_precompile.py``).

Without a GPU: the launcher's strict and collecting modes (a dry run launches
nothing and records each kernel not yet loaded), the three runs of :func:`ahead`, and
that every kernel factory's recipe makes, in another process, a kernel with the same
disk-cache key (code and pickled closure) -- what a compile worker relies on. On a
GPU: a first forward + backward in a fresh process with an empty cache, with workers
and without, gives the same bits, and the workers did compile.
"""

import base64
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

arrays = pytest.importorskip("sla_numba.gpu._arrays")
launcher = importlib.import_module("sla_numba.gpu._launcher")
precompile = importlib.import_module("sla_numba.gpu._precompile")
DeviceView = arrays.DeviceView

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Stream:
    handle = 0xABC000  # a non-default stream: its handle names its device


@pytest.fixture
def fake_gpu(monkeypatch):
    """The launcher as on a GPU, with compiles and launches replaced by records."""
    launched, compiled_for = [], []

    def fake_compile(kernel, device, values):
        compiled_for.append(kernel)
        return launcher._Compiled(kernel, None, ["array" for _ in values])

    monkeypatch.setattr(launcher, "SIMULATOR", False)
    monkeypatch.setattr(launcher, "_core_launch", lambda s, c, k, *a: launched.append(k))
    monkeypatch.setattr(launcher, "_core_stream", lambda s: s)
    monkeypatch.setattr(launcher, "_config", lambda *a: a)
    monkeypatch.setattr(launcher, "_compile", fake_compile)
    monkeypatch.setattr(launcher, "_argtypes", lambda k, v: (("types",) * len(v), ["array"]))
    monkeypatch.setattr(launcher, "_compiled", {})
    # the fake streams' handles are no driver's: asking the driver about them would
    # crash on a GPU (it did, session 8), so nothing captures here unless a test says so
    monkeypatch.setattr(launcher, "capturing", lambda stream: False)
    monkeypatch.delenv("SLA_NUMBA_LAUNCH", raising=False)
    return launched, compiled_for


@pytest.fixture
def prepared(monkeypatch):
    """Compiling ahead on, with ``prepare`` replaced: each call's kernels are recorded
    (the returned list) and marked loaded, as the real one would leave them."""
    calls = []

    def fake_prepare(jobs):
        calls.append([j.kernel for j in jobs])
        for j in jobs:
            launcher._compiled[j.key] = launcher._Compiled(j.kernel, None, ["array"])

    monkeypatch.setattr(precompile, "enabled", lambda: True)
    monkeypatch.setattr(precompile, "prepare", fake_prepare)
    return calls


def _x():
    return DeviceView(0x1000, (8,), np.float32, None)


def test_strict_mode_raises_at_a_kernel_not_loaded(fake_gpu):
    launched, _ = fake_gpu
    known, new = object(), object()
    launcher.launch(known, 1, 32, _Stream(), (_x(),))  # loads it
    with launcher.strict():
        launcher.launch(known, 1, 32, _Stream(), (_x(),))
        with pytest.raises(launcher.Missing):
            launcher.launch(new, 1, 32, _Stream(), (_x(),))
    assert launched == [known, known]
    launcher.launch(new, 1, 32, _Stream(), (_x(),))  # outside: loads as usual
    assert launched == [known, known, new]


def test_collecting_launches_nothing_and_records_each_new_kernel_once(fake_gpu):
    launched, compiled_for = fake_gpu
    known, a, b = object(), object(), object()
    launcher.launch(known, 1, 32, _Stream(), (_x(),))
    with launcher.collecting() as jobs:
        for k in (known, a, b, a):
            launcher.launch(k, 1, 32, _Stream(), (_x(),))
        launcher.launch(a, 1, 32, _Stream(), (_x(), 3))  # another signature of a
    assert launched == [known] and compiled_for == [known]
    assert [j.kernel for j in jobs.values()] == [a, b, a]
    assert all(j.device == ("stream", _Stream.handle) for j in jobs.values())
    launcher.launch(b, 1, 32, _Stream(), (_x(),))  # after the block: launches again
    assert launched == [known, b]


def test_ahead_runs_strict_then_dry_then_for_real(fake_gpu, prepared):
    launched, _ = fake_gpu
    k1, k2 = object(), object()
    calls = []

    def fn(tag):
        calls.append(tag)
        launcher.launch(k1, 1, 32, _Stream(), (_x(),))
        launcher.launch(k2, 1, 32, _Stream(), (_x(),))
        return len(calls)

    wrapped = precompile.ahead(fn)
    assert wrapped("x") == 3  # the third run's result
    assert prepared == [[k1, k2]]
    assert launched == [k1, k2]  # the strict run stopped at k1; the dry run launched nothing
    assert wrapped("y") == 4  # loaded now: one run
    assert prepared == [[k1, k2]] and launched == [k1, k2, k1, k2]


def test_run_ahead_takes_nested_entry_points_in_one_dry_run(fake_gpu, prepared):
    """The API runs classification and forward (each an :func:`ahead` entry point)
    inside one :func:`run_ahead`: one dry run collects the kernels of both, and the
    inner entry points just run inside the outer one's modes."""
    launched, _ = fake_gpu
    k1, k2, k3 = object(), object(), object()

    @precompile.ahead
    def classify():
        launcher.launch(k1, 1, 32, _Stream(), (_x(),))
        launcher.launch(k2, 1, 32, _Stream(), (_x(),))

    @precompile.ahead
    def forward():
        launcher.launch(k3, 1, 32, _Stream(), (_x(),))

    precompile.run_ahead(lambda: (classify(), forward()))
    assert prepared == [[k1, k2, k3]]
    assert launched == [k1, k2, k3]
    assert not launcher.in_mode()
    forward()  # loaded: one plain run, nothing prepared
    assert prepared == [[k1, k2, k3]] and launched == [k1, k2, k3, k3]


def test_capture_with_a_kernel_not_loaded_raises_and_compiles_nothing(
    fake_gpu, prepared, monkeypatch
):
    """Under stream capture the strict run's first unloaded kernel raises
    ``CaptureError``: no dry run, no compile, nothing launched after it."""
    launched, compiled_for = fake_gpu
    known, new = object(), object()
    launcher.launch(known, 1, 32, _Stream(), (_x(),))
    monkeypatch.setattr(launcher, "capturing", lambda stream: True)

    def fn():
        launcher.launch(known, 1, 32, _Stream(), (_x(),))
        launcher.launch(new, 1, 32, _Stream(), (_x(),))

    with pytest.raises(launcher.CaptureError, match="warm-up"):
        precompile.ahead(fn)()
    assert prepared == [] and compiled_for == [known] and launched == [known, known]
    assert not launcher.in_mode()
    monkeypatch.setattr(precompile, "enabled", lambda: False)  # compiling ahead off: same
    with pytest.raises(launcher.CaptureError):
        precompile.ahead(fn)()
    assert compiled_for == [known]


def test_ahead_is_a_plain_call_when_disabled(monkeypatch):
    monkeypatch.setenv("SLA_NUMBA_COMPILE_WORKERS", "0")
    assert not precompile.enabled()
    seen = []
    assert precompile.ahead(lambda: seen.append(1) or 7)() == 7 and seen == [1]


def test_compile_workers_switch(monkeypatch):
    from sla_numba import config

    monkeypatch.setenv("SLA_NUMBA_COMPILE_WORKERS", "3")
    assert config.compile_workers() == 3
    for bad in ("-1", "many"):
        monkeypatch.setenv("SLA_NUMBA_COMPILE_WORKERS", bad)
        with pytest.raises(ValueError, match="SLA_NUMBA_COMPILE_WORKERS"):
            config.compile_workers()
    monkeypatch.delenv("SLA_NUMBA_COMPILE_WORKERS")
    assert 0 <= config.compile_workers() <= 8


class _Job:
    def __init__(self, name):
        self.name, self.argtypes, self.device, self.key = name, ("int64",), 0, name


def _groups(*names):
    return {n: [(_Job(n), ("no.such.module", "f", (), {}, None))] for n in names}


def test_failing_workers_are_reported_and_their_kernels_stay_for_this_process(monkeypatch, caplog):
    """A worker that fails (here: its module does not exist) is one logged line and
    an entry in ``last["failed"]``; the calling process compiles its own share and
    (in :func:`prepare`, afterwards) everything else on load."""
    caplog.set_level(logging.INFO, logger="sla_numba")
    loaded = []
    monkeypatch.setattr(precompile._launcher, "load", lambda job: loaded.append(job.name))
    monkeypatch.setattr(precompile, "WORKER_MODULE", "sla_numba.no_such_worker")
    precompile.last.clear()
    precompile.last.update(workers=0, failed=[])
    precompile._compile_in_workers(_groups("a", "b", "c"), workers=2)
    assert loaded == ["c"]  # this process's share (one group)
    assert precompile.last["workers"] == 2
    assert len(precompile.last["failed"]) == 2
    assert all("no_such_worker" in why for why in precompile.last["failed"])
    assert caplog.text.count("a compile worker failed") == 2


def test_a_worker_that_cannot_start_is_reported(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sla_numba")

    def no_python(*a, **kw):
        raise OSError("no interpreter")

    monkeypatch.setattr(precompile._launcher, "load", lambda job: None)
    monkeypatch.setattr(precompile.subprocess, "Popen", no_python)
    precompile.last.clear()
    precompile.last.update(workers=0, failed=[])
    precompile._compile_in_workers(_groups("a", "b"), workers=4)
    assert precompile.last["workers"] == 0
    assert precompile.last["failed"] == ["OSError: no interpreter"]
    assert "a compile worker failed (OSError: no interpreter)" in caplog.text


# Every kernel factory, as the backend calls them (tensor-core and SIMT kernels,
# classification); the real-GPU variants are built (no simulator), nothing compiles.
_MAKE = """
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
from sla_numba.gpu.tc import backward, forward, linear, linear_backward, marginal, states
from sla_numba.gpu.tc import forward_wgmma
from sla_numba.gpu.simt import backward as sb, classify, forward as sf, marginal as sm
from sla_numba.gpu.simt import states as ss, tiles
t = tiles.choose_tiles(64, np.float32, 64, 64)
kernels = [
    forward.make_sparse_forward(128, 64, 128, "bf16").kernel,
    forward_wgmma.make_sparse_forward_wgmma(128, "bf16").kernel,
    forward_wgmma.make_sparse_forward_wgmma(64, "f16", 1).kernel,
    backward.make_sparse_backward("dq", 64, 64, 128, "f16").kernel,
    backward.make_sparse_backward("dkv", 64, 64, 128, "f16").kernel,
    states.make_states_kernel("bf16", 64, 64, (2, 1)).kernel,
    states.make_states_kernel("bf16", 128, 64, (2, 1), True, out_bf16=True).kernel,
    states.make_states_kernel_staged("bf16", 128, 64, (4, 2), True, True).kernel,
    states.make_states_kernel_pipelined("bf16", 128, 64, (4, 2), True, False).kernel,
    marginal.make_marginal_kernel(marginal.GPU_TILES).kernel,
    marginal.make_marginal_kernel(marginal.GPU_TILES, s_bf16=True).kernel,
    linear.make_linear_kernel("f16", 64, 64, 32).kernel,
    linear.make_linear_kernel_pipelined("bf16", 128, 64, 32, True, 3).kernel,
    linear_backward.make_dq_linear_kernel("bf16", 64, 64, 32, False).kernel,
    linear_backward.make_dq_linear_kernel("bf16", 128, 64, 32, True, pipelined=True).kernel,
    linear_backward.make_dkdv_linear_kernel("bf16", 64, 64, 32).kernel,
    linear_backward.make_dkdv_linear_kernel("bf16", 128, 64, 32, pipelined=True).kernel,
    marginal.make_marginal_kernel_pipelined(marginal.GPU_PIPE_TILES).kernel,
    sf.make_forward_simt(t), sb.make_dq(t), sb.make_dkdv(t), ss.make_prep(t),
    sm.make_marginal_sum("float32"),
    classify.make_pool(64, 2), classify.make_score_rank(64),
    classify.make_score_select(64, 4, 4, 4),
]
"""

_HASH = """
import hashlib
from numba.cuda.serialize import dumps
def key(k):
    f = k.py_func
    cells = tuple(c.cell_contents for c in f.__closure__ or ())
    return [f.__qualname__, hashlib.sha256(f.__code__.co_code + dumps(cells)).hexdigest()]
"""


def _python(script, stdin=b""):
    env = dict(os.environ, PYTHONPATH=_ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the GPU variants
    out = subprocess.run(
        [sys.executable, "-c", script], input=stdin, env=env, capture_output=True, timeout=300
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out.stdout


def test_recipes_make_the_same_kernels_in_another_process():
    made = json.loads(
        _python(
            _MAKE
            + _HASH
            + """
import base64, json, pickle
from sla_numba.gpu._precompile import recipe
print(json.dumps([[key(k), base64.b64encode(pickle.dumps(recipe(k))).decode()]
                  for k in kernels]))
"""
        )
    )
    assert len(made) == 26
    recipes = [pickle.loads(base64.b64decode(r)) for _, r in made]
    assert all(r is not None for r in recipes)
    again = json.loads(
        _python(
            _HASH
            + """
import json, pickle, sys
from sla_numba.gpu._precompile import rebuild
print(json.dumps([key(rebuild(r)) for r in pickle.load(sys.stdin.buffer)]))
""",
            stdin=pickle.dumps(recipes),
        )
    )
    assert again == [k for k, _ in made]


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------

_FIRST_CALL = """
import json, sys
import torch
import sla_numba
from sla_numba.gpu import _precompile
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, generator=g)
           .requires_grad_() for _ in range(3))
o = sla_numba.sla_attention(q, k, v, topk=0.2, skip=0.2)
fwd = dict(_precompile.last)
o.float().square().sum().backward()
bwd = dict(_precompile.last)
out = [t.detach().float().cpu().numpy().tobytes().hex() for t in (o, q.grad, k.grad, v.grad)]
print(json.dumps(dict(fwd=fwd, bwd=bwd, out=out)))
"""


def _first_call(tmp_path, workers):
    env = dict(
        os.environ,
        PYTHONPATH=_ROOT,
        NUMBA_CACHE_DIR=str(tmp_path / f"cache{workers}"),
        SLA_NUMBA_COMPILE_WORKERS=str(workers),
    )
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
def test_first_call_with_workers_gives_the_same_bits(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with_workers = _first_call(tmp_path, 4)
    alone = _first_call(tmp_path, 0)
    for stage in ("fwd", "bwd"):
        info = with_workers[stage]
        assert info["cold"] >= 2 and info["workers"] >= 1 and info["failed"] == [], info
    # the first forward compiled classification's kernels together with its own
    # (gpu/classify.py's, or gpu/simt/classify_fused.py's: the default since session 9)
    assert any(".classify" in name for name in with_workers["fwd"]["kernels"])
    # a tensor-core sparse forward: tc/forward.py's, or tc/forward_wgmma.py's on cc 9.0
    assert any(".tc.forward" in name for name in with_workers["fwd"]["kernels"])
    assert alone["fwd"] == {} and alone["bwd"] == {}  # no workers: nothing ahead
    assert with_workers["out"] == alone["out"]
