"""Markdown tables from a ``bench_gpu.py`` JSON file (for BENCHMARKS.md).

Usage: python benchmarks/bench_table.py bench_gpu.json

One table per (shape, topk): rows = implementations (SLA per dtype and kernel path,
SDPA per backend and dtype, FlexAttention), columns = forward and forward+backward ms,
dense-equivalent TFLOP/s, speed-up against SDPA bf16 with its default backend (cuDNN),
against the flash backend and against SDPA fp32 (memory-efficient: the only fp32
backend). Then the per-stage breakdown of each SLA call. Every number is copied from
the JSON: nothing is measured here.
"""

import json
import sys


def _ms(rows, **key):
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def _short(err):
    """A table-sized version of an error row's message."""
    if "No available kernel" in err:
        return "no kernel for this dtype"
    if "divisible by BLOCK_M" in err:
        return "refused: its tiles do not divide 64 x 64 blocks"
    if "out of memory" in err:
        return "out of memory"
    return "error: " + err[:50]


def tables(data):
    rows = data["rows"]
    out = [f"Device: {data['device']}; torch {data['torch']}.", ""]
    cases = sorted({(r["shape"], r["topk"]) for r in rows}, key=lambda c: (c[0] != "wan", c))
    for shape, topk in cases:
        rs = [r for r in rows if r["shape"] == shape and r["topk"] == topk]
        r0 = rs[0]
        out.append(
            f"#### B={r0['B']}, H={r0['H']}, N={r0['N']}, D={r0['D']}, "
            f"topk {topk:.2f}, skip {r0['skip']:.2f}, block 64 x 64"
        )
        out.append("")
        out.append(
            "| implementation | dtype | fwd ms | fwd+bwd ms | fwd TFLOP/s* | "
            "fwd / fwd+bwd vs SDPA bf16 cuDNN | vs SDPA bf16 flash | "
            "vs SDPA fp32 | peak MiB (fwd+bwd) | first call s |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        impls = []
        for r in rs:
            k = (r["impl"], r["dtype"], r.get("path", ""))
            if r["impl"] != "sla stages" and k not in impls:
                impls.append(k)
        base = {}
        for name in ("sdpa[cudnn]", "sdpa[flash]", "sdpa[efficient]"):
            for ph in ("fwd", "fwd+bwd"):
                dt = "fp32" if name == "sdpa[efficient]" else "bf16"
                r = _ms(rs, impl=name, dtype=dt, phase=ph)
                base[(name, ph)] = r.get("ms") if r else None

        def ratio(ms, ref):
            return f"{ref / ms:.2f}x" if ms and ref else "-"

        for impl, dt, path in impls:
            f = _ms(rs, impl=impl, dtype=dt, phase="fwd") or {}
            fb = _ms(rs, impl=impl, dtype=dt, phase="fwd+bwd") or {}
            label = impl + (f" ({path})" if path else "")
            cells = []
            for r in (f, fb):
                cells.append(
                    f"{r['ms']:.2f}" if "ms" in r else (_short(r["error"]) if "error" in r else "-")
                )
            sp = [
                " / ".join(
                    ratio(r.get("ms"), base[(n, ph)]) for r, ph in ((f, "fwd"), (fb, "fwd+bwd"))
                )
                for n in ("sdpa[cudnn]", "sdpa[flash]", "sdpa[efficient]")
            ]
            out.append(
                f"| {label} | {dt} | {cells[0]} | {cells[1]} | "
                f"{f.get('tflops', float('nan')):.0f} | {sp[0]} | {sp[1]} | {sp[2]} | "
                f"{fb.get('peak_mib', float('nan')):.0f} | "
                f"{f.get('first_s', float('nan')):.1f} |"
            )
        out.append("")
        out.append("*dense-equivalent: 4·B·H·N²·D / time (what dense attention would need).")
        out.append("")
        st = [r for r in rs if r["impl"] == "sla stages"]
        if st:
            out.append(
                "Per-stage breakdown of the SLA calls (mean ms, CUDA events between the "
                "backend's launches):"
            )
            out.append("")
            for r in st:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
                out.append(
                    f"- {r['dtype']} ({r['path']}) {r['phase']}: total {r['ms']:.2f} — {parts}"
                )
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(tables(json.load(fh)))
