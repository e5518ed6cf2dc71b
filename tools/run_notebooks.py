#!/usr/bin/env python3
"""Execute the teaching notebooks without Jupyter's front end (nbclient + ipykernel only).

    python tools/run_notebooks.py --out /tmp/nb                     # all notebooks, full size
    SLA_NB_QUICK=1 python tools/run_notebooks.py --out /tmp/nb      # small ("quick") size
    python tools/run_notebooks.py --inplace notebooks/03_*.ipynb    # overwrite with outputs

Every notebook runs in a fresh ``python3`` kernel with its own folder as working
directory (the notebooks import ``_nbutils`` from there). ``SLA_NB_QUICK`` is passed
through to the kernels; unset, it defaults to ``0`` (full size). The executed copies go
to ``--out`` (or replace the originals with ``--inplace``); a notebook that fails is
written too, with the error in its failing cell. Prints each notebook's wall time and,
at the end, the lines the notebooks printed that mention cuda, gpu, device or backend,
so a log shows whether a GPU was really used. Exit status 1 if any notebook failed.

Needs nbformat, nbclient, jupyter_client and ipykernel: the ``notebooks`` extra, or, on
a machine without network, the wheels pinned in tools/notebook_wheels.txt (download
command there) installed with ``pip install --no-index --no-deps --target DIR
.whl/*.whl`` and DIR on PYTHONPATH. ipykernel provides the ``python3`` kernel itself,
so no kernelspec needs to be installed.
"""

import argparse
import glob
import os
import re
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_RE = re.compile(r"cuda|gpu|device|backend", re.IGNORECASE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "notebooks", nargs="*", help="notebooks to run (default: notebooks/[0-9]*.ipynb, in order)"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for the executed copies")
    where.add_argument("--inplace", action="store_true", help="overwrite the notebooks")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    p.add_argument("--kernel", default="python3", help="kernel name (default python3)")
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failing cell, run the notebook's remaining cells too",
    )
    return p.parse_args(argv)


def kernel_check(name):
    """Find the kernelspec now, so a missing one fails with a clear message, not a hang."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        sys.exit(
            f"no Jupyter kernel named {name!r}: install ipykernel "
            "(or `python -m ipykernel install --prefix DIR` and put DIR/share/jupyter "
            "on JUPYTER_PATH)"
        )
    return spec


def output_text(nb):
    """All text the executed notebook printed (streams, text/plain results, errors)."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                yield out.get("text", "")
            elif out.get("output_type") in ("execute_result", "display_data"):
                yield out.get("data", {}).get("text/plain", "")
            elif out.get("output_type") == "error":
                yield f"{out.get('ename')}: {out.get('evalue')}"


def device_lines(nb, limit=8):
    seen = []
    for text in output_text(nb):
        for line in text.splitlines():
            line = line.strip()
            if DEVICE_RE.search(line) and line not in seen and not line.startswith("<"):
                seen.append(line)
    return seen[:limit]


def run_one(path, args):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name=args.kernel,
        allow_errors=args.keep_going,
        record_timing=False,
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
    )
    t0 = time.perf_counter()
    error = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        error = str(exc).strip().splitlines()
        error = "\n".join(error[-12:])
    except Exception:  # kernel died, could not start, ...
        error = traceback.format_exc(limit=4)
    seconds = time.perf_counter() - t0
    if error is None and args.keep_going:
        errs = [
            o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"
        ]
        if errs:
            error = f"{len(errs)} cell(s) raised: {errs[0].get('ename')}: {errs[0].get('evalue')}"
    dest = path if args.inplace else os.path.join(args.out, os.path.basename(path))
    nbformat.write(nb, dest)
    return seconds, error, device_lines(nb), dest


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("SLA_NB_QUICK", "0")
    os.environ.setdefault(
        "PYDEVD_DISABLE_FILE_VALIDATION", "1"
    )  # debugpy's warning about frozen modules
    os.environ.setdefault(
        "JUPYTER_RUNTIME_DIR", tempfile.mkdtemp(prefix="nbrun-")
    )  # connection files
    # kernels start in the notebook's folder: make PYTHONPATH entries (e.g. ".") absolute
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) if p else p for p in os.environ["PYTHONPATH"].split(os.pathsep)
        )
    paths = args.notebooks or sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9]*.ipynb")))
    if not paths:
        sys.exit("no notebooks found")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    spec = kernel_check(args.kernel)
    try:
        import torch

        host = f"torch {torch.__version__}, CUDA GPU: " + (
            torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        )
    except ImportError:
        host = "torch not importable in the runner"
    print(
        f"SLA_NB_QUICK={os.environ['SLA_NB_QUICK']}  kernel {args.kernel!r}: "
        f"{' '.join(spec.argv[:3])}  {host}",
        flush=True,
    )

    results = []
    t_all = time.perf_counter()
    for path in paths:
        print(f"--- {os.path.relpath(path)} ...", flush=True)
        seconds, error, devices, dest = run_one(path, args)
        results.append((path, seconds, error, devices))
        print(f"    {'FAILED' if error else 'ok'} in {seconds:.0f} s -> {dest}", flush=True)
        if error:
            print("    " + error.replace("\n", "\n    "), flush=True)

    print(f"\n{'notebook':<34} {'status':>7} {'wall time':>10}")
    for path, seconds, error, _ in results:
        print(f"{os.path.basename(path):<34} {'FAILED' if error else 'ok':>7} {seconds:9.0f}s")
    print(f"{'total':<34} {'':>7} {time.perf_counter() - t_all:9.0f}s")
    print("\ndevice / backend lines printed by the notebooks:")
    for path, _, _, devices in results:
        print(f"  {os.path.basename(path)}:")
        for line in devices or ["(none)"]:
            print(f"    {line[:160]}")
    failed = [p for p, _, e, _ in results if e]
    if failed:
        print(f"\n{len(failed)} notebook(s) failed: " + ", ".join(map(os.path.basename, failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
