"""The marginal sums on wgmma (``gpu/tc/marginal_wgmma.py``) against the present default.

Usage (on an H100 / H200):  PYTHONPATH=. python tools/sweep_marginal_wgmma.py [--reps 20]
                            [--configs N,KB,STAGES,WGS[,DEPTH,A_SMEM] ...] [--shapes wan b2]
Without a GPU (needs a CUDA compiler, numba-cuda's cu13 wheels):
                            PYTHONPATH=. python tools/sweep_marginal_wgmma.py --ptx

GPU mode. For each shape (``wan``: B*H = 12, Mq = Mk = 512 blocks, W = 128*128 + 128;
``b2``: B*H = 32, Mq = Mk = 128, W = 64*64 + 64) and each orientation (row sums, and
``transposed`` column sums), a random block map (5 % critical, 10 % negligible, the rest
marginal) and bf16 states:

1. the float64 product ``M·S`` and ``M·|S|`` (torch, on the GPU); every kernel's output
   is compared with it (max ``|out - M·S| / (M·|S|)``, the bound of the fp32
   accumulation ``2·ceil(n_in/16)·2^-23`` beside it) and with the present default
   kernel's output (the pipelined mma.sync kernel, ``SLA_NUMBA_MARGINAL`` unset: max abs
   difference, max difference / (M·|S|), and whether the bits agree);
2. the median of ``--reps`` calls between CUDA events of: the default kernel, each wgmma
   variant ``(N, kb, stages, wgs, depth, a_smem)`` (N columns and 64·wgs rows a CTA, kb
   c-values a stage, a ring of ``stages``, wgmma wait depth, M from registers or shared
   memory; ``CONFIGS``), and the cuBLAS floor (``torch.bmm`` of the bf16 0/1
   matrix and the bf16 states, same shape), all in the same run;
3. one table: ms, TFLOP/s (2·B·H·n_out·n_in·W), time / default, time / floor.

A variant that fails to compile or launch is reported and skipped (the process goes on).

PTX mode (``--ptx``): compiles each variant for sm_90a (no GPU) and prints, per
variant, the wgmma count, ``.local`` uses, registers, spills and whether ptxas reports
serialized wgmma; the last line is the same as JSON (``tests/gpu/tc/test_tc_marginal_wgmma.py``
reads it).
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

#: (n, kb, stages, wgs, depth, a_smem) timed by default (``marginal_wgmma.Config``): N 128 /
#: 256, 3 / 4 stages, 1 / 2 warpgroups; depth 0 (wait for a stage's wgmma before the
#: next) or 1 (one stage's wgmma queued behind the next's); A = M from registers (0) or
#: from shared memory (1). ptxas serializes depth 1 with A from registers (``--ptx``).
CONFIGS = [
    (256, 32, 3, 1),
    (128, 32, 3, 1),
    (256, 32, 3, 2),
    (256, 32, 4, 2, 1, 0),
    (256, 32, 3, 2, 0, 1),
    (256, 32, 4, 1, 1, 1),
    (256, 32, 4, 2, 1, 1),
    (256, 32, 3, 2, 1, 1),
    (128, 32, 4, 2, 1, 1),
    (128, 64, 4, 1, 1, 1),
    (256, 64, 4, 2, 1, 1),
]
#: name -> (B*H, blocks, head dim): W = D*D + D
SHAPES = {"wan": (12, 512, 128), "b2": (32, 128, 64)}


def _configs(specs):
    return [tuple(int(x) for x in s.split(",")) for s in specs] if specs else CONFIGS


# --------------------------------------------------------------------------- PTX mode
def ptx_report(configs):
    """Compile each configuration for sm_90a; a list of dicts (module doc)."""
    import importlib.util

    import numba.cuda.dispatcher as disp
    from numba import cuda, float32, int8, int16, int64

    try:
        cuda.get_current_device()
    except Exception:  # noqa: BLE001 - no GPU: type device functions for sm_90

        class _Dev:
            compute_capability = (9, 0)

        disp.get_current_device = lambda: _Dev()
    spec = importlib.util.spec_from_file_location("probe", os.path.join(HERE, "wgmma_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from sla_numba.gpu.tc.marginal_wgmma import make_marginal_kernel_wgmma

    sig = (
        int8[::1], int64, int64, int64, int64, int64, int16[::1], int64, float32[::1], int64,
        int64,
    )  # fmt: skip
    out = []
    for cfg in configs:
        t0 = time.time()
        try:
            kern = make_marginal_kernel_wgmma(cfg, 16).kernel
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0, "a"))
            _, info = probe.nvjitlink_assemble(ptx, "sm_90a")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{cfg}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        rep = dict(
            config=list(cfg),
            target=re.search(r"\.target\s+(\S+)", ptx).group(1),
            wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
            # A from registers (``{a0..a3}``), and shared x shared with B MN-major
            rs=len(re.findall(r"wgmma\.mma_async[^;]*\}, \{[^;]*;", ptx)),
            ss_trans_b=len(re.findall(r"wgmma\.mma_async[^{;]*\{[^}]*\}, %rd[^;]*, 0, 1;", ptx)),
            cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)),
            local=ptx.count(".local"),
            regs=int(regs.group(1)) if regs else -1,
            spill=[int(spill.group(1)), int(spill.group(2))] if spill else None,
            serialized="serialized" in info,
            why=sorted(set(re.findall(r"serialized ([^\x27]*?) in the function", info))),
            seconds=round(time.time() - t0, 1),
        )
        print(
            f"{cfg}: {rep['target']} wgmma {rep['wgmma']} (rs {rep['rs']}, ss "
            f"trans-b {rep['ss_trans_b']}) cp.async {rep['cp_async']} "
            f".local {rep['local']} regs {rep['regs']} spill {rep['spill']} "
            f"serialized {rep['serialized']} {rep['why']} ({rep['seconds']} s)",
            flush=True,
        )
        out.append(rep)
    print(json.dumps(out))
    return out


# --------------------------------------------------------------------------- GPU mode
def gpu_sweep(configs, shapes, reps):
    import torch
    from cuda_timing import cuda_time

    from sla_numba.gpu._arrays import device_view
    from sla_numba.gpu.tc import marginal as tcm
    from sla_numba.gpu.tc import marginal_wgmma as mw

    dev = torch.cuda.get_device_name()
    cc = torch.cuda.get_device_capability()
    print(f"{dev}, compute capability {cc}; reps {reps} (median of CUDA-event times)")
    if cc != (9, 0):
        print("not compute capability 9.0: wgmma variants will be refused")
    rows = []
    for shape in shapes:
        bh, M, D = SHAPES[shape]
        W = D * D + D
        g = torch.Generator(device="cuda").manual_seed(0)
        r = torch.rand(1, bh, M, M, device="cuda", generator=g)
        bmap = torch.zeros(1, bh, M, M, dtype=torch.int8, device="cuda")
        bmap[r < 0.05] = 1
        bmap[r > 0.90] = -1
        s16 = (torch.randn(1, bh, M, W, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        bits = s16.view(torch.int16)
        print(
            f"\n{shape}: B*H={bh} Mq=Mk={M} W={W}; marginal fraction "
            f"{(bmap == 0).float().mean():.3f}; cp.async chunk {tcm.chunk_bytes(bits, W)} B"
        )
        for transposed in (False, True):
            orient = "col" if transposed else "row"
            m = (bmap == 0).reshape(bh, M, M)
            m = m.transpose(1, 2) if transposed else m
            s64 = s16.reshape(bh, M, W).double()
            ref = torch.bmm(m.double(), s64)
            mag = torch.bmm(m.double(), s64.abs())
            del s64
            bound = 2 * -(-M // 16) * 2.0**-23
            safe = torch.where(mag == 0, torch.ones_like(mag), mag)
            v = [device_view(x) for x in (bmap, bits)]

            def err64(out, ref=ref, safe=safe):
                o = out.reshape(bh, M, W).double()
                return ((o - ref).abs() / safe).max().item()

            # the present default kernel (SLA_NUMBA_MARGINAL unset: pipelined mma.sync)
            out_d = torch.full((1, bh, M, W), float("nan"), device="cuda")
            vd = device_view(out_d)

            def run_default(vd=vd, transposed=transposed):
                tcm.launch_marginal_sum_tc(0, v[0], transposed, M, M, v[1], vd, pipeline=True)

            ms_d = cuda_time(run_default, reps)
            e_d = err64(out_d)
            m16 = m.to(torch.bfloat16)
            s16m = s16.reshape(bh, M, W)
            ms_f = cuda_time(lambda m16=m16: torch.bmm(m16, s16m), reps)
            print(f"{shape} {orient}: default {ms_d:.3f} ms, floor {ms_f:.3f} ms", flush=True)
            rows.append((shape, orient, "default (pipelined mma.sync)", ms_d, e_d, "", ""))
            rows.append((shape, orient, "cuBLAS floor torch.bmm bf16", ms_f, None, "", ""))
            for cfg in configs:
                c6 = tuple(mw.Config(*cfg))
                name = "wgmma N={} kb={} st={} wg={} d={} as={}".format(*c6)
                out = torch.full((1, bh, M, W), float("nan"), device="cuda")
                vo = device_view(out)

                def run(cfg=cfg, vo=vo, transposed=transposed):
                    mw.launch_marginal_sum_wgmma(0, v[0], transposed, M, M, v[1], vo, config=cfg)

                try:
                    ms = cuda_time(run, reps)
                except Exception as e:  # noqa: BLE001 - compile / launch failure: go on
                    print(f"{shape} {orient} {name}: failed ({type(e).__name__}: {str(e)[:160]})")
                    torch.cuda.synchronize()
                    continue
                if not torch.isfinite(out).all():
                    print(f"{shape} {orient} {name}: NON-FINITE outputs (unwritten elements?)")
                dd = (out.double() - out_d.double()).abs()
                same = (
                    "same bits"
                    if torch.equal(out.view(torch.int32), out_d.view(torch.int32))
                    else ""
                )
                rel_d = (dd.reshape(bh, M, W) / safe).max().item()
                print(  # at once: a later variant that hangs must not hide this one
                    f"{shape} {orient} {name}: {ms:.3f} ms ({ms / ms_d:.2f} x default, "
                    f"{ms / ms_f:.2f} x floor), max |diff| vs default {dd.max().item():.2e}",
                    flush=True,
                )
                rows.append(
                    (
                        shape,
                        orient,
                        name,
                        ms,
                        err64(out),
                        f"{dd.max().item():.2e}/{rel_d:.1e}",
                        same,
                    )
                )
            print(f"{shape} {orient}: done (float64 bound {bound:.1e} x M|S|)", flush=True)
    print(
        f"\n{'shape':5} {'sum':3} {'kernel':36} {'ms':>7} {'TFLOP/s':>7} {'/dflt':>6} "
        f"{'/floor':>6} {'err64/M|S|':>10} {'vs default abs/rel':>18} bits"
    )
    base = {}
    for shape, orient, name, ms, *_ in rows:
        if name.startswith("default"):
            base[(shape, orient, "d")] = ms
        if name.startswith("cuBLAS"):
            base[(shape, orient, "f")] = ms
    for shape, orient, name, ms, e64, vs, same in rows:
        bh, M, D = SHAPES[shape]
        flops = 2.0 * bh * M * M * (D * D + D)
        d, f = base.get((shape, orient, "d")), base.get((shape, orient, "f"))
        e = "" if e64 is None else f"{e64:.1e}"
        print(
            f"{shape:5} {orient:3} {name:36} {ms:7.3f} {flops / ms / 1e9:7.1f} "
            f"{ms / d:6.2f} {ms / f:6.2f} {e:>10} {vs:>18} {same}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--configs", nargs="*", default=None, help="N,KB,STAGES,WGS[,DEPTH,A_SMEM] ...")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ptx", action="store_true", help="compile for sm_90a only (no GPU)")
    args = ap.parse_args()
    configs = _configs(args.configs)
    if args.ptx:
        ptx_report(configs)
    else:
        gpu_sweep(configs, args.shapes, max(10, args.reps))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
