"""The optimizers and the parts they are composed of.

Layers, each importing only those before it: ``primitives`` (EMA, bias correction, block mean, apply),
``projection`` and ``refresh`` (the projector and its schedule), ``core`` (the base optimizer: no
algorithm, no DTensor), ``multi_tensor`` and ``capturable`` (execution drivers), ``distributed`` (the
sharded layer above the base), then one file per update rule: ``galore`` (GaLore-AdamW and its 8-bit
form), ``adafactor``, ``adam_mini`` (the block-Adam rule), ``galore_mini``.
"""

from galore_mini.optim.adam_mini import AdamMini
from galore_mini.optim.core import ComposedOptimizer, ParamStep
from galore_mini.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from galore_mini.optim.galore_mini import GaLoreMini

__all__ = ["AdamMini", "ComposedOptimizer", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreMini",
           "ParamStep"]
