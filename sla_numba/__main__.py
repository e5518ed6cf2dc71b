"""``python -m sla_numba`` (or ``sla-numba``): SLA on a video-like input, in one table.

The input is built here, no download: a small "video latent" of T x Hh x W
tokens whose features vary smoothly in space and time (a few low-frequency
waves plus a little noise), projected to queries, keys and values per head.
Attention on such data is what SLA was designed for: a few key blocks (the
neighbourhood of a query) carry most of the weight, the rest is small and smooth.

The table shows
- the kernel path that ran (``cpu``, ``gpu:simt`` or ``gpu:tc``) and how the key
  blocks were classified (critical / marginal / negligible per query block);
- the error against dense softmax attention of
  * sparse-only attention (critical blocks only: the same exact-attention budget),
  * untrained SLA: ``SparseLinearAttention`` starts with its projection at zero,
    so it *is* block-sparse attention and shows the same error,
  * linear-only attention (every key block marginal),
  * SLA with its projection W, b fitted (ridge least squares, the optimum of
    training the projection alone) on other inputs to the same layer, and on this
    input itself: the most a projection can do without fine-tuning the model.
    It cannot rescale O_s, whose softmax is normalised over the critical blocks
    only; SLA's gain comes from fine-tuning the whole model
    (notebooks/03_finetune_dit.ipynb measures that),
  * ``O_s + O_l`` without projection (what ``sla_attention`` returns without
    ``proj_weight``);
- the time of the SLA forward against dense attention (torch SDPA when torch is
  installed, else a numpy dense attention): median and range of ``--repeats`` runs.

``python -m sla_numba warmup`` compiles the kernels ahead of time (see ``_warmup.py``).
"""

import argparse
import sys
import textwrap
import time

import numpy as np

from . import api


def video_like_qkv(
    batch,
    heads,
    frames,
    height,
    width,
    head_dim,
    seed=0,
    sample=0,
    length_scale=3.0,
    sharpness=8.0,
    noise=0.3,
):
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
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
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


def time_calls(fn, repeats, sync=None):
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call (which also compiles).

    Wall-clock (``time.perf_counter``) per call; ``sync`` (e.g. ``torch.cuda.synchronize``)
    is called before each clock read so GPU work is counted. Returns the list of times:
    the table prints their median and range, so a noisy machine shows as a wide range.
    """
    sync = sync or (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _fmt_times(times):
    t = 1e3 * np.asarray(times)
    return f"{np.median(t):.2f} ms ({t.min():.2f}–{t.max():.2f})"


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


#: ridge strengths tried when fitting the projection (chosen on a held-out input)
RIDGES = (1e-2, 1e-1, 1.0, 10.0)


def fit_projection_heldout(train, ridges=RIDGES):
    """W, b fitted on ``train`` (a list of (o_s, o_l, dense)), ridge chosen on its last item.

    The ridge strength is picked by fitting on all but the last training input and
    measuring the error on the last one; then W, b are refitted on all of them.
    The demo's own input is never seen: its error is a held-out error.
    """

    def stack(items):
        return [np.concatenate([it[i] for it in items], axis=2) for i in range(3)]

    fit_part, (val_s, val_l, val_dense) = stack(train[:-1]), train[-1]

    def val_error(ridge):
        w, b = fit_projection(*fit_part, ridge=ridge)
        return _rel_err(val_s + val_l @ w.T + b, val_dense)

    best = min(ridges, key=val_error)
    return fit_projection(*stack(train), ridge=best)


def _device(backend):
    """'cuda' when the demo should use torch CUDA tensors, else 'cpu' (numpy arrays)."""
    if backend == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args, out=sys.stdout):
    """Build the inputs, measure every row, print the table; returns {row name: value}."""
    n = args.frames * args.height * args.width
    shape = (args.batch, args.heads, n, args.dim)
    device = _device(args.backend)
    backend = args.backend if args.backend != "auto" else ("gpu" if device == "cuda" else "cpu")
    scale = 1.0 / np.sqrt(args.dim)
    kw = dict(
        topk=args.topk, skip=args.skip, block_q=args.block, block_k=args.block, backend=backend
    )
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize

        def to_dev(a):
            return torch.from_numpy(np.ascontiguousarray(a)).cuda()

        def to_host(a):
            return a.double().cpu().numpy()
    else:

        def to_dev(a):
            return a

        def to_host(a):
            return np.asarray(a, dtype=np.float64)

    def sla(q, k, v, **extra):
        res = api.sla_attention(q, k, v, **kw, **extra)
        return tuple(to_host(r) for r in res) if isinstance(res, tuple) else to_host(res)

    # sample 0 is the demo's input; samples 1.. are other inputs to the same "layer"
    # (same projections, other content), used only to fit the projection.
    data = []
    for sample in range(1 + args.fit_inputs):
        q, k, v = (
            to_dev(a)
            for a in video_like_qkv(
                args.batch,
                args.heads,
                args.frames,
                args.height,
                args.width,
                args.dim,
                seed=args.seed,
                sample=sample,
            )
        )
        dense = dense_attention_numpy(*(to_host(a) for a in (q, k, v)), scale)
        o_s, o_l = sla(q, k, v, return_parts=True)
        data.append(((q, k, v), o_s, o_l, dense))
    (q, k, v), o_s, o_l, dense = data[0]

    cls = api.classify_blocks(
        q,
        k,
        topk=args.topk,
        skip=args.skip,
        block_q=args.block,
        block_k=args.block,
        backend=backend,
    )
    m = to_host(cls.map)
    n_rows_blocks = m.shape[-1]
    counts = [int(round((m == c).sum(-1).mean())) for c in (1, 0, -1)]
    path = api.kernel_path(q, block_q=args.block, block_k=args.block, backend=backend)

    # untrained SLA: the module's projection starts at zero, so O = O_s exactly
    zeros_w = to_dev(np.zeros((args.dim, args.dim), np.float32))
    zeros_b = to_dev(np.zeros(args.dim, np.float32))
    o_untrained = sla(q, k, v, proj_weight=zeros_w, proj_bias=zeros_b)
    # linear-only: every key block marginal -> O_l is linear attention over all keys
    all_marginal = to_dev(np.zeros(m.shape, np.int8))
    _, o_lin = sla(q, k, v, return_parts=True, block_map=all_marginal)
    w, b = fit_projection_heldout([d[1:] for d in data[1:]])
    o_fit = o_s + o_l @ w.T + b
    w_self, b_self = fit_projection(o_s, o_l, dense)
    o_self = o_s + o_l @ w_self.T + b_self

    t_sla = time_calls(lambda: api.sla_attention(q, k, v, **kw), args.repeats, sync)
    try:
        import torch

        tq, tk, tv = (x if device == "cuda" else torch.from_numpy(x) for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_dense = time_calls(lambda: sdpa(tq, tk, tv), args.repeats, sync)
        dense_name = (
            f"torch SDPA fp32 ({torch.get_num_threads()} threads)"
            if device == "cpu"
            else "torch SDPA fp32 (cuda)"
        )
    except ImportError:
        t_dense = time_calls(lambda: dense_attention_numpy(q, k, v, scale), args.repeats)
        dense_name = "numpy dense (float64)"
    speedup = float(np.median(t_dense) / np.median(t_sla))

    err = {
        "sparse": _rel_err(o_s, dense),
        "untrained": _rel_err(o_untrained, dense),
        "linear": _rel_err(o_lin, dense),
        "fit": _rel_err(o_fit, dense),
        "self": _rel_err(o_self, dense),
        "identity": _rel_err(o_s + o_l, dense),
    }
    rows = [
        (
            "input (B, H, N, D), fp32",
            f"{shape}: {args.frames} x {args.height} x {args.width} video-latent tokens",
        ),
        ("kernel path", f"{path} (backend={args.backend!r})"),
        (
            "key blocks per query block",
            f"{n_rows_blocks} blocks of {args.block} tokens: "
            f"{counts[0]} critical, {counts[1]} marginal, "
            f"{counts[2]} negligible",
        ),
        (
            "error vs dense: sparse-only (critical blocks exact, rest dropped)",
            f"{err['sparse']:.4f}",
        ),
        (
            "error vs dense: SLA untrained (proj = 0, as the module starts)",
            f"{err['untrained']:.4f}",
        ),
        ("error vs dense: linear-only (linear attention over all keys)", f"{err['linear']:.4f}"),
        (
            f"error vs dense: SLA, proj fitted on {args.fit_inputs} other inputs",
            f"{err['fit']:.4f}",
        ),
        (
            "error vs dense: SLA, proj fitted on this input (best any proj does)",
            f"{err['self']:.4f}",
        ),
        ("error vs dense: O_s + O_l unprojected (sla_attention default)", f"{err['identity']:.4f}"),
        (f"time SLA forward ({path})", _fmt_times(t_sla)),
        (f"time dense: {dense_name}", _fmt_times(t_dense)),
        ("speed-up of SLA over dense (medians)", f"{speedup:.2f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    print("SLA (Sparse-Linear Attention) on a video-like input", file=out)
    print("-" * (width + 30), file=out)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=out)
    print("-" * (width + 30), file=out)
    print(
        f"errors: relative L2 norm against dense softmax attention (float64); times: "
        f"median (min–max) of {args.repeats} runs after a warm-up.",
        file=out,
    )
    print(reading(err, counts, n_rows_blocks, speedup), file=out)
    return dict(rows)


def reading(err, counts, mk, speedup):
    """The table in one sentence: accuracy first, then speed (wrapped to 88 columns)."""
    faster = f"{speedup:.1f}x faster than" if speedup >= 1 else f"{1 / speedup:.1f}x slower than"
    text = (
        f"Reading: computing {counts[0]} of {mk} key blocks exactly gives error "
        f"{err['sparse']:.3f}, and untrained SLA is exactly that block-sparse attention; "
        f"a projection of the linear branch alone brings it to {err['fit']:.3f} "
        f"(fitted on other inputs) or {err['self']:.3f} (at best, fitted on this one), "
        f"so SLA's gain must come from fine-tuning the model around it "
        f"(notebooks/03_finetune_dit.ipynb); the SLA forward was {faster} dense "
        f"attention here."
    )
    return textwrap.fill(text, 88)


# --------------------------------------------------------------------------- command line
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _fraction(low_open, high_open):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        lo = value > 0 if low_open else value >= 0
        hi = value < 1 if high_open else value <= 1
        if not (lo and hi):
            interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value

    return parse


DESCRIPTION = """SLA (Sparse-Linear Attention) on a video-like input, in one table.

Builds a small "video latent" (frames x height x width tokens with smooth
structure in space and time; no download), runs SLA on it and prints the block
classification, the error against dense softmax attention of sparse-only,
untrained SLA, linear-only and SLA with a fitted projection, and the time
against dense attention (torch SDPA), all measured in this run.

Other command: python -m sla_numba warmup --help (compile the kernels ahead of time)."""


def demo_parser():
    p = argparse.ArgumentParser(
        prog="sla-numba",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input shape")
    g.add_argument("--batch", type=_positive_int, default=1, help="batch size B (default 1)")
    g.add_argument("--heads", type=_positive_int, default=4, help="attention heads H (default 4)")
    g.add_argument(
        "--frames",
        type=_positive_int,
        default=4,
        help="latent frames T; N = T x height x width tokens (default 4)",
    )
    g.add_argument(
        "--height", type=_positive_int, default=16, help="latent height in tokens (default 16)"
    )
    g.add_argument(
        "--width", type=_positive_int, default=32, help="latent width in tokens (default 32)"
    )
    g.add_argument("--dim", type=_positive_int, default=64, help="head dimension D (default 64)")
    g = p.add_argument_group("SLA")
    g.add_argument(
        "--block",
        type=_positive_int,
        default=64,
        help="block size in tokens, for queries and keys (default 64)",
    )
    g.add_argument(
        "--topk",
        type=_fraction(True, False),
        default=0.05,
        help="share of key blocks per row computed exactly, in (0, 1] (default 0.05)",
    )
    g.add_argument(
        "--skip",
        type=_fraction(False, True),
        default=0.10,
        help="share of key blocks per row skipped, in [0, 1) (default 0.10)",
    )
    g.add_argument(
        "--backend",
        default="cpu",
        choices=["auto", "cpu", "gpu"],
        help="cpu: Numba CPU kernels; gpu: CUDA kernels (needs a GPU); auto: the "
        "GPU when torch sees one, else the CPU (default cpu)",
    )
    g = p.add_argument_group("measurement")
    g.add_argument(
        "--repeats",
        type=_positive_int,
        default=10,
        help="timed runs of each contender after a warm-up (default 10)",
    )
    g.add_argument(
        "--fit-inputs",
        type=int,
        default=4,
        choices=range(2, 33),
        metavar="N",
        help="other inputs the projection is fitted on, 2..32 (default 4)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic layer and inputs (default 0)"
    )
    return p


def warmup_parser():
    p = argparse.ArgumentParser(
        prog="sla-numba warmup",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile the SLA kernels now, so a model's first call runs at speed.\n"
        "Kernels are cached on disk: run this once per machine and "
        "configuration.",
    )
    p.add_argument(
        "--head-dim",
        type=_positive_int,
        nargs="+",
        default=[64],
        metavar="D",
        help="head dimensions to compile for (default 64)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        metavar="DTYPE",
        help="input dtypes: float32 float64 float16 bfloat16 (default float32)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="auto: the GPU when torch sees one, else the CPU (default auto)",
    )
    p.add_argument(
        "--block-q", type=_positive_int, default=64, help="query block size (default 64)"
    )
    p.add_argument("--block-k", type=_positive_int, default=64, help="key block size (default 64)")
    p.add_argument(
        "--feature-map",
        default="softmax",
        choices=["softmax", "elu", "relu"],
        help="feature map of the linear branch (default softmax)",
    )
    p.add_argument("--no-backward", action="store_true", help="compile the forward kernels only")
    return p


def warmup_main(argv):
    from ._warmup import canonical_dtype, warmup

    p = warmup_parser()
    args = p.parse_args(argv)
    try:
        dtypes = [canonical_dtype(d) for d in args.dtype]
        if args.backend == "gpu":
            from ._gpu_check import require_gpu

            require_gpu()
    except (ValueError, RuntimeError) as err:
        p.error(str(err))
    steps = warmup(
        args.head_dim,
        dtypes,
        args.backend,
        block_q=args.block_q,
        block_k=args.block_k,
        feature_map=args.feature_map,
        backward=not args.no_backward,
    )
    total = sum(s["seconds"] for s in steps)
    print(
        f"sla_numba warmup: {len(steps)} step{'s' * (len(steps) != 1)} in {total:.1f} s "
        f"({steps[0]['backend'] if steps else args.backend}); kernels cached on disk"
    )
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["warmup"]:
        return warmup_main(argv[1:])
    p = demo_parser()
    args = p.parse_args(argv)
    if args.backend == "gpu":
        from ._gpu_check import require_gpu

        try:
            require_gpu()
        except RuntimeError as err:
            p.error(str(err))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
