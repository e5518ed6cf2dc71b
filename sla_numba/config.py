"""Every environment switch of sla_numba, read in one place.

All names start with ``SLA_NUMBA_``; each is read when it is used (on every call),
so a test or a notebook can set it with ``os.environ`` at any time. An invalid value
is a ``ValueError`` naming the variable; unset or empty means the default.

==========================  ===========================================================
``SLA_NUMBA_GPU_PATH``      ``auto`` (default) | ``simt`` | ``tc``: which GPU kernels do
                            the sparse branch when the caller asked for ``path="auto"``
                            (docs/internals.md, "GPU kernel paths"). A forced ``tc`` on
                            inputs the tensor cores cannot take is a ``ValueError``.
``SLA_NUMBA_TC_OFF``        comma-separated tensor-core parts (``states``, ``marginal``,
                            ``linear``, ``linear_grad``) sent back to their SIMT twins
                            (ablation, fault isolation).
``SLA_NUMBA_NO_CACHE``      ``1``: compile GPU kernels without Numba's disk cache.
``SLA_NUMBA_STATES``        ``auto`` (default) | ``fp32`` | ``bf16``: the storage of the
                            linear branch's per-key-block states on the tensor-core
                            path. ``bf16``: half the bytes and one product in the
                            marginal sums instead of two; O_l then carries ~4e-4
                            relative error instead of ~3e-8 (``tools/states_precision.py``).
                            ``auto``: bf16 states for bf16 inputs (their own rounding
                            is coarser), fp32 for fp16 inputs.
``SLA_NUMBA_GRAD_STATES``   ``auto`` (default) | ``fp32`` | ``bf16``: the storage of the
                            tensor-core backward's per-query-block gradient sums
                            (QO_i, QD_i, written by ``dq_linear``): ``bf16`` rounds
                            each to bf16, halves their bytes, and lets the column
                            sums dH_j take the pipelined bf16 marginal kernel
                            (H200: 0.74 ms instead of 1.37 ms at the Wan2.1 shape).
                            ``auto``: bf16 for bf16 inputs, fp32 for fp16 inputs
                            (the rule of ``SLA_NUMBA_STATES``).
``SLA_NUMBA_MARGINAL``      ``pipelined`` (default) | ``registers`` | ``wgmma`` |
                            ``pipelined_v2``: the
                            tensor-core marginal-sum kernel for bf16 states
                            (``gpu/tc/marginal.py``): the ``cp.async`` ring of several
                            k-steps per barrier, or the register-staged kernel (same
                            bits; the first 1.5x faster on the H200, BENCHMARKS.md),
                            or (opt-in) Hopper's warpgroup MMA
                            (``gpu/tc/marginal_wgmma.py``; compute capability 9.0
                            only, elsewhere the pipelined kernel; equal to fp32
                            rounding, not bit for bit), or (opt-in)
                            ``pipelined_v2``: the pipelined kernel with its map
                            loaded as int32 words and its results staged through
                            shared memory into 16-byte stores (same bits; not yet
                            timed on a GPU). fp32 states always take the
                            register kernel.
``SLA_NUMBA_LINEAR``        ``auto`` (default) | ``pipelined`` | ``registers`` |
                            ``wgmma``: the tensor-core kernel of the linear branch's
                            forward output. ``wgmma``: Hopper's warpgroup MMA
                            (``gpu/tc/linear_wgmma.py``) where it applies (fp16 / bf16,
                            block_q 64, D 64 or 128, compute capability 9.0), the
                            pipelined kernel elsewhere; agrees with it to fp32
                            rounding, not bit for bit; H200 (session 9): 0.362 ms
                            against 0.540 at the Wan2.1 shape. ``pipelined``
                            (``gpu/tc/linear.py``): the next chunk of H_i in flight
                            (16-byte loads into registers) while the mma of the
                            current one run, one barrier a chunk; ``registers``: H_i
                            staged chunk by chunk with scalar loads, two barriers a
                            chunk (same bits; the pipelined one 1.27x faster on the
                            H200). ``auto``: wgmma where it applies, else pipelined
                            (and pipelined under the simulator).
``SLA_NUMBA_LINEAR_GRAD``   ``pipelined`` (default) | ``registers`` | ``wgmma``: the
                            tensor-core linear-branch gradient kernels
                            (``gpu/tc/linear_backward.py``, ``dq_linear`` /
                            ``dkdv_linear``): double-buffered chunks of the state
                            loaded one ahead with 16-byte loads, one barrier a chunk;
                            or staged chunk by chunk, two barriers a chunk, no loads
                            in flight during the mma. Same bits; the first 1.22x /
                            1.40x faster on the H200 (BENCHMARKS.md). ``wgmma``
                            (opt-in; slower on the H200, session 9: dk/dv 1.36 against
                            1.27 ms, dq 2.00 against 1.76 at the Wan2.1 shape): both on
                            Hopper warpgroup MMA
                            (``gpu/tc/linear_backward_wgmma.py``; compute capability
                            9.0, fp16 / bf16, D 64 / 128, block 64; agrees to fp32
                            rounding, not bitwise); other configurations keep the
                            pipelined kernels.
``SLA_NUMBA_SPARSE_BWD``    ``sync`` (default) | ``pipelined``: the tensor-core sparse
                            backward kernels (``gpu/tc/backward.py``, dQ and dK/dV):
                            each K / V tile (query chunk) copied and waited for before
                            its math, two barriers a step; or two stages, the next
                            step's copy in flight during the current step's math, one
                            barrier a step. Same bits. Opt-in: no faster on the H200
                            (``tools/sweep_sparse_backward.py``).
``SLA_NUMBA_SPARSE_FWD``    ``auto`` (default) | ``mma`` | ``wgmma``: the tensor-core kernel
                            of the sparse branch's forward: ``mma.sync``
                            (``gpu/tc/forward.py``, compute capability >= 8.0) or
                            Hopper's warpgroup MMA (``gpu/tc/forward_wgmma.py``: fp16 /
                            bf16, block_q = block_k = 64, D 64 or 128, compute
                            capability 9.0; explicit ``wgmma`` elsewhere is a
                            ``ValueError`` naming this variable). ``auto``: wgmma where
                            it applies (1.48x / 1.42x faster than mma.sync at D = 128
                            / 64 on the H200, same results), mma.sync elsewhere and
                            under the simulator.
``SLA_NUMBA_STATES_KERNEL`` ``auto`` (default) | ``registers`` | ``staged`` |
                            ``pipelined``: the tensor-core key-block states kernel
                            (``gpu/tc/states.py``): one key block a CTA, K and V read
                            with 2-byte loads and the result stored straight from the
                            mma fragments; or (``staged``) K and V copied into shared
                            memory with 16-byte ``cp.async`` and the result staged in
                            shared memory and stored as 128-byte warp rows; or
                            (``pipelined``) the same with several key blocks a CTA,
                            the next block's K and V in flight while the current one
                            computes and stores. Same bits. ``auto``: staged for bf16
                            states (0.404 ms against 0.554 at the Wan2.1 shape on the
                            H200), registers for fp32 states (staged 0.606 against
                            0.561 there) -- where ``wgmma`` does not apply, which ``auto`` tries first
                            (not under the simulator; H200, session 9: bf16 states
                            0.308 ms against 0.451, fp32 0.383 against 0.536, the same
                            bits). ``wgmma`` (``gpu/tc/states_wgmma.py``):
                            each key block's product as Hopper warpgroup MMA, φ(K)ᵀ
                            read MN-major from shared memory, z as 8 columns of ones,
                            several key blocks a CTA; only compute capability 9.0,
                            fp16 / bf16 inputs, D 64 or 128, block_k 64 (elsewhere
                            ``auto``'s choice runs). Same results to fp32 rounding,
                            not the same bits.
``SLA_NUMBA_CLASSIFY``      ``fused`` (default) | ``scratch``: the GPU block
                            classification's kernels (``gpu/classify.py``): pooling by
                            warps with packed 8-byte bf16 loads and the scores kept as
                            keys in shared memory (``gpu/simt/classify_fused.py``); or
                            the pooling kernel with one thread per d and the score /
                            select kernel that keeps its scores in a global scratch
                            array. Same map, bit for bit. H200 (session 9,
                            ``tools/bench_classify.py --fused``): kernels 0.218 ->
                            0.204 ms at the Wan2.1 shape, 0.072 -> 0.059 ms at B2.
``SLA_NUMBA_LAUNCH``        ``direct`` (default) | ``numba``: how GPU kernels are
                            launched: ``direct`` hands the compiled kernel and its
                            argument list to ``cuda.core`` (``gpu/_launcher.py``);
                            ``numba`` goes through Numba's dispatcher (slower per
                            launch; for comparison and fault isolation).
``SLA_NUMBA_TORCH_OPS``     ``auto`` (default) | ``always``: torch tensors go through
                            the custom ops ``torch.ops.sla_numba.*`` only where torch
                            needs them (torch.compile, export, FakeTensor, functorch);
                            a plain eager call skips that layer (``torch_ops.py``,
                            section 3). ``always``: every call through the ops.
``SLA_NUMBA_SAVE_STATES``   ``0`` (default, :data:`SAVE_STATES_DEFAULT`) | ``1``: the
                            torch bridge keeps the GPU forward's linear-branch row
                            states (H_i, Z_i: B·H·Mq·(D²+D) values of the compute
                            dtype a layer) for the backward, which then skips
                            recomputing the key-block states and their row sums;
                            the same gradients bit for bit. ``0``: nothing extra is
                            kept, the backward recomputes them. The cpu backend
                            ignores it. Read at each forward (under torch.compile:
                            when the graph is traced).
``SLA_NUMBA_COMPILE_WORKERS`` how many worker processes compile a call's GPU kernels
                            side by side the first time (``gpu/_precompile.py``);
                            ``0`` compiles them one by one in the calling process.
                            Default: the number of CPUs, at most 8; 0 with fewer
                            than 4 CPUs.
==========================  ===========================================================

Numba's own variables (``NUMBA_CACHE_DIR``, ``NUMBA_ENABLE_CUDASIM``,
``NUMBA_NUM_THREADS``, ...) keep their Numba names and meaning.
"""

import os

GPU_PATHS = ("auto", "simt", "tc")
TC_PARTS = ("states", "marginal", "linear", "linear_grad")

GPU_PATH_VAR = "SLA_NUMBA_GPU_PATH"
TC_OFF_VAR = "SLA_NUMBA_TC_OFF"
NO_CACHE_VAR = "SLA_NUMBA_NO_CACHE"
LAUNCH_VAR = "SLA_NUMBA_LAUNCH"
STATES_VAR = "SLA_NUMBA_STATES"
MARGINAL_VAR = "SLA_NUMBA_MARGINAL"
LINEAR_VAR = "SLA_NUMBA_LINEAR"
LINEAR_GRAD_VAR = "SLA_NUMBA_LINEAR_GRAD"
SPARSE_BWD_VAR = "SLA_NUMBA_SPARSE_BWD"
STATES_KERNEL_VAR = "SLA_NUMBA_STATES_KERNEL"
COMPILE_WORKERS_VAR = "SLA_NUMBA_COMPILE_WORKERS"
SAVE_STATES_VAR = "SLA_NUMBA_SAVE_STATES"
#: ``SLA_NUMBA_SAVE_STATES`` when unset or empty: "0" recompute the row states in the
#: backward, "1" keep the forward's (docs/internals.md, "Reusing the forward's row states")
SAVE_STATES_DEFAULT = "0"
TORCH_OPS_VAR = "SLA_NUMBA_TORCH_OPS"
TORCH_OPS = ("auto", "always")
STATES_DTYPES = ("auto", "fp32", "bf16")
GRAD_STATES_VAR = "SLA_NUMBA_GRAD_STATES"
GRAD_STATES_DTYPES = ("auto", "fp32", "bf16")
MARGINAL_KERNELS = ("pipelined", "registers", "wgmma", "pipelined_v2")
LINEAR_KERNELS = ("auto", "pipelined", "registers", "wgmma")
LINEAR_GRAD_KERNELS = ("pipelined", "registers", "wgmma")
SPARSE_BWD_KERNELS = ("sync", "pipelined")
#: The first is the default (unset or empty): flipping it is reordering this one line.
STATES_KERNELS = ("auto", "registers", "staged", "pipelined", "wgmma")
LAUNCHERS = ("direct", "numba")
SPARSE_FWD_VAR = "SLA_NUMBA_SPARSE_FWD"
CLASSIFY_VAR = "SLA_NUMBA_CLASSIFY"
CLASSIFY_KERNELS = ("fused", "scratch")
SPARSE_FWD_KERNELS = ("auto", "mma", "wgmma")


def _choice(var, values):
    """The value of the switch ``var``, one of ``values`` (case and spaces ignored;
    unset or empty: ``values[0]``, the default)."""
    raw = os.environ.get(var, "")
    val = raw.strip().lower() or values[0]
    if val not in values:
        raise ValueError(f"{var}={raw!r}: must be one of {values}")
    return val


def gpu_path():
    """``SLA_NUMBA_GPU_PATH``: 'auto' (unset or empty), 'simt' or 'tc'."""
    return _choice(GPU_PATH_VAR, GPU_PATHS)


def tc_parts_off():
    """``SLA_NUMBA_TC_OFF``: the set of tensor-core parts switched off."""
    raw = os.environ.get(TC_OFF_VAR, "")
    off = {p.strip().lower() for p in raw.split(",") if p.strip()}
    unknown = off - set(TC_PARTS)
    if unknown:
        raise ValueError(
            f"{TC_OFF_VAR}={raw!r}: unknown part(s) {sorted(unknown)}; parts are {TC_PARTS}"
        )
    return off


def disk_cache():
    """Whether GPU kernels use Numba's disk cache (``SLA_NUMBA_NO_CACHE`` != '1')."""
    raw = os.environ.get(NO_CACHE_VAR, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{NO_CACHE_VAR}={raw!r}: must be 0 or 1")
    return raw != "1"


def launcher():
    """``SLA_NUMBA_LAUNCH``: 'direct' (unset or empty) or 'numba'."""
    return _choice(LAUNCH_VAR, LAUNCHERS)


def grad_states_dtype():
    """``SLA_NUMBA_GRAD_STATES``: 'auto' (unset or empty), 'fp32' or 'bf16'."""
    return _choice(GRAD_STATES_VAR, GRAD_STATES_DTYPES)


def bf16_grad_states(kind):
    """Whether the tensor-core backward stores QO_i / QD_i in bf16 for inputs of
    ``kind`` ("bf16" or "f16"): ``SLA_NUMBA_GRAD_STATES`` bf16, or auto with bf16 inputs."""
    mode = grad_states_dtype()
    return mode == "bf16" or (mode == "auto" and kind == "bf16")


def states_dtype():
    """``SLA_NUMBA_STATES``: 'auto' (unset or empty), 'fp32' or 'bf16'."""
    return _choice(STATES_VAR, STATES_DTYPES)


def bf16_states(kind):
    """Whether the tensor-core path stores the linear states in bf16 for inputs of
    ``kind`` ("bf16" or "f16"): ``SLA_NUMBA_STATES`` bf16, or auto with bf16 inputs."""
    mode = states_dtype()
    return mode == "bf16" or (mode == "auto" and kind == "bf16")


def marginal_kernel():
    """``SLA_NUMBA_MARGINAL``: 'pipelined' (unset or empty), 'registers', 'wgmma' or
    'pipelined_v2'."""
    return _choice(MARGINAL_VAR, MARGINAL_KERNELS)


def linear_kernel():
    """``SLA_NUMBA_LINEAR``: 'auto' (unset or empty), 'pipelined', 'registers' or 'wgmma'."""
    return _choice(LINEAR_VAR, LINEAR_KERNELS)


def linear_grad_kernel():
    """``SLA_NUMBA_LINEAR_GRAD``: 'pipelined' (unset or empty), 'registers' or 'wgmma'."""
    return _choice(LINEAR_GRAD_VAR, LINEAR_GRAD_KERNELS)


def sparse_bwd_kernel():
    """``SLA_NUMBA_SPARSE_BWD``: 'sync' (unset or empty) or 'pipelined'."""
    return _choice(SPARSE_BWD_VAR, SPARSE_BWD_KERNELS)


def sparse_fwd_kernel():
    """``SLA_NUMBA_SPARSE_FWD``: 'auto' (unset or empty), 'mma' or 'wgmma'."""
    return _choice(SPARSE_FWD_VAR, SPARSE_FWD_KERNELS)


def classify_kernel():
    """``SLA_NUMBA_CLASSIFY``: 'fused' (unset or empty) or 'scratch'."""
    return _choice(CLASSIFY_VAR, CLASSIFY_KERNELS)


def states_kernel():
    """``SLA_NUMBA_STATES_KERNEL``: 'auto' (unset or empty), 'registers', 'staged',
    'pipelined' or 'wgmma'."""
    return _choice(STATES_KERNEL_VAR, STATES_KERNELS)


def compile_workers():
    """``SLA_NUMBA_COMPILE_WORKERS``: an int >= 0 (unset or empty: the number of CPUs
    this process may use, at most 8, or 0 when that is below 4: workers would only
    take the calling process's cores)."""
    raw = os.environ.get(COMPILE_WORKERS_VAR, "").strip()
    if not raw:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return min(cpus, 8) if cpus >= 4 else 0
    try:
        val = int(raw)
    except ValueError:
        val = -1
    if val < 0:
        raise ValueError(f"{COMPILE_WORKERS_VAR}={raw!r}: must be an integer >= 0")
    return val


def save_states():
    """``SLA_NUMBA_SAVE_STATES``: whether the torch bridge keeps the GPU forward's row
    states for the backward (unset or empty: :data:`SAVE_STATES_DEFAULT`)."""
    raw = os.environ.get(SAVE_STATES_VAR, "")
    val = raw.strip() or SAVE_STATES_DEFAULT
    if val not in ("0", "1"):
        raise ValueError(f"{SAVE_STATES_VAR}={raw!r}: must be 0 or 1")
    return val == "1"


def torch_ops():
    """``SLA_NUMBA_TORCH_OPS``: 'auto' (unset or empty) or 'always'."""
    return _choice(TORCH_OPS_VAR, TORCH_OPS)
