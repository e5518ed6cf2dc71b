"""One line when a call waits for the Numba compiler, and one when it is done.

The first call of a kernel for a new dtype (and, on the GPU, head dimension and
block configuration) compiles it: 20-40 s on a CPU, up to a minute on a GPU. Later
calls, in this process or the next, load it from Numba's disk cache. A silent
half-minute looks like a hang, so every backend call runs inside :func:`notice`:

    sla_numba: compiling SLA kernels for D=64 float32 (cpu, forward) — first call only, cached on disk
    sla_numba: SLA kernels for D=64 float32 (cpu, forward) ready in 23.4 s

How we know that a compile (and not a disk-cache load or a long run) is happening:
Numba fires the event ``"numba:compile"`` around every real compilation (a cache
hit does not fire it); numba-cuda fires ``"numba-cuda:run_pass"`` for every
compiler pass (none on a cache hit). A listener registered once for that event announces the
first compile that starts inside a :func:`notice` block on the same thread; the
block logs the total time when it ends. The CUDA simulator compiles nothing, so it
logs nothing.

Where the lines go: the logger ``"sla_numba"``, level INFO. If logging has not
been configured (no handler on it or on the root logger, the state of a fresh
script, the CLI or a notebook), the lines are written to stderr, so a user sees
them without setting anything up; once the program configures logging, its
configuration decides (``logging.getLogger("sla_numba").setLevel(logging.INFO)``
shows them, ``...setLevel(logging.WARNING)`` silences them in both cases).
"""

import contextlib
import logging
import sys
import threading
import time

logger = logging.getLogger("sla_numba")

_state = threading.local()  # .label, .start, .announced of the innermost notice
_registered = set()  # event modules we listen to (numba core, numba-cuda)
_register_lock = threading.Lock()


def emit(message):
    """Log ``message`` at INFO on the "sla_numba" logger (stderr when logging is unconfigured)."""
    if logger.hasHandlers():
        logger.info(message)
        return
    # logging not configured: behave like a default INFO handler on our logger,
    # unless the user raised this logger's level to silence it.
    if logger.level == logging.NOTSET or logger.level <= logging.INFO:
        print(f"sla_numba: {message}", file=sys.stderr, flush=True)


def _on_compile_start(event):
    """Numba started compiling: announce it once per notice block, on this thread."""
    label = getattr(_state, "label", None)
    if label is None or _state.announced:
        return
    _state.announced = True
    emit(f"compiling SLA kernels {label} — first call only, cached on disk")


def announce():
    """Say now that the current notice block compiles (as Numba's first compile event
    would; for compiles that happen in other processes, ``gpu/_precompile.py``)."""
    _on_compile_start(None)


def _event_modules():
    """(event module, event kind) pairs to listen to: numba's "numba:compile" and, when
    numba-cuda is loaded, its own event module's "numba-cuda:run_pass" (numba-cuda
    fires no compile event for kernels, but every compiler pass is an event; a disk
    cache hit runs no pass)."""
    from numba.core import event

    mods = [(event, "numba:compile")]
    cuda_event = sys.modules.get("numba.cuda.core.event")
    if cuda_event is not None:
        mods.append((cuda_event, "numba-cuda:run_pass"))
    return mods


def _ensure_listening():
    """Register our listener (once) with every Numba event module now loaded."""
    if len(_registered) == 2:  # both (numba's and numba-cuda's): nothing left to do
        return
    with _register_lock:
        for mod, kind in _event_modules():
            if mod.__name__ in _registered:
                continue

            class _Listener(mod.Listener):
                def on_start(self, event):
                    _on_compile_start(event)

                def on_end(self, event):
                    pass

            mod.register(kind, _Listener())
            _registered.add(mod.__name__)


@contextlib.contextmanager
def notice(label):
    """Run a backend call; log once if it compiles, and its duration when it ends."""
    outer = getattr(_state, "label", None)
    if outer is not None:  # nested (warmup around a call): the outer one reports
        yield
        return
    _ensure_listening()
    _state.label, _state.announced, start = label, False, time.perf_counter()
    try:
        yield
    finally:
        announced = _state.announced
        _state.label, _state.announced = None, True
    if announced:
        emit(f"SLA kernels {label} ready in {time.perf_counter() - start:.1f} s")


def describe(stage, head_dim, dtype, backend):
    """The label of a call, e.g. 'for D=64 float32 (cpu, forward)'."""
    return f"for D={head_dim} {dtype} ({backend}, {stage})"


@contextlib.contextmanager
def quiet():
    """Calls inside say nothing (:func:`sla_numba.warmup` shows its own progress)."""
    outer = getattr(_state, "label", None)
    if outer is not None:
        yield
        return
    _state.label, _state.announced = "", True
    try:
        yield
    finally:
        _state.label = None
