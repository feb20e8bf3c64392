"""Errors a user can act on.

`UsageError` subclasses `ValueError`, so library callers can catch the usual
exception type, while the command-line tool prints it as one line (no traceback).
"""


class UsageError(ValueError):
    """Bad input: the message names the parameter and the fix."""
