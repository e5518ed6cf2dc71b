"""The wgmma sparse forward (``sla_numba/gpu/tc/forward_wgmma.py``) and its layouts.

1. numpy (no simulator, no GPU): the shared-memory layouts and fragment maps the kernel
   and the simulator twins assume, against the PTX ISA's formulas written out here a
   second time: the MN-major (transposed) reading of V through its descriptor, the
   K-major reading of Q / K, and wgmma's register-A fragment fed by ``pack_a`` of the
   S accumulators. A descriptor with LBO and SBO exchanged must read the wrong matrix
   (so the reading is pinned down, not just self-consistent).
2. Simulator: the kernel (its warpgroup-collective twins) against the float64 dense
   oracle, with tails of Nq and Nk, a query block with no critical block, poisoned
   outputs; through ``SLA_NUMBA_SPARSE_FWD=wgmma`` and directly; the switch refuses
   configurations the kernel does not take, naming the variable.
3. Real PTX (a CUDA compiler, no GPU): ``.target sm_90a``, D/16 + 4 wgmma a key block,
   no ``.local``; nvJitLink assembles it for sm_90a within 255 registers, no spills.
4. A GPU of compute capability 9.0: against the mma.sync kernel and float64.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tc_reference import SIM, dense_reference, random_lut
from helpers import needs_cuda_compiler

from sla_numba import config
from sla_numba._params import LSE_EMPTY
from sla_numba.gpu.tc import wgmma as W
from sla_numba.testing import poisoned

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

needs_sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1 (simulator twins)")


# ---------------------------------------------------------------------------
# 1. Layouts (numpy)
# ---------------------------------------------------------------------------


def _store_tile(smem, base, tile):
    """Write a (64, D) tile of 16-bit values the way the kernel's ``load_tile`` does:
    D/64 column chunks of 8 KiB, 16-byte pieces at ``sw128_offset`` (bytes)."""
    from sla_numba.gpu.tc.forward_wgmma import CHUNK_BYTES

    rows, D = tile.shape
    for dc in range(D // 64):
        for r in range(rows):
            for p in range(8):
                at = (base + dc * CHUNK_BYTES + W.sw128_offset(r, p)) // 2
                smem[at : at + 8] = tile[r, 64 * dc + 8 * p : 64 * dc + 8 * p + 8]


def _tiles(D, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << 16, size=(64, D), dtype=np.uint16)


def test_loader_offsets_are_the_swizzled_layout():
    """The kernel's per-thread copy address (t_off + chunk + pass) is sw128_offset."""
    from sla_numba.gpu.tc.forward_wgmma import CHUNK_BYTES

    for tid in range(128):
        rr, ch = tid >> 3, tid & 7
        t_off = rr * 128 + ((ch ^ (rr & 7)) << 4)  # as in sla_fwd_wgmma
        for p in range(4):
            for dc in range(2):
                got = t_off + dc * CHUNK_BYTES + p * 2048
                assert got == dc * CHUNK_BYTES + W.sw128_offset(rr + 16 * p, ch)


@pytest.mark.parametrize("D", [64, 128])
def test_v_descriptor_reads_mn_major_transposed(D):
    """B of O += P V at k-step kk is V[16kk : 16kk+16, :] (16 keys x D columns); the
    MN-major descriptor (LBO = chunk distance, SBO = 8 keys) reads exactly that."""
    from sla_numba.gpu.tc import forward_wgmma as F

    v = _tiles(D, seed=D)
    base = 1024 * 3
    smem = np.zeros((base + F.smem_layout(D)["bytes"]) // 2, np.uint16)
    _store_tile(smem, base, v)
    for kk in range(4):
        desc = W.make_desc(base + kk * 2048, F.V_LBO, F.SBO)
        assert desc == ((base + kk * 2048) >> 4) | int(F.desc_hi(F.V_LBO, F.SBO))
        got = W.decode_operand(smem, desc, D, trans=1)  # (N = D, 16): B^T
        assert np.array_equal(got, v[16 * kk : 16 * kk + 16, :].T)
    if D == 128:  # the other reading of LBO / SBO reads something else
        swapped = W.make_desc(base, F.SBO, F.V_LBO)
        assert not np.array_equal(W.decode_operand(smem, swapped, D, trans=1), v[:16].T)


@pytest.mark.parametrize("D", [64, 128])
def test_qk_descriptor_reads_k_major(D):
    from sla_numba.gpu.tc import forward_wgmma as F

    x = _tiles(D, seed=1)
    smem = np.zeros(F.smem_layout(D)["bytes"] // 2, np.uint16)
    _store_tile(smem, 0, x)
    for ks in range(D // 16):
        off = (ks // 4) * F.CHUNK_BYTES + (ks % 4) * 32  # as in sla_fwd_wgmma
        got = W.decode_operand(smem, W.make_desc(off, F.K_MAJOR_LBO, F.SBO), 64, trans=0)
        assert np.array_equal(got, x[:, 16 * ks : 16 * ks + 16])
    # reading without the swizzle XOR (a plain row-major tile) does not match
    plain = smem.copy()
    plain[:] = 0
    for r in range(64):
        plain[r * 64 : r * 64 + 64] = x[r, :64]
    got = W.decode_operand(plain, W.make_desc(0, F.K_MAJOR_LBO, F.SBO), 64, trans=0)
    assert not np.array_equal(got, x[:, :16])


def test_fragment_maps_follow_the_ptx_isa():
    """Accumulator and register-A maps against the PTX ISA's formulas (wgmma
    .m64nNk16: row = 16*warp + groupID (+8), col = ...)."""
    rows, cols = W.acc_coords(64)
    ar, ac = W.a_coords()
    for tid in range(128):
        w, lane = tid // 32, tid % 32
        gid, tig = lane // 4, lane % 4
        for i in range(32):  # d_i: row groupID (+8 for i % 4 >= 2), col 8*(i//4) + 2*tig + i%2
            assert rows[tid, i] == 16 * w + gid + 8 * ((i % 4) // 2)
            assert cols[tid, i] == 8 * (i // 4) + 2 * tig + (i % 2)
        # a_i: row groupID (+8 for a2, a3, a6, a7), col 2*tig + i%2 (+8 for i >= 4)
        for i in range(8):
            assert ar[tid, i] == 16 * w + gid + 8 * ((i % 4) // 2)
            assert ac[tid, i] == 2 * tig + (i % 2) + 8 * (i // 4)
    # every element exactly once
    assert len(set(zip(rows.ravel(), cols.ravel()))) == 64 * 64
    assert len(set(zip(ar.ravel(), ac.ravel()))) == 64 * 16


def test_pack_a_of_accumulators_is_register_a_of_the_k_step():
    """P (64 x 64, in the S accumulator layout) packed as tc/tiles.py's ``pack_a`` does
    (registers from n8 tiles 2kk, 2kk+1) is wgmma's A operand P[:, 16kk : 16kk+16]."""
    rng = np.random.default_rng(3)
    p_bits = rng.integers(0, 1 << 16, size=(64, 64)).astype(np.uint16)
    rows, cols = W.acc_coords(64)
    acc = p_bits[rows, cols].astype(np.int64)  # (128, 32): s[0, n, e] = acc[:, 4n + e]

    def pack(lo, hi):
        return lo | (hi << 16)

    for kk in range(4):
        n0, n1 = 2 * kk, 2 * kk + 1
        regs = np.stack(
            [
                pack(acc[:, 4 * n0], acc[:, 4 * n0 + 1]),
                pack(acc[:, 4 * n0 + 2], acc[:, 4 * n0 + 3]),
                pack(acc[:, 4 * n1], acc[:, 4 * n1 + 1]),
                pack(acc[:, 4 * n1 + 2], acc[:, 4 * n1 + 3]),
            ],
            axis=1,
        )
        assert np.array_equal(W.gather_a(regs), p_bits[:, 16 * kk : 16 * kk + 16])
        # the m16n8k8-style order (a1 <-> a2) would be a different matrix
        assert not np.array_equal(
            W.gather_a(regs[:, [0, 2, 1, 3]]), p_bits[:, 16 * kk : 16 * kk + 16]
        )


# ---------------------------------------------------------------------------
# 2. The kernel under the simulator
# ---------------------------------------------------------------------------


def _inputs(dtype, D, Nq, Nk, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 1, n, D, generator=g).to(dtype) for n in (Nq, Nk, Nk))


def _check_against_float64(q, k, v, lut, counts, o, lse, tol):
    D = q.shape[-1]
    ro, rlse = dense_reference(q.double(), k.double(), v.double(), lut, counts, 64, 64, D**-0.5)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    assert (o.double() - ro).abs().max().item() < tol
    empty = torch.isinf(rlse)
    assert empty.any() and (~empty).any()
    assert (lse[empty] == np.float32(LSE_EMPTY)).all() and (o[empty] == 0).all()
    assert (lse.double() - rlse)[~empty].abs().max().item() < 1e-4


@needs_sim
def test_switch_runs_wgmma_kernel_bf16_tails_and_empty_row(monkeypatch):
    """bf16, D = 64, Nq = Nk = 130 (tails of both), 3 query blocks: 2, 2 and 0 critical
    blocks, among them the partial last key block."""
    from sla_numba.gpu.tc import forward as forward_tc

    q, k, v = _inputs(torch.bfloat16, 64, 130, 130, seed=0)
    lut = torch.tensor([[[[0, 2, 0], [1, 2, 0], [0, 0, 0]]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 2, 0]]], dtype=torch.int32)
    monkeypatch.setenv(config.SPARSE_FWD_VAR, "wgmma")
    with poisoned():
        o, lse = forward_tc.sparse_forward_tc(q, k, v, lut, counts, 64, 64, 64**-0.5)
    _check_against_float64(q, k, v, lut, counts, o, lse, 2e-2)


@needs_sim
@pytest.mark.parametrize("v_stages,overlap", [(2, False), (1, False), (2, True)])
def test_wgmma_kernel_fp16_d128_two_chunks(v_stages, overlap):
    """fp16, D = 128 (two 64-column chunks: exercises V's LBO), Nq != Nk, 3 blocks in one
    row (both stages of the K / V ring, refilled), an empty query block; both variants
    (V double- or single-buffered, the softmax overlapping P.V)."""
    from sla_numba.gpu.tc.forward_wgmma import sparse_forward_wgmma

    q, k, v = _inputs(torch.float16, 128, 100, 190, seed=1)
    lut = torch.tensor([[[[0, 0, 0], [0, 1, 2]]]], dtype=torch.int32)
    counts = torch.tensor([[[0, 3]]], dtype=torch.int32)
    with poisoned():
        o, lse = sparse_forward_wgmma(q, k, v, lut, counts, 64, 64, 128**-0.5, v_stages, overlap)
    _check_against_float64(q, k, v, lut, counts, o, lse, 3e-3)


@pytest.mark.parametrize(
    "dtype,D,bq,bk,what",
    [
        (torch.bfloat16, 32, 64, 64, "head_dim 32"),
        (torch.bfloat16, 128, 128, 64, "block_q 128"),
        (torch.float16, 64, 64, 32, "block_k 32"),
        (torch.float32, 64, 64, 64, "dtype float32"),
    ],
)
def test_switch_refuses_what_the_kernel_does_not_take(monkeypatch, dtype, D, bq, bk, what):
    from sla_numba.gpu.tc import forward as forward_tc

    q, k, v = (torch.zeros(1, 1, 64, D, dtype=dtype) for _ in range(3))
    lut = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    counts = torch.ones(1, 1, 1, dtype=torch.int32)
    monkeypatch.setenv(config.SPARSE_FWD_VAR, "wgmma")
    with pytest.raises(ValueError, match=config.SPARSE_FWD_VAR) as err:
        forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, 0.1)
    assert what in str(err.value)


# ---------------------------------------------------------------------------
# 3. Real PTX for sm_90a (no GPU)
# ---------------------------------------------------------------------------

_PTX_SCRIPT = r"""
import importlib.util, json, re, sys
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
import numba.cuda.dispatcher as disp
from numba import cuda, float32, int16, int32, int64
try:
    cuda.get_current_device()
except Exception:  # no GPU: type device functions for sm_90
    class _Dev:
        compute_capability = (9, 0)
    disp.get_current_device = lambda: _Dev()
spec = importlib.util.spec_from_file_location("probe", sys.argv[1])
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
from sla_numba.gpu.tc.forward_wgmma import make_sparse_forward_wgmma
i16, i32, f32 = int16[::1], int32[::1], float32[::1]
sig = (i16, i16, i16, i32, i32, f32, f32, int64, int64, int64, int64, float32)
out = []
for D, kind, vst, ovl in ((128, "bf16", 2, 0), (64, "f16", 2, 0), (128, "bf16", 1, 0),
                          (128, "bf16", 2, 1)):
    kern = make_sparse_forward_wgmma(D, kind, vst, bool(ovl)).kernel
    fm = kern.targetoptions.get("fastmath", False)
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0, "a"), fastmath=fm)
    cubin, info = probe.nvjitlink_assemble(ptx, "sm_90a")
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    out.append(dict(
        D=D, kind=kind, v_stages=vst, overlap=ovl, target=re.search(r"\.target\s+(\S+)", ptx).group(1),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        ss=len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n64k16\.f32\.%s\.%s \{[^}]*\}, %%rd" % (kind, kind), ptx)),
        rs=len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n%dk16\.f32\.%s\.%s \{[^}]*\}, \{" % (D, kind, kind), ptx)),
        local=ptx.count(".local"), fence=ptx.count("wgmma.fence"), cubin=len(cubin),
        regs=int(regs.group(1)) if regs else -1,
        spill=[int(spill.group(1)), int(spill.group(2))] if spill else None))
print(json.dumps(out))
"""


@needs_cuda_compiler
def test_ptx_is_sm90a_with_the_expected_wgmma_and_assembles():
    pytest.importorskip(
        "cuda.bindings.nvjitlink", reason="needs numba-cuda's CUDA wheels (nvJitLink)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler, not the simulator
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT, os.path.join(ROOT, "tools", "wgmma_probe.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    for rep in json.loads(proc.stdout.strip().splitlines()[-1]):
        D = rep["D"]
        assert rep["target"] == "sm_90a", rep
        # one key block: D/16 S k-steps (both operands by descriptor) + 4 P.V k-steps
        # (A from registers); the loop body is not unrolled over key blocks
        # (overlapped variant: block 0's S also in the prologue, one more fence)
        ss = D // 16 * (2 if rep["overlap"] else 1)
        assert rep["ss"] == ss and rep["rs"] == 4 and rep["wgmma"] == ss + 4, rep
        assert rep["fence"] == 2 + rep["overlap"] and rep["local"] == 0, rep
        assert 0 < rep["regs"] <= 255 and rep["spill"] == [0, 0], rep
        assert rep["cubin"] > 0


# ---------------------------------------------------------------------------
# 4. A Hopper GPU
# ---------------------------------------------------------------------------


def _hopper():
    if SIM or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
@pytest.mark.parametrize("v_stages,overlap", [(2, False), (1, False), (2, True)])
@pytest.mark.parametrize(
    "dtype,D,Nq,Nk", [(torch.bfloat16, 128, 1000, 1000), (torch.float16, 64, 777, 1100)]
)
def test_gpu_matches_mma_kernel_and_float64(dtype, D, Nq, Nk, v_stages, overlap):
    from sla_numba.gpu.tc.forward import sparse_forward_tc
    from sla_numba.gpu.tc.forward_wgmma import sparse_forward_wgmma

    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v = (torch.randn(2, 3, n, D, device="cuda", generator=g).to(dtype) for n in (Nq, Nk, Nk))
    mq, mk = -(-Nq // 64), -(-Nk // 64)
    lut, counts = random_lut(2, 3, mq, mk, 4, seed=D)
    lut, counts = lut.cuda(), counts.cuda()
    scale = D**-0.5
    with poisoned():
        o, lse = sparse_forward_wgmma(q, k, v, lut, counts, 64, 64, scale, v_stages, overlap)
        o2, lse2 = sparse_forward_tc(q, k, v, lut, counts, 64, 64, scale)
    torch.cuda.synchronize()
    ro, rlse = dense_reference(q.double(), k.double(), v.double(), lut, counts, 64, 64, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.isfinite(o).all()
    assert (o.double() - ro).abs().max().item() < tol
    empty = torch.isinf(rlse)
    assert (lse[empty] == LSE_EMPTY).all() and (o[empty] == 0).all()
    assert (lse.double() - rlse)[~empty].abs().max().item() < 1e-3
    # the two kernels: same inputs, different accumulation order inside the MMA
    assert (o - o2).abs().max().item() < tol / 10
    assert (lse - lse2)[~empty].abs().max().item() < 1e-4


def test_backend_launcher_takes_the_switch(monkeypatch):
    """``tc/forward.py``'s ``launch_sparse_forward`` (what ``gpu/forward.py`` calls) hands
    the same arguments to the wgmma launcher when the switch says so, and the wgmma
    launcher refuses a configuration it does not take before launching anything."""
    from sla_numba.gpu.tc import forward as forward_tc
    from sla_numba.gpu.tc import forward_wgmma

    calls = []
    real = forward_wgmma.launch_sparse_forward_wgmma
    monkeypatch.setattr(forward_wgmma, "launch_sparse_forward_wgmma", lambda *a: calls.append(a))
    args = (
        "bf16",
        "q",
        "k",
        "v",
        "lut",
        "counts",
        "o",
        "lse",
        1,
        2,
        130,
        140,
        64,
        64,
        64,
        0.125,
        0,
    )
    monkeypatch.setenv(config.SPARSE_FWD_VAR, "wgmma")
    forward_tc.launch_sparse_forward(*args)
    assert calls == [args]
    bad = args[:12] + (96,) + args[13:]  # D = 96
    with pytest.raises(ValueError, match=f"{config.SPARSE_FWD_VAR}=wgmma.*head_dim 96"):
        real(*bad)
