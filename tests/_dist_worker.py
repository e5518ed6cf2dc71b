"""What each spawned rank of tests/test_distributed.py runs (not a test module itself).

A rank builds the same full tensors as the parent test from a seed, takes its token
shard, runs the distributed calls and saves what it got to ``<out>/rank<r>.pt``; the
parent compares that with single-process ``sla_attention`` on the full tensors. A
failure inside a rank is written to ``<out>/rank<r>.err`` and the rank exits with 1.

Nothing here imports Numba at module level: the thread counts below must be set
before it loads (2 cores, 2-3 ranks: one thread each).
"""

import copy
import datetime
import os
import sys
import traceback

import torch

KW = dict(topk=0.3, skip=0.2, block_q=8, block_k=8)  # tiny blocks: several per shard


def split_counts(n, size):
    """Tokens per rank for n tokens over size ranks: the first n % size get one more."""
    return [n // size + (r < n % size) for r in range(size)]


def shard(x, counts, rank, dim=2):
    start = sum(counts[:rank])
    return x.narrow(dim, start, counts[rank])


def inputs(seed, B, H, nq, nk, D):
    """Full q (B,H,nq,D), k, v (B,H,nk,D), proj W (D,D), b (D,), output weights G like q."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g)
    k = torch.randn(B, H, nk, D, generator=g)
    v = torch.randn(B, H, nk, D, generator=g)
    W = 0.3 * torch.randn(D, D, generator=g)
    b = torch.randn(D, generator=g)
    G = torch.randn(B, H, nq, D, generator=g)
    return q, k, v, W, b, G


def random_map(seed, B, H, mq, mk):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (B, H, mq, mk), generator=g).to(torch.int8)


def main(rank, size, port, scenario, out_dir):
    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=90),
        )
        results = SCENARIOS[scenario](rank, size)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.exit(1)


# --------------------------------------------------------------------------- helpers
def _leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


def _run(q, k, v, W, b, G, counts_q, counts_k, rank, **kw):
    """Distributed forward + backward of sum(O * G) on this rank's shards."""
    import sla_numba

    ql, kl, vl = _leaves(
        shard(q, counts_q, rank), shard(k, counts_k, rank), shard(v, counts_k, rank)
    )
    Wl, bl = _leaves(W, b)
    o = sla_numba.sla_attention_ulysses(ql, kl, vl, proj_weight=Wl, proj_bias=bl, **kw)
    (o * shard(G, counts_q, rank)).sum().backward()
    return dict(o=o.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, dW=Wl.grad, db=bl.grad)


def _raises(fn):
    """(exception type name, message) of what fn raised, or None if it returned."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the parent checks the type
        return type(err).__name__, str(err)
    return None


# --------------------------------------------------------------------------- scenarios
SHAPE2 = dict(B=2, H=4, nq=48, nk=48, D=8)


def scenario_two(rank, size):
    """P = 2: outputs, gradients, parts, maps, DDP and FSDP2 training, bad input."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import sla_numba

    res = {}
    q, k, v, W, b, G = inputs(0, **SHAPE2)
    c = split_counts(SHAPE2["nq"], size)
    res["plain"] = _run(q, k, v, W, b, G, c, c, rank, **KW)

    # return_parts: both parts' shards, and gradients through both
    ql, kl, vl = _leaves(*(shard(x, c, rank) for x in (q, k, v)))
    o_s, o_l = sla_numba.sla_attention_ulysses(ql, kl, vl, return_parts=True, **KW)
    (o_s * shard(G, c, rank) + 2 * o_l * shard(G, c, rank)).sum().backward()
    res["parts"] = dict(o_s=o_s.detach(), o_l=o_l.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad)

    # the map of this rank's heads, and block_map given for all heads / for my heads
    cls = sla_numba.classify_blocks_ulysses(shard(q, c, rank), shard(k, c, rank), **KW)
    res["classify"] = dict(map=cls.map, lut=cls.lut)
    full_map = random_map(1, 2, 4, 6, 6)
    res["map_all"] = _run(q, k, v, W, b, G, c, c, rank, block_map=full_map, **KW)
    hp = 4 // size
    res["map_mine"] = _run(
        q,
        k,
        v,
        W,
        b,
        G,
        c,
        c,
        rank,
        block_map=full_map[:, rank * hp : (rank + 1) * hp].clone(),
        **KW,
    )

    # training, DDP and FSDP2: proj starts from W, two SGD steps on sum(O_r * G_r)
    def train(wrap):
        torch.manual_seed(0)
        attn = sla_numba.UlyssesSparseLinearAttention(SHAPE2["D"], group=dist.group.WORLD, **KW)
        with torch.no_grad():
            attn.proj.weight.copy_(W)
            attn.proj.bias.copy_(b)
        twin = copy.deepcopy(attn)  # as for an EMA model: the group is shared, not copied
        res["deepcopy_shares_group"] = twin.group is attn.group is dist.group.WORLD
        model = wrap(attn)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for step in range(2):
            qs, ks, vs, _, _, Gs = inputs(10 + step, **SHAPE2)
            out = model(*(shard(x, c, rank) for x in (qs, ks, vs)))
            loss = (out * shard(Gs, c, rank)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        full = [
            p.full_tensor() if hasattr(p, "full_tensor") else p
            for p in (attn.proj.weight, attn.proj.bias)
        ]
        return dict(
            losses=torch.stack(losses),
            weight=full[0].detach().clone(),
            bias=full[1].detach().clone(),
        )

    res["ddp"] = train(lambda m: DistributedDataParallel(m))

    def fsdp2(m):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(m, mesh=init_device_mesh("cpu", (size,)))
        return m

    res["fsdp2"] = train(fsdp2)

    # bad input: every rank must raise, none may hang, and the group stays usable
    qs, ks, vs = (shard(x, c, rank) for x in (q, k, v))
    run = sla_numba.sla_attention_ulysses
    bad = {}
    bad["dtype_differs"] = _raises(
        lambda: run(
            qs.double() if rank else qs,
            ks.double() if rank else ks,
            vs.double() if rank else vs,
            **KW,
        )
    )
    bad["head_dim_differs"] = _raises(
        lambda: run(qs[..., : 6 + 2 * rank], ks[..., : 6 + 2 * rank], vs[..., : 6 + 2 * rank], **KW)
    )
    bad["one_rank_int"] = _raises(lambda: run(qs.long() if rank == 1 else qs, ks, vs, **KW))
    bad["heads_not_divisible"] = _raises(lambda: run(qs[:, :3], ks[:, :3], vs[:, :3], **KW))
    bad["topk_everywhere"] = _raises(lambda: run(qs, ks, vs, **dict(KW, topk=1.5)))
    bad["skip_differs"] = _raises(lambda: run(qs, ks, vs, **dict(KW, skip=0.2 + 0.1 * rank)))
    bad["map_shape"] = _raises(lambda: run(qs, ks, vs, block_map=full_map[:, :, :5], **KW))
    bad["map_value_one_rank"] = _raises(
        lambda: run(qs, ks, vs, block_map=full_map + 2 * rank, **KW)
    )
    bad["requires_grad_one_rank"] = _raises(
        lambda: run(qs.clone().requires_grad_(rank == 0), ks, vs, **KW)
    )
    bad["not_a_tensor_one_rank"] = _raises(
        lambda: run(qs.numpy() if rank == 1 else qs, ks, vs, **KW)
    )
    # a group of rank 0 alone: rank 0 computes everything, rank 1 is not a member
    solo = dist.new_group([0])
    bad["not_a_member"] = _raises(lambda: run(q, k, v, group=solo, **KW)) if rank else None
    if rank == 0:
        res["solo"] = run(q, k, v, group=solo, **KW)
    res["bad"] = bad
    res["after_errors"] = _run(q, k, v, W, b, G, c, c, rank, **KW)
    return res


SHAPE3 = dict(B=1, H=6, nq=50, nk=37, D=8)


def scenario_three(rank, size):
    """P = 3: uneven shards (N not divisible by 3, Nq != Nk), heads not divisible."""
    import sla_numba

    res = {}
    q, k, v, W, b, G = inputs(3, **SHAPE3)
    cq, ck = split_counts(SHAPE3["nq"], size), split_counts(SHAPE3["nk"], size)
    res["uneven"] = _run(q, k, v, W, b, G, cq, ck, rank, **KW)
    cls = sla_numba.classify_blocks_ulysses(shard(q, cq, rank), shard(k, ck, rank), **KW)
    res["classify"] = dict(map=cls.map, lut=cls.lut)
    # shards chosen by hand, nothing like N / P: 5, 40, 5 query tokens
    cq2 = [5, 40, 5]
    res["lopsided"] = _run(q, k, v, W, b, G, cq2, ck, rank, **KW)
    qs, ks, vs = shard(q, cq, rank), shard(k, ck, rank), shard(v, ck, rank)
    res["bad"] = {
        "heads_not_divisible": _raises(
            lambda: sla_numba.sla_attention_ulysses(qs[:, :4], ks[:, :4], vs[:, :4], **KW)
        )
    }
    return res


SCENARIOS = {"two": scenario_two, "three": scenario_three}
