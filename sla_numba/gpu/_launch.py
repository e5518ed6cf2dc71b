"""Launch helpers shared by the GPU orchestrators (``forward.py``, ``backward.py``).

They decide, per call, which kernel of a twin pair runs a stage (``simt/`` or ``tc/``),
allocate its workspaces through the call's :class:`~._arrays.DeviceCall` and enqueue it
on the call's stream. No kernel code lives here.
"""

import math

import numpy as np

from .. import config
from ._arrays import DeviceView
from ._launcher import launch
from ._path import tc_part
from .simt.fill import FILL_THREADS, fill
from .simt.marginal import launch_marginal_sum
from .simt.states import delta_lanes, make_prep


def compute_dtype(in_dtype):
    """float64 for float64 input, float32 for everything else (fp16, bf16, fp32)."""
    return np.dtype(np.float64) if in_dtype == np.dtype(np.float64) else np.dtype(np.float32)


def launch_prep(
    call,
    tiles,
    x,
    y,
    n_rows,
    block,
    n_state,
    bmap,
    mq,
    mk,
    fm,
    want_cols,
    delta_of=None,
    tc_kind=None,
    states=True,
):
    """Launch ``prep``; returns the device buffers (states, lists, counts).

    ``tc_kind`` ("bf16" / "f16", the tensor-core path): the states come from the
    tensor-core kernel (``tc/states.py``, one more launch) and ``prep`` builds only the
    lists (and delta). With bf16 states (``config.bf16_states``: bf16 inputs by default,
    ``SLA_NUMBA_STATES``; and the tensor-core marginal sum on, the only reader that takes
    them) they are stored as bf16 bits (int16).

    ``info`` arrays are (2, B, H, M) (see ``simt/states.py``): ``row_info[0]`` / ``col_info[0]``
    are the critical counts per row / column, ``[1]`` the marginal counts.
    ``delta_of=(o_s, do_s)`` (backward, tensor-core path) also fills ``delta``
    (B, H, Nq) = rowsum(o_s * do_s).

    ``states=False`` (a backward handed the forward's row states, ``row_states=``):
    no key-block states at all -- ``prep`` runs with zero state blocks (a runtime
    count, the same compiled kernel) and the tensor-core states kernel is not
    launched; the returned ``state`` is None.
    """
    B, H = x.shape[0], x.shape[1]
    acc = tiles.acc_dtype
    width = tiles.DP * tiles.DP + tiles.DP
    tc_states = False
    if states and tc_kind is not None and tc_part("states"):
        from .tc.states import states_tc_supported

        tc_states = states_tc_supported(x.shape[3], block)
    bf16_states = tc_states and tc_part("marginal") and config.bf16_states(tc_kind)
    if states:
        _, state = call.workspace((B, H, n_state, width), np.int16 if bf16_states else acc)
    else:
        state = None
    # One small buffer stands in for each argument this launch leaves untouched: the
    # state's weights (unused without them), delta and o_s / do_s without delta (nq = 0),
    # the SIMT state with bf16 states or with none (n_simt = 0). Nothing reads or writes
    # them, so they share one allocation (of the largest shape, (1, 1, 1, width)).
    _, spare = call.workspace((1, 1, 1, width), acc)
    dummy = spare[0]  # (1, 1, width)
    _, row_crit = call.workspace((B, H, mq, max(mk, 1)), np.int32)
    _, row_info = call.workspace((2, B, H, mq), np.int32)
    if want_cols:
        _, col_crit = call.workspace((B, H, mk, max(mq, 1)), np.int32)
        _, col_info = call.workspace((2, B, H, mk), np.int32)
        n_lists = mq + mk
    else:
        col_crit = col_info = row_info
        n_lists = mq
    nt = tiles.NT
    n_list_blocks = -(-n_lists // nt)
    if delta_of is not None:
        o_s, do_s = delta_of
        nq = o_s.shape[2]
        _, delta = call.workspace((B, H, nq), acc)
        n_delta_blocks = -(-nq // (nt // delta_lanes(nt)))
    else:
        o_s = do_s = spare
        delta, nq, n_delta_blocks = dummy, 0, 0
    n_simt = n_state if states and not tc_states else 0  # state blocks the SIMT prep computes
    # the prep kernel's state argument (written only for its n_simt blocks): with bf16
    # states or none, a 1-block stand-in of the compute dtype keeps its signature (one
    # compiled prep)
    prep_state = spare if bf16_states or not states else state
    grid = (n_simt + n_list_blocks + n_delta_blocks, H, B)
    args = (
        x,
        y,
        n_rows,
        block,
        n_simt,
        prep_state,
        fm,
        dummy,
        bmap,
        mq,
        mk,
        1 if want_cols else 0,
        row_crit,
        row_info,
        col_crit,
        col_info,
        n_list_blocks,
        o_s,
        do_s,
        delta,
        nq,
    )
    launch(make_prep(tiles), grid, nt, call.stream, args)
    if tc_states:
        from .tc.states import launch_states_tc

        launch_states_tc(
            tc_kind,
            half_bits(x),
            half_bits(y),
            flat(state),
            B,
            H,
            n_rows,
            x.shape[3],
            block,
            fm,
            call.stream,
        )
    return dict(
        state=state,
        dummy=dummy,
        row_crit=row_crit,
        row_info=row_info,
        col_crit=col_crit,
        col_info=col_info,
        delta=delta,
    )


def marginal_sum(call, bmap, transposed, n_out, n_in, states, out, tc):
    """``out = M · states`` (``simt/marginal.py``), on tensor cores (``tc/marginal.py``: bf16
    hi + lo products, fp32 accumulation; one product for bf16 states, int16 bits) when
    ``tc`` (the tensor-core path) and the states are fp32 or bf16; the SIMT product
    otherwise (fp32 / fp64 states only)."""
    if np.dtype(states.dtype) == np.int16 or (
        tc and np.dtype(states.dtype) == np.float32 and tc_part("marginal")
    ):
        from .tc.marginal import launch_marginal_sum_tc

        launch_marginal_sum_tc(call.stream, bmap, transposed, n_out, n_in, states, out)
    else:
        launch_marginal_sum(call.stream, bmap, transposed, n_out, n_in, states, out)


def row_states(call, bmap, state, mq, mk, tc=False, out=None):
    """(B, H, Mq, W) workspace: row i holds [vec(H_i), Z_i], the sum of ``state``
    over row i's marginal key blocks (:func:`marginal_sum`). ``out``: the buffer to
    write (the forward's ``return_states``), of :func:`row_states_layout`."""
    B, H, _, W = state.shape
    dt = np.float32 if np.dtype(state.dtype) == np.int16 else state.dtype  # bf16 states
    if out is None:
        _, out = call.workspace((B, H, mq, W), dt)
    marginal_sum(call, bmap, False, mq, mk, state, out, tc)
    return out


def row_states_layout(B, H, mq, tiles):
    """Shape and dtype of :func:`row_states`' buffer for a call's tiles: (B, H, Mq,
    DP*DP + DP) in the compute dtype (bf16 states are summed into fp32, the compute
    dtype of half inputs)."""
    return (B, H, mq, tiles.DP * tiles.DP + tiles.DP), np.dtype(tiles.acc_dtype)


def fill_on_device(call, x, value):
    """Every element of the C-contiguous device array ``x`` set to ``value``, on the
    call's stream (one small kernel: numba device arrays have no ``fill``)."""
    n = int(math.prod(x.shape))
    if n:
        blocks = min(-(-n // FILL_THREADS), 1024)
        launch(fill, blocks, FILL_THREADS, call.stream, (flat(x), x.dtype.type(value)))


def linear_scope_global(call, ws, bmap, want_cols):
    """Make the linear-branch stages see every key block (``linear_scope="global"``).

    The sparse stages keep the real map (critical lists, ``info[0]``). The linear
    stages get an all-zero map -- every block marginal -- for their sums
    (:func:`row_states`, the backward's column sums), and ``info[1]``, the
    marginal count they test, becomes the full count (Mk per row, Mq per column).
    Returns the map the linear stages read.
    """
    B, H, mq, mk = bmap.shape
    _, lin_map = call.workspace((B, H, mq, mk), np.int8)
    fill_on_device(call, lin_map, 0)
    fill_on_device(call, ws["row_info"][1], mk)
    if want_cols:
        fill_on_device(call, ws["col_info"][1], mq)
    return lin_map


def flat(x):
    """A flat (1-D) view of a C-contiguous device array.

    (``math.prod`` of the shape, not ``np.prod``: 0.1 µs against 3.4 µs, and a call
    takes ~20 flat views.)"""
    return x.reshape(int(math.prod(x.shape)))


def half_bits(x):
    """Flat int16 view of an fp16 / bf16 device array (bf16 already arrives as int16)."""
    x = flat(x)
    return x if x.dtype == np.int16 else x.view(np.int16)


def half_pairs(x):
    """Flat int32 view of a 16-bit device array (two values an element): what the
    kernels that write 16-bit outputs take (``tc/tiles.make_pair_store``)."""
    x = flat(x)
    if isinstance(x, DeviceView):
        return DeviceView(x.ptr, (x.size // 2,), np.int32, x.owner)
    return x.view(np.int32)


def half_kind(call, x):
    return "bf16" if call.in_dtype(x) == "bfloat16" else "f16"


def linear_supported(D, block_q):
    """Whether ``tc/linear.py`` takes this head dim and query block (imported lazily)."""
    from .tc.linear import linear_tc_supported

    return linear_tc_supported(D, block_q)


def call_device(call):
    """The device for ``tc_supported`` (None: the current one)."""
    return call.device_index
