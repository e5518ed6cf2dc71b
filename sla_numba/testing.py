"""Test hooks.

``poison_outputs(True)`` makes every output buffer a backend allocates start
as NaN (float) or 99 (int8 map) instead of uninitialised memory, so an element
a kernel forgets to write makes a test fail instead of passing by luck.
"""

import contextlib

_state = {"poison": False}


def poison_outputs(on=True):
    """Switch NaN-poisoning of freshly allocated output buffers on or off."""
    _state["poison"] = bool(on)


def poisoning():
    """True while output poisoning is on."""
    return _state["poison"]


@contextlib.contextmanager
def poisoned():
    """Context manager: poisoning on inside, previous setting restored after."""
    old = _state["poison"]
    _state["poison"] = True
    try:
        yield
    finally:
        _state["poison"] = old
