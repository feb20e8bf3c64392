"""Errors a user can act on.

`UsageError` subclasses `ValueError`, so library callers can catch the usual
exception type, while the command-line tool prints it as one line (no traceback).
"""

import math

import torch


class UsageError(ValueError):
    """Bad input: the message names the parameter and the fix."""


def check_number(name: str, value, *, allow_none: bool = False, low: float = 0.0) -> None:
    """Refuse an option that is not a finite number >= `low` (a one-element tensor counts as its value).

    >>> check_number("lr", 1e-3)
    >>> check_number("lr", -1.0)
    Traceback (most recent call last):
    ...
    galore_mini.errors.UsageError: lr=-1.0 is invalid: it must be a finite number >= 0.0
    """
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise UsageError(f"{name}={value!r} is invalid: it must be a finite number >= {low}")
