"""Context-parallel SLA (sla_numba.distributed) against single-process sla_attention.

Each scenario spawns 2 or 3 processes (gloo on 127.0.0.1, CPU tensors, one Numba and
one OpenMP thread each) that run tests/_dist_worker.py once and save what every rank
got; the tests below compare that with ``sla_attention`` of the full tensors computed
here. A hard timeout turns a hang into a failure (the ranks' gloo timeout is 90 s).

Tolerances: the output, O_s, O_l, dq, dk, dv and the block map are compared bit for
bit: the Numba CPU kernels compute each (batch, head) on its own, so rank r's heads
give the same bits as the same heads of the full call. The projection's gradients
are a sum over ranks (each rank's GEMM covers its heads; then a sum or DDP/FSDP
average), so their float32 summation order differs from the single call: rtol 1e-5.
"""

import multiprocessing
import socket
import time

import _dist_worker as W
import pytest
import torch

import sla_numba

TIMEOUT_S = 480  # cold Numba compiles in 2-3 processes on a busy 2-core machine


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario, size, out_dir):
    """Run scenario on ``size`` ranks; returns the list of their result dicts."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=W.main, args=(r, size, port, scenario, str(out_dir)), daemon=True)
        for r in range(size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in alive:
        procs[r].kill()
        procs[r].join()
    errors = []
    for r in range(size):
        err = out_dir / f"rank{r}.err"
        if err.exists():
            errors.append(f"--- rank {r}:\n{err.read_text()}")
    if alive:
        pytest.fail(
            f"ranks {alive} still running after {TIMEOUT_S} s (hang?)\n" + "\n".join(errors)
        )
    if errors or any(p.exitcode != 0 for p in procs):
        pytest.fail(f"exit codes {[p.exitcode for p in procs]}\n" + "\n".join(errors))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(size)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn("two", 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _spawn("three", 3, tmp_path_factory.mktemp("three"))


# --------------------------------------------------------------------------- references
def reference(q, k, v, Wt, b, G, **kw):
    """Single-process forward + backward of sum(O * G): what every rank is checked against."""
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, Wt, b)]
    o = sla_numba.sla_attention(*leaves[:3], proj_weight=leaves[3], proj_bias=leaves[4], **kw)
    (o * G).sum().backward()
    return dict(
        o=o.detach(),
        dq=leaves[0].grad,
        dk=leaves[1].grad,
        dv=leaves[2].grad,
        dW=leaves[3].grad,
        db=leaves[4].grad,
    )


def check_against(ranks, ref, counts_q, counts_k):
    """Each rank's o, dq, dk, dv = its shard of the reference, bitwise; proj grads sum up."""
    for r, got in enumerate(ranks):
        for name, counts in (("o", counts_q), ("dq", counts_q), ("dk", counts_k), ("dv", counts_k)):
            want = W.shard(ref[name], counts, r)
            assert torch.equal(got[name], want), (
                f"rank {r}: {name} differs, max |diff| {(got[name] - want).abs().max():.3g}"
            )
    for name in ("dW", "db"):
        total = sum(got[name] for got in ranks)
        torch.testing.assert_close(total, ref[name], rtol=1e-5, atol=1e-5 * ref[name].abs().max())


# --------------------------------------------------------------------------- P = 2
def test_output_and_every_gradient_equal_single_process(two):
    q, k, v, Wt, b, G = W.inputs(0, **W.SHAPE2)
    c = W.split_counts(W.SHAPE2["nq"], 2)
    check_against([r["plain"] for r in two], reference(q, k, v, Wt, b, G, **W.KW), c, c)
    # the same after the error cases of the scenario: the group is still usable
    check_against([r["after_errors"] for r in two], reference(q, k, v, Wt, b, G, **W.KW), c, c)


def test_return_parts(two):
    q, k, v, _, _, G = W.inputs(0, **W.SHAPE2)
    c = W.split_counts(W.SHAPE2["nq"], 2)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_s, o_l = sla_numba.sla_attention(*leaves, return_parts=True, **W.KW)
    (o_s * G + 2 * o_l * G).sum().backward()
    want = dict(
        o_s=o_s.detach(), o_l=o_l.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad
    )
    for r, rank in enumerate(two):
        for name in want:
            assert torch.equal(rank["parts"][name], W.shard(want[name], c, r)), f"rank {r}: {name}"


def test_classification_map_is_the_rows_of_my_heads(two):
    q, k, *_ = W.inputs(0, **W.SHAPE2)
    c = sla_numba.classify_blocks(q, k, **W.KW)
    for r, rank in enumerate(two):
        heads = slice(2 * r, 2 * r + 2)
        assert torch.equal(rank["classify"]["map"], c.map[:, heads]), f"rank {r}: map"
        assert torch.equal(rank["classify"]["lut"], c.lut[:, heads]), f"rank {r}: lut"


def test_block_map_for_all_heads_or_my_heads(two):
    q, k, v, Wt, b, G = W.inputs(0, **W.SHAPE2)
    c = W.split_counts(W.SHAPE2["nq"], 2)
    ref = reference(q, k, v, Wt, b, G, block_map=W.random_map(1, 2, 4, 6, 6), **W.KW)
    check_against([r["map_all"] for r in two], ref, c, c)
    check_against([r["map_mine"] for r in two], ref, c, c)
    # and the map matters: without it the result is different
    assert not torch.equal(two[0]["map_all"]["o"], two[0]["plain"]["o"])


def single_process_training():
    """What DDP / FSDP2 training must reproduce: the mean of the ranks' losses."""
    P, c = 2, W.split_counts(W.SHAPE2["nq"], 2)
    _, _, _, Wt, b, _ = W.inputs(0, **W.SHAPE2)
    attn = sla_numba.SparseLinearAttention(W.SHAPE2["D"], **W.KW)
    with torch.no_grad():
        attn.proj.weight.copy_(Wt)
        attn.proj.bias.copy_(b)
    opt = torch.optim.SGD(attn.parameters(), lr=0.05)
    rank_losses = []
    for step in range(2):
        q, k, v, _, _, G = W.inputs(10 + step, **W.SHAPE2)
        prod = attn(q, k, v) * G
        rank_losses.append([W.shard(prod, c, r).sum().detach() for r in range(P)])
        opt.zero_grad()
        (prod.sum() / P).backward()
        opt.step()
    return torch.tensor(rank_losses), attn.proj.weight.detach(), attn.proj.bias.detach()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_training_equals_single_process(two, wrapper):
    losses, weight, bias = single_process_training()
    for r, rank in enumerate(two):
        got = rank[wrapper]
        torch.testing.assert_close(got["losses"], losses[:, r], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got["weight"], weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["bias"], bias, rtol=1e-5, atol=1e-6)
    assert all(rank["deepcopy_shares_group"] for rank in two)
    # the two SGD steps moved the projection (a test that cannot pass by standing still)
    _, _, _, Wt, _, _ = W.inputs(0, **W.SHAPE2)
    assert (weight - Wt).abs().max() > 1e-2


# what each bad input must raise on each rank (rank 0, rank 1) and a word of the message
BAD = {
    "dtype_differs": [("ValueError", "dtype differs")] * 2,
    "head_dim_differs": [("ValueError", "head_dim differs")] * 2,
    "one_rank_int": [("ValueError", "rank(s) [1]"), ("TypeError", "floating")],
    "heads_not_divisible": [("ValueError", "multiple of the group size")] * 2,
    "topk_everywhere": [("ValueError", "topk")] * 2,
    "skip_differs": [("ValueError", "skip differs")] * 2,
    "map_shape": [("ValueError", "block_map must have shape")] * 2,
    "map_value_one_rank": [("ValueError", "rank(s) [1]"), ("ValueError", "block_map values")],
    "requires_grad_one_rank": [("ValueError", "requires_grad differs")] * 2,
    "not_a_tensor_one_rank": [("ValueError", "rank(s) [1]"), ("TypeError", "numpy")],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_on_every_rank(two, case):
    for r, (kind, word) in enumerate(BAD[case]):
        got = two[r]["bad"][case]
        assert got is not None, f"rank {r} did not raise for {case}"
        assert got[0] == kind and word in got[1], f"rank {r}: {got}"


def test_group_of_one_and_non_member(two):
    kind, msg = two[1]["bad"]["not_a_member"]
    assert kind == "ValueError" and "not a member" in msg
    q, k, v, *_ = W.inputs(0, **W.SHAPE2)
    assert torch.equal(two[0]["solo"], sla_numba.sla_attention(q, k, v, **W.KW))


# --------------------------------------------------------------------------- P = 3
def test_uneven_shards_equal_single_process(three):
    q, k, v, Wt, b, G = W.inputs(3, **W.SHAPE3)
    cq, ck = W.split_counts(W.SHAPE3["nq"], 3), W.split_counts(W.SHAPE3["nk"], 3)
    assert len(set(cq)) > 1 and len(set(ck)) > 1  # the shards really are uneven
    ref = reference(q, k, v, Wt, b, G, **W.KW)
    check_against([r["uneven"] for r in three], ref, cq, ck)
    check_against([r["lopsided"] for r in three], ref, [5, 40, 5], ck)
    c = sla_numba.classify_blocks(q, k, **W.KW)
    for r, rank in enumerate(three):
        assert torch.equal(rank["classify"]["map"], c.map[:, 2 * r : 2 * r + 2])


def test_heads_not_divisible_by_three(three):
    for r, rank in enumerate(three):
        kind, msg = rank["bad"]["heads_not_divisible"]
        assert kind == "ValueError" and "4 heads" in msg and "3 ranks" in msg, f"rank {r}"


# --------------------------------------------------------------------------- no group
def test_without_process_group_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sla_numba.sla_attention_ulysses(q, q, q)
