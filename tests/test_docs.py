"""The examples in the docstrings run and print what they say (docs cannot rot)."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["sla_numba.reference", "sla_numba.api",
                                    "sla_numba.torch_ops"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module} failed"
