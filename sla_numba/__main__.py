"""``python -m sla_numba`` (or ``sla-numba``): SLA on a video-like input, in one table.

The input is built here, no download: a small "video latent" of T x Hh x W
tokens whose features vary smoothly in space and time (a few low-frequency
waves plus a little noise), projected to queries, keys and values per head.
Attention on such data is what SLA was designed for: a few key blocks (the
neighbourhood of a query) carry most of the weight, the rest is small and smooth.

The table shows
- how the key blocks were classified (critical / marginal / negligible shares);
- the error against dense softmax attention of
  * sparse-only attention (critical blocks only: the same exact-attention budget),
  * SLA with the projection W = I (untrained: the linear branch added as is),
  * SLA with W fitted (ridge least squares) on another input to the same layer:
    what training the projection *alone* reaches. It cannot rescale O_s, whose
    softmax is normalised over the critical blocks only, so on this input it does
    not beat sparse-only; SLA's gain comes from fine-tuning the whole model
    (notebooks/03_finetune_dit.ipynb measures that);
- the time of SLA against dense attention (torch SDPA when torch is installed,
  else a numpy dense attention), measured in this run.
"""
import argparse
import sys
import time

import numpy as np

from . import api


def video_like_qkv(batch, heads, frames, height, width, head_dim, seed=0, sample=0,
                   length_scale=3.0, sharpness=8.0, noise=0.3):
    """q, k, v (B, H, T·Hh·W, D) float32 with the structure of video-latent attention.

    ``seed`` fixes the "layer" (its projections and the attention's length scale),
    ``sample`` the input it sees. Queries and keys are random Fourier features of a
    token's (t, y, x) position, so ``q·k`` is a smooth kernel of the distance between
    two tokens (about exp(-d²/2ℓ²) with ℓ = ``length_scale`` tokens) plus noise: each
    token attends mostly to its neighbourhood, a few key blocks, and a little to
    everything else. Values are a smooth random field of the sample's content.
    """
    layer = np.random.default_rng(seed)
    data = np.random.default_rng([seed, sample])
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width),
                          indexing="ij")
    pos = np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.float64)  # (N, 3)
    n = pos.shape[0]
    n_feat = 4 * head_dim

    def fourier(rng, scale):
        freqs = rng.normal(scale=1.0 / scale, size=(3, n_feat // 2))
        phases = rng.uniform(0, 2 * np.pi, size=n_feat // 2)
        z = pos @ freqs + phases
        return np.concatenate([np.cos(z), np.sin(z)], 1) / np.sqrt(n_feat // 2)  # (N, F)

    shape = (batch, heads, n, head_dim)
    qk_feats = fourier(layer, length_scale)
    proj = layer.normal(size=(heads, n_feat, head_dim))
    # scaled so that scale·q·k ≈ sharpness · kernel(distance): peak logits ≈ sharpness
    base = np.einsum("nf,hfd->hnd", qk_feats, proj) * np.sqrt(sharpness / np.sqrt(head_dim))
    q = base + noise * data.normal(size=shape)
    k = base + noise * data.normal(size=shape)
    v_proj = layer.normal(size=(heads, n_feat, head_dim))
    v = np.einsum("nf,hfd->hnd", fourier(data, 2 * length_scale), v_proj)
    v = np.broadcast_to(v, shape) + noise * data.normal(size=shape)
    return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))


def dense_attention_numpy(q, k, v, scale):
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v.astype(np.float64))


def _rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _median_time(fn, repeats):
    fn()  # warm-up (and JIT compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fit_projection(o_s, o_l, target, ridge=1e-2):
    """W, b minimising ||o_s + o_l Wᵀ + b − target||² + λ||W||² over all tokens and heads.

    O_l varies little from token to token (it averages many blocks), so plain least
    squares is ill-conditioned; the ridge term (λ = ``ridge`` · mean eigenvalue of the
    centred O_lᵀO_l) keeps W small where the data say little.
    """
    x = o_l.reshape(-1, o_l.shape[-1]).astype(np.float64)
    y = (target - o_s).reshape(-1, o_s.shape[-1]).astype(np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc).T
    return w.copy(), y_mean - x_mean @ w.T


def run(args, out=sys.stdout):
    shape = (args.batch, args.heads, args.frames * args.height * args.width, args.dim)
    q, k, v = video_like_qkv(args.batch, args.heads, args.frames, args.height, args.width,
                             args.dim, seed=args.seed, sample=0)
    # another input to the same "layer", to fit the projection on
    q2, k2, v2 = video_like_qkv(args.batch, args.heads, args.frames, args.height, args.width,
                                args.dim, seed=args.seed, sample=1)
    scale = 1.0 / np.sqrt(args.dim)
    kw = dict(topk=args.topk, skip=args.skip, block_q=args.block, block_k=args.block,
              backend=args.backend)

    cls = api.classify_blocks(q, k, topk=args.topk, skip=args.skip, block_q=args.block,
                              block_k=args.block, backend=args.backend)
    m = np.asarray(cls.map)
    shares = [(m == c).mean() for c in (1, 0, -1)]

    dense = dense_attention_numpy(q, k, v, scale)
    o_s, o_l = api.sla_attention(q, k, v, return_parts=True, **kw)
    o_s2, o_l2 = api.sla_attention(q2, k2, v2, return_parts=True, **kw)
    w, b = fit_projection(o_s2, o_l2, dense_attention_numpy(q2, k2, v2, scale))
    o_fit = api.sla_attention(q, k, v, proj_weight=w.astype(np.float32),
                              proj_bias=b.astype(np.float32), **kw)

    t_sla = _median_time(lambda: api.sla_attention(q, k, v, **kw), args.repeats)
    try:
        import torch
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_dense = _median_time(lambda: sdpa(tq, tk, tv), args.repeats)
        dense_name = f"torch SDPA fp32 ({torch.get_num_threads()} threads)"
    except ImportError:
        t_dense = _median_time(lambda: dense_attention_numpy(q, k, v, scale), args.repeats)
        dense_name = "numpy dense (float64)"

    rows = [
        ("input (B, H, N, D)", str(shape)),
        ("blocks per row (Mk), block size", f"{m.shape[-1]}, {args.block}"),
        ("critical / marginal / negligible", " / ".join(f"{100 * s:.1f} %" for s in shares)),
        ("error vs dense: sparse-only (critical blocks)", f"{_rel_err(o_s, dense):.4f}"),
        ("error vs dense: SLA, W = I (untrained)", f"{_rel_err(o_s + o_l, dense):.4f}"),
        ("error vs dense: SLA, W fitted on another sample", f"{_rel_err(o_fit, dense):.4f}"),
        (f"time SLA ({args.backend}), fp32", f"{1e3 * t_sla:.2f} ms"),
        (f"time dense: {dense_name}", f"{1e3 * t_dense:.2f} ms"),
        ("speed-up of SLA over dense", f"{t_dense / t_sla:.2f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    print("SLA (Sparse-Linear Attention) on a video-like input", file=out)
    print("-" * (width + 24), file=out)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=out)
    print("(errors: relative L2 norm; times: median of %d runs after a warm-up;\n"
          " a projection alone cannot undo O_s's renormalisation: SLA needs fine-tuning,\n"
          " see notebooks/03_finetune_dit.ipynb)" % args.repeats, file=out)
    return dict(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="sla-numba", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--frames", type=int, default=4, help="T of the T x Hh x W token grid")
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dim", type=int, default=64, help="head dimension D")
    p.add_argument("--block", type=int, default=64, help="block_q = block_k")
    p.add_argument("--topk", type=float, default=0.05)
    p.add_argument("--skip", type=float, default=0.10)
    p.add_argument("--backend", default="cpu", choices=["auto", "cpu", "gpu"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
