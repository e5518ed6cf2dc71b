"""Fine-tune a DiT-like attention block with its sequence split over processes.

Two processes on the CPU (gloo) by default; each holds half of every sequence's
tokens. The block (LayerNorm -> qkv -> attention -> out projection, plus an MLP) is a
copy of a dense "teacher" block with its attention swapped for SLA
(``sla_numba.UlyssesSparseLinearAttention``: Ulysses all-to-all around the SLA
kernels). Its token-wise layers only ever see their rank's tokens; attention sees the
whole sequence through the all-to-all. DDP averages the gradients, ``proj`` of the
SLA layer included. The student is distilled to the teacher's output: the loss falls
as SLA's linear branch and the other weights adapt to the sparsity.

Run (from the repository root):

    PYTHONPATH=. python examples/finetune_distributed.py              # spawns 2 ranks
    PYTHONPATH=. python examples/finetune_distributed.py --ranks 4 --steps 40
    PYTHONPATH=. torchrun --nproc_per_node 2 examples/finetune_distributed.py

Step 0 also checks the distributed output against the same block run in one
process on the whole sequence (it prints the largest difference).
"""
import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


class Block(torch.nn.Module):
    """Pre-norm transformer block on (B, tokens, C); ``attention(q, k, v)`` is pluggable."""

    def __init__(self, width, heads, attention):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))
        self.attention = attention

    def forward(self, x):
        B, n, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, n, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = self.attention(q.contiguous(), k.contiguous(), v.contiguous())  # (B, H, n, D)
        x = x + self.out(a.transpose(1, 2).reshape(B, n, C))
        return x + self.mlp(self.norm2(x))


def video_like_tokens(generator, batch, tokens, width):
    """Smooth along the sequence (neighbouring tokens alike), as video latents are."""
    x = torch.randn(batch, tokens, width, generator=generator).cumsum(dim=1)
    return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)


def run(rank, size, args):
    import sla_numba
    torch.manual_seed(0)
    torch.set_num_threads(1)
    counts = [args.tokens // size + (r < args.tokens % size) for r in range(size)]
    start, n = sum(counts[:rank]), counts[rank]

    sla = dict(topk=args.topk, skip=0.1, block_q=args.block, block_k=args.block)
    teacher = Block(args.width, args.heads, F.scaled_dot_product_attention)
    student = Block(args.width, args.heads, sla_numba.UlyssesSparseLinearAttention(
        args.width // args.heads, **sla))
    student.load_state_dict(teacher.state_dict(), strict=False)   # all but SLA's proj
    single = Block(args.width, args.heads, sla_numba.SparseLinearAttention(
        args.width // args.heads, **sla))
    single.load_state_dict(student.state_dict())   # the same block, for one process
    model = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.Adam([
        {"params": [p for name, p in student.named_parameters() if "attention" not in name]},
        {"params": student.attention.parameters(), "lr": 20 * args.lr},   # zero-init proj
    ], lr=args.lr)

    data = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = video_like_tokens(data, args.batch, args.tokens, args.width)   # same on all ranks
        with torch.no_grad():
            target = teacher(x)[:, start:start + n]
        out = model(x[:, start:start + n])
        loss = F.mse_loss(out, target)
        if step == 0:
            with torch.no_grad():
                diff = (single(x)[:, start:start + n] - out).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(f"step 0: distributed vs one-process output, max |diff| = {diff.item():.2e}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean.item() / size:.5f}", flush=True)


def main(rank, size, args, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=120))
    try:
        run(rank, size, args)
    finally:
        dist.destroy_process_group()


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes to spawn (not under torchrun)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--topk", type=float, default=0.125)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")   # one thread a rank
    if "RANK" in os.environ:   # torchrun set up the rendezvous
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
    else:
        import socket
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(main, args=(args.ranks, args, port), nprocs=args.ranks)
