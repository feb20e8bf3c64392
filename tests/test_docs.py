"""The examples in docstrings and the README run."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

MODULES = ["galore_mini.optim.blocks", "galore_mini.optim.quant", "galore_mini.optim.galore",
           "galore_mini.optim.adam_mini", "galore_mini.optim.galore_mini", "galore_mini.optim.groups",
           "galore_mini.optim.capturable"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_usage_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    first = re.search(r"## Use it\s+```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(first, "README.md", "exec"), namespace)
    assert namespace["loss"].item() > 0 and int(namespace["opt"].state[
        namespace["model"].model.layers[0].mlp.up_proj.weight]["step"]) == 10
