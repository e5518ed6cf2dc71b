"""Fine-tune a tiny Wan2.1 transformer with SLA attention on generated video latents.

    python examples/finetune_wan_tiny.py            (needs: pip install 'sla-numba[diffusers]')

What it does, top to bottom:

1. builds a small random ``WanTransformer3DModel`` from a config (no download);
2. swaps every self-attention for SLA with one call, ``apply_sla(model, ...)``;
3. makes "video latents": smooth random fields of shape (C, frames, H, W), i.e.
   low-resolution noise upsampled in time and space, which is what VAE latents of
   real video look like to a first approximation;
4. trains with the rectified-flow (flow-matching) objective Wan itself uses:
   ``x_t = (1 - t) x0 + t ε`` and the model predicts the velocity ``ε - x0``;
5. prints the training loss as it falls, and a held-out loss before and after.

The SLA projections are zero at the start (the model then computes block-sparse
attention) and get their own, larger learning rate, as in notebook 03.
Runs on CPU (Numba kernels) or on a CUDA GPU when there is one. The first run of a
fresh checkout also compiles the Numba kernels (once; they are cached on disk).
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from diffusers import WanTransformer3DModel  # noqa: E402

from sla_numba.integrations.diffusers import apply_sla  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS, BATCH, LOG_EVERY = 50, 4, 10
LATENT = (4, 2, 16, 16)          # (channels, frames, height, width): 2 x 8 x 8 = 128 tokens
TEXT_TOKENS, TEXT_DIM = 8, 32


def smooth_latents(n, generator):
    """n smooth random latent videos (n, C, F, H, W): coarse noise, upsampled."""
    c, f, h, w = LATENT
    coarse = torch.randn(n, c, f, h // 4, w // 4, generator=generator)
    x = F.interpolate(coarse, size=(f, h, w), mode="trilinear", align_corners=True)
    return x / x.std(dim=(1, 2, 3, 4), keepdim=True)


def flow_matching_batch(x0, generator):
    """Noisy inputs, timesteps in [0, 1000), and the velocity targets."""
    t = torch.rand(x0.shape[0], generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    tt = t.view(-1, 1, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise, t * 1000, noise - x0


def loss_of(model, x0, text, generator):
    x_t, timestep, target = flow_matching_batch(x0, generator)
    pred = model(x_t.to(DEVICE), timestep.to(DEVICE), text.to(DEVICE)).sample
    return F.mse_loss(pred, target.to(DEVICE))


def held_out_loss(model, data, text):
    g = torch.Generator().manual_seed(123)          # same noise and timesteps every call
    with torch.no_grad():
        return sum(loss_of(model, data[i:i + BATCH], text[i:i + BATCH], g).item()
                   for i in range(0, len(data), BATCH)) / (len(data) // BATCH)


def main():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
        in_channels=LATENT[0], out_channels=LATENT[0], text_dim=TEXT_DIM, freq_dim=32,
        ffn_dim=96, num_layers=2, rope_max_seq_len=64).to(DEVICE)

    # The one-line swap: 8 key blocks of 16 tokens per query block, 2 exact
    # (topk 0.25), 1 skipped (skip 0.125), the other 5 by linear attention.
    apply_sla(model, topk=0.25, skip=0.125, block_q=16, block_k=16)
    sla_params = [p for n, p in model.named_parameters() if ".sla." in n]
    other = [p for n, p in model.named_parameters() if ".sla." not in n]
    print(f"Wan, {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(sla_params) // 2} SLA layers, on {DEVICE}")

    g = torch.Generator().manual_seed(1)
    data = smooth_latents(64, g)                      # training set
    text = torch.randn(64, TEXT_TOKENS, TEXT_DIM, generator=g)
    test_data, test_text = smooth_latents(16, g), torch.randn(16, TEXT_TOKENS, TEXT_DIM, generator=g)

    opt = torch.optim.AdamW([{"params": other, "lr": 2e-3},
                             {"params": sla_params, "lr": 1e-2}], weight_decay=0.0)
    before = held_out_loss(model, test_data, test_text)
    print(f"held-out loss before: {before:.4f}")

    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(data), (BATCH,), generator=g)
        loss = loss_of(model, data[idx], text[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if step % LOG_EVERY == 0:
            print(f"step {step:3d}/{STEPS}  loss {running / LOG_EVERY:.4f}  "
                  f"{time.perf_counter() - start:5.1f} s", flush=True)
            running = 0.0
    model.eval()

    after = held_out_loss(model, test_data, test_text)
    proj = max(p.abs().max().item() for p in sla_params)
    print(f"held-out loss after:  {after:.4f}  ({after / before:.2f}x of before); "
          f"largest SLA projection entry {proj:.3f} (was 0)")


if __name__ == "__main__":
    main()
