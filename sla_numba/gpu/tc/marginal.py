"""The linear branch's marginal sums ``out = M · S`` on tensor cores (bf16 ``mma.sync``).

Same operation and interface as ``_marginal.launch_marginal_sum`` (read its module
doc first)::

    out[b, h, r, :] = Σ_c  M[r, c] · S[b, h, c, :]      r < n_out, c < n_in
    M[r, c] = (bmap[b, h, r, c] == 0)                    transposed = False (row sums)
    M[r, c] = (bmap[b, h, c, r] == 0)                    transposed = True  (column sums)

bmap int8 (B, H, Mq, Mk); S = states fp32 (B, H, >= n_in, W); out fp32
(B, H, >= n_out, W). Every ``out[b, h, r, w]`` with r < n_out, w < W is written
(a row without marginal blocks gets exactly 0); nothing else is touched.

Precision: two bf16 products per tile
--------------------------------------
``mma.sync.m16n8k16`` multiplies bf16 operands and accumulates in fp32. M is 0 or 1,
exact in bf16 (1.0 = 0x3F80). S is fp32 (24-bit significand): each value is split as

    hi = bf16(s)            lo = bf16(s - hi)            (round to nearest, both)

bf16 keeps 8 significant bits, so ``|s - hi| <= 2^-8 |s|`` (exact in fp32) and
``|s - hi - lo| <= 2^-8 |s - hi| <= 2^-16 |s|``: ``M·hi + M·lo`` (two mma per tile into
the same fp32 accumulator) carries ~16 significant bits per term. Bound per output:
``|out - M·S| <= (2^-16 + 2·ceil(n_in/16)·2^-23) · (M·|S|)``; measured ~6e-6 · (M·|S|)
(tests/gpu/test_marginal_tc.py; the brief asked for <= 1e-4 against fp32).

Where the split happens: while staging. Each k-step, the threads load a 16 x WT fp32
tile of S from global memory into registers, split every value pair into a hi pair
and a lo pair (``pack_bf16x2``, and ``bf16_low_f32`` / ``bf16_high_f32`` to subtract)
and store both as bf16 tiles in shared memory. A pre-pass kernel writing hi / lo
copies of S would add a launch and a workspace (the interface has none) and move
S through global memory once more (406 MB at the Wan2.1 shape), to save a few ALU
ops per value that run while the loads of the next k-step are in flight.

Work decomposition (``TILES`` = (WR, WC, MT, NP))
------------------------------------------------
One CTA computes RT x WT outputs, RT = WR·16·MT rows (r), WT = WC·16·NP columns (w),
with WR x WC warps; each warp owns a 16·MT x 16·NP block = MT m16 tiles x 2·NP n8
tiles, ``4·MT·2·NP`` fp32 accumulators per lane. The GPU default (2, 2, 2, 4):
4 warps as 2 x 2, CTA 64 x 128, warp 32 x 64, 64 accumulators per lane. (One warp per
16 rows x 128 columns would hold as many accumulators but use every S fragment for
one m-tile only: twice the ldmatrix traffic per mma.)

Grid: (ceil(n_out / RT), ceil(W / WT), B*H). Row tiles vary fastest, so the CTAs
that read the same column panel of S run at about the same time and S comes from
DRAM about once (L2 serves the other row tiles).

Shared memory, two stages of ``[S hi: 16 x (WT+8)][S lo: 16 x (WT+8)][M: RT x 24]``
bf16, all row-major with 8 bf16 of padding per row (ldmatrix then reads 8 rows in
8 different bank groups): 23.5 KiB for the GPU tiles.

Per k-step (16 values of c):

1. store: the S values and map bytes prefetched into registers (step 2 of the
   previous iteration) go to stage ``it & 1``: S split into hi / lo as above, M as
   bf16 pairs (0x3F80 where ``bmap == 0``, else 0);
2. ``syncthreads``, then prefetch the next k-step's S values and map bytes into
   registers: global loads in flight during the mma below;
3. per warp: the A fragments of its m-tiles with ``ldmatrix.x4`` from the M tile
   (a0 = M[g, 2t:2t+2], a1 = M[g+8, ..], a2 = M[g, 2t+8:..], a3 = M[g+8, 2t+8:..],
   see ``_mma``); per pair of n8 tiles, ``ldmatrix.x4.trans`` of the hi tile and of
   the lo tile give the B fragments (k = c, n = w) of both; then 4 mma per m-tile.

Two stages and one barrier per step: a warp writing stage s in step i + 1 has passed
the barrier of step i, which every warp reaches only after its mma of step i - 1
(the last reader of stage s). Loads past n_in / n_out / W are masked: S rows c >= n_in
are zeros in shared memory (so even NaN there never reaches an accumulator), map
entries outside the n_out x n_in window count as not marginal.

Why M goes through shared memory: building the A fragments in registers straight from
the int8 map (each lane loading its own 8 bytes per m-tile) needs 16 map bytes per
lane per k-step, held across the mma block: 184 registers (2 CTAs per SM) against
168 (3 CTAs per SM) for this version, where a CTA loads its RT x 16 map bytes once
(8 per thread) and each warp gets its fragments with one ldmatrix per m-tile.

Determinism: no atomics; every output is one lane's fixed sequence of mma.

Code generation
---------------
The accumulators must stay in registers. As in ``forward_tc``, the tile loops are
written out as straight-line code (``acc_<mt>_<n>_<e>`` scalars) by
``marginal_source``, imported through ``_tc_build.load_generated``; the k-loop stays
a loop. Under the CUDA simulator the ``_mma`` twins run it (slowly: keep shapes and
tiles tiny there, ``SIM_TILES``).
"""
import hashlib
from collections import namedtuple

import numpy as np

from ... import config
from . import build as _tc_build
from .ptx import SIMULATED

Tiles = namedtuple("Tiles", "WR WC MT NP")

#: GPU default: 4 warps (2 x 2), CTA 64 rows x 128 columns, warp 32 x 64.
GPU_TILES = Tiles(2, 2, 2, 4)
#: Simulator default: 1 warp, CTA 16 x 16 (each warp-wide op costs ~10-50 ms there).
SIM_TILES = Tiles(1, 1, 1, 1)
TILES = SIM_TILES if SIMULATED else GPU_TILES

KSTEP = 16          # c values per k-step (the mma's k)
PAD = 8             # bf16 pad per shared-memory row

with open(__file__, "rb") as _f:
    _SOURCE_HASH = hashlib.sha1(_f.read()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------

def _device_ok(device=None):
    """A CUDA device of compute capability >= 8.0 (always True under the simulator)."""
    if SIMULATED:
        return True
    try:
        from numba import cuda
        if not cuda.is_available():
            return False
        dev = cuda.get_current_device() if device is None else cuda.gpus[int(device)]
        return tuple(dev.compute_capability) >= (8, 0)
    except Exception:  # noqa: BLE001 - no driver / no such device: no tensor cores
        return False


def tc_marginal_unsupported_reason(states_dtype, device=None):
    """None when ``launch_marginal_sum_tc`` takes states of ``states_dtype``, else why not.

    Only fp32 states (the float64 path stays on the SIMT kernel: a bf16 split would not
    keep float64 precision), on compute capability >= 8.0 (``device``: None for the
    current device, or its index).
    """
    if np.dtype(states_dtype) != np.float32:
        return (f"states dtype {np.dtype(states_dtype).name} "
                "(tensor-core marginal sum: float32 only)")
    if not _device_ok(device):
        return "no CUDA device of compute capability >= 8.0"
    return None


def tc_marginal_supported(states_dtype, device=None):
    """True when the tensor-core marginal sum handles these states (see the reason above)."""
    return tc_marginal_unsupported_reason(states_dtype, device) is None


# ---------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------

def geometry(tiles):
    """Derived sizes of a tile configuration (a dict; all in elements unless *_BYTES)."""
    WR, WC, MT, NP = tiles
    RT, WT = WR * 16 * MT, WC * 16 * NP          # CTA tile: rows x columns
    NT = 32 * WR * WC                            # threads
    SW = WT + PAD                                # S tile row stride (bf16)
    MW = KSTEP + PAD                             # M tile row stride (bf16)
    HP = WT // 2                                 # S column pairs per row
    NW, RG = NT // 32, RT // 8                   # warps; 8-row groups of the M tile
    NMP = 2 * RG // NW                           # M staging passes (8 x 8 units per warp)
    if NT % HP or KSTEP % (NT // HP) or (2 * RG) % NW or (RG % NMP and NMP % RG):
        raise ValueError(f"tiles {tuple(tiles)}: the staging needs threads % (WT/2) == 0, "
                         f"16 % (threads / (WT/2)) == 0, (RT/4) % warps == 0 and one of "
                         f"RT/8, (RT/4)/warps dividing the other")
    RPP = NT // HP                               # S rows staged per pass
    TILE = KSTEP * SW                            # one S tile (hi or lo)
    STAGE = 2 * TILE + RT * MW                   # hi, lo, M
    return dict(RT=RT, WT=WT, NT=NT, SW=SW, MW=MW, HP=HP, RPP=RPP, NPASS=KSTEP // RPP,
                NMP=NMP, RG=RG, TILE=TILE, STAGE=STAGE, SMEM_BYTES=2 * STAGE * 2)


def _plus(k):
    """'' or ' + k': offsets in generated expressions."""
    return f" + {k}" if k else ""


def _m_units(tiles):
    """(i, j) per M staging pass: rows mr + 8i, columns mc + 8j of this warp's 8 x 8 unit."""
    G = geometry(tiles)
    RG = G["RG"]
    return [(p % RG, p // RG) for p in range(G["NMP"])]


def _prefetch_lines(ind, tiles, c0):
    """Lines loading k-step ``c0``'s S values (x_<p>_<0|1>) and map bytes (y_<p>_<0|1>)."""
    G = geometry(tiles)
    L = [f"{ind}cn = {c0}",
         f"{ind}# S rows cn + srow + RPP*p, columns sw, sw + 1 (zero past n_in / W)",
         f"{ind}gs = s_lane + cn * W"]
    for p in range(G["NPASS"]):
        row = f"srow + {p * G['RPP']}" if p else "srow"
        L.append(f"{ind}ok = cn + {row} < n_in")
        L.append(f"{ind}x_{p}_0 = states[u64(gs)] if ok and sok0 else ZERO")
        L.append(f"{ind}x_{p}_1 = states[u64(gs + 1)] if ok and sok1 else ZERO")
        if p + 1 < G["NPASS"]:
            L.append(f"{ind}gs += rpp_w")
    L.append(f"{ind}# map bytes of M[mr + 8i, mc + 8j], M[.., mc + 8j + 1] (not marginal outside")
    L.append(f"{ind}# the n_out x n_in window)")
    L.append(f"{ind}gm = mo + cn * cs")
    for dc in sorted({j for _, j in _m_units(tiles)}):
        L.append(f"{ind}cv{dc}_0 = cn + mc{_plus(8 * dc)} < n_in")
        L.append(f"{ind}cv{dc}_1 = cn + mc{_plus(8 * dc + 1)} < n_in")
    for p, (i, j) in enumerate(_m_units(tiles)):
        off = "gm" + (f" + {i} * rs8" if i > 1 else " + rs8" if i else "") \
            + (" + cs8" if j else "")
        L.append(f"{ind}y_{p}_0 = bmap[u64({off})] if mv{i} and cv{j}_0 else NOT_MARGINAL")
        L.append(f"{ind}y_{p}_1 = bmap[u64({off} + cs)] if mv{i} and cv{j}_1 else NOT_MARGINAL")
    return L


def marginal_source(tiles=GPU_TILES):
    """Source text of the generated module (kernel ``marginal_sum_tc``, SMEM_BYTES, THREADS)."""
    tiles = Tiles(*tiles)
    WR, WC, MT, NP = tiles
    G = geometry(tiles)
    RT, WT, NT, SW, MW, HP, RPP = (G[k] for k in ("RT", "WT", "NT", "SW", "MW", "HP", "RPP"))
    TILE, STAGE = G["TILE"], G["STAGE"]
    MOFF = 2 * TILE                              # M tile offset in a stage (bf16)
    L = []
    e = L.append
    e('"""Generated by sla_numba.gpu.tc.marginal.marginal_source(%r)' % (tuple(tiles),))
    e('(generator %s). Do not edit: see marginal_tc for the algorithm and names."""'
      % _SOURCE_HASH)
    e("import numpy as np")
    e("from numba import cuda, int16, int32, uint64")
    e("from sla_numba.gpu.tc.ptx import mma_bf16, pack_bf16x2, ldsm_x4, ldsm_x4_trans, smem_addr")
    e("from sla_numba.gpu.tc.ptx import bf16_low_f32, bf16_high_f32")
    e("ZERO = np.float32(0.0)")
    e("BF16_ONE_LO = np.int32(0x3F80)          # bf16 1.0 in the low half of a pair")
    e("BF16_ONE_HI = np.int32(0x3F800000)      # ... in the high half")
    e("ZI = np.int32(0)")
    e("NOT_MARGINAL = np.int8(1)")
    e("u64 = uint64")
    e(f"SMEM_BYTES = {G['SMEM_BYTES']}")
    e(f"THREADS = {NT}")
    e("")
    e("")
    if SIMULATED or not config.disk_cache():
        e("@cuda.jit")
    else:
        e("@cuda.jit(cache=True)")
    e("def marginal_sum_tc(bmap, m_size, rs, cs, n_out, n_in, states, s_rows, out, o_rows, W):")
    I = "    "
    e(I + '"""out[bh, r, w] = sum_c M[r, c] states[bh, c, w] for r < n_out, c < n_in, w < W,')
    e(I + "M[r, c] = (bmap[bh*m_size + r*rs + c*cs] == 0). Flat arrays: bmap int8,")
    e(I + "states fp32 (B*H, s_rows, W), out fp32 (B*H, o_rows, W).\"\"\"")
    e(I + "# two views of the dynamic shared memory (they alias): bf16 bits for ldmatrix,")
    e(I + "# int32 to store packed pairs. 2 stages of")
    e(I + f"# [S hi: 16 x {SW}][S lo: 16 x {SW}][M: {RT} x {MW}] (bf16, row-major)")
    if SIMULATED:
        e(I + "smem = cuda.shared.array(0, int16)")
        e(I + "smem32 = cuda.shared.array(0, int32)")
    else:
        e(I + "smem = cuda.shared.array(0, int16, alignment=16)")
        e(I + "smem32 = cuda.shared.array(0, int32, alignment=16)")
    e(I + "tid = cuda.threadIdx.x")
    e(I + "lane = tid & 31")
    e(I + "warp = tid >> 5")
    e(I + f"wr = warp // {WC}")
    e(I + f"wc = warp - wr * {WC}")
    e(I + "r0 = cuda.blockIdx.x * %d" % RT)
    e(I + "w0 = cuda.blockIdx.y * %d" % WT)
    e(I + "bh = cuda.blockIdx.z")
    e(I + "# --- S staging role: column pair (sw, sw + 1), rows srow + RPP*p of each k-step")
    e(I + f"srow = tid // {HP}")
    e(I + f"sc = (tid - srow * {HP}) * 2")
    e(I + "sw = w0 + sc")
    e(I + "sok0 = sw < W")
    e(I + "sok1 = sw + 1 < W")
    e(I + "s_lane = (bh * s_rows + srow) * W + sw      # global offset of (c = srow, sw); int64")
    e(I + f"rpp_w = {RPP} * W")
    e(I + f"st_lane = (srow * {SW} + sc) >> 1          # int32 index in the hi tile")
    e(I + "# --- M staging role: the RT x 16 tile is (RT/8) x 2 units of 8 rows x 8 columns;")
    e(I + f"# warp w stages units w*{G['NMP']} .. (row group first). In a unit, lane (i, j) =")
    e(I + "# (lane & 7, lane >> 3) takes the pair M[i, 2j], M[i, 2j + 1]: 8 consecutive bytes")
    e(I + "# of a bmap row either way (row or column sums), 32 int32 stores in 32 banks.")
    e(I + f"u = warp * {G['NMP']}")
    e(I + f"mr = (u % {G['RG']}) * 8 + (lane & 7)")
    e(I + f"mc = (u // {G['RG']}) * 8 + (lane >> 3) * 2")
    for i in sorted({i for i, _ in _m_units(tiles)}):
        e(I + f"mv{i} = r0 + mr{_plus(8 * i)} < n_out")
    e(I + "mo = bh * m_size + (r0 + mr) * rs + mc * cs      # bmap offset of M[mr, mc] at c = 0")
    e(I + "rs8 = 8 * rs")
    e(I + "cs8 = 8 * cs")
    e(I + f"ms = (mr * {MW} + mc + {MOFF}) >> 1                # int32 index in the M tile")
    e(I + "# --- fragment roles (see _mma): ldmatrix.x4 row addresses of this lane. Matrix")
    e(I + "# i = lane >> 3 covers rows 8*(i & 1).. and columns 8*(i >> 1).. of a 16 x 16 block:")
    e(I + "# A (M, [r][c], non-transposed load) and B (S, [c][w], transposed load).")
    e(I + "fr = (lane & 7) + ((lane >> 3) & 1) * 8")
    e(I + "fc = (lane >> 4) * 8")
    e(I + "sa = smem_addr(smem)")
    e(I + f"la = sa + ({MOFF} + (wr * {16 * MT} + fr) * {MW} + fc) * 2")
    e(I + f"lb = sa + (fr * {SW} + wc * {16 * NP} + fc) * 2")
    e(I + "# --- accumulators: acc_<mt>_<n>_<e> = D fragment element e of m-tile mt, n8 tile n")
    for mt in range(MT):
        for n in range(2 * NP):
            e(I + " = ".join(f"acc_{mt}_{n}_{x}" for x in range(4)) + " = ZERO")
    e(I + "nk = (n_in + 15) // 16")
    e(I + "# prefetch k-step 0")
    L.extend(_prefetch_lines(I, tiles, "0"))
    e(I + "for it in range(nk):")
    J = I * 2
    e(J + "# 1. store the prefetched k-step into stage it & 1: S split into bf16 hi / lo,")
    e(J + "#    M as bf16 1.0 where marginal, else 0")
    e(J + f"st = (it & 1) * {STAGE // 2}")
    for p in range(G["NPASS"]):
        off = p * RPP * SW // 2
        e(J + f"hi = pack_bf16x2(x_{p}_0, x_{p}_1)")
        e(J + f"smem32[st + st_lane{_plus(off)}] = hi")
        e(J + f"smem32[st + st_lane + {off + TILE // 2}] = "
          f"pack_bf16x2(x_{p}_0 - bf16_low_f32(hi), x_{p}_1 - bf16_high_f32(hi))")
    for p, (i, j) in enumerate(_m_units(tiles)):
        off = (8 * i * MW + 8 * j) // 2
        e(J + f"smem32[st + ms{_plus(off)}] = int32((BF16_ONE_LO if y_{p}_0 == 0 else ZI) | "
          f"(BF16_ONE_HI if y_{p}_1 == 0 else ZI))")
    e(J + "cuda.syncthreads()")
    e(J + "# 2. prefetch the next k-step (masked: nothing is read past n_in)")
    L.extend(_prefetch_lines(J, tiles, "it * 16 + 16"))
    e(J + "# 3. tensor cores: A fragments of the warp's m-tiles; per n16 pair, B fragments")
    e(J + "#    of hi and lo (two n8 tiles each), then 4 mma per m-tile")
    e(J + f"sb = (it & 1) * {STAGE * 2}")
    for mt in range(MT):
        e(J + f"a_{mt}_0, a_{mt}_1, a_{mt}_2, a_{mt}_3 = "
          f"ldsm_x4(smem, la + sb, {mt * 16 * MW * 2})")
    for j in range(NP):
        e(J + f"h0, h1, h2, h3 = ldsm_x4_trans(smem, lb + sb, {16 * j * 2})")
        e(J + f"l0, l1, l2, l3 = ldsm_x4_trans(smem, lb + sb, {(TILE + 16 * j) * 2})")
        for mt in range(MT):
            A = ", ".join(f"a_{mt}_{k}" for k in range(4))
            for n, b0, b1 in ((2 * j, "h0", "h1"), (2 * j + 1, "h2", "h3"),
                              (2 * j, "l0", "l1"), (2 * j + 1, "l2", "l3")):
                acc = ", ".join(f"acc_{mt}_{n}_{x}" for x in range(4))
                e(J + f"{acc} = mma_bf16({A}, {b0}, {b1}, {acc})")
    e(I + "# epilogue: lane (g, t) holds rows g, g + 8 x columns 8n + 2t, 8n + 2t + 1")
    e(I + "g = lane >> 2")
    e(I + "t2 = (lane & 3) * 2")
    e(I + f"wl = W - (w0 + wc * {16 * NP} + t2)          # columns left from this lane's first")
    for mt in range(MT):
        for h in range(2):
            e(I + f"r = r0 + wr * {16 * MT}{_plus(16 * mt + 8 * h)} + g")
            e(I + "if r < n_out:")
            e(I + f"    ob = (bh * o_rows + r) * W + w0 + wc * {16 * NP} + t2")
            for n in range(2 * NP):
                for x in range(2):
                    e(I + f"    if {8 * n + x} < wl:")
                    e(I + f"        out[u64(ob{_plus(8 * n + x)})] = acc_{mt}_{n}_{2 * h + x}")
    return "\n".join(L) + "\n"


_kernels = {}


def get_marginal_kernel(tiles=TILES):
    """The generated module for ``tiles`` (kernel ``marginal_sum_tc``, SMEM_BYTES, THREADS)."""
    tiles = Tiles(*tiles)
    mod = _kernels.get(tiles)
    if mod is None:
        stem = "marginal_%d_%d_%d_%d" % tuple(tiles)
        mod = _kernels[tiles] = _tc_build.load_generated(stem, marginal_source(tiles))
    return mod


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def _flat(x):
    """A flat (1-D) view of a C-contiguous array (numba device array, or numpy under the
    simulator); writes through it reach ``x``."""
    return x.reshape(int(np.prod(x.shape)))


def launch_marginal_sum_tc(stream, bmap, transposed, n_out, n_in, states, out, tiles=TILES):
    """``out[b, h, :n_out] = M · states[b, h, :n_in]`` on tensor cores, on ``stream``.

    bmap int8 (B, H, Mq, Mk); states fp32 (B, H, >= n_in, W); out fp32
    (B, H, >= n_out, W); C-contiguous device arrays (numpy arrays under the
    simulator). ``transposed`` False: ``M[r, c] = bmap[b, h, r, c] == 0`` (n_out <= Mq,
    n_in <= Mk); True: ``M[r, c] = bmap[b, h, c, r] == 0`` (n_out <= Mk, n_in <= Mq).
    Same semantics as ``_marginal.launch_marginal_sum``; fp32 states only
    (:func:`tc_marginal_supported`), compute capability >= 8.0.
    """
    if np.dtype(states.dtype) != np.float32 or np.dtype(out.dtype) != np.float32:
        raise TypeError("launch_marginal_sum_tc: states and out must be float32")
    B, H, Mq, Mk = (int(s) for s in bmap.shape)
    s_rows, W = int(states.shape[2]), int(states.shape[3])
    o_rows = int(out.shape[2])
    n_out, n_in = int(n_out), int(n_in)
    if n_in > s_rows or n_out > o_rows or n_in > (Mq if transposed else Mk) \
            or n_out > (Mk if transposed else Mq):
        raise ValueError("launch_marginal_sum_tc: n_out / n_in exceed the arrays")
    if n_out <= 0 or W <= 0 or B * H <= 0:
        return
    mod = get_marginal_kernel(tiles)
    G = geometry(Tiles(*tiles))
    grid = (-(-n_out // G["RT"]), -(-W // G["WT"]), B * H)
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError("launch_marginal_sum_tc: W or B*H too large for the grid")
    rs, cs = (1, Mk) if transposed else (Mk, 1)
    args = (_flat(bmap), Mq * Mk, rs, cs, n_out, n_in, _flat(states), s_rows,
            _flat(out), o_rows, W)
    _tc_build.launch(mod.marginal_sum_tc, grid, mod.THREADS, mod.SMEM_BYTES, stream, args)
