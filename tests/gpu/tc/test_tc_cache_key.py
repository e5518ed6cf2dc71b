"""The tensor-core kernels hit Numba's disk cache in a new process.

They are closures made by factories (``make_states_kernel`` and its ``_staged`` and
``_pipelined`` variants, ``make_marginal_kernel``, ``make_linear_kernel``,
``make_linear_kernel_pipelined``, the pipelined linear-gradient kernels, the wgmma sparse
forward, the sparse backward's sync and pipelined kernels) with ``cache=True``. Numba
keys a closure's cache entry on the pickle of its closure cells, so those must pickle to
the same bytes in every process:
a cell holding a device function pickles it by value, with the ``ptx`` intrinsics'
per-process random uuids, and the cache would never hit (and only grow). This test
builds the real-GPU variants (no simulator; nothing is compiled, no GPU needed) in two
fresh processes and compares the hashes.
"""

from _tc_reference import fresh_process_lines

_SCRIPT = """
import hashlib
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
from numba.cuda.serialize import dumps
from sla_numba.gpu.tc import backward, forward_wgmma, linear, linear_backward, marginal, states
from sla_numba.gpu.tc import marginal_wgmma
kernels = [marginal.make_marginal_kernel(marginal.GPU_TILES).kernel,
           linear.make_linear_kernel("f16", 64, 64, 32).kernel,
           linear.make_linear_kernel_pipelined("bf16", 64, 64, 32, True, 3).kernel,
           states.make_states_kernel("bf16", 32, 64, (2, 1)).kernel,
           states.make_states_kernel_staged("bf16", 32, 64, (2, 1), True, True).kernel,
           states.make_states_kernel_pipelined("bf16", 128, 64, (4, 2)).kernel,
           linear_backward.make_dq_linear_kernel("bf16", 64, 64, 32, True, pipelined=True).kernel,
           linear_backward.make_dkdv_linear_kernel("bf16", 64, 64, 32, pipelined=True).kernel,
           forward_wgmma.make_sparse_forward_wgmma(128, "bf16").kernel,
           marginal_wgmma.make_marginal_kernel_wgmma((256, 32, 3, 1)).kernel,
           marginal_wgmma.make_marginal_kernel_wgmma((256, 32, 4, 2, 1, 1)).kernel]
kernels += [backward.make_sparse_backward(w, 64, 64, 64, "bf16", p).kernel
            for w in backward.KERNELS for p in (False, True)]
for k in kernels:
    cells = tuple(c.cell_contents for c in k.py_func.__closure__)
    print(k.__name__, hashlib.sha256(dumps(cells)).hexdigest())
"""


def _hashes():
    return fresh_process_lines(_SCRIPT)  # the GPU variants (helpers forceinline)


def test_closure_pickle_is_the_same_in_two_processes():
    first, second = _hashes(), _hashes()
    assert len(first) == 30  # 15 kernels: name, hash
    assert first == second
    # each configuration its own entry (the sparse backward's sync and pipelined kernels
    # share a name and a body: only the closure tells them apart)
    assert len(set(first[1::2])) == 15
