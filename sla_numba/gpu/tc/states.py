"""The linear branch's per-key-block states on tensor cores (fp16 / bf16, cc >= 8.0).

Same result and layout as the SIMT prep kernel's states (``_prep.make_state_fn``)::

    h_j[d1, e] = Σ_r φ(k_r)[d1] · v_r[e]          (D x D)
    z_j[d1]    = Σ_r φ(k_r)[d1]                    (D)
    r in [j*BK, min((j+1)*BK, Nk))                 (rows past Nk contribute nothing)

    state[b, h, j, :D*D]        = h_j (row-major)
    state[b, h, j, D*D:D*D + D] = z_j             W = D*D + D (DP = D: D % 16 == 0)

Inputs: k, v (B, H, Nk, D) as raw int16 bits of bf16 or fp16 (contiguous, flat views
are taken); state fp32 (B, H, Mk, W), Mk >= ceil(Nk / BK), C-contiguous (or flat).
Every ``state[b, h, j, w]`` with j < ceil(Nk / BK), w < W is written; nothing else.
φ = feature map ``fm``: 0 softmax over the head dim of each row, 1 elu + 1, 2 relu
(the definitions of ``_tiles.make_common.phi_value`` / ``row_stats``).

Algorithm (one CTA per (j, h, b), grid (ceil(Nk/BK), H, B))
-----------------------------------------------------------
1. φ rows. The CTA's threads are (row slot, lane) pairs: L = NT/BK lanes per key row
   (a power of two <= 8, adjacent lanes of one warp), each lane owning C = D/L
   consecutive columns. A lane loads its C values of k_r (fp32), and for softmax
   the row max and Σ exp are reduced over the L lanes with ``shfl_xor`` (all lanes
   execute the shuffles; invalid rows are masked only when stored). φ (fp32) is split

       hi = half(φ)     lo = half(φ - hi)           (round to nearest; half = the
                                                    input's type, bf16 or fp16)

   and both are stored as packed pairs in shared memory, row-major [r][d1]. Rows
   r >= nrows (tail block) store zeros. ``split=False`` keeps hi only (one mma per
   tile, ~2^-9 relative error with bf16).
2. V rows are copied (bits, packed pairs, coalesced) into a third tile [r][e];
   tail rows are zeros. One ``syncthreads``.
3. Tensor cores, ``mma.sync.m16n8k16`` (fp32 accumulation) per 16 key rows:
   A = φᵀ (m = d1, k = r) with ``ldmatrix.x4.trans`` from the [r][d1] tile (matrix i
   of a 16 x 16 block: rows r 8(i >> 1).., columns d1 8(i & 1)..), B = V (k = r,
   n = e) with ``ldmatrix.x4.trans`` from the [r][e] tile (rows 8(i & 1).., columns
   8(i >> 1)..: two n8 tiles). Per tile: acc += A_hi·B + A_lo·B. V is exact in its
   own type, so the only rounding is φ's split (2^-16 bf16 / 2^-22 fp16 relative)
   and the fp32 accumulation.
   z_j = φᵀ·1: the warps of column 0 do one more n8 tile per m-tile with B = ones
   (constant registers, no shared memory), hi and lo, so z sums exactly the values
   that h sums.
   Warps form a WR x WC grid over the D x D output: warp (wr, wc) owns MT = D/16/WR
   m-tiles (d1) x NP = D/16/WC pairs of n8 tiles (e): 8·MT·NP fp32 accumulators per
   lane, written out as scalars (``_tc_build``: straight-line generated code). GPU
   default: at most 64 accumulators with >= 4 warps if possible (D = 128: 8 warps
   as 4 x 2; D = 64: 4 warps as 2 x 2). The BK/16 k-steps are written out, each
   skipped when it starts past the valid rows.
4. Epilogue: lane (g, t) stores rows g, g + 8 x columns 2t, 2t + 1 of each tile
   straight to global memory (pairs of consecutive floats); lanes t == 0 of the
   column-0 warps store z.

Shared memory: [φ hi: BK x (D+8)][φ lo: BK x (D+8)][V: BK x (D+8)] 16-bit, 8 values
of padding per row (the 8 rows of an ldmatrix land in 8 different bank groups):
52 KiB at D = 128, BK = 64 (``_tc_build.launch`` opts in above 48 KiB).

Determinism: no atomics; every output is one lane's fixed sequence of mma.
Under the CUDA simulator the ``_mma`` twins run the same generated code (slowly: use
1-warp tiles and tiny shapes there, ``SIM_MAX_WARPS``).
"""
import hashlib
from collections import namedtuple

import numpy as np

from . import build as _tc_build
from .ptx import SIMULATED

Tiles = namedtuple("Tiles", "WR WC")

GPU_MAX_WARPS = 8
SIM_MAX_WARPS = 1
PAD = 8
KINDS = ("bf16", "f16")
BLOCKS = (16, 32, 64)

with open(__file__, "rb") as _f:
    _SOURCE_HASH = hashlib.sha1(_f.read()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Supported shapes, tiles
# ---------------------------------------------------------------------------

def states_tc_supported(D, block_k):
    """D a multiple of 16 up to 128, block_k in {16, 32, 64}."""
    D, block_k = int(D), int(block_k)
    return 16 <= D <= 128 and D % 16 == 0 and block_k in BLOCKS


def choose_tiles(D, max_warps=None):
    """Warp grid (WR, WC) for head dim D: at most 64 accumulators a lane with at least
    4 warps when possible (fewest warps next, then fewest ldmatrix per k-step)."""
    if max_warps is None:
        max_warps = SIM_MAX_WARPS if SIMULATED else GPU_MAX_WARPS
    m = D // 16
    best = None
    for wr in range(1, m + 1):
        for wc in range(1, m + 1):
            if m % wr or m % wc or wr * wc > max_warps:
                continue
            MT, NP = m // wr, m // wc
            acc = 8 * MT * NP
            key = (max(acc, 64), -min(wr * wc, 4), wr * wc, 2 * MT + NP)
            if best is None or key < best[0]:
                best = (key, Tiles(wr, wc))
    return best[1]


def geometry(D, BK, tiles):
    WR, WC = tiles
    m = D // 16
    if m % WR or m % WC:
        raise ValueError(f"tiles {tuple(tiles)} do not divide D/16 = {m}")
    NT = 32 * WR * WC
    L = 1
    while L * 2 <= min(NT // BK, 8):
        L *= 2
    RP = NT // L                       # rows per pass of the φ phase
    SW = D + PAD                       # tile row stride (16-bit values)
    TILE = BK * SW
    return dict(NT=NT, MT=m // WR, NP=m // WC, L=L, C=D // L, RP=RP,
                NPASS=-(-BK // RP), SW=SW, TILE=TILE)


# ---------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------

def _plus(k):
    return f" + {k}" if k else ""


def states_source(kind, D, BK, tiles, split=True):
    """Source text of the generated module (kernel ``states_tc``, SMEM_BYTES, THREADS,
    MMA_PER_KSTEP)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not states_tc_supported(D, BK):
        raise ValueError(f"D = {D}, block_k = {BK}: not supported")
    tiles = Tiles(*tiles)
    WR, WC = tiles
    G = geometry(D, BK, tiles)
    NT, MT, NP, L, C, RP, SW, TILE = (G[k] for k in
                                      ("NT", "MT", "NP", "L", "C", "RP", "SW", "TILE"))
    NTILES = 3 if split else 2
    VOFF = (NTILES - 1) * TILE                    # V tile offset (16-bit values)
    LOFF = TILE                                   # φ lo tile offset
    ONES = "0x3F803F80" if kind == "bf16" else "0x3C003C00"
    L_ = []
    e = L_.append
    e('"""Generated by sla_numba.gpu.tc.states.states_source(%r, %d, %d, %r, split=%r)'
      % (kind, D, BK, tuple(tiles), split))
    e('(generator %s). Do not edit: see states_tc for the algorithm and names."""'
      % _SOURCE_HASH)
    e("import math")
    e("import numpy as np")
    e("from numba import cuda, int16, int32, uint64")
    e(f"from sla_numba.gpu.tc.ptx import mma_{kind}, pack_{kind}x2 as pack, "
      "ldsm_x4_trans, smem_addr, shfl_xor, fmax")
    if kind == "bf16":
        e("from sla_numba.gpu.tc.ptx import bf16_low_f32 as low_f32, "
          "bf16_high_f32 as high_f32")
    else:
        e("from sla_numba.gpu.tc.ptx import f16_low_f32 as low_f32, "
          "f16_high_f32 as high_f32")
    e("ZERO = np.float32(0.0)")
    e("ONE = np.float32(1.0)")
    e("ZI = np.int32(0)")
    e(f"ONES = np.int32({ONES})            # a pair of 1.0 in the input's type")
    e("u64 = uint64")
    e(f"SMEM_BYTES = {NTILES * TILE * 2}")
    e(f"THREADS = {NT}")
    e(f"MMA_PER_KSTEP = {(WR * WC * MT * 2 * NP + WR * MT) * (2 if split else 1)}")
    e("")
    e("")
    e(_tc_build.jit_decorator())
    e("def states_tc(k, v, state, H, Nk, Mk, fm):")
    I = "    "
    e(I + '"""state[b, h, j] = [vec(φ(K_j)ᵀ V_j), colsum φ(K_j)]; k, v flat int16 bits')
    e(I + f'(B, H, Nk, {D}), state flat fp32 (B, H, Mk, W). Grid (ceil(Nk/{BK}), H, B)."""')
    e(I + f"# shared: [φ hi][φ lo][V], each {BK} x {SW} 16-bit values, row-major")
    if SIMULATED:
        e(I + "smem = cuda.shared.array(0, int16)")
        e(I + "smem32 = cuda.shared.array(0, int32)")
    else:
        e(I + "smem = cuda.shared.array(0, int16, alignment=16)")
        e(I + "smem32 = cuda.shared.array(0, int32, alignment=16)")
    e(I + "tid = cuda.threadIdx.x")
    e(I + "lane = tid & 31")
    e(I + "warp = tid >> 5")
    e(I + "j = cuda.blockIdx.x")
    e(I + "h = cuda.blockIdx.y")
    e(I + "b = cuda.blockIdx.z")
    e(I + f"r0 = j * {BK}")
    e(I + "nrows = min(Nk - r0, %d)" % BK)
    e(I + f"kb = ((b * H + h) * Nk + r0) * {D}            # first value of the block (int64)")
    e(I + f"# --- 1. φ rows: row slot tid // {L}, lane li owns columns li*{C} .. li*{C} + {C - 1}")
    e(I + f"slot = tid // {L}")
    e(I + f"li = tid - slot * {L}")
    e(I + f"for ps in range({G['NPASS']}):")
    J = I * 2
    e(J + f"r = ps * {RP} + slot")
    e(J + "ok = r < nrows")
    e(J + f"gk = kb + r * {D} + li * {C}")
    for c in range(C):
        e(J + f"x{c} = low_f32(int32(k[u64(gk{_plus(c)})])) if ok else ZERO")
    e(J + "if fm == 0:")
    K = J + I
    e(K + "# softmax over the row: max and Σ exp over this lane's columns, then the")
    e(K + f"# row's {L} lanes (shuffles run in every lane: warp-uniform)")
    e(K + "mx = x0")
    for c in range(1, C):
        e(K + f"mx = fmax(mx, x{c})")
    s = 1
    while s < L:
        e(K + f"mx = fmax(mx, shfl_xor(mx, {s}))")
        s *= 2
    for c in range(C):
        e(K + f"x{c} = math.exp(x{c} - mx)")
    e(K + "sm = " + " + ".join(f"x{c}" for c in range(C)))
    s = 1
    while s < L:
        e(K + f"sm += shfl_xor(sm, {s})")
        s *= 2
    e(K + "inv = ONE / sm")
    for c in range(C):
        e(K + f"x{c} = x{c} * inv")
    e(J + "elif fm == 1:")
    for c in range(C):
        e(K + f"x{c} = x{c} + ONE if x{c} > ZERO else math.exp(x{c})")
    e(J + "else:")
    for c in range(C):
        e(K + f"x{c} = x{c} if x{c} > ZERO else ZERO")
    e(J + f"if r < {BK}:")
    e(K + f"si = (r * {SW} + li * {C}) >> 1          # int32 index of the pair (r, li*C)")
    for c in range(0, C, 2):
        e(K + f"p = pack(x{c}, x{c + 1}) if ok else ZI")
        e(K + f"smem32[si{_plus(c // 2)}] = p")
        if split:
            e(K + f"smem32[si + {(LOFF + c) // 2}] = "
              f"pack(x{c} - low_f32(p), x{c + 1} - high_f32(p)) if ok else ZI")
    e(I + "# --- 2. V rows (bits), pairs of columns, zeros past nrows")
    e(I + f"for q in range(tid, {BK * D // 2}, {NT}):")
    e(J + f"r = q // {D // 2}")
    e(J + f"c = (q - r * {D // 2}) * 2")
    e(J + "p = ZI")
    e(J + "if r < nrows:")
    e(K + f"gv = kb + r * {D} + c")
    e(K + "p = int32((int32(v[u64(gv)]) & 0xFFFF) | (int32(v[u64(gv + 1)]) << 16))")
    e(J + f"smem32[(r * {SW} + c + {VOFF}) >> 1] = p")
    e(I + "cuda.syncthreads()")
    e(I + f"# --- 3. tensor cores: warp (wr, wc) owns d1 in wr*{16 * MT} + [0, {16 * MT}),")
    e(I + f"# e in wc*{16 * NP} + [0, {16 * NP})")
    e(I + f"wr = warp // {WC}")
    e(I + f"wc = warp - wr * {WC}")
    e(I + "sa = smem_addr(smem)")
    e(I + "# A = φᵀ: matrix i = lane >> 3 at rows r 8(i >> 1).., columns d1 8(i & 1)..")
    e(I + f"la = sa + (((lane & 7) + (lane >> 4) * 8) * {SW} + ((lane >> 3) & 1) * 8"
      f" + wr * {16 * MT}) * 2")
    e(I + "# B = V: matrix i at rows r 8(i & 1).., columns e 8(i >> 1)..")
    e(I + f"lb = sa + (((lane & 7) + ((lane >> 3) & 1) * 8) * {SW} + (lane >> 4) * 8"
      f" + wc * {16 * NP} + {VOFF}) * 2")
    for mt in range(MT):
        for n in range(2 * NP):
            e(I + " = ".join(f"acc_{mt}_{n}_{x}" for x in range(4)) + " = ZERO")
        e(I + " = ".join(f"z_{mt}_{x}" for x in range(4)) + " = ZERO")
    e(I + f"# k-steps of 16 rows, written out (each guarded: none past the valid rows)")
    parts = ("h", "l") if split else ("h",)
    for ks in range(BK // 16):
        e(I + f"if nrows > {16 * ks}:")
        ko = ks * 16 * SW * 2
        for mt in range(MT):
            for pt in parts:
                off = (mt * 16 + (LOFF if pt == "l" else 0)) * 2 + ko
                e(J + f"a{pt}_{mt}_0, a{pt}_{mt}_1, a{pt}_{mt}_2, a{pt}_{mt}_3 = "
                  f"ldsm_x4_trans(smem, la, {off})")
        for p in range(NP):
            e(J + f"b0, b1, b2, b3 = ldsm_x4_trans(smem, lb, {p * 16 * 2 + ko})")
            for mt in range(MT):
                for pt in parts:
                    A = ", ".join(f"a{pt}_{mt}_{x}" for x in range(4))
                    for n, B in ((2 * p, "b0, b1"), (2 * p + 1, "b2, b3")):
                        acc = ", ".join(f"acc_{mt}_{n}_{x}" for x in range(4))
                        e(J + f"{acc} = mma_{kind}({A}, {B}, {acc})")
        e(J + "if wc == 0:")
        e(K + "# z = φᵀ · ones")
        for mt in range(MT):
            for pt in parts:
                A = ", ".join(f"a{pt}_{mt}_{x}" for x in range(4))
                zs = ", ".join(f"z_{mt}_{x}" for x in range(4))
                e(K + f"{zs} = mma_{kind}({A}, ONES, ONES, {zs})")
    e(I + "# --- 4. epilogue: lane (g, t) holds d1 = g, g + 8 x e = 2t, 2t + 1 of each tile")
    e(I + "g = lane >> 2")
    e(I + "t2 = (lane & 3) * 2")
    e(I + f"sb = ((b * H + h) * Mk + j) * {D * D + D}      # state row (int64)")
    e(I + f"ob = sb + (wr * {16 * MT} + g) * {D} + wc * {16 * NP} + t2")
    for mt in range(MT):
        for hh in range(2):
            for n in range(2 * NP):
                for x in range(2):
                    off = (16 * mt + 8 * hh) * D + 8 * n + x
                    e(I + f"state[u64(ob{_plus(off)})] = acc_{mt}_{n}_{2 * hh + x}")
    e(I + "if wc == 0 and t2 == 0:")
    e(J + f"zb = sb + {D * D} + wr * {16 * MT} + g")
    for mt in range(MT):
        e(J + f"state[u64(zb{_plus(16 * mt)})] = z_{mt}_0")
        e(J + f"state[u64(zb + {16 * mt + 8})] = z_{mt}_2")
    return "\n".join(L_) + "\n"


_kernels = {}


def get_states_kernel(kind, D, BK, tiles=None, split=True):
    """The generated module (kernel ``states_tc``, SMEM_BYTES, THREADS, MMA_PER_KSTEP)."""
    tiles = choose_tiles(D) if tiles is None else Tiles(*tiles)
    key = (kind, int(D), int(BK), tiles, bool(split))
    mod = _kernels.get(key)
    if mod is None:
        stem = "states_%s_%d_%d_%d_%d_%d" % (kind, D, BK, tiles.WR, tiles.WC, int(split))
        mod = _kernels[key] = _tc_build.load_generated(
            stem, states_source(kind, D, BK, tiles, split))
    return mod


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def _flat(x):
    return x if x.ndim == 1 else x.reshape(int(np.prod(x.shape)))


def launch_states_tc(kind, k_bits, v_bits, state, B, H, Nk, D, block_k, fm, stream,
                     tiles=None, split=True):
    """``state[b, h, j] = [vec(h_j), z_j]`` for j < ceil(Nk / block_k), on ``stream``.

    kind 'bf16' / 'f16'; k_bits, v_bits: int16 bits of (B, H, Nk, D) (any shape, flat
    views are taken); state: fp32 (B, H, Mk, D*D + D) or its flat view of B*H*Mk*W
    elements (Mk >= ceil(Nk / block_k)). Numba device arrays or torch / CuPy CUDA
    tensors (numpy arrays under the simulator).
    fm: 0 softmax, 1 elu + 1, 2 relu. ``tiles`` (WR, WC): None for ``choose_tiles``;
    ``split=False``: φ rounded to one half value (no lo part, half the mma).
    """
    B, H, Nk, D, block_k, fm = (int(x) for x in (B, H, Nk, D, block_k, fm))
    if not states_tc_supported(D, block_k):
        raise ValueError(f"launch_states_tc: D = {D}, block_k = {block_k} not supported")
    if fm not in (0, 1, 2):
        raise ValueError(f"launch_states_tc: feature map code {fm}")
    if str(state.dtype).replace("torch.", "") != "float32":
        raise TypeError("launch_states_tc: state must be float32")
    W = D * D + D
    n_blocks = -(-Nk // block_k)
    if n_blocks <= 0 or B * H == 0:
        return
    size = int(np.prod(state.shape))
    if state.ndim == 4:
        if tuple(int(s) for s in (state.shape[0], state.shape[1], state.shape[3])) != (B, H, W):
            raise ValueError("launch_states_tc: state shape is not (B, H, Mk, D*D + D)")
        Mk = int(state.shape[2])
    else:
        if size % (B * H * W):
            raise ValueError("launch_states_tc: state size is not B*H*Mk*(D*D + D)")
        Mk = size // (B * H * W)
    if Mk < n_blocks:
        raise ValueError(f"launch_states_tc: state has {Mk} blocks, {n_blocks} needed")
    k, v = _flat(k_bits), _flat(v_bits)
    if int(k.shape[0]) < B * H * Nk * D or int(v.shape[0]) < B * H * Nk * D:
        raise ValueError("launch_states_tc: k / v smaller than B*H*Nk*D")
    if H > 65535 or B > 65535:
        raise ValueError("launch_states_tc: H or B too large for the grid")
    mod = get_states_kernel(kind, D, block_k, tiles, split)
    _tc_build.launch(mod.states_tc, (n_blocks, H, B), mod.THREADS, mod.SMEM_BYTES, stream,
                     (k, v, _flat(state), H, Nk, Mk, fm))
