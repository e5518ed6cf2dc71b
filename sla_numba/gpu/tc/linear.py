"""The linear branch's forward output on tensor cores (fp16 / bf16 q, cc >= 8.0).

For each (b, h, query block i) and rows r in [i*BQ, min((i+1)*BQ, Nq))::

    O_l[r, :] = (φ(q_r) · H_i) / (φ(q_r) · Z_i + eps)     if n_marg[b, h, i] > 0
    O_l[r, :] = 0                                           otherwise

Inputs: q (B, H, Nq, D) as int16 bits of bf16 or fp16; lstate fp32 (B, H, Mq, W),
W = D*D + D, row i = [vec(H_i) (row-major, H_i[d1, e]), Z_i] (``forward.row_states``);
n_marg int32 (B, H, Mq) (``row_info[1]`` of ``forward.launch_prep``); o_l fp32
(B, H, Nq, D). All flat views are accepted. Every ``o_l[b, h, r, :]`` with r < Nq is
written, nothing else. φ = feature map ``fm``: 0 softmax over the head dim, 1 elu + 1,
2 relu (``_tiles.make_common.phi_value``). Same result as the SIMT fused forward's
linear branch (``forward.make_forward_simt``, fp32).

Algorithm (one CTA per (i, h, b), grid (ceil(Nq/BQ), H, B); NW = BQ/16 warps)
--------------------------------------------------------------------------
0. ``n_marg[b, h, i] <= 0``: the CTA writes zeros to its rows and returns (uniform).
1. φ rows: two adjacent lanes per query row, each with D/2 consecutive columns
   (q decoded from the input's half type to fp32); softmax's row max and Σ exp are
   combined over the two lanes with one ``shfl_xor``. φ (fp32) is split into two
   **bf16** values ``hi = bf16(φ)``, ``lo = bf16(φ - hi)``, stored row-major
   [r][d1] in shared memory (rows >= nrows: zeros).
2. H_i is staged in chunks of HK rows (d1), also split into bf16 hi / lo tiles
   [d1][e]. The tile's padding columns carry the denominator: column D of the hi tile
   holds ``bf16(Z[d1])``, column D + 1 the bf16 of the remainder, columns D+2..D+7
   zeros. Two ``syncthreads`` per chunk.
3. Tensor cores, ``mma.sync.m16n8k16.bf16`` (fp32 accumulation). Warp w owns query
   rows 16w..16w+15 x all D output columns: D/8 n8 tiles (4·D/8 accumulators per
   lane, 64 at D = 128) plus one n8 "Z tile" (columns D..D+7). Per 16-wide k-step
   (d1): A = φ hi / lo with ``ldmatrix.x4`` from [r][d1]; B = H hi / lo with
   ``ldmatrix.x4.trans`` from [d1][e] (two n8 tiles a load); per tile

        acc += φhi·Hhi + φlo·Hhi + φhi·Hlo        (the φlo·Hlo term, ~2^-16, dropped)

   and for the Z tile ``z += φhi·Zt + φlo·Zt``. The k-steps of a chunk are written
   out (generated straight-line code, ``_tc_build``); warps whose rows all lie past
   the block's last row skip them.
4. Epilogue: den = Σ of the Z tile's columns of a row (lanes t = 0..3, two
   ``shfl_xor``) + eps; lane (g, t) stores rows g, g + 8 x columns 2t, 2t + 1 of each
   n8 tile, times 1 / den, straight to global memory.

Why bf16 for both kinds: ``mma`` needs A and B of one type, and H_i / Z_i are fp32
sums over many keys whose magnitude is not bounded by fp16's range (65504), and
fp16 lo parts of small φ values (softmax) would be subnormal. bf16 hi + lo holds
16 significant bits with fp32's range; the result's relative error is ~1e-5
(the dropped lo·lo term and the split remainders, each ~2^-17 relative).

Shared memory (16-bit values, rows padded to SW = D + 8 so the 8 rows of an
ldmatrix fall in different bank groups): [φ hi: BQ x SW][φ lo: BQ x SW]
[H hi: HK x SW][H lo: HK x SW]; 52 KiB at D = 128, BQ = 64, HK = 32.

Determinism: no atomics; each output is one lane's fixed sequence of operations.
Under the CUDA simulator the ``_mma`` twins run the same generated code (slowly:
tiny shapes, BQ = 16, HK = 16).
"""
import hashlib

import numpy as np

from . import build as _tc_build
from .ptx import SIMULATED

KINDS = ("bf16", "f16")
BLOCKS = (16, 32, 64, 128)
PAD = 8
GPU_HK = 32
SIM_HK = 16

with open(__file__, "rb") as _f:
    _SOURCE_HASH = hashlib.sha1(_f.read()).hexdigest()[:12]


def linear_tc_supported(D, block_q):
    """D a multiple of 16 up to 128, block_q in {16, 32, 64, 128}."""
    D, block_q = int(D), int(block_q)
    return 16 <= D <= 128 and D % 16 == 0 and block_q in BLOCKS


def chunk_rows(D, hk=None):
    """Rows of H_i staged at a time: a multiple of 16 dividing D."""
    hk = (SIM_HK if SIMULATED else GPU_HK) if hk is None else int(hk)
    hk = min(hk, D)
    while D % hk:
        hk -= 16
    return hk


def _plus(k):
    return f" + {k}" if k else ""


def linear_source(kind, D, BQ, HK):
    """Source text of the generated module (kernel ``linear_tc``, SMEM_BYTES, THREADS,
    MMA_PER_KSTEP)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not linear_tc_supported(D, BQ):
        raise ValueError(f"D = {D}, block_q = {BQ}: not supported")
    if HK % 16 or D % HK:
        raise ValueError(f"chunk of {HK} rows does not divide D = {D} in k16 steps")
    NW = BQ // 16
    NT = 32 * NW
    C = D // 2                       # columns of a row per lane in the φ phase
    SW = D + PAD
    PLO = BQ * SW                    # φ lo tile offset (16-bit values)
    HHI = 2 * BQ * SW                # H hi tile
    HLO = HHI + HK * SW              # H lo tile
    SMEM = (HLO + HK * SW) * 2
    NN = D // 8                      # n8 output tiles
    W = D * D + D
    L_ = []
    e = L_.append
    I, J, K = "    ", "        ", "            "
    e('"""Generated by sla_numba.gpu.tc.linear.linear_source(%r, %d, %d, %d)' % (kind, D, BQ, HK))
    e('(generator %s). Do not edit: see linear_tc for the algorithm and names."""'
      % _SOURCE_HASH)
    e("import math")
    e("import numpy as np")
    e("from numba import cuda, int16, int32, uint64")
    e("from sla_numba.gpu.tc.ptx import mma_bf16, pack_bf16x2 as pack, ldsm_x4, "
      "ldsm_x4_trans, smem_addr, shfl_xor, fmax")
    e("from sla_numba.gpu.tc.ptx import bf16_low_f32 as low_f32, "
      "bf16_high_f32 as high_f32")
    if kind == "bf16":
        e("from sla_numba.gpu.tc.ptx import bf16_low_f32 as in_f32")
    else:
        e("from sla_numba.gpu.tc.ptx import f16_low_f32 as in_f32")
    e("ZERO = np.float32(0.0)")
    e("ONE = np.float32(1.0)")
    e("ZI = np.int32(0)")
    e("u64 = uint64")
    e(f"SMEM_BYTES = {SMEM}")
    e(f"THREADS = {NT}")
    e(f"MMA_PER_KSTEP = {3 * NN + 2}          # per warp")
    e("")
    e("")
    e(_tc_build.jit_decorator())
    e("def linear_tc(q, lstate, n_marg, o_l, H, Nq, Mq, fm, eps):")
    e(I + '"""o_l rows of query block i = φ(Q_i)·H_i / (φ(Q_i)·Z_i + eps); flat arrays,')
    e(I + f'q int16 bits (B, H, Nq, {D}), lstate fp32 (B, H, Mq, {W}), n_marg int32 (B, H, Mq),')
    e(I + f'o_l fp32 (B, H, Nq, {D}). Grid (ceil(Nq/{BQ}), H, B), {NT} threads."""')
    if SIMULATED:
        e(I + "smem = cuda.shared.array(0, int16)")
        e(I + "smem32 = cuda.shared.array(0, int32)")
    else:
        e(I + "smem = cuda.shared.array(0, int16, alignment=16)")
        e(I + "smem32 = cuda.shared.array(0, int32, alignment=16)")
    e(I + "tid = cuda.threadIdx.x")
    e(I + "lane = tid & 31")
    e(I + "warp = tid >> 5")
    e(I + "i = cuda.blockIdx.x")
    e(I + "h = cuda.blockIdx.y")
    e(I + "b = cuda.blockIdx.z")
    e(I + "bh = b * H + h")
    e(I + f"r0 = i * {BQ}")
    e(I + f"nrows = min(Nq - r0, {BQ})")
    e(I + f"ob = (bh * Nq + r0) * {D}             # first output value of the block (int64)")
    e(I + "if n_marg[u64(bh * Mq + i)] <= 0:      # no marginal key block: zeros")
    e(J + f"for x in range(tid, nrows * {D}, {NT}):")
    e(K + "o_l[u64(ob + x)] = ZERO")
    e(J + "return")
    e(I + f"# --- 1. φ rows: row tid >> 1, lane li = tid & 1 owns columns li*{C} ..")
    e(I + "r = tid >> 1")
    e(I + "li = tid & 1")
    e(I + "ok = r < nrows")
    e(I + f"gq = ob + r * {D} + li * {C}")
    for c in range(C):
        e(I + f"x{c} = in_f32(int32(q[u64(gq{_plus(c)})])) if ok else ZERO")
    e(I + "if fm == 0:")
    e(J + "# softmax over the row (both lanes shuffle: warp-uniform)")
    e(J + "mx = x0")
    for c in range(1, C):
        e(J + f"mx = fmax(mx, x{c})")
    e(J + "mx = fmax(mx, shfl_xor(mx, 1))")
    for c in range(C):
        e(J + f"x{c} = math.exp(x{c} - mx)")
    e(J + "sm = " + " + ".join(f"x{c}" for c in range(C)))
    e(J + "sm += shfl_xor(sm, 1)")
    e(J + "inv = ONE / sm")
    for c in range(C):
        e(J + f"x{c} = x{c} * inv")
    e(I + "elif fm == 1:")
    for c in range(C):
        e(J + f"x{c} = x{c} + ONE if x{c} > ZERO else math.exp(x{c})")
    e(I + "else:")
    for c in range(C):
        e(J + f"x{c} = x{c} if x{c} > ZERO else ZERO")
    e(I + f"si = (r * {SW} + li * {C}) >> 1          # int32 index of the pair (r, li*{C})")
    for c in range(0, C, 2):
        e(I + f"p = pack(x{c}, x{c + 1}) if ok else ZI")
        e(I + f"smem32[si{_plus(c // 2)}] = p")
        e(I + f"smem32[si + {(PLO + c) // 2}] = "
          f"pack(x{c} - low_f32(p), x{c + 1} - high_f32(p)) if ok else ZI")
    e(I + "# --- 3. fragment addresses (bytes). A = φ [r][d1], matrix m = lane >> 3 at rows")
    e(I + "# 8(m & 1).., columns 8(m >> 1)..; B = H [d1][e] (.trans), same pattern: matrices")
    e(I + "# 0, 1 = k rows 0-7, 8-15 of n8 tile 2p, matrices 2, 3 those of tile 2p + 1")
    e(I + "sa = smem_addr(smem)")
    e(I + "lrow = (lane & 7) + ((lane >> 3) & 1) * 8")
    e(I + f"la = sa + ((warp * 16 + lrow) * {SW} + (lane >> 4) * 8) * 2")
    e(I + f"lb = sa + (lrow * {SW} + (lane >> 4) * 8 + {HHI}) * 2")
    e(I + f"lz = sa + (lrow * {SW} + {D + HHI}) * 2       # the Z tile (all lanes: columns D..)")
    e(I + "busy = warp * 16 < nrows")
    for n in range(NN):
        e(I + " = ".join(f"acc_{n}_{x}" for x in range(4)) + " = ZERO")
    e(I + " = ".join(f"z_{x}" for x in range(4)) + " = ZERO")
    e(I + f"sb = (bh * Mq + i) * {W}                 # lstate row (int64)")
    e(I + f"for kc in range({D // HK}):")
    e(J + "cuda.syncthreads()                     # φ written / previous chunk consumed")
    e(J + f"# --- 2. H rows kc*{HK} .. + {HK - 1}: bf16 hi / lo pairs; Z in columns D, D+1")
    e(J + f"hb = sb + kc * {HK * D}")
    e(J + f"for x in range(tid, {HK * D // 2}, {NT}):")
    e(K + f"rr = x // {D // 2}")
    e(K + f"c = (x - rr * {D // 2}) * 2")
    e(K + "g = hb + rr * %d + c" % D)
    e(K + "y0 = lstate[u64(g)]")
    e(K + "y1 = lstate[u64(g + 1)]")
    e(K + "p = pack(y0, y1)")
    e(K + f"s = (rr * {SW} + c + {HHI}) >> 1")
    e(K + "smem32[s] = p")
    e(K + f"smem32[s + {HK * SW // 2}] = pack(y0 - low_f32(p), y1 - high_f32(p))")
    e(J + f"if tid < {HK}:")
    e(K + f"zv = lstate[u64(sb + {D * D} + kc * {HK} + tid)]")
    e(K + "zh = low_f32(pack(zv, zv))")
    e(K + f"s = (tid * {SW} + {D + HHI}) >> 1")
    e(K + "smem32[s] = pack(zh, zv - zh)")
    e(K + "smem32[s + 1] = ZI")
    e(K + "smem32[s + 2] = ZI")
    e(K + "smem32[s + 3] = ZI")
    e(J + "cuda.syncthreads()")
    e(J + "if busy:")
    e(K + f"lk = la + kc * {HK * 2}")
    L4 = K + I
    for ks in range(HK // 16):
        e(K + f"# k-step {ks}: d1 = kc*{HK} + {16 * ks} ..")
        e(K + f"ah0, ah1, ah2, ah3 = ldsm_x4(smem, lk, {ks * 32})")
        e(K + f"al0, al1, al2, al3 = ldsm_x4(smem, lk, {ks * 32 + PLO * 2})")
        AH, AL = "ah0, ah1, ah2, ah3", "al0, al1, al2, al3"
        ko = ks * 16 * SW
        for p in range(NN // 2):
            e(K + f"bh0, bh1, bh2, bh3 = ldsm_x4_trans(smem, lb, {(ko + 16 * p) * 2})")
            e(K + f"bl0, bl1, bl2, bl3 = ldsm_x4_trans(smem, lb, {(ko + 16 * p + HK * SW) * 2})")
            for n, BH, BL in ((2 * p, "bh0, bh1", "bl0, bl1"), (2 * p + 1, "bh2, bh3", "bl2, bl3")):
                acc = ", ".join(f"acc_{n}_{x}" for x in range(4))
                e(K + f"{acc} = mma_bf16({AH}, {BH}, {acc})")
                e(K + f"{acc} = mma_bf16({AL}, {BH}, {acc})")
                e(K + f"{acc} = mma_bf16({AH}, {BL}, {acc})")
        e(K + f"zb0, zb1, zb2, zb3 = ldsm_x4_trans(smem, lz, {ko * 2})")
        e(K + f"z_0, z_1, z_2, z_3 = mma_bf16({AH}, zb0, zb1, z_0, z_1, z_2, z_3)")
        e(K + f"z_0, z_1, z_2, z_3 = mma_bf16({AL}, zb0, zb1, z_0, z_1, z_2, z_3)")
    del L4
    e(I + "# --- 4. epilogue: den of rows g, g + 8 = Σ over the Z tile's columns (t = 0..3)")
    e(I + "d0 = z_0 + z_1")
    e(I + "d1 = z_2 + z_3")
    e(I + "d0 += shfl_xor(d0, 1)")
    e(I + "d1 += shfl_xor(d1, 1)")
    e(I + "d0 += shfl_xor(d0, 2)")
    e(I + "d1 += shfl_xor(d1, 2)")
    e(I + "inv0 = ONE / (d0 + eps)")
    e(I + "inv1 = ONE / (d1 + eps)")
    e(I + "ra = warp * 16 + (lane >> 2)")
    e(I + f"oa = ob + ra * {D} + (lane & 3) * 2")
    e(I + "if ra < nrows:")
    for n in range(NN):
        for x in range(2):
            e(J + f"o_l[u64(oa{_plus(8 * n + x)})] = acc_{n}_{x} * inv0")
    e(I + "if ra + 8 < nrows:")
    for n in range(NN):
        for x in range(2):
            e(J + f"o_l[u64(oa + {8 * D + 8 * n + x})] = acc_{n}_{2 + x} * inv1")
    return "\n".join(L_) + "\n"


_kernels = {}


def get_linear_kernel(kind, D, BQ, hk=None):
    """The generated module (kernel ``linear_tc``, SMEM_BYTES, THREADS, MMA_PER_KSTEP)."""
    HK = chunk_rows(D, hk)
    key = (kind, int(D), int(BQ), HK)
    mod = _kernels.get(key)
    if mod is None:
        mod = _kernels[key] = _tc_build.load_generated(
            "linear_%s_%d_%d_%d" % (kind, D, BQ, HK), linear_source(kind, D, BQ, HK))
    return mod


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def _flat(x):
    return x if x.ndim == 1 else x.reshape(int(np.prod(x.shape)))


def _size(x):
    return int(np.prod(x.shape))


def _dtype(x):
    return str(x.dtype).replace("torch.", "")


def launch_linear_forward_tc(kind, q_bits, lstate, n_marg, o_l, B, H, Nq, D, block_q, fm,
                             eps, stream, hk=None):
    """``o_l`` = the linear branch's output for all rows < Nq, on ``stream``.

    kind 'bf16' / 'f16' (the type of q's bits); q_bits int16 (B, H, Nq, D); lstate fp32
    (B, H, Mq, D*D + D); n_marg int32 (B, H, Mq); o_l fp32 (B, H, Nq, D); any of them
    may be given as flat views (Mq is taken from lstate's size, Mq >= ceil(Nq/block_q)).
    Numba device arrays or torch / CuPy CUDA tensors (numpy under the simulator).
    fm: 0 softmax, 1 elu + 1, 2 relu. ``hk``: rows of H_i staged at a time (tests).
    """
    B, H, Nq, D, block_q, fm = (int(x) for x in (B, H, Nq, D, block_q, fm))
    if kind not in KINDS:
        raise ValueError(f"launch_linear_forward_tc: kind {kind!r}")
    if not linear_tc_supported(D, block_q):
        raise ValueError(f"launch_linear_forward_tc: D = {D}, block_q = {block_q} not supported")
    if fm not in (0, 1, 2):
        raise ValueError(f"launch_linear_forward_tc: feature map code {fm}")
    if _dtype(lstate) != "float32" or _dtype(o_l) != "float32":
        raise TypeError("launch_linear_forward_tc: lstate and o_l must be float32")
    if _dtype(n_marg) != "int32":
        raise TypeError("launch_linear_forward_tc: n_marg must be int32")
    nblk = -(-Nq // block_q)
    if nblk <= 0 or B * H == 0:
        return
    W = D * D + D
    if _size(lstate) % (B * H * W):
        raise ValueError("launch_linear_forward_tc: lstate size is not B*H*Mq*(D*D + D)")
    Mq = _size(lstate) // (B * H * W)
    if Mq < nblk:
        raise ValueError(f"launch_linear_forward_tc: lstate has {Mq} blocks, {nblk} needed")
    if _size(n_marg) < B * H * Mq:
        raise ValueError("launch_linear_forward_tc: n_marg smaller than B*H*Mq")
    if _size(q_bits) < B * H * Nq * D or _size(o_l) < B * H * Nq * D:
        raise ValueError("launch_linear_forward_tc: q / o_l smaller than B*H*Nq*D")
    if H > 65535 or B > 65535:
        raise ValueError("launch_linear_forward_tc: H or B too large for the grid")
    mod = get_linear_kernel(kind, D, block_q, hk)
    _tc_build.launch(mod.linear_tc, (nblk, H, B), mod.THREADS, mod.SMEM_BYTES, stream,
                     (_flat(q_bits), _flat(lstate), _flat(n_marg), _flat(o_l), H, Nq, Mq, fm,
                      np.float32(eps)))
