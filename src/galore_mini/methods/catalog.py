"""Every training method, declared once with its optimizer, its behaviour and its recipes.

Adding a method is one :class:`~galore_mini.methods.method.Method` entry here (``docs/adding-a-method.md``):
an optimizer method names its optimizer class in :mod:`galore_mini.optim`; an adapter method names the
transform of the model it trains. The optimizer layer (``create_optimizer``), the pretraining and
fine-tuning harnesses, the memory estimator and the plots all read these entries.
"""

from __future__ import annotations

from galore_mini.methods.method import (
    Method, adamw_on_trainable, lora, low_rank, no_hooks, own_optimizer, relora_hooks, unchanged)
from galore_mini.methods.registry import register


def optimizer_method(name: str, label: str, short_label: str, optimizer: str, **fields) -> Method:
    """An entry whose model is unchanged and whose optimizer is `optimizer` (a class of galore_mini.optim)."""
    return Method(name, label, short_label, "optimizer", optimizer, unchanged, own_optimizer, no_hooks, **fields)


def adapter_method(name: str, label: str, transform, hooks=no_hooks, **fields) -> Method:
    """An entry that re-parametrises the model with `transform` and trains what is trainable with torch's AdamW."""
    return Method(name, label, label, "adapter", "AdamW", transform, adamw_on_trainable, hooks,
                  state_dtype_option=False, **fields)


# The GaLore family keeps the paper's 1e-2 (scale 0.25); the others are the best of a sweep over
# {1e-3, 3e-3, 1e-2} on `tiny` (300 steps, default corpus), see docs/pretraining.md.
# finetune_lr: the best of one sweep, lr in {3e-4, 1e-3, 3e-3, 1e-2}, seed 0, on the offline fine-tuning
# demo (RESULTS.md, "Fine-tuning"); GaLore-mini's lr and α·r = 4 (α = 0.5 at r = 8) from a second sweep
# over lr × α × T with 3 seeds each, confirmed on 3 held-out seeds (same section).
register(
    optimizer_method("full", "Full (AdamW)", "AdamW", "AdamW", default_lr=3e-3, state_dtype_option=False,
                     finetune_lr=1e-3),
    optimizer_method("adam_mini", "Adam-mini", "Adam-mini", "AdamMini", blocked=True, default_lr=1e-3,
                     finetune_lr=1e-3),
    optimizer_method("galore", "GaLore", "GaLore", "GaLoreAdamW", projected=True, eps=1e-6, finetune_lr=3e-3),
    optimizer_method("galore_mini", "GaLore-mini", "GaLore-mini", "GaLoreMini", projected=True, blocked=True,
                     finetune_lr=2e-3, finetune_scale_rank=4.0, layerwise=True),
    optimizer_method("galore_mini_a1", "GaLore-mini (approach 1)", "GaLore-mini a1", "GaLoreMini", projected=True,
                     blocked=True, options={"approach": 1}),
    optimizer_method("galore_mini_a2", "GaLore-mini (approach 2)", "GaLore-mini a2", "GaLoreMini", projected=True,
                     blocked=True, options={"approach": 2}),
    optimizer_method("galore_adafactor", "GaLore-Adafactor", "GaLore-Adafactor", "GaLoreAdafactor", projected=True,
                     eps=None, options={"relative_step": False, "scale_parameter": False}, state_dtype_option=False),
    optimizer_method("galore_8bit", "8-bit GaLore", "8-bit GaLore", "GaLoreAdamW8bit", projected=True, eps=1e-6),
    optimizer_method("galore_mini_8bit", "8-bit GaLore-mini", "8-bit GaLore-mini", "GaLoreMini", projected=True,
                     blocked=True, options={"moment_bits": 8}),
    adapter_method("low_rank", "Low-Rank", low_rank, default_lr=1e-3),
    adapter_method("lora", "LoRA", lora(), default_lr=3e-3, finetune_lr=1e-3),
    adapter_method("relora", "ReLoRA", lora(), relora_hooks, default_lr=1e-3,
                   no_fsdp="ReLoRA's merge of the adapters into sharded frozen weights is not implemented"),
    # DoRA (Liu et al., 2024): LoRA on the direction of W plus a trained magnitude per output row (peft's
    # use_dora); LoRA's learning rates, not swept for DoRA
    adapter_method("dora", "DoRA", lora(use_dora=True), default_lr=3e-3, finetune_lr=1e-3,
                   no_fsdp="DoRA's weight norm over sharded frozen weights is not tested under FSDP2"),
)

#: what `compare` runs by default, and the paper's comparison (``--methods all`` in `memory`)
DEMO_METHODS = ("full", "adam_mini", "galore", "galore_mini", "low_rank", "lora", "relora")
#: what `finetune` compares by default (the GLUE table's methods); DoRA and others on request
FINETUNE_DEFAULT_METHODS = ("full", "adam_mini", "galore", "galore_mini", "lora")
FIGURE_METHODS = ("full", "adam_mini", "galore", "galore_mini", "galore_8bit", "galore_mini_8bit",
                  "low_rank", "lora", "relora")
