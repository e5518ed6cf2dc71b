"""Shared code of the notebooks: a toy image data set, a small DiT, and diffusion helpers.

Notebooks 01 and 03 both train the same small diffusion transformer; keeping it here
avoids copying 150 lines twice. Everything is plain PyTorch and runs on a CPU.

- :func:`make_images` -- 32×32 RGB images of soft blobs on a smooth background,
  generated from a seed (no download). Every image has its own palette: the blobs of
  one image share a colour, so a token learns something from far-away tokens too.
- :class:`DiT` -- patchify (2×2 patches -> 256 tokens), ``depth`` transformer blocks
  with adaLN-Zero timestep conditioning, unpatchify. Each block's attention calls
  ``Attention.attn_fn(q, k, v)`` on (B, H, N, D) tensors: dense SDPA by default, or
  any module put there, e.g. ``sla_numba.SparseLinearAttention``.
- :func:`train`, :func:`fixed_eval_set`, :func:`predict`, :func:`scores`,
  :func:`ddim_sample` -- epsilon-prediction diffusion with a cosine noise schedule.
"""
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- data
def make_images(n, size=32, seed=0):
    """(n, 3, size, size) float32 tensor in [-1, 1]: 2-5 soft blobs per image.

    Background: a random colour with a linear gradient. Blobs: Gaussian ellipses of
    one random colour per image (the image's "palette"), random position and size.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        bg = rng.uniform(-0.8, 0.2, 3)[:, None, None]
        grad = rng.normal(0, 0.25, (3, 2))
        img = bg + grad[:, 0, None, None] * yy + grad[:, 1, None, None] * xx
        colour = rng.uniform(-0.2, 1.0, 3)[:, None, None]
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(-0.8, 0.8, 2)
            sy, sx = rng.uniform(0.08, 0.3, 2)
            a = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
            img = img * (1 - a) + colour * a
        out[i] = np.clip(img, -1, 1)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- model
def sincos_2d(dim, grid):
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    assert dim % 4 == 0
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                          torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out = [f(p.reshape(-1, 1) * omega) for p in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of diffusion times t in [0, 1], (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000 * t[:, None].float() * freqs[None].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def dense_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention; the (B, H, N, D) core is ``self.attn_fn``."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attn_fn = dense_attention   # swap for SparseLinearAttention(head_dim, ...)
        self.capture = False             # True: keep the last q, k, v (notebook 01)
        self.last_qkv = None

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.capture:
            self.last_qkv = tuple(t.detach().clone() for t in (q, k, v))
        o = self.attn_fn(q, k, v)                                   # (B, H, N, D)
        return self.out(o.transpose(1, 2).reshape(B, N, C))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """DiT block: adaLN-Zero (shift, scale, gate from the timestep) around attention and MLP."""

    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    """A small diffusion transformer: (B, 3, S, S) noisy image, t -> predicted noise."""

    def __init__(self, size=32, patch=2, channels=3, dim=64, depth=4, heads=2):
        super().__init__()
        self.patch, self.channels, self.grid = patch, channels, size // patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(dim, self.grid)[None])
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, patch * patch * channels)
        for m in (self.ada[-1], self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.dim = dim

    def forward(self, x, t):
        B = x.shape[0]
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos     # (B, N, dim), raster order
        c = self.t_mlp(timestep_embedding(t, self.dim))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        h = self.head(modulate(self.norm(h), shift, scale))          # (B, N, p*p*C)
        p, g, C = self.patch, self.grid, self.channels
        h = h.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, g * p, g * p)

    def attentions(self):
        return [blk.attn for blk in self.blocks]


# --------------------------------------------------------------------------- diffusion
def alpha_bar(t):
    """Cosine schedule: the signal share of x_t = sqrt(ab) x0 + sqrt(1-ab) noise."""
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def noisy(x0, t, noise):
    ab = alpha_bar(t)[:, None, None, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def fixed_eval_set(x0, n_t=8, seed=1234):
    """Held-out (x_t, t, noise) triples, fixed once: every model is scored on the same ones.

    Each image gets every one of ``n_t`` evenly spaced times, so the score averages
    over the whole noise range.
    """
    g = torch.Generator().manual_seed(seed)
    ts = (torch.arange(n_t, dtype=torch.float32) + 0.5) / n_t
    t = ts.repeat(x0.shape[0])
    x = x0.repeat_interleave(n_t, dim=0)
    noise = torch.randn(x.shape, generator=g)
    return noisy(x, t, noise), t, noise


@torch.no_grad()
def heldout_loss(model, eval_set, batch=64, target=None):
    """Mean squared error of the prediction on a fixed eval set.

    ``target=None``: against the true noise (the diffusion loss). Otherwise a tensor
    of reference predictions (e.g. the dense teacher's), to measure the distance to it.
    """
    xt, t, noise = eval_set
    ref = noise if target is None else target
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, xt.shape[0], batch):
        pred = model(xt[i:i + batch].to(device), t[i:i + batch].to(device)).cpu()
        total += F.mse_loss(pred, ref[i:i + batch], reduction="sum").item()
    return total / ref.numel()


def scores(pred, eval_set, teacher_pred=None, n_t=None):
    """Held-out numbers from predictions on a fixed eval set.

    Returns a dict: ``loss`` (MSE to the true noise: the diffusion loss), ``to_teacher``
    (MSE to ``teacher_pred``, if given) and, with ``n_t``, ``loss_by_t`` (one value per
    noise level of :func:`fixed_eval_set`).
    """
    _, t, noise = eval_set
    out = {"loss": F.mse_loss(pred, noise).item()}
    if teacher_pred is not None:
        out["to_teacher"] = F.mse_loss(pred, teacher_pred).item()
    if n_t is not None:
        err = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).reshape(-1, n_t)
        out["loss_by_t"] = err.mean(0).tolist()
    return out


@torch.no_grad()
def predict(model, eval_set, batch=64):
    xt, t, _ = eval_set
    device = next(model.parameters()).device
    return torch.cat([model(xt[i:i + batch].to(device), t[i:i + batch].to(device)).cpu()
                      for i in range(0, xt.shape[0], batch)])


@torch.no_grad()
def ddim_sample(model, n, steps=25, seed=0, size=32):
    """Deterministic DDIM sampling from fixed noise: (n, 3, size, size) in [-1, 1]."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, size, size), generator=g).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        ab, ab_next = alpha_bar(t_now), alpha_bar(t_next)
        eps = model(x, torch.full((n,), float(t_now), device=device))
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    return x.clamp(-1, 1).cpu()


class _Progress:
    """A progress bar for a training loop: tqdm when installed (the notebooks extra has
    it), else one printed line at every quarter of the run. ``desc=None``: silent."""

    def __init__(self, desc, total):
        self.desc, self.total, self.bar, self.t0 = desc, total, None, time.perf_counter()
        if desc is None:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def update(self, step, loss):
        if self.desc is None:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif step % max(1, self.total // 4) == 0 or step == self.total:
            print(f"  {self.desc}: step {step}/{self.total}, loss {loss:.4f}, "
                  f"{time.perf_counter() - self.t0:.0f} s", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(model, data, steps, *, lr=1e-3, batch=32, seed=0, teacher=None, params=None,
          log_every=25, warmup=20, desc=None):
    """AdamW on the diffusion loss, or on the distance to ``teacher``'s predictions.

    ``params``: optional list of parameter groups (dicts, as for torch optimisers),
    e.g. to give new parameters their own learning rate; default all trainable ones.
    ``desc``: show progress under this name (a tqdm bar, or a line per quarter).

    Returns the list of (step, training loss). Batches and noise come from ``seed``,
    so two runs with the same seed see exactly the same examples.
    """
    device = next(model.parameters()).device
    if params is None:
        params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    params = [p for group in opt.param_groups for p in group["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    g = torch.Generator().manual_seed(seed)
    model.train()
    log, run = [], []
    t0 = time.perf_counter()
    progress = _Progress(desc, steps)
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x0 = data[idx].to(device)
        t = torch.rand(batch, generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        xt = noisy(x0, t, noise)
        pred = model(xt, t)
        if teacher is None:
            loss = F.mse_loss(pred, noise)
        else:
            with torch.no_grad():
                target = teacher(xt, t)
            loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run.append(loss.item())
        progress.update(step, run[-1])
        if step % log_every == 0 or step == steps:
            log.append((step, float(np.mean(run))))
            run = []
    progress.close()
    model.eval()
    return log, time.perf_counter() - t0


def show_grid(ax, images, nrow):
    """Images (n, 3, S, S) in [-1, 1] tiled on a matplotlib axis."""
    n, C, S, _ = images.shape
    ncol = math.ceil(n / nrow)
    canvas = np.ones((nrow * (S + 1) - 1, ncol * (S + 1) - 1, 3), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[r * (S + 1):r * (S + 1) + S, c * (S + 1):c * (S + 1) + S] = \
            (img.permute(1, 2, 0).numpy() + 1) / 2
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- figures of notebook 02
#: One colour per block class of the block map (1 critical, 0 marginal, -1 negligible).
CLASS_STYLE = {1: ("critical: sparse branch", "#d1495b"),
               0: ("marginal: linear branch", "#66a5ad"),
               -1: ("negligible: skipped", "#e4e4e4")}


def _class_image(ax, classes):
    """Draw an int8 array of block classes (rows, cols) with the colours of CLASS_STYLE."""
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap([CLASS_STYLE[c][1] for c in (-1, 0, 1)])
    ax.imshow(np.asarray(classes) + 1, cmap=cmap, vmin=-0.5, vmax=2.5, interpolation="nearest")
    rows, cols = np.asarray(classes).shape
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)


def class_legend(fig, **kw):
    """A figure legend with the three block classes."""
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=col, edgecolor="0.6", label=name)
               for name, col in (CLASS_STYLE[c] for c in (1, 0, -1))]
    fig.legend(handles=handles, ncol=3, frameon=False, **kw)


def plot_block_map(scores, block_map, lut, title=""):
    """Pooled scores → block map → LUT, for one head.

    scores (Mq, Mk) float, block_map (Mq, Mk) int8, lut (Mq, n_crit) int (the critical
    key blocks of each row, ascending). Returns the figure.
    """
    import matplotlib.pyplot as plt
    mq, mk = block_map.shape
    n_crit = lut.shape[1]
    fig, (ax_s, ax_m, ax_l) = plt.subplots(
        1, 3, figsize=(12.5, 4.8), layout="constrained",
        gridspec_kw=dict(width_ratios=[mk, mk, n_crit + 0.5]))
    im = ax_s.imshow(scores, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_s, fraction=0.046, pad=0.03)
    ax_s.set_title("pooled score  S[i, j] = scale · q̄ᵢ · k̄ⱼ")
    _class_image(ax_m, block_map)
    ax_m.set_title("block map: each row ranks its key blocks")
    for ax in (ax_s, ax_m):
        ax.set_xlabel("key block j")
        ax.set_ylabel("query block i")
    # the LUT: one row per query block, its critical key blocks in ascending order
    _class_image(ax_l, np.ones((mq, n_crit), np.int8))
    for i in range(mq):
        for c in range(n_crit):
            ax_l.text(c, i, str(int(lut[i, c])), ha="center", va="center", color="white",
                      fontsize=11, fontweight="bold")
    ax_l.set_xticks(range(n_crit))
    ax_l.set_xlabel("position c in lut[i, c]")
    ax_l.set_ylabel("query block i")
    ax_l.set_title("LUT (sparse loop)")
    for side in ("top", "right"):
        ax_l.spines[side].set_visible(False)
    class_legend(fig, loc="outside lower center")
    fig.suptitle(title)
    return fig


def plot_online_softmax(row_classes, lut, trace, contrib, row, title=""):
    """One query block's walk over its critical key blocks (the sparse branch).

    row_classes (Mk,) int8: the block's row of the map; lut (n,) its critical key blocks,
    in visiting order; trace: list of (m, l, alpha) after each step, each (nr,) over the
    block's query rows; contrib (nr, n): share of each visited block in the final
    softmax sum of each row; ``row``: the query row (within the block) highlighted.
    """
    import matplotlib.pyplot as plt
    n = len(lut)
    m = np.array([t[0] for t in trace])        # (n, nr)
    l = np.array([t[1] for t in trace])
    alpha = np.array([t[2] for t in trace])
    fig = plt.figure(figsize=(13, 6.4), layout="constrained")
    gs = fig.add_gridspec(2, 3, height_ratios=[1, 4.2])
    ax_row = fig.add_subplot(gs[0, :])
    _class_image(ax_row, np.asarray(row_classes)[None, :])
    ax_row.set_yticks([])
    ax_row.set_xlabel("key block j")
    for step, j in enumerate(lut):
        ax_row.text(j, 0, f"step {step + 1}", ha="center", va="center", color="white",
                    fontsize=9, fontweight="bold")
    ax_row.set_title("the query block's row of the map; its LUT is the visiting order")
    steps = np.arange(1, n + 1)
    labels = [f"{s}: j={j}" for s, j in zip(steps, lut)]
    ax_m = fig.add_subplot(gs[1, 0])
    ax_l = fig.add_subplot(gs[1, 1])
    for ax, y, name in ((ax_m, m, "running max m"), (ax_l, l, "running sum l")):
        ax.plot(steps, y, color="0.8", lw=0.8)
        ax.plot([], [], color="0.8", lw=0.8, label="every row of the block")
        ax.plot(steps, y[:, row], "o-", color=CLASS_STYLE[1][1], lw=2, label=f"query row {row}")
        ax.set_xticks(steps)
        ax.set_xticklabels(labels)
        ax.set_xlabel("after step: key block j")
        ax.set_title(name)
        ax.legend(loc="best", fontsize=8)
    for s in range(1, n):
        if alpha[s, row] < 1:
            ax_l.annotate(f"α = {alpha[s, row]:.2f}", (steps[s], l[s, row]),
                          textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax_c = fig.add_subplot(gs[1, 2])
    bottom = np.zeros(contrib.shape[0])
    shades = plt.cm.Reds(np.linspace(0.35, 0.9, n))
    for c in range(n):
        ax_c.bar(np.arange(contrib.shape[0]), contrib[:, c], bottom=bottom, width=1.0,
                 color=shades[c], label=f"j = {lut[c]}")
        bottom += contrib[:, c]
    ax_c.plot([row], [1.0], "v", color=CLASS_STYLE[1][1], markersize=9, clip_on=False)
    ax_c.set_xlim(-0.5, contrib.shape[0] - 0.5)
    ax_c.set_ylim(0, 1)
    ax_c.set_xlabel(f"query row of the block (▼: row {row})")
    ax_c.set_title("share of each visited block in the softmax")
    ax_c.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.suptitle(title)
    return fig


def plot_linear_branch(h_blocks, marg, H_i, i, terms, err, title=""):
    """The linear branch of query block ``i`` and the combination of the two branches.

    h_blocks: the D x D states h_j of the marginal key blocks ``marg``; H_i their sum.
    terms: (O_s, O_l Wᵀ + b, O) of the block's rows, each (nr, D); err: |O − reference|.
    """
    import matplotlib.pyplot as plt
    n = len(marg)
    cols = max(n + 1, 4)
    fig, axes = plt.subplots(2, cols, figsize=(2.7 * cols, 6.6), layout="constrained",
                             gridspec_kw=dict(height_ratios=[1, 1.35]))
    lim = max(np.abs(H_i).max(), max(np.abs(h).max() for h in h_blocks))
    for c, (ax, h) in enumerate(zip(axes[0], list(h_blocks) + [H_i])):
        im = ax.imshow(h, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        name = f"= H_{i}" if c == n else (f"+ h_{marg[c]}" if c else f"h_{marg[c]}")
        ax.set_title(name, color="black" if c == n else CLASS_STYLE[0][1], fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[0, n + 1:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("h_j = φ(K_j)ᵀ V_j\n(D × D)")
    fig.colorbar(im, ax=axes[0, n], shrink=0.9)
    lim = max(np.abs(t).max() for t in terms)
    names = ("O_s (sparse)", "+ O_l Wᵀ + b (linear, projected)", "= O")
    for ax, t, name in zip(axes[1], terms, names):
        im = ax.imshow(t, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                       interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("d")
    axes[1, 0].set_ylabel("query row of the block")
    fig.colorbar(im, ax=axes[1, 2])
    ax = axes[1, 3]
    im = ax.imshow(err, cmap="Greys", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, format="%.1e")
    ax.set_title(f"|O − reference|, max {err.max():.1e}", fontsize=10)
    ax.set_xlabel("d")
    for ax in axes[1, 4:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_row_and_column(block_map, i, j, title=""):
    """The map read two ways: by row i (forward, dQ) and by column j (dK / dV).

    block_map (Mq, Mk) int8. Left: row i outlined, its critical blocks (the LUT) and
    marginal blocks listed; right: column j outlined, with the query blocks that mark
    key block j critical (the reverse index) and marginal (the sum dH_j = Σ QO_i).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    bm = np.asarray(block_map)
    mq, mk = bm.shape
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 5.4), layout="constrained")
    for ax in axes:
        _class_image(ax, bm)
        ax.set_xlabel("key block j")
        ax.set_ylabel("query block i")

    def names(idx):
        return ", ".join(str(int(x)) for x in idx) or "none"

    def veil(ax, x, y, w, h):                          # fade what the CUDA block does not read
        if w > 0 and h > 0:
            ax.add_patch(Rectangle((x, y), w, h, fc="white", alpha=0.6, ec="none", zorder=4))

    ax = axes[0]
    veil(ax, -0.5, -0.5, mk, i)
    veil(ax, -0.5, i + 0.5, mk, mq - i - 1)
    ax.add_patch(Rectangle((-0.5, i - 0.5), mk, 1, fill=False, lw=2.5, ec="black", zorder=5))
    ax.set_title(f"forward and dQ: one CUDA block per row, e.g. i = {i}\n"
                 f"critical (LUT): {names(np.flatnonzero(bm[i] == 1))}   "
                 f"marginal (H_{i}): {names(np.flatnonzero(bm[i] == 0))}", fontsize=10)
    ax = axes[1]
    veil(ax, -0.5, -0.5, j, mq)
    veil(ax, j + 0.5, -0.5, mk - j - 1, mq)
    ax.add_patch(Rectangle((j - 0.5, -0.5), 1, mq, fill=False, lw=2.5, ec="black", zorder=5))
    ax.set_title(f"dK, dV: one CUDA block per column, e.g. j = {j}\n"
                 f"critical (reverse index): {names(np.flatnonzero(bm[:, j] == 1))}   "
                 f"marginal (dH_{j}): {names(np.flatnonzero(bm[:, j] == 0))}", fontsize=10)
    class_legend(fig, loc="outside lower center")
    fig.suptitle(title)
    return fig
