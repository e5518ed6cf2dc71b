"""The examples in the docstrings run and print what they say (docs cannot rot)."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "sla_numba.reference",
        "sla_numba.api",
        "sla_numba.modules",
        "sla_numba._warmup",
        "sla_numba.gpu.classify",
        "sla_numba.gpu.simt.classify_fused",
        "sla_numba.gpu.forward",
    ],
)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module} failed"


def test_readme_usage_example_runs():
    """The README's Python example runs as written and gives what its comments say."""
    import os
    import re

    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "README has no python example"
    env = {}
    exec(compile(blocks[0], "README.md", "exec"), env)  # noqa: S102 - our own README
    assert env["o"].shape == (1, 4, 1024, 64)
    assert env["c"].map.shape == (1, 4, 16, 16) and env["c"].lut.shape == (1, 4, 16, 1)
    assert env["out"].shape == (1, 4, 1024, 64)
    assert env["attn"].proj.weight.grad is not None
    assert env["tq"].grad is not None and env["tq"].grad.isfinite().all()
