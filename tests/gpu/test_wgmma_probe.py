"""The parts of ``tools/wgmma_probe.py`` that run without a GPU.

1. The numpy twin of one kernel block (shared-memory layout -> matrix descriptors ->
   our reading of how wgmma decodes them -> m64nN accumulator fragments -> the
   epilogue's stores) reproduces numpy's product for the layouts the kernel uses,
   and the deliberately swapped LBO/SBO reading does not (so the GPU check can tell
   the two readings apart).
2. In a subprocess without the CUDA simulator: Numba compiles the kernel to PTX with
   ``.target sm_90a`` holding exactly 4 ``wgmma.mma_async`` per k-tile, nvJitLink
   assembles it for sm_90a, and refuses the same PTX for plain sm_90.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import needs_cuda_compiler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(ROOT, "tools", "wgmma_probe.py")


def _load_probe():
    spec = importlib.util.spec_from_file_location("wgmma_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_descriptor_fields():
    w = _load_probe()
    d = w.make_desc(0x2400 + 32, 16, 1024, 1)
    assert d & 0x3FFF == (0x2400 + 32) >> 4
    assert (d >> 16) & 0x3FFF == 1
    assert (d >> 32) & 0x3FFF == 64
    assert d >> 62 == 1
    assert (d >> 49) & 7 == 0


@pytest.mark.parametrize("layout", ["sw128", "inter", "inter_swapped"])
def test_twin_block_matches_numpy(layout):
    from sla_numba.gpu.tc.ptx import bf16_bits_to_f32, f32_to_bf16_bits

    w = _load_probe()
    rng = np.random.default_rng(1)
    bn = 128
    a = f32_to_bf16_bits(rng.standard_normal((w.BM, w.BK)).astype(np.float32))
    bt = f32_to_bf16_bits(rng.standard_normal((bn, w.BK)).astype(np.float32))
    ref = bf16_bits_to_f32(a).astype(np.float64) @ bf16_bits_to_f32(bt).astype(np.float64).T
    got = w.twin_gemm(a, bt, layout, bn)
    assert not np.isnan(got).any()  # every C element written by the epilogue map
    err = np.abs(got - ref).max()
    if layout == "inter_swapped":
        assert err > 1.0
    else:
        assert err < 1e-3


def test_sizes_must_fit_tiles():
    w = _load_probe()
    with pytest.raises(ValueError, match="K=100"):
        w.check_sizes(128, 128, 100, 128)
    with pytest.raises(ValueError, match="N=128"):
        w.check_sizes(128, 128, 64, 256)


@needs_cuda_compiler
def test_ptx_is_sm90a_and_assembles(tmp_path):
    pytest.importorskip(
        "cuda.bindings.nvjitlink", reason="needs numba-cuda's CUDA wheels (nvJitLink)"
    )
    out = tmp_path / "wgmma.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler, not the simulator
    proc = subprocess.run(
        [
            sys.executable,
            PROBE,
            "--ptx-only",
            "--bn",
            "128",
            "--layout",
            "sw128",
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["step"]: s for s in json.loads(out.read_text())["steps"]}
    ptx = steps["ptx sm_90a (cc=(9,0,'a'))"]
    assert ptx["ok"] and ptx["target"] == "sm_90a"
    assert ptx["wgmma"] == ptx["expected_wgmma"] == 4
    assert ptx["local"] == 0
    assert steps["ptx sm_90 + retarget"]["wgmma"] == 4
    link = steps["nvjitlink sm_90a"]
    assert link["ok"] and link["cubin_bytes"] > 0 and link["registers"] > 0
    assert steps["nvjitlink sm_90 refuses wgmma"]["ok"]


def test_gpu_plan_order():
    """The main sw128 GEMMs run first and the fallback path early; the no-swizzle
    diagnostics (the ones that may fault and poison the context) run last."""
    w = _load_probe()
    cfgs = [
        (128, 4, "sw128", False),
        (256, 4, "sw128", False),
        (128, 3, "sw128", False),
        (128, 4, "sw128", True),
        (128, 4, "inter", False),
        (128, 4, "inter_swapped", False),
        (128, 4, "tma", False),
        (256, 4, "ws", False),
    ]
    plan = [(w.tag_of(c), p) for c, p in w.gpu_plan(cfgs, ["jit", "retarget"])]
    assert plan == [
        ("bn128_s4_sw128", "jit"),
        ("bn256_s4_sw128", "jit"),
        ("bn128_s4_sw128", "retarget"),
        ("bn128_s4_sw128_mmaonly", "jit"),
        ("bn128_s4_tma", "jit"),
        ("bn256_s4_ws", "jit"),
        ("bn128_s3_sw128", "jit"),
        ("bn128_s4_inter", "jit"),
        ("bn128_s4_inter_swapped", "jit"),
    ]
