"""The examples in the docstrings of the optimizer parts run (the modules test_docs.py does not list)."""

import pytest

from test_docs import test_docstring_examples as check_docstring_examples

MODULES = ["galore_mini.errors", "galore_mini.optim.primitives", "galore_mini.optim.refresh",
           "galore_mini.optim.dtypes", "galore_mini.optim.adafactor", "galore_mini.optim.shards",
           "galore_mini.optim.shard_8bit"]


@pytest.mark.parametrize("name", MODULES)
def test_optimizer_part_examples(name):
    check_docstring_examples(name)
