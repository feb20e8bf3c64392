"""The optimizers and the parts they are composed of."""

from galore_mini.optim.adam_mini import AdamMini
from galore_mini.optim.core import ComposedOptimizer, ParamStep
from galore_mini.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from galore_mini.optim.galore_mini import GaLoreMini

__all__ = ["AdamMini", "ComposedOptimizer", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreMini",
           "ParamStep"]
