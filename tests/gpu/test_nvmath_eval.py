"""The parts of ``tools/nvmath_eval.py`` that run without a GPU.

1. Kernel (c), the minimal ``mma.sync`` states product the tool times against nvmath's
   cuBLASDx tile, compiles to PTX for sm_90a with every k-step unrolled: 64 mma (4 k-steps
   x 2 m16 tiles x 8 n8 tiles a warp), 24 ldmatrix (4 x (2 + 4)), no local memory.
2. Without nvmath-python (CI's case; CI has no CUDA compilers either, so there the first
   step to fail is kernel (c)'s compile) the tool names the step that failed and exits 0: on
   the GPU machine that line is the result the lead needs, so it must not be a traceback.
   With nvmath-python importable this is skipped; the full offline check (code generation,
   compile, nvJitLink for sm_90a) takes minutes and is run by hand:
   ``PYTHONPATH=<nvmath site>:. python tools/nvmath_eval.py --offline``.
"""

import glob
import os
import subprocess
import sys

import pytest
from helpers import cuda_compiler_available, needs_cuda_compiler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "nvmath_eval.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler, not the simulator
    return subprocess.run(
        [sys.executable, TOOL, *args], env=env, capture_output=True, text=True, timeout=300
    )


@needs_cuda_compiler
def test_mma_kernel_ptx():
    proc = _run("--offline", "--mma-only")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "UNAVAILABLE" not in out, out[-3000:]
    line = next(ln for ln in out.splitlines() if "(c) PTX instructions" in ln)
    assert "'mma.sync': 64," in line and "'ldmatrix': 24," in line, line
    assert "'.local': 0" in line and "'wgmma': 0" in line, line


def test_without_nvmath_names_the_step():
    libs = [
        p
        for entry in sys.path
        for p in glob.glob(os.path.join(entry or ".", "nvidia", "cu1*", "lib", "libmathdx.so*"))
    ]
    if libs:
        pytest.skip("nvmath-python's libmathdx is installed: run the offline check by hand")
    proc = _run("--offline")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # the first step that cannot run is named: the CUDA compilers' absence (CI installs
    # numba-cuda without them) stops kernel (c); with them, the missing libmathdx
    first = "find libmathdx.so.0" if cuda_compiler_available() else "(c) compile the mma.sync"
    assert f"nvmath_eval: UNAVAILABLE at {first}" in out, out[-3000:]
