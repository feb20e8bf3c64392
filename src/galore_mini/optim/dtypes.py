"""The dtype options of param groups (``state_dtype``, ``proj_dtype``): names or torch dtypes, kept in
groups as plain strings so ``state_dict()`` holds no torch objects.

>>> resolve_dtype("bf16", "state_dtype"), resolve_dtype(None, "proj_dtype"), dtype_name(resolve_dtype("fp16", "x"))
(torch.bfloat16, torch.float32, 'float16')
"""

from __future__ import annotations

import torch

from galore_mini.errors import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(value, name: str) -> torch.dtype:
    """A group's dtype option (None: fp32; a torch dtype; or a name such as ``"bf16"``) as a torch dtype."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise UsageError(f"{name}={value!r}: use one of {sorted(set(DTYPES))}")


def dtype_name(value) -> str | None:
    """Group values stay plain strings so `state_dict()` holds no torch objects."""
    if value is None or isinstance(value, str):
        return value
    return str(value).replace("torch.", "")
