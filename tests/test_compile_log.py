"""Waits say what they are: a call that compiles logs one line before and one after."""

import logging

import numpy as np
from helpers import needs_cuda_compiler
from numba import njit

import sla_numba
from sla_numba import _compile_log


def _fresh_function():
    """A Numba function that has never been compiled (a new closure each time; no disk cache)."""

    @njit
    def add_one(x):
        return x + 1

    return add_one


def test_notice_logs_a_compile_and_its_duration(caplog):
    fn = _fresh_function()
    with caplog.at_level(logging.INFO, logger="sla_numba"):
        with _compile_log.notice("for D=8 float32 (cpu, forward)"):
            assert fn(1) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "sla_numba"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("compiling SLA kernels for D=8 float32 (cpu, forward)")
    assert "first call only, cached on disk" in lines[0]
    assert lines[1].startswith("SLA kernels for D=8 float32 (cpu, forward) ready in ")
    assert lines[1].endswith(" s")


def test_notice_is_silent_without_a_compile(caplog):
    fn = _fresh_function()
    fn(1)  # compiled outside the block
    with caplog.at_level(logging.INFO, logger="sla_numba"):
        with _compile_log.notice("for D=8 float32 (cpu, forward)"):
            fn(2)
    assert [r for r in caplog.records if r.name == "sla_numba"] == []


def test_unconfigured_logging_writes_to_stderr(capsys, monkeypatch):
    """A fresh script / the CLI / a notebook has no handler: the line still shows (stderr)."""
    monkeypatch.setattr(_compile_log.logger, "hasHandlers", lambda: False)
    _compile_log.emit("hello")
    assert capsys.readouterr().err == "sla_numba: hello\n"
    monkeypatch.setattr(_compile_log.logger, "level", logging.WARNING)  # silenced by the user
    _compile_log.emit("hello")
    assert capsys.readouterr().err == ""


def test_sla_attention_announces_a_compile(caplog, monkeypatch):
    """The public call is wrapped: a kernel compiling inside it is announced, with D,
    dtype, backend and stage (a fresh Numba function stands in for a cold kernel)."""
    import sla_numba.cpu as cpu

    fn, real = _fresh_function(), cpu.forward

    def cold_forward(*args):
        fn(1)
        return real(*args)

    monkeypatch.setattr(cpu, "forward", cold_forward)
    q = np.random.default_rng(0).standard_normal((1, 1, 32, 8)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="sla_numba"):
        sla_numba.sla_attention(q, q, q, block_q=16, block_k=16, backend="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "sla_numba"]
    assert len(lines) == 2, lines
    assert "for D=8 float32 (cpu, forward)" in lines[0] and "ready in" in lines[1]


@needs_cuda_compiler
def test_a_cuda_compile_is_announced_too():
    """numba-cuda fires no "numba:compile" event; its compiler passes are what we hear.
    Compiling PTX needs no GPU, but not the simulator: run it in a fresh process."""
    import os
    import subprocess
    import sys

    code = (
        "import sla_numba.gpu\n"
        "from sla_numba import _compile_log as c\n"
        "from numba import cuda, types\n"
        "def kern(x):\n"
        "    x[0] = 1\n"
        "with c.notice('for D=8 bfloat16 (gpu, forward)'):\n"
        "    cuda.compile_ptx(kern, (types.float32[::1],), cc=(8, 0))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in [env.get("PYTHONPATH")] if p]
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sla_numba: ")]
    assert len(lines) == 2, res.stderr
    assert "compiling SLA kernels for D=8 bfloat16 (gpu, forward)" in lines[0]
    assert "ready in" in lines[1]
