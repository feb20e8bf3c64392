"""The examples in the docstrings of the optimizer parts run (the modules test_docs.py does not list)."""

import doctest
import importlib

import pytest

MODULES = ["galore_mini.errors", "galore_mini.optim.primitives", "galore_mini.optim.refresh",
           "galore_mini.optim.dtypes", "galore_mini.optim.adafactor", "galore_mini.optim.shards",
           "galore_mini.optim.shard_8bit"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
