"""Moved to :mod:`galore_mini.memory`; this name stays for the harness's imports (``loop.py``)."""

from galore_mini.memory import *  # noqa: F401,F403
from galore_mini.memory import default_rank, optimizer_state_bytes, weights_bytes  # noqa: F401
