"""Optional per-stage timing of the GPU backend (benchmarks; torch inputs only).

The backend calls :func:`mark` after each stage's launches are enqueued (and with
``"glue"`` on entry, so work the caller queued in between is not billed to a
kernel). Normally a no-op; inside :func:`record_stages` each mark records a torch
CUDA event on the current stream, and the durations between consecutive events
are summed per stage name once the block exits (it synchronises).
"""

import contextlib

_recorder = None


def mark(name):
    """End of stage ``name`` (no-op unless :func:`record_stages` is active)."""
    if _recorder is not None:
        _recorder(name)


@contextlib.contextmanager
def record_stages(out):
    """Fill dict ``out`` with {stage: milliseconds} for the work queued in the block."""
    import torch

    global _recorder
    events = []

    def rec(name):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append((name, ev))

    rec("start")
    _recorder = rec
    try:
        yield out
    finally:
        _recorder = None
        rec("glue")
        torch.cuda.synchronize()
        for (_, e0), (name, e1) in zip(events, events[1:]):
            out[name] = out.get(name, 0.0) + e0.elapsed_time(e1)
