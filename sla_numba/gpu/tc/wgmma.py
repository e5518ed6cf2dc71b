"""Hopper warpgroup MMA (``wgmma``) for Numba kernels: inline PTX, with simulator twins.

The companion of ``tc/ptx.py`` for compute capability 9.0 (sm_90a; numba-cuda builds
plain ``@cuda.jit`` kernels for sm_90a on such a device, see docs/internals.md,
"wgmma from Numba"). Kernels import the public names below and get the inline-PTX
intrinsics on a GPU, or pure-Python twins with the same signatures under
``NUMBA_ENABLE_CUDASIM=1``.

Warpgroup, operands, fragments
------------------------------
A warpgroup is 4 consecutive warps (128 threads, ``tid // 128``). One
``wgmma.mma_async.m64nNk16`` computes ``D (64 x N, fp32) = A (64 x 16) . B (16 x N)
[+ D]`` for the whole warpgroup. Warp ``w`` of the group (``(tid >> 5) & 3``) owns
rows ``16w .. 16w + 15`` of A (when A is in registers) and of D; inside a warp the
layouts are those of ``mma.sync.m16n8k16`` (``g = lane >> 2``, ``t = lane & 3``):

* D (accumulator), ``N/2`` fp32 a thread: ``d[4j + e]`` is D at row
  ``16w + g + 8*(e >> 1)``, column ``8j + 2t + (e & 1)`` (the m16n8 C layout repeated
  along N). The kernels keep it in a ``cuda.local.array`` of shape (1, N/8, 4), so
  ``acc[0, j, e]`` is ``d[4j + e]`` and the row reductions of ``tc/tiles.py`` apply.
* A from registers, four int32 of two 16-bit values each (low half = lower column):
  ``a[0] = A[16w+g, 2t:2t+2]``, ``a[1] = A[16w+g+8, 2t:2t+2]``,
  ``a[2] = A[16w+g, 2t+8:2t+10]``, ``a[3] = A[16w+g+8, 2t+8:2t+10]`` (PTX ISA,
  "Register Fragments", wgmma .m64nNk16 matrix A: the m16n8k16 A fragment per warp).
  So ``pack_a`` of two adjacent n8 accumulator tiles (``tc/tiles.py``) is the A
  fragment of one k16 step, as with ``mma.sync``.
* A or B from shared memory, through a 64-bit *matrix descriptor* (below).

Shared-memory layout: 128-byte swizzle (the only one used here)
---------------------------------------------------------------
A tile is stored in *column chunks* of 64 16-bit values (128 bytes) per row: row ``r``
of chunk ``c`` is 128 bytes at ``c*CHUNK + 128*r``, and inside it the 16-byte piece
``p`` (values ``8p .. 8p+7``) sits at piece ``p ^ (r % 8)`` (:func:`sw128_offset`).
Tiles start 1024-byte aligned (the XOR uses address bits 7-9: 8-row atoms of 1024
bytes). The hardware applies the same XOR to the byte address it computes:
``addr ^ (((addr >> 7) & 7) << 4)``.

Matrix descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4,
16-29 leading-dimension byte offset (LBO) >> 4, 32-45 stride-dimension byte offset
(SBO) >> 4, 49-51 base offset (0: 1024-aligned atoms), 62-63 swizzle (1 = 128 B).
How the hardware walks the operand (our reading, the one the twins implement and
``tests/gpu/tc/test_wgmma_layout.py`` pins down):

* **K-major** (``trans = 0``; Q and K here: a row of the stored tile is one M / N index,
  the 16 k values contiguous): element (row ``i``, k) at
  ``start + (i // 8)*SBO + (i % 8)*128 + 2k``, then swizzled. SBO = 1024; LBO unused
  (a k16 step is 32 bytes, inside one 128-byte row). The k-step ``ks`` of a chunked
  tile starts at ``(ks // 4)*CHUNK + (ks % 4)*32``.
* **MN-major** (``trans = 1``, only for 16-bit types; V here: a row of the stored tile is
  one k index, the N values contiguous): element (k, n) at
  ``start + (n // 64)*LBO + 2*(n % 64) + (k // 8)*SBO + (k % 8)*128``, then swizzled
  (CUTLASS's canonical ``Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))``).
  LBO = the byte distance between 64-wide column chunks, SBO = 1024 (8 rows of k). A
  k16 step starts 16 rows = 2048 bytes further.

Intrinsics (``N`` and the element kind fixed by the factory; ``acc`` and ``af`` local
arrays, read and written in place)
--------------------------------------------------------------------------------------
``make_wgmma_ss(kind, N, trans_b=0, trans_a=0)(smem, acc, desc_a, desc_b, scale_d)``: A
and B from shared memory, K-major by default; ``trans_b`` / ``trans_a`` 1 read that
operand MN-major instead (``imm-trans-b`` / ``imm-trans-a``, as ``make_wgmma_rs``'s B;
A MN-major is a stored tile whose row is one k index with the 64 M values contiguous,
read as the MN-major formula above with N -> M). ``scale_d`` 0: ``D = A.B`` (the old accumulator is
ignored), 1: ``D += A.B``. ``smem`` is the kernel's shared array (only the twin reads it).

``make_wgmma_rs(kind, N)(smem, acc, af, kk, desc_b, scale_d)``: A from registers
``af[kk, 0:4]`` (an int32 local array of shape (K/16, 4)), B from shared memory
MN-major (``imm-trans-b = 1``).

``wg_fence(x, n)`` / ``wg_fence2(x, n, y, m)``: ``wgmma.fence`` with the first ``n``
(``m``) elements of the local arrays ``x`` (``y``) tied to it, so the compiler keeps
their ordinary writes before it and the wgmma reads after (required before a wgmma
whose accumulator or register A was written, or read, by other instructions).
``wg_commit()``: ``wgmma.commit_group``. ``wg_wait(x, n, k)``: ``wgmma.wait_group k``
with ``x[:n]`` tied (the accumulators must not be touched before their wait).
``fence_proxy_async()``: ``fence.proxy.async.shared::cta`` (makes generic-proxy writes,
e.g. landed ``cp.async``, visible to wgmma's async-proxy reads; a barrier follows).

Twins
-----
Under the simulator each CUDA thread is a Python thread. A wgmma twin is a
warpgroup-collective: the 128 threads meet at a ``threading.Barrier(128)``, publish
their accumulators (and register A fragments) and descriptors; the group's first
thread decodes the operands from the shared array exactly as the hardware reading
above says (descriptor fields, swizzle), gathers A and C by the fragment maps,
multiplies in float64 (rounded to fp32, as the ``mma`` twin does), and every thread
takes its own fragment back. The twins are deferred: a wgmma is recorded when issued,
``wg_commit`` closes the group, and the group runs (reads the registers and shared
memory it names, writes the accumulators) only when a ``wg_wait`` covers it -- the
latest moment the hardware may, so a kernel that touches a wgmma's registers or shared
operands while it is in flight computes something else under the simulator too. Every
thread of the warpgroup must issue the same sequence of wgmma (true for
warpgroup-uniform code); the descriptors must agree (checked). ``wg_fence`` is a no-op.
"""

import functools
import hashlib
import threading

import numpy as np

from .ptx import SIMULATED, bf16_bits_to_f32

__all__ = [
    "CHUNK_COLS",
    "sw128_offset",
    "make_desc",
    "decode_operand",
    "make_wgmma_ss",
    "make_wgmma_rs",
    "wg_fence",
    "wg_fence2",
    "wg_commit",
    "wg_wait",
    "fence_proxy_async",
]

#: 16-bit values per row of one 128-byte-swizzled column chunk
CHUNK_COLS = 64
#: 128-byte swizzle code of the descriptor (bits 62-63)
SWIZZLE_128B = 1


# ---------------------------------------------------------------------------
# Host-side layout helpers (the kernel's address arithmetic and the twins use them)
# ---------------------------------------------------------------------------


def sw128_offset(r, p):
    """Byte offset, inside a 1024-aligned 128-byte-swizzled column chunk, of the 16-byte
    piece ``p`` (values ``8p .. 8p+7``) of row ``r``."""
    return r * 128 + ((p ^ (r & 7)) << 4)


def make_desc(addr, lbo, sbo, swizzle=SWIZZLE_128B):
    """64-bit wgmma matrix descriptor of the operand starting at shared byte ``addr``."""
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (swizzle << 62)


def desc_hi(lbo, sbo, swizzle=SWIZZLE_128B):
    """The fixed fields of a descriptor (everything but the start address)."""
    return make_desc(0, lbo, sbo, swizzle)


def _swizzle(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def decode_operand(smem, desc, rows, trans):
    """The operand a descriptor points at, as the hardware reads it (our reading, module
    docstring): the (rows, 16) matrix of 16-bit values (uint16 bits) with ``rows`` the
    M or N extent. ``trans`` 0: K-major; 1: MN-major. ``smem``: the shared memory as a
    flat array of 16-bit values; the address in ``desc`` is a byte offset into it."""
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    swz = (desc >> 62) & 3
    if swz != SWIZZLE_128B or (desc >> 49) & 7:
        raise NotImplementedError(f"descriptor {desc:#x}: only 128-byte swizzle, base offset 0")
    i = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    if trans:
        addr = (
            start + (i // CHUNK_COLS) * lbo + 2 * (i % CHUNK_COLS) + (k // 8) * sbo + (k % 8) * 128
        )
    else:
        addr = start + (i // 8) * sbo + (i % 8) * 128 + 2 * k
    addr = _swizzle(addr)
    bits = np.asarray(smem).view(np.uint16) if np.asarray(smem).dtype.itemsize == 2 else None
    if bits is None:
        raise TypeError("smem must be an array of 16-bit values")
    return bits[addr // 2]


def _to_float(bits, kind):
    bits = np.asarray(bits, np.uint16)
    if kind == "bf16":
        return bf16_bits_to_f32(bits).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def _regs_to_bits(regs):
    """(..., 4) int32 registers -> (..., 8) uint16: each register's low half first."""
    u = np.asarray(regs, np.int64) & 0xFFFFFFFF
    lo, hi = u & 0xFFFF, u >> 16
    return np.stack([lo, hi], axis=-1).reshape(*u.shape[:-1], -1).astype(np.uint16)


# Fragment maps of one warpgroup (module docstring): thread -> rows / columns.
def acc_coords(n):
    """(rows, cols) int arrays of shape (128, n/2): accumulator element ``d[x]`` of thread
    ``tid`` is D[rows[tid, x], cols[tid, x]] of the 64 x n product."""
    tid = np.arange(128)[:, None]
    x = np.arange(n // 2)[None, :]
    w, lane = tid >> 5, tid & 31
    g, t = lane >> 2, lane & 3
    j, e = x >> 2, x & 3
    return 16 * w + g + 8 * (e >> 1), 8 * j + 2 * t + (e & 1)


def a_coords():
    """(rows, cols) int arrays of shape (128, 8): the 16-bit value ``v`` of the register-A
    fragment of thread ``tid`` (register ``v >> 1``, half ``v & 1``) is
    A[rows[tid, v], cols[tid, v]] of the 64 x 16 operand."""
    tid = np.arange(128)[:, None]
    v = np.arange(8)[None, :]
    w, lane = tid >> 5, tid & 31
    g, t = lane >> 2, lane & 3
    reg, half = v >> 1, v & 1
    return 16 * w + g + 8 * (reg & 1), 2 * t + half + 8 * (reg >> 1)


def gather_a(regs):
    """The 64 x 16 A operand (uint16 bits) from the 128 threads' (128, 4) registers."""
    rows, cols = a_coords()
    out = np.zeros((64, 16), np.uint16)
    out[rows, cols] = _regs_to_bits(regs)
    return out


# ---------------------------------------------------------------------------
# Simulator twins
# ---------------------------------------------------------------------------

_lock = threading.Lock()


class _GroupExchange:
    """The 128 threads of one simulated warpgroup meet here; the first computes."""

    def __init__(self):
        self.barrier = threading.Barrier(128)
        self.slots = [None] * 128
        self.result = None

    def run(self, idx, value, compute):
        self.barrier.wait()  # the previous collective's result fully read
        self.slots[idx] = value
        self.barrier.wait()  # every thread has published
        if idx == 0:
            self.result = compute(list(self.slots))
        self.barrier.wait()  # the result is there
        return self.result


def _collective(value, compute):
    """Publish this thread's ``value``; ``compute(values of the 128 threads)`` runs once;
    returns (its result, this thread's index in the warpgroup)."""
    th = threading.current_thread()
    tid = th.thread_id
    key = (tuple(th.blockIdx), tid // 128)
    mgr = th._manager
    with _lock:
        table = mgr.__dict__.setdefault("_sla_wgmma_exchange", {})
        ex = table.get(key)
        if ex is None:
            ex = table[key] = _GroupExchange()
    idx = tid % 128
    return ex.run(idx, value, compute), idx


def _uniform(vals, what):
    if any(v != vals[0] for v in vals):
        raise ValueError(f"wgmma twin: {what} differs between the threads of a warpgroup")
    return vals[0]


def _product(smem, kind, n, accs, a, desc_b, trans_b, scale_d):
    """D (64 x n, fp32) = A . B (+ C) from the gathered operands; ``a`` 64 x 16 float64."""
    b = _to_float(decode_operand(smem, desc_b, n, trans_b), kind)  # (n, 16): B^T
    d = a @ b.T
    if scale_d:
        rows, cols = acc_coords(n)
        c = np.zeros((64, n))
        c[rows, cols] = np.asarray(accs, np.float64)
        d = d + c
    return d.astype(np.float32)


def _scatter(d, n, acc, idx):
    rows, cols = acc_coords(n)
    flat = acc.reshape(-1)
    flat[: n // 2] = d[rows[idx], cols[idx]]


def _run_ss(kind, n, trans_a, trans_b, smem, acc, desc_a, desc_b, scale_d):
    """Execute one shared x shared wgmma of the warpgroup (a collective)."""

    def compute(slots):
        da = _uniform([s[1] for s in slots], "desc_a")
        db = _uniform([s[2] for s in slots], "desc_b")
        sd = _uniform([s[3] for s in slots], "scale_d")
        a = _to_float(decode_operand(smem, da, 64, trans_a), kind)
        return _product(smem, kind, n, [s[0] for s in slots], a, db, trans_b, sd)

    with np.errstate(invalid="ignore"):  # scale_d 0: acc may hold garbage, unused
        mine = (np.array(acc.reshape(-1)[: n // 2], np.float64), desc_a, desc_b, scale_d)
    d, idx = _collective(mine, compute)
    _scatter(d, n, acc, idx)


def _run_rs(kind, n, smem, acc, af, kk, desc_b, scale_d):
    """Execute one register x shared wgmma of the warpgroup (a collective)."""

    def compute(slots):
        db = _uniform([s[2] for s in slots], "desc_b")
        sd = _uniform([s[3] for s in slots], "scale_d")
        a = _to_float(gather_a(np.array([s[1] for s in slots])), kind)
        return _product(smem, kind, n, [s[0] for s in slots], a, db, 1, sd)

    regs = [int(af[kk, i]) for i in range(4)]
    mine = (np.array(acc.reshape(-1)[: n // 2], np.float64), regs, desc_b, scale_d)
    d, idx = _collective(mine, compute)
    _scatter(d, n, acc, idx)


# The twins are *deferred*, like ``ptx.cp_async_zfill``'s: a wgmma is recorded in the
# thread's open group when issued and executed (its registers and shared memory read,
# its accumulators written) only when a ``wg_wait`` covers its group, the latest moment
# the hardware may do it. A kernel that rewrites the registers of a wgmma in flight (its
# accumulators or register A) or the shared memory it reads, before waiting for it,
# then computes something else under the simulator too.
def _wg_state():
    th = threading.current_thread()
    st = getattr(th, "_sla_wgmma", None)
    if st is None:
        st = th._sla_wgmma = ([], [])  # (open group, committed groups, oldest first)
    return st


def _make_ss_twin(kind, n, trans_a=0, trans_b=0):
    def wgmma_ss(smem, acc, desc_a, desc_b, scale_d):
        args = (kind, n, trans_a, trans_b, smem, acc, int(desc_a), int(desc_b), int(scale_d))
        op = (_run_ss, args)
        _wg_state()[0].append(op)

    return wgmma_ss


def _make_rs_twin(kind, n):
    def wgmma_rs(smem, acc, af, kk, desc_b, scale_d):
        op = (_run_rs, (kind, n, smem, acc, af, int(kk), int(desc_b), int(scale_d)))
        _wg_state()[0].append(op)

    return wgmma_rs


def _wg_fence_twin(x, n):
    pass


def _wg_fence2_twin(x, n, y, m):
    pass


def _wg_commit_twin():
    open_, groups = _wg_state()
    groups.append(list(open_))
    open_.clear()


def _wg_wait_twin(x, n, k):
    _, groups = _wg_state()
    while len(groups) > k:
        for fn, args in groups.pop(0):
            fn(*args)


def _fence_proxy_async_twin():
    pass


# ---------------------------------------------------------------------------
# Inline-PTX intrinsics (real GPU)
# ---------------------------------------------------------------------------

_DIGEST = None


def _pin(fn, name):
    """A deterministic uuid for an intrinsic (Numba draws a random one; the disk-cache
    key of a closure kernel pickles its intrinsics with it: see ``ptx._pin_uuids``).
    The hash of this file makes an edit of the inline PTX a new key."""
    global _DIGEST
    if _DIGEST is None:
        with open(__file__, "rb") as f:
            _DIGEST = hashlib.sha1(f.read()).hexdigest()[:12]
    try:
        fn._set_uuid(f"sla_numba.gpu.tc.wgmma.{name}.{_DIGEST}")
    except Exception:  # noqa: BLE001 - private API; the cache just misses then
        pass
    return fn


@functools.cache
def _ir():
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import _intrinsic, intrinsic

    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
    str(i32), str(i64), str(f32)  # fill llvmlite's type-text cache (ptx._build_intrinsics)
    return ir, types, intrinsic, _intrinsic(target="cuda", prefer_literal=True), i32, i64, f32


def _asm(builder, ret, argtys, text, cons, args):
    ir = _ir()[0]
    fnty = ir.FunctionType(ret, argtys)
    return builder.call(ir.InlineAsm(fnty, text, cons, side_effect=True), args)


def _ptrs(context, builder, aryty, ary, n, start=None):
    """Pointers to elements ``start .. start + n`` of a (C-contiguous) local array."""
    ir, *_, i64, _ = _ir()
    data = context.make_array(aryty)(context, builder, ary).data
    out = []
    for i in range(n):
        idx = ir.Constant(i64, i) if start is None else builder.add(start, ir.Constant(i64, i))
        out.append(builder.gep(data, [idx]))
    return out


def _tied_call(builder, ptrs, llty, text, cons_in, argtys, args, kinds):
    """Inline asm whose first outputs are the values behind ``ptrs`` (tied, "+"), read
    before and stored back after; ``kinds``: 'f' / 'r' constraint letter per pointer."""
    ir = _ir()[0]
    vals = [builder.load(p) for p in ptrs]
    n = len(ptrs)
    cons = ",".join(
        ["=" + kd for kd in kinds] + cons_in + [str(i) for i in range(n)] + ["~{memory}"]
    )
    ret = ir.LiteralStructType(llty) if n else ir.VoidType()
    res = _asm(builder, ret, argtys + llty, text, cons, args + vals)
    for i, p in enumerate(ptrs):
        builder.store(builder.extract_value(res, i), p)


def _build_ss(kind, n, trans_a=0, trans_b=0):
    ir, types, intrinsic, lit, i32, i64, f32 = _ir()
    nacc = n // 2
    regs = ",".join("$%d" % i for i in range(nacc))
    text = (
        "{ .reg .pred p; setp.ne.b32 p, $%d, 0; "
        "wgmma.mma_async.sync.aligned.m64n%dk16.f32.%s.%s {%s}, $%d, $%d, p, 1, 1, %d, %d; }"
        % (nacc + 2, n, kind, kind, regs, nacc, nacc + 1, trans_a, trans_b)
    )

    @intrinsic
    def wgmma_ss(typingctx, smem, acc, desc_a, desc_b, scale_d):
        sig = types.void(smem, acc, types.int64, types.int64, types.int32)

        def codegen(context, builder, sig, args):
            _, accv, da, db, sd = args
            ptrs = _ptrs(context, builder, sig.args[1], accv, nacc)
            _tied_call(
                builder, ptrs, [f32] * nacc, text, ["l", "l", "r"], [i64, i64, i32],
                [da, db, sd], "f" * nacc,
            )  # fmt: skip
            return context.get_dummy_value()

        return sig, codegen

    tag = ("_tb" if trans_b else "") + ("_ta" if trans_a else "")
    return _pin(wgmma_ss, f"wgmma_ss_{kind}_{n}{tag}")


def _build_rs(kind, n):
    ir, types, intrinsic, lit, i32, i64, f32 = _ir()
    nacc = n // 2
    regs = ",".join("$%d" % i for i in range(nacc))
    a = ",".join("$%d" % (nacc + i) for i in range(4))
    text = (
        "{ .reg .pred p; setp.ne.b32 p, $%d, 0; "
        "wgmma.mma_async.sync.aligned.m64n%dk16.f32.%s.%s {%s}, {%s}, $%d, p, 1, 1, 1; }"
        % (nacc + 5, n, kind, kind, regs, a, nacc + 4)
    )

    @intrinsic
    def wgmma_rs(typingctx, smem, acc, af, kk, desc_b, scale_d):
        sig = types.void(smem, acc, af, types.int64, types.int64, types.int32)

        def codegen(context, builder, sig, args):
            _, accv, afv, kkv, db, sd = args
            ptrs = _ptrs(context, builder, sig.args[1], accv, nacc)
            start = builder.mul(kkv, ir.Constant(i64, 4))
            a_vals = [builder.load(p) for p in _ptrs(context, builder, sig.args[2], afv, 4, start)]
            _tied_call(
                builder, ptrs, [f32] * nacc, text, ["r", "r", "r", "r", "l", "r"],
                [i32] * 4 + [i64, i32], a_vals + [db, sd], "f" * nacc,
            )  # fmt: skip
            return context.get_dummy_value()

        return sig, codegen

    return _pin(wgmma_rs, f"wgmma_rs_{kind}_{n}")


def _kinds(aryty):
    return "f" if str(aryty.dtype).startswith("float") else "r"


@functools.cache
def _build_common():
    ir, types, intrinsic, lit, i32, i64, f32 = _ir()

    def llty(aryty):
        return f32 if _kinds(aryty) == "f" else i32

    @lit
    def wg_fence(typingctx, x, n):
        if not isinstance(n, types.IntegerLiteral):
            return None
        cnt = n.literal_value

        def codegen(context, builder, sig, args):
            ptrs = _ptrs(context, builder, sig.args[0], args[0], cnt)
            k = _kinds(sig.args[0])
            _tied_call(
                builder, ptrs, [llty(sig.args[0])] * cnt, "wgmma.fence.sync.aligned;",
                [], [], [], k * cnt,
            )  # fmt: skip
            return context.get_dummy_value()

        return types.void(x, n), codegen

    @lit
    def wg_fence2(typingctx, x, n, y, m):
        if not isinstance(n, types.IntegerLiteral) or not isinstance(m, types.IntegerLiteral):
            return None
        cx, cy = n.literal_value, m.literal_value

        def codegen(context, builder, sig, args):
            px = _ptrs(context, builder, sig.args[0], args[0], cx)
            py = _ptrs(context, builder, sig.args[2], args[2], cy)
            kx, ky = _kinds(sig.args[0]), _kinds(sig.args[2])
            _tied_call(
                builder, px + py, [llty(sig.args[0])] * cx + [llty(sig.args[2])] * cy,
                "wgmma.fence.sync.aligned;", [], [], [], kx * cx + ky * cy,
            )  # fmt: skip
            return context.get_dummy_value()

        return types.void(x, n, y, m), codegen

    @lit
    def wg_wait(typingctx, x, n, k):
        if not isinstance(n, types.IntegerLiteral) or not isinstance(k, types.IntegerLiteral):
            return None
        cnt = n.literal_value
        text = "wgmma.wait_group.sync.aligned %d;" % k.literal_value

        def codegen(context, builder, sig, args):
            ptrs = _ptrs(context, builder, sig.args[0], args[0], cnt)
            k_ = _kinds(sig.args[0])
            _tied_call(builder, ptrs, [llty(sig.args[0])] * cnt, text, [], [], [], k_ * cnt)
            return context.get_dummy_value()

        return types.void(x, n, k), codegen

    def void_asm(text):
        @intrinsic
        def fn(typingctx):
            def codegen(context, builder, sig, args):
                _asm(builder, ir.VoidType(), [], text, "~{memory}", [])
                return context.get_dummy_value()

            return types.void(), codegen

        return fn

    fns = dict(
        wg_fence=wg_fence,
        wg_fence2=wg_fence2,
        wg_wait=wg_wait,
        wg_commit=void_asm("wgmma.commit_group.sync.aligned;"),
        fence_proxy_async=void_asm("fence.proxy.async.shared::cta;"),
    )
    return {name: _pin(fn, name) for name, fn in fns.items()}


@functools.cache
def make_wgmma_ss(kind, n, trans_b=0, trans_a=0):
    """The ``wgmma_ss`` of element kind ``kind`` ('bf16' / 'f16') and width ``n`` (module
    docstring): the intrinsic on a GPU, the twin under the simulator. ``trans_b`` 1: B
    is read MN-major (``imm-trans-b = 1``, as ``make_wgmma_rs``'s B); ``trans_a`` 1: A
    is (``imm-trans-a = 1``); 0: K-major."""
    if kind not in ("bf16", "f16") or n % 8 or not 8 <= n <= 256 or trans_b not in (0, 1):
        raise ValueError(f"wgmma m64n{n}k16 {kind} trans_b={trans_b}: unsupported")
    if trans_a not in (0, 1):
        raise ValueError(f"wgmma m64n{n}k16 {kind}: transpose flag trans_a={trans_a} not 0 / 1")
    ta, tb = int(trans_a), int(trans_b)
    return _make_ss_twin(kind, n, ta, tb) if SIMULATED else _build_ss(kind, n, ta, tb)


@functools.cache
def make_wgmma_rs(kind, n):
    """The ``wgmma_rs`` (A from registers, B MN-major) of ``kind`` and width ``n``."""
    if kind not in ("bf16", "f16") or n % 8 or not 8 <= n <= 256:
        raise ValueError(f"wgmma m64n{n}k16 {kind}: unsupported")
    return _make_rs_twin(kind, n) if SIMULATED else _build_rs(kind, n)


if SIMULATED:
    wg_fence, wg_fence2, wg_commit = _wg_fence_twin, _wg_fence2_twin, _wg_commit_twin
    wg_wait, fence_proxy_async = _wg_wait_twin, _fence_proxy_async_twin
else:
    globals().update(_build_common())
