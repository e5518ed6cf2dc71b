"""The key-block states on Hopper wgmma (``gpu/tc/states_wgmma.py``) against the present
default kernel and the cuBLAS floor, on an H100 / H200.

Usage (compute capability 9.0):
    PYTHONPATH=. python tools/sweep_states_wgmma.py [--reps 20] [--fm 0] [--nper 2 4 8 16]
        [--shapes wan b2] [--no-fp32]

Per shape (``wan``: B*H = 12, Nk = 32760, D = 128; ``b2``: B*H = 32, Nk = 8192, D = 64;
bf16 k and v, block_k = 64) and state type (bf16 states, int16 bits: the default
``SLA_NUMBA_STATES=auto`` for bf16 inputs; and fp32 states):

1. the default kernel (``SLA_NUMBA_STATES_KERNEL=auto``: staged for bf16 states,
   registers for fp32) and, for fp32 states, the staged kernel too;
2. the wgmma kernel for each ``--nper`` (key blocks a CTA), and its ``trans_a=False``
   variant ("kA": φ stored transposed, A read K-major; bf16 states) for each
   ``--nper-ka``; the output against the default's: max abs difference, max difference
   relative to max |default|, and for bf16 states the share of equal bits and the
   largest difference in bf16 units;
3. the wgmma kernel's error against float64 (torch, head 0: h relative to Σ|φ||v|, z
   relative to |z|, the bound of tests/gpu/tc/test_tc_states.py; bf16 states add their
   rounding);
4. the cuBLAS floor: ``torch.bmm`` of φ(K_j)ᵀ (B*H*Mk, D, 64) and V_j (B*H*Mk, 64, D),
   bf16 in and out, same run.

Times: median of ``--reps`` calls between CUDA events (``tools/cuda_timing.py``). One
table a shape: ms, effective TB/s (K and V read, states written), useful TFLOP/s (2 ·
B*H·Nk·D·D), ratio default / this and floor / this. A variant that fails is printed
and skipped. Under 150 s on an H200 including the compiles.
"""

import argparse
import time
import traceback

import numpy as np
import torch
from cuda_timing import cuda_time

from sla_numba.gpu._arrays import device_view
from sla_numba.gpu.tc import states as tcs
from sla_numba.gpu.tc import states_wgmma as tcw

SHAPES = {"wan": (12, 32760, 128), "b2": (32, 8192, 64)}
BK = 64


def phi64(k, fm):
    """φ in float64 (torch), the definitions of ``tc/states.py``."""
    if fm == 0:
        return torch.softmax(k, dim=-1)
    if fm == 1:
        return torch.where(k > 0, k + 1, torch.exp(k))
    return torch.relu(k)


def float64_error(state, k, v, Nk, D, fm, out_bf16):
    """(h error relative to Σ|φ||v|, z error relative to |z|) of head 0."""
    Mk = -(-Nk // BK)
    pad = Mk * BK - Nk
    p = phi64(k[0, 0].double(), fm)
    p = torch.nn.functional.pad(p, (0, 0, 0, pad)).reshape(Mk, BK, D)
    vv = torch.nn.functional.pad(v[0, 0].double(), (0, 0, 0, pad)).reshape(Mk, BK, D)
    h = torch.einsum("jrd,jre->jde", p, vv)
    ha = torch.einsum("jrd,jre->jde", p.abs(), vv.abs())
    z = p.sum(1)
    st = state[0, 0, :Mk]
    st = (st.view(torch.bfloat16) if out_bf16 else st).double()
    gh, gz = st[:, : D * D].reshape(Mk, D, D), st[:, D * D :]
    eh = ((gh - h).abs() / ha.clamp_min(1e-30)).max().item()
    ez = ((gz - z).abs() / z.abs().clamp_min(1e-30)).max().item()
    return eh, ez


def compare(out, ref, Mk, out_bf16):
    """A short text: how far ``out`` is from ``ref`` (the default kernel's)."""
    a, b = out[:, :, :Mk], ref[:, :, :Mk]
    if out_bf16:
        ulp = (a.int() - b.int()).abs().max().item()
        same = (a == b).double().mean().item()
        fa, fb = a.view(torch.bfloat16).float(), b.view(torch.bfloat16).float()
        extra = f", {100 * same:.2f}% same bits, max {ulp} bf16 ulp"
    else:
        fa, fb = a, b
        extra = ", same bits" if torch.equal(a, b) else ""
    dmax = (fa - fb).abs().max().item()
    rel = dmax / max(fb.abs().max().item(), 1e-30)
    return f"max |diff| {dmax:.3g} (rel {rel:.2g}){extra}"


def sweep_shape(name, BH, Nk, D, args):
    Mk, W = -(-Nk // BK), D * D + D
    g = torch.Generator(device="cuda").manual_seed(0)
    k = (torch.randn(1, BH, Nk, D, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
    v = torch.randn(1, BH, Nk, D, device="cuda", generator=g).to(torch.bfloat16)
    kv = [device_view(x.view(torch.int16)) for x in (k, v)]
    flops = 2.0 * BH * Nk * D * D
    print(f"\n== {name}: B*H={BH} Nk={Nk} D={D} block_k={BK} (Mk={Mk}) fm={args.fm} bf16 in")
    # the cuBLAS floor (bf16 product of every key block, bf16 out)
    pad = Mk * BK - Nk
    kp = torch.nn.functional.pad(torch.relu(k[0]), (0, 0, 0, pad)).reshape(BH * Mk, BK, D)
    vp = torch.nn.functional.pad(v[0], (0, 0, 0, pad)).reshape(BH * Mk, BK, D)
    at = kp.transpose(1, 2)
    floor = cuda_time(lambda: torch.bmm(at, vp), args.reps)
    print(f"cuBLAS floor torch.bmm bf16 ({BH * Mk} x {D}x{BK} @ {BK}x{D}): {floor:.3f} ms")
    rows = []
    types = [(torch.int16, 2)] + ([] if args.no_fp32 else [(torch.float32, 4)])
    for dtype, esize in types:
        out_bf16 = dtype == torch.int16
        sname = "bf16 states" if out_bf16 else "fp32 states"
        nbytes = 2 * BH * Nk * D * 2 + BH * Mk * W * esize
        default = tcs.auto_variant(out_bf16)
        variants = [(f"default ({default})", default, None)]
        if default != "staged":
            variants.append(("staged", "staged", None))
        variants += [(f"wgmma x{n}", "wgmma", n) for n in args.nper]
        if out_bf16:  # (bf16 states only: a compile less a shape)
            variants += [(f"wgmma kA x{n}", "wgmma-kA", n) for n in args.nper_ka]
        base = None
        for label, variant, nper in variants:
            out = torch.full((1, BH, Mk, W), -1, dtype=dtype, device="cuda")
            view = device_view(out)
            if variant.startswith("wgmma"):

                def run(view=view, nper=nper, ta=variant == "wgmma"):
                    tcw.launch_states_wgmma(
                        "bf16", *kv, view, 1, BH, Nk, D, BK, args.fm, 0, blocks_per_cta=nper,
                        trans_a=ta,
                    )  # fmt: skip
            else:

                def run(view=view, variant=variant):
                    tcs.launch_states_tc(
                        "bf16", *kv, view, 1, BH, Nk, D, BK, args.fm, 0, variant=variant
                    )

            try:
                ms = cuda_time(run, args.reps)
            except Exception as e:  # noqa: BLE001 - report, go on with the next variant
                print(f"{sname} {label}: FAILED ({type(e).__name__}: {str(e)[:300]})")
                traceback.print_exc(limit=2)
                continue
            note = ""
            try:
                if base is None:
                    base = (out, ms)
                else:
                    note = compare(out, base[0], Mk, out_bf16)
                if variant.startswith("wgmma"):
                    eh, ez = float64_error(out, k, v, Nk, D, args.fm, out_bf16)
                    note += f"; vs float64 h {eh:.2g} z {ez:.2g}"
            except Exception as e:  # noqa: BLE001
                note += f" (check failed: {type(e).__name__}: {str(e)[:200]})"
            rows.append((sname, label, ms, nbytes / ms / 1e9, flops / ms / 1e9, base[1] / ms,
                         floor / ms, note))  # fmt: skip
    print(
        f"{'states':12} {'kernel':18} {'ms':>7} {'TB/s':>6} {'TFLOP/s':>8} "
        f"{'x default':>9} {'x floor':>8}  check"
    )
    for sname, label, ms, tbs, tfl, xd, xf, note in rows:
        print(f"{sname:12} {label:18} {ms:7.3f} {tbs:6.2f} {tfl:8.1f} {xd:9.2f} {xf:8.2f}  {note}")


def main():
    t0 = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--fm", type=int, default=0, help="feature map: 0 softmax, 1 elu+1, 2 relu")
    ap.add_argument("--nper", type=int, nargs="*", default=[2, 4, 8, 16])
    ap.add_argument("--nper-ka", type=int, nargs="*", default=[8],
                    help="blocks a CTA of the trans_a=False variant (φ stored [d][c])")  # fmt: skip
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-fp32", action="store_true", help="bf16 states only")
    args = ap.parse_args()
    print(
        torch.cuda.get_device_name(), torch.cuda.get_device_capability(), "torch", torch.__version__
    )
    reason = tcw.wgmma_states_unsupported_reason("bf16", 128, BK)
    if reason is not None:
        print(f"the wgmma states kernel does not run here: {reason}")
        return
    for name in args.shapes:
        try:
            sweep_shape(name, *SHAPES[name], args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
