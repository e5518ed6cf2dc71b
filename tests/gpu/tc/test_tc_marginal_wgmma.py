"""The marginal sums on Hopper wgmma (``sla_numba/gpu/tc/marginal_wgmma.py``,
``SLA_NUMBA_MARGINAL=wgmma``) for bf16 states.

The tensor core adds a k-step's products in its own order, so the outputs are held to the
fp32-accumulation bound of the bf16-states kernels against float64,
``|out - M·S| <= 2·ceil(n_in/16)·2^-23 · (M·|S|)`` (``test_tc_bf16_states._check_bf16``),
and to twice that against the pipelined mma.sync kernel; not to its bits.

1. numpy: the copy layout (every piece of a stage written once, at the 128-byte swizzle)
   read back through the kernel's MN-major descriptor is S's k-step, for 1 and 2 chunks;
   geometry refusals; the unsupported reasons.
2. Simulator: the kernel (wgmma and cp.async twins, both deferred to their waits) with
   tails in every dimension, 16 / 8 / 4-byte copies, column sums, 1 and 2 warpgroups,
   rings of 2 to 4 stages, wait depth 0 and 1, M from registers and from shared memory
   (the ``trans_b`` shared x shared twin), n_in = 0; outputs NaN-poisoned, S rows past
   n_in NaN; the switch sends bf16 states (only) there. ~15 s.
3. Real PTX (a CUDA compiler, no GPU): sm_90a, kb/16 wgmma a stage of the expected form
   (register A; shared x shared with imm-trans-b = 1), no ``.local``, no spills, and no
   "wgmma serialized" warning from ptxas. ~15-25 s (two compiles).
4. A GPU of compute capability 9.0: the GPU configuration at the Wan2.1 and smaller
   sizes against the pipelined kernel and float64; the public API with the switch.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from _tc_reference import SIM, needs_sim
from helpers import needs_cuda_compiler
from test_tc_bf16_states import _bf16_problem, _check_bf16

from sla_numba import config
from sla_numba.gpu.tc import marginal as marginal_tc
from sla_numba.gpu.tc import marginal_wgmma as MW
from sla_numba.gpu.tc import wgmma as W

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# --------------------------------------------------------------------------- 1. numpy
@pytest.mark.parametrize(
    "cfg,chunk", [((64, 16, 3, 1), 16), ((128, 32, 3, 2), 8), ((256, 32, 3, 1), 4)]
)
def test_copies_fill_the_stage_and_the_descriptor_reads_s(cfg, chunk):
    """Thread tid's copy i (``copy_offset``) puts S[k, n : n + V] at its place; over all
    threads every byte of the stage is written once, and the descriptor of k-step ks
    (LBO = one chunk, SBO = 1024, + 2048 a k-step) reads S[16 ks : 16 ks + 16, :]."""
    n, kb, _, wgs = cfg
    G = MW.geometry(cfg, chunk)
    V = G["V"]
    rng = np.random.default_rng(n + kb)
    s = rng.integers(0, 1 << 16, size=(kb, n), dtype=np.uint16)
    base = 2048
    smem = np.zeros((base + G["STAGE_B"]) // 2, np.uint16)
    hits = np.zeros(G["STAGE_B"] // 2, np.int64)
    for tid in range(G["NT"]):
        for i in range(G["NPASS"]):
            off, k, col = MW.copy_offset(cfg, tid, i, chunk)
            assert off % chunk == 0
            smem[(base + off) // 2 : (base + off) // 2 + V] = s[k, col : col + V]
            hits[off // 2 : off // 2 + V] += 1
    assert (hits == 1).all()
    hi = int(W.desc_hi(G["CHUNK_B"], MW.SBO))
    for ks in range(G["KS"]):
        desc = (((base + 2048 * ks) & 0x3FFFF) >> 4) | hi
        got = W.decode_operand(smem, desc, n, trans=1)  # (n, 16): B^T
        assert np.array_equal(got, s[16 * ks : 16 * ks + 16].T)
    if n >= 128:  # LBO and SBO the other way round read something else
        swapped = ((base & 0x3FFFF) >> 4) | int(W.desc_hi(MW.SBO, G["CHUNK_B"]))
        assert not np.array_equal(W.decode_operand(smem, swapped, n, trans=1), s[:16].T)


def test_geometry_and_refusals():
    G = MW.geometry(MW.GPU_CONFIG)
    assert MW.GPU_CONFIG == (256, 32, 4, 2, 1, 1)
    assert (G["RT"], G["NT"], G["KS"], G["STAGE_B"], G["MSLOT_B"]) == (128, 256, 2, 16384, 16384)
    assert G["SMEM_BYTES"] == 4 * (16384 + 16384) + 1024
    assert MW.geometry((256, 32, 3, 1))["SMEM_BYTES"] == 3 * 16384 + 1024  # M in registers
    bads = [(96, 32, 3, 1), (256, 24, 3, 1), (256, 32, 1, 1), (256, 32, 3, 3)]
    bads += [(256, 32, 2, 1, 1), (256, 128, 3, 1, 0, 1), (256, 32, 3, 1, 2)]
    for bad in bads:
        with pytest.raises(ValueError, match="wgmma marginal"):
            MW.geometry(bad)
    with pytest.raises(ValueError, match="cannot copy"):  # 128 threads, 24 chunks a row
        MW.geometry((192, 32, 3, 1))
    with pytest.raises(ValueError, match="chunk=2"):
        MW.geometry(MW.GPU_CONFIG, chunk=2)
    assert "int16" in MW.wgmma_marginal_unsupported_reason(np.float32)
    assert "even" in MW.wgmma_marginal_unsupported_reason(np.int16, W=21)


def test_switch_value_is_checked(monkeypatch):
    monkeypatch.setenv(config.MARGINAL_VAR, "wgmma")
    assert config.marginal_kernel() == "wgmma"
    monkeypatch.setenv(config.MARGINAL_VAR, "tma")
    with pytest.raises(ValueError, match=config.MARGINAL_VAR):
        config.marginal_kernel()


# --------------------------------------------------------------------------- 2. simulator
SIM_CASES = [
    # B, H, Mq, Mk, W, n_out, n_in, transposed, config, cp.async bytes, vs pipelined
    # 2 column tiles (the second 8 wide), n_in 37: 3 stages, the last partial; 16 B
    (1, 1, 20, 40, 72, 18, 37, False, (64, 16, 3, 1), 16, False),
    # column sums, 2 warpgroups (the second past n_out), 2 chunks (LBO), ring of 2; 8 B
    (1, 2, 40, 70, 36, 60, 33, True, (128, 32, 2, 2), 8, False),
    # B*H = 2, 4 slots (wait_group 2) for 1 stage; 4-byte copies (the pipelined kernel's
    # 1-warp simulator tiles cost seconds a case: compared here only)
    (2, 1, 9, 14, 22, 9, 14, False, (64, 16, 4, 1), 4, True),
    # 2 warpgroups x 2 row tiles (n_out 67: the last rows partial), ring wraps; 4 B
    (1, 1, 70, 50, 130, 67, 50, False, (128, 16, 3, 2), 4, False),
    # depth 1 (two A register sets, wait_group 1): 5 stages, odd count
    (1, 1, 20, 70, 72, 18, 69, False, (64, 16, 3, 1, 1, 0), 16, False),
    # M from shared memory, depth 1: column sums, 3 stages of 32, the ring of 3 wraps
    (1, 1, 70, 20, 72, 18, 69, True, (64, 32, 3, 1, 1, 1), 16, False),
    # ... the GPU default's shape: 2 warpgroups, 4 slots, depth 1, 2 chunks; 8 B
    (1, 2, 40, 70, 36, 60, 33, True, (128, 32, 4, 2, 1, 1), 8, False),
    # ... depth 0, kb 64 (the whole 128-byte row of M), one partial stage
    (2, 1, 9, 14, 22, 9, 14, False, (64, 64, 3, 1, 0, 1), 4, False),
]


@needs_sim
@pytest.mark.parametrize("B,H,Mq,Mk,Wd,n_out,n_in,transposed,cfg,chunk,vs_pipe", SIM_CASES)
def test_sim_against_float64_and_pipelined(
    B, H, Mq, Mk, Wd, n_out, n_in, transposed, cfg, chunk, vs_pipe
):
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, Wd, n_out, n_in, transposed, seed=Wd)
    assert marginal_tc.chunk_bytes(bits, Wd) == chunk
    got, ref = out.copy(), out.copy()
    MW.launch_marginal_sum_wgmma(0, bmap, transposed, n_out, n_in, bits, got, config=cfg)
    _check_bf16(got, bmap, values, transposed, n_out, n_in)  # written, untouched, accurate
    if not vs_pipe:
        return
    marginal_tc.launch_marginal_sum_tc(0, bmap, transposed, n_out, n_in, bits, ref, pipeline=True)
    m = np.swapaxes(bmap, 2, 3) if transposed else bmap
    mag = (m[:, :, :n_out, :n_in] == 0).astype(np.float64) @ np.abs(values[:, :, :n_in])
    d = np.abs(got[:, :, :n_out].astype(np.float64) - ref[:, :, :n_out])
    assert (d <= 4 * -(-n_in // 16) * 2.0**-23 * mag).all()


@needs_sim
def test_sim_empty_inner_dimension_gives_zeros():
    bmap, bits, _, out = _bf16_problem(1, 1, 17, 5, 18, 17, 0, False, seed=3)
    MW.launch_marginal_sum_wgmma(0, bmap, False, 17, 0, bits, out)
    assert (out[:, :, :17] == 0).all() and np.isnan(out[:, :, 17:]).all()
    out[:] = np.nan
    MW.launch_marginal_sum_wgmma(0, bmap, False, 0, 5, bits, out)
    assert np.isnan(out).all()


@needs_sim
def test_sim_switch_selects_the_kernel(monkeypatch):
    """``SLA_NUMBA_MARGINAL=wgmma``: bf16 states go to the wgmma kernel (right results),
    fp32 states stay on the register kernel; unset: the pipelined kernel."""
    calls = []
    real = MW.launch_marginal_sum_wgmma

    def spy(*args, **kw):
        calls.append(args[1].shape)
        return real(*args, **kw)

    monkeypatch.setattr(MW, "launch_marginal_sum_wgmma", spy)
    bmap, bits, values, out = _bf16_problem(1, 1, 5, 6, 16, 5, 6, False, seed=0)
    monkeypatch.setenv(config.MARGINAL_VAR, "wgmma")
    got = out.copy()
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 6, bits, got)
    assert calls == [bmap.shape]
    _check_bf16(got, bmap, values, False, 5, 6)
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 6, values, out.copy())  # fp32
    monkeypatch.delenv(config.MARGINAL_VAR)
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 6, bits, out.copy())
    assert calls == [bmap.shape]


def test_launcher_refuses_what_it_does_not_take():
    bmap, bits, values, out = _bf16_problem(1, 1, 4, 4, 8, 4, 4, False, seed=1)
    with pytest.raises(ValueError, match="int16"):
        MW.launch_marginal_sum_wgmma(0, bmap, False, 4, 4, values, out)
    with pytest.raises(TypeError, match="float32"):
        MW.launch_marginal_sum_wgmma(0, bmap, False, 4, 4, bits, out.astype(np.float64))
    with pytest.raises(ValueError, match="exceed"):
        MW.launch_marginal_sum_wgmma(0, bmap, False, 4, 5, bits, out)


# --------------------------------------------------------------------------- 3. PTX
@needs_cuda_compiler
def test_ptx_is_sm90a_without_local_spills_or_serialization():
    pytest.importorskip(
        "cuda.bindings.nvjitlink", reason="needs numba-cuda's CUDA wheels (nvJitLink)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler, not the simulator
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "sweep_marginal_wgmma.py"), "--ptx",
         "--configs", "256,32,3,1", "256,32,4,2,1,1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    reps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(reps) == 2, reps
    for rep in reps:
        assert rep["target"] == "sm_90a" and rep["local"] == 0, rep
        assert rep["wgmma"] == 2 and rep["serialized"] is False, rep  # kb/16 in the loop
        assert 0 < rep["regs"] <= 255 and rep["spill"] == [0, 0], rep
    # A from registers; then both from shared memory, B MN-major (imm-trans-b = 1)
    assert (reps[0]["rs"], reps[0]["ss_trans_b"]) == (2, 0), reps[0]
    assert (reps[1]["rs"], reps[1]["ss_trans_b"]) == (0, 2), reps[1]


# --------------------------------------------------------------------------- 4. Hopper
def _hopper():
    if SIM:
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
@pytest.mark.parametrize(
    "BH,M,Wd,transposed",
    [(2, 512, 16512, False), (2, 512, 16512, True), (3, 77, 4162, False), (2, 130, 1000, True)],
)
def test_gpu_matches_pipelined_and_float64(BH, M, Wd, transposed):
    from numba import cuda

    bmap, bits, values, out = _bf16_problem(1, BH, M, M, Wd, M - 3, M - 1, transposed, seed=M)
    d = [cuda.to_device(x) for x in (bmap, bits, out, out)]
    MW.launch_marginal_sum_wgmma(0, d[0], transposed, M - 3, M - 1, d[1], d[2], MW.GPU_CONFIG)
    marginal_tc.launch_marginal_sum_tc(0, d[0], transposed, M - 3, M - 1, d[1], d[3], pipeline=True)
    got, ref = d[2].copy_to_host(), d[3].copy_to_host()
    _check_bf16(got, bmap, values, transposed, M - 3, M - 1)
    m = np.swapaxes(bmap, 2, 3) if transposed else bmap
    mag = (m[:, :, : M - 3, : M - 1] == 0).astype(np.float64) @ np.abs(values[:, :, : M - 1])
    diff = np.abs(got[:, :, : M - 3].astype(np.float64) - ref[:, :, : M - 3])
    assert (diff <= 4 * -(-(M - 1) // 16) * 2.0**-23 * mag).all()


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
def test_gpu_api_with_the_switch(monkeypatch):
    """Public API, bf16, N = 1000 with tails, forward + backward: with
    ``SLA_NUMBA_MARGINAL=wgmma`` the wgmma kernel runs (row sums forward and backward,
    column sums backward), o_s keeps its bits, o_l and the gradients move by no more
    than fp32 rounding of the sums can explain (norm-relative 1e-3)."""
    import importlib

    import torch

    import sla_numba

    B, H, N, D, blk = 1, 2, 1000, 128, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, do = (
        torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)
    )
    bm = importlib.import_module("sla_numba.gpu").classify(q, k, 4, 2, blk, blk, D**-0.5)
    calls = []
    real = MW.launch_marginal_sum_wgmma
    monkeypatch.setattr(
        MW, "launch_marginal_sum_wgmma", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw)
    )

    def run(switch):
        monkeypatch.setenv(config.MARGINAL_VAR, switch)
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o_s, o_l = sla_numba.sla_attention(
            *xs, block_q=blk, block_k=blk, block_map=bm, return_parts=True, backend="gpu"
        )
        (o_s + o_l).backward(do)
        torch.cuda.synchronize()
        return [o_s.detach(), o_l.detach()] + [x.grad for x in xs]

    base, wg = run(""), run("wgmma")
    assert sorted(calls) == [False, False, True], calls  # fwd rows, bwd rows, bwd columns
    assert torch.equal(base[0], wg[0])
    for a, b in zip(wg[1:], base[1:]):
        assert torch.isfinite(a).all()
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < 1e-3, rel
