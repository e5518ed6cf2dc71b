"""The first call of a configuration: its GPU kernels compiled side by side.

Numba compiles a kernel the first time a process launches it with a new signature,
then keeps it in its disk cache. A first forward at the Wan2.1 shape compiles six
kernels (classification, states, marginal sums, sparse branch, ...), 2-5 s each, one
after the other: 13-18 s measured on the H200 machine (BENCHMARKS.md). A process
compiles one kernel at a time (Numba holds a global compiler lock, and most of the
time is Python: typing and lowering, so threads would not help). Processes, though,
share the disk cache. So the backend's entry points (``classify``, ``forward``,
``backward``) are wrapped by :func:`ahead` (and the API runs classification and
forward together through :func:`run_ahead`, so a first forward compiles the kernels
of both at once), and a call that meets a kernel this process has not loaded goes
like this:

1. **run**: the call starts as usual, with the launcher in *strict* mode: the first
   launch of a kernel not loaded here raises ``_launcher.Missing`` (launches made
   before it are harmless: the call runs again below);
2. **dry run**: the call runs again with the launcher *collecting*: nothing is
   launched, and every kernel not loaded here is recorded with its argument types.
   The host code never reads results back (no host syncs), so the dry run takes the
   same path as a real run;
3. **compile**: each recorded kernel is looked up in Numba's disk cache; those not
   there are compiled by worker processes (``python -m sla_numba.gpu._precompile``),
   several at once, each making the kernel again from its factory (the factories are
   marked with :func:`kernel_factory`, which notes how each kernel was made) and
   compiling it, which writes the disk cache. Kernels of one cache index file go to
   the same worker (Numba's index is read, updated and written back as a whole);
4. **load and run**: every kernel is loaded here (from the disk cache) and the call
   runs for real.

A later process finds everything on disk and skips step 3; later calls of the same
configuration in this process skip all of it (one attribute lookup a call). The
kernels and their results are the same whoever compiled them. Workers are used only
when they can help: ``SLA_NUMBA_COMPILE_WORKERS`` > 0 (default: the CPUs, at most 8;
none below 4 CPUs), at least two cache files to compile, direct launches
(``_launcher.py``), Numba's disk cache on. A worker that fails is reported in one
line, and its kernels are then compiled in this process.

Under CUDA-graph capture (``torch.cuda.graph``, ...) a warm call's strict run is the
whole call: it launches only loaded kernels. A kernel not loaded raises the launcher's
``CaptureError`` (it is asked before ``Missing``), so a capture never starts a dry run,
a compile or a worker process: kernels must be loaded by a call before the capture.
"""

import functools
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time

from .. import config
from . import _launcher

#: ``python -m`` target of the worker processes (this module)
WORKER_MODULE = __name__

#: What the last call that compiled ahead did (for tests and tools/first_call.py).
last = {}


# ---------------------------------------------------------------------------
# Recipes: how a kernel is made again in another process
# ---------------------------------------------------------------------------


def kernel_factory(factory):
    """Mark a module-level function that makes kernels (returns a ``@cuda.jit``
    dispatcher, or an object whose ``.kernel`` is one) so a worker process can make
    the same kernel again: the returned kernel remembers the factory and the
    arguments it was called with. Put it under ``functools.cache``."""

    @functools.wraps(factory)
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        attr = None if hasattr(out, "py_func") else "kernel"
        kernel = out if attr is None else out.kernel
        if getattr(kernel, "_sla_recipe", None) is None:  # the innermost factory wins
            kernel._sla_recipe = (factory.__module__, factory.__qualname__, args, kwargs, attr)
        return out

    return make


def recipe(kernel):
    """``(module, qualname, args, kwargs, attr)`` that makes ``kernel`` again, or None.

    A kernel made by a :func:`kernel_factory` carries its recipe; a module-level
    kernel is found by name (``args`` None)."""
    made = getattr(kernel, "_sla_recipe", None)
    if made is not None:
        return made
    fn = getattr(kernel, "py_func", None)
    if fn is None or fn.__closure__ is not None or "<locals>" in fn.__qualname__:
        return None
    module = sys.modules.get(fn.__module__)
    if module is None or getattr(module, fn.__qualname__, None) is not kernel:
        return None
    return (fn.__module__, fn.__qualname__, None, None, None)


def rebuild(made):
    """The kernel a :func:`recipe` describes, made in this process."""
    module, qualname, args, kwargs, attr = made
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if args is None:
        return obj
    out = obj(*args, **kwargs)
    return out if attr is None else getattr(out, attr)


# ---------------------------------------------------------------------------
# The wrapper of the backend's entry points
# ---------------------------------------------------------------------------


def enabled():
    """Whether a first call compiles ahead (see the module docstring)."""
    return config.compile_workers() > 0 and config.disk_cache() and _launcher.direct_launches()


def ahead(fn):
    """Wrap a backend entry point: its first call in a new configuration compiles the
    kernels it needs side by side (steps 1-4 of the module docstring)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return run_ahead(fn, *args, **kwargs)

    return call


def run_ahead(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, run by steps 1-4 of the module docstring.

    ``fn`` may call several entry points: the API runs classification and forward
    this way, so a first forward compiles the kernels of both at once. Calls nest:
    inside another one's run (strict, or a dry run) an entry point just runs.
    """
    if _launcher.in_mode() or not enabled():  # (nested: a thread-local read, no more)
        return fn(*args, **kwargs)
    try:
        with _launcher.strict():
            return fn(*args, **kwargs)
    except _launcher.Missing:
        pass
    with _launcher.collecting() as jobs:
        fn(*args, **kwargs)
    prepare(list(jobs.values()))
    return fn(*args, **kwargs)


def prepare(jobs, workers=None):
    """Load every job's kernel here; compile first, in worker processes, those that
    are not in the disk cache (when there are at least two cache files to fill)."""
    workers = config.compile_workers() if workers is None else workers
    t0 = time.perf_counter()
    cold = []
    for job in jobs:
        cached = _on_disk(job)
        if cached is None:  # this Numba's cache cannot be asked: compile here
            cold = []
            break
        if not cached:
            cold.append(job)
    groups = _groups(cold)
    last.clear()
    last.update(jobs=len(jobs), cold=len(cold), groups=len(groups), workers=0, failed=[])
    last["kernels"] = [_name(job.kernel) for job in jobs]
    if workers > 0 and len(groups) > 1:
        from .._compile_log import announce

        announce()
        _compile_in_workers(groups, workers)
    for job in jobs:
        _launcher.load(job)
    last["seconds"] = time.perf_counter() - t0


def _name(kernel):
    fn = getattr(kernel, "py_func", kernel)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _on_disk(job):
    """True / False: the job's kernel is / is not in Numba's disk cache; None when
    the cache cannot be asked (another numba-cuda's internals, caching off)."""
    kernel = job.kernel
    try:
        with _launcher.numba_context(job.device):
            cache = kernel._cache
            key = cache._index_key(job.argtypes, kernel.targetctx.codegen())
            return key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - private API of Numba's cache
        return None


def _groups(jobs):
    """Jobs by the cache index file they write (one worker each); jobs whose kernel
    cannot be made again elsewhere stay with this process (group key None)."""
    groups = {}
    for job in jobs:
        made = recipe(job.kernel)
        if made is None:
            key = None
        else:
            try:
                key = job.kernel._cache._cache_file._index_path
            except AttributeError:
                key = (job.kernel.py_func.__module__, job.kernel.py_func.__qualname__)
        groups.setdefault(key, []).append((job, made))
    return groups


def _compile_in_workers(groups, workers):
    """Compile the groups: one worker process each (at most ``workers`` at once), and
    this process takes the kernels no worker can make plus one group (it would wait
    anyway)."""
    mine = list(groups.pop(None, []))
    keys = list(groups)
    if keys:
        mine += groups.pop(keys.pop())
    env = _worker_env()
    pending = [groups[k] for k in keys]
    running = []

    def start(group):
        try:
            payload = pickle.dumps(
                {"jobs": [(made, job.argtypes, job.device) for job, made in group]}
            )
            err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty worker never blocks
            proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
            proc.stdin.write(payload)  # the worker reads it first thing
            proc.stdin.close()
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            _report(f"{type(exc).__name__}: {exc}")  # its kernels compile here, on load
            return
        running.append((proc, err))
        last["workers"] += 1

    while pending and len(running) < workers:
        start(pending.pop())
    for job, _ in mine:  # this process's share, while the workers compile
        _launcher.load(job)
    while running:
        proc, err = running.pop(0)
        if proc.wait() != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            _report(lines[-1] if lines else f"exit status {proc.returncode}")
        err.close()
        if pending:
            start(pending.pop())


def _report(why):
    """One line for a worker that could not start or failed; :func:`prepare` then
    compiles its kernels in this process."""
    from .._compile_log import emit

    last["failed"].append(why)
    emit(f"a compile worker failed ({why[:200]}); its kernels are compiled in this process")


def _worker_env():
    """The workers' environment: this one, with this sla_numba first on the path and
    Numba's cache folder as this process sees it."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in _site_dirs():  # a source checkout: put it first (an install needs nothing)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    try:
        from numba.cuda.core import config as numba_config

        if getattr(numba_config, "CACHE_DIR", ""):
            env["NUMBA_CACHE_DIR"] = numba_config.CACHE_DIR
    except ImportError:  # pragma: no cover - other numba-cuda layouts
        pass
    return env


def _site_dirs():
    import site

    try:
        return set(site.getsitepackages()) | {site.getusersitepackages()}
    except AttributeError:  # pragma: no cover - virtualenvs without site.getsitepackages
        return set(sys.path)


def _worker_main():
    """A worker: read the pickled jobs from stdin, make each kernel from its recipe
    and compile it for its device (Numba writes the disk cache)."""
    payload = pickle.load(sys.stdin.buffer)
    for made, argtypes, device in payload["jobs"]:
        with _launcher.numba_context(device):
            rebuild(made).compile(argtypes)


if __name__ == "__main__":
    _worker_main()
