"""Helpers for the tensor-core kernel tests: skip marks, exact half inputs, feature
maps in float64, random LUTs and a float64 dense oracle."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import config

from sla_numba.gpu.tc.ptx import bf16_bits_to_f32, f32_to_bf16_bits

#: The CUDA simulator is on (the kernels' pure-Python twins run).
SIM = bool(config.ENABLE_CUDASIM)


def tc_gpu_available():
    """A real CUDA GPU with compute capability >= 8.0 (not the simulator), seen by
    Numba and by torch (some tests hand the kernels torch CUDA tensors)."""
    if SIM:
        return False
    try:
        from numba import cuda

        return (
            torch.cuda.is_available()
            and cuda.is_available()
            and cuda.get_current_device().compute_capability >= (8, 0)
        )
    except Exception:  # noqa: BLE001 - no driver: no GPU test
        return False


needs_sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1 (simulator twins)")
needs_gpu = pytest.mark.skipif(not tc_gpu_available(), reason="needs a CUDA GPU with cc >= 8.0")

#: The repository root (what a fresh process needs on its PYTHONPATH).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def fresh_process_lines(script, timeout=300):
    """The stdout lines of ``python -c script`` in a new process that builds the real-GPU
    kernel variants (the simulator switched off; nothing is compiled, no GPU needed):
    how the tests see a kernel's disk-cache key as another process would. The process
    must succeed."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


def half_values(x, kind):
    """(int16 bits, float64 values) of ``x`` rounded to ``kind`` ('bf16' or 'f16')."""
    x = np.asarray(x, np.float32)
    if kind == "bf16":
        bits = f32_to_bf16_bits(x).view(np.int16)
        return bits, bf16_bits_to_f32(bits).astype(np.float64)
    bits = x.astype(np.float16).view(np.int16)
    return bits, bits.view(np.float16).astype(np.float64)


def phi64(x, fm):
    """The feature map ``fm`` (0 softmax over the last axis, 1 elu + 1, 2 relu), numpy."""
    if fm == 0:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if fm == 1:
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    return np.maximum(x, 0.0)


def random_lut(B, H, mq, mk, n, seed, empty_every=3):
    """Ascending random critical LUT (B, H, mq, n) int32 and counts (B, H, mq).

    Rows whose index is a multiple of ``empty_every`` (shifted by head) get fewer
    blocks, some none at all, to exercise empty rows and variable counts.
    """
    rng = np.random.default_rng(seed)
    lut = np.zeros((B, H, mq, n), np.int32)
    counts = np.zeros((B, H, mq), np.int32)
    for b in range(B):
        for h in range(H):
            for i in range(mq):
                c = min(n, mk)
                if empty_every and (i + h) % empty_every == 0:
                    c = (i + h + b) % (c + 1)
                sel = np.sort(rng.choice(mk, size=c, replace=False))
                lut[b, h, i, :c] = sel
                counts[b, h, i] = c
    return torch.from_numpy(lut), torch.from_numpy(counts)


def full_lut(B, H, mq, mk):
    lut = torch.arange(mk, dtype=torch.int32).expand(B, H, mq, mk).contiguous()
    return lut, torch.full((B, H, mq), mk, dtype=torch.int32)


def token_mask(lut, counts, Nq, Nk, bq, bk):
    """Expand the LUT into a boolean (B, H, Nq, Nk) token mask."""
    B, H, mq, n = lut.shape
    mk = -(-Nk // bk)
    blk = torch.zeros(B, H, mq, mk + 1, dtype=torch.bool)
    valid = torch.arange(n) < counts[..., None].long()
    idx = torch.where(valid, lut.long(), torch.full_like(lut, mk, dtype=torch.long))
    blk.scatter_(-1, idx, True)
    blk = blk[..., :mk]
    m = blk.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
    return m[:, :, :Nq, :Nk]


def dense_reference(q, k, v, lut, counts, bq, bk, scale):
    """float64 masked softmax attention: (O_s, lse) with lse = -inf on empty rows.

    Differentiable w.r.t. q, k, v (float64 leaves)."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = token_mask(lut.cpu(), counts.cpu(), Nq, Nk, bq, bk).to(q.device)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, -torch.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def gpu_ms(run, reps):
    """Mean ms of one ``run()`` over ``reps`` calls back to back between two CUDA events
    (after whatever untimed calls the caller made)."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        run()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps
