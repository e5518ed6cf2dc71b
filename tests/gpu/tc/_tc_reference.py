"""Helpers for the tensor-core kernel tests: random LUTs and a float64 dense oracle."""

import numpy as np
import torch


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
