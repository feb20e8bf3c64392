"""galore-mini: train large language models in less memory by keeping optimizer state small.

Optimizers (ordinary ``torch.optim.Optimizer`` classes)::

    GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit   # GaLore (low-rank projected gradients)
    AdamMini                                        # Adam with block-shared second moments
    GaLoreMini                                      # both at once

and the helpers that build their param groups from a model::

    import galore_mini as gm
    opt = gm.create_optimizer(model, "galore_mini", lr=1e-2, rank=128)
"""

from galore_mini.errors import UsageError
from galore_mini.optim import AdamMini, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreMini
from galore_mini.methods import OPTIMIZER_METHODS
from galore_mini.optim.groups import ParamGroups, create_optimizer, param_groups
from galore_mini.optim.layerwise import layerwise
from galore_mini import memory  # after the optimizers it counts; it imports no harness

#: the methods `create_optimizer` and `param_groups` take: the registry's optimizer methods (the
#: adapter baselines are galore_mini.methods.ADAPTER_METHODS)
METHODS = OPTIMIZER_METHODS

__version__ = "0.1.0"

__all__ = [
    "AdamMini",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreMini",
    "METHODS",
    "OPTIMIZER_METHODS",
    "ParamGroups",
    "UsageError",
    "create_optimizer",
    "layerwise",
    "memory",
    "param_groups",
]


def __getattr__(name):
    if name == "hf":  # Hugging Face Trainer integration; pulls in transformers, so only when asked for
        import importlib

        return importlib.import_module("galore_mini.hf")
    raise AttributeError(f"module 'galore_mini' has no attribute {name!r}")
