"""Memory estimates per method: ``galore_mini.memory.estimate(model, method, rank=..., dtype=...)`` (see galore_mini.train.memory)."""
from galore_mini.train.memory import *  # noqa: F401,F403
from galore_mini.train.memory import estimate  # noqa: F401
