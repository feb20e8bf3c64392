"""The training methods: one registry entry per method, carrying its behaviour.

A method is either an *optimizer* method (the model is unchanged, the optimizer differs: GaLore,
Adam-mini, GaLore-mini …) or an *adapter* method (the model is re-parametrised — Low-Rank factors,
LoRA, ReLoRA — and trained with torch's AdamW). ``create_optimizer``, ``param_groups``, the harnesses,
the memory estimator and the plots read the entries; none of them asks which method it holds.

**API for a training loop** (names from this package)::

    entry = get(name, "--method")                         # the Method; a UsageError naming the flag otherwise
    settings = Settings(rank=..., lr=..., ...)            # from the harness's config (every field has a default)
    model = entry.build_model(model, settings)            # pretraining: rank checked, model re-parametrised
    optimizer = entry.build_optimizer(model, settings)    # the method's optimizer, or AdamW on what is trainable
    hooks = entry.step_hooks(model, optimizer, settings)  # per step: hooks.lr_factor(step) × the schedule,
                                                          # hooks.after_step(step) after each update

Fine-tuning: ``targets = check_targets(model, method_names, rank)`` once (the rank refused before
anything trains), ``settings = entry.finetune_settings(rank, lr=..., scale=..., targets=...,
freeze_embeddings=...)`` (the recipe: LR, α·r, T), ``model = entry.finetune_model(model, settings)``,
then ``build_optimizer`` as above; ``entry.layerwise`` says whether ``--layerwise`` applies. Recipes and
flags: ``entry.default_lr``, ``finetune_lr``, ``ranked``, ``projected``, ``no_fsdp``.

Modules: :mod:`.registry` (lookup, below the optimizer layer), :mod:`.method` (:class:`Method`,
:class:`Settings` and the behaviours), :mod:`.adapters` (the one adapter builder), :mod:`.catalog`
(the entries). Adding a method: ``docs/adding-a-method.md``.

Example::

    >>> from galore_mini.methods import get, names
    >>> get("galore_mini").projected, get("galore_mini").blocked
    (True, True)
    >>> "lora" in names(kind="adapter")
    True
"""

from galore_mini.methods.registry import REGISTRY, get, label, names, register
from galore_mini.methods.catalog import DEMO_METHODS, FIGURE_METHODS, FINETUNE_DEFAULT_METHODS
from galore_mini.methods.adapters import LORA_ALPHA, LORA_DROPOUT, RELORA_PRUNE, check_targets
from galore_mini.methods.method import FINETUNE_GAP, Method, Settings, StepHooks

METHODS = names()
OPTIMIZER_METHODS = names("optimizer")
ADAPTER_METHODS = names("adapter")
#: the methods with a fine-tuning recipe (a ``finetune_lr``)
FINETUNE_METHODS = tuple(m.name for m in REGISTRY.values() if m.finetune_lr is not None)

__all__ = [
    "ADAPTER_METHODS", "DEMO_METHODS", "FIGURE_METHODS", "FINETUNE_DEFAULT_METHODS", "FINETUNE_GAP", "FINETUNE_METHODS", "LORA_ALPHA",
    "LORA_DROPOUT", "METHODS", "Method", "OPTIMIZER_METHODS", "REGISTRY", "RELORA_PRUNE", "Settings", "StepHooks",
    "check_targets", "get", "label", "names", "register",
]
