"""The one registry of training methods: every name, label, flag and default lives here.

`create_optimizer`, `param_groups`, the pretraining and fine-tuning harnesses, the memory
estimator and the plots all read :data:`REGISTRY`; no other module spells a method's name
in a table of its own. Adding an optimizer is one class plus one :class:`Method` entry.

A method is either an *optimizer* method (the model is unchanged, the optimizer differs) or an
*adapter* method (the model is re-parametrised — LoRA, ReLoRA, low-rank factors — and trained
with torch's AdamW).

Example::

    >>> from galore_mini.methods import get, names
    >>> get("galore_mini").projected, get("galore_mini").blocked
    (True, True)
    >>> "lora" in names(kind="adapter")
    True
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from galore_mini.errors import UsageError


@dataclass(frozen=True)
class Method:
    """How one method trains and how the harness, estimator and plots present it."""

    name: str
    label: str  # the name the paper's tables use
    short_label: str  # for narrow table columns and plot ticks
    kind: str  # "optimizer" or "adapter"
    optimizer: str  # class name in galore_mini.optim, or "AdamW" for torch.optim.AdamW
    projected: bool = False  # GaLore low-rank projection of the selected 2-D weights
    blocked: bool = False  # Adam-mini block second moments (groups carry `block`)
    default_lr: float = 1e-2
    #: peak LR for `galore-mini finetune` (None: the method has no fine-tuning recipe there); see docs/finetuning.md
    finetune_lr: float | None = None
    # α·r of the fine-tuning recipe (α = finetune_scale_rank / rank); the paper's GLUE recipe is 16
    finetune_scale_rank: float = 16.0
    eps: float | None = 1e-8  # the optimizer's eps default (None: the optimizer's own)
    #: fixed constructor options (e.g. the ablation's approach, 8-bit moments)
    options: dict[str, Any] = field(default_factory=dict)
    #: whether the optimizer keeps its moments in `state_dtype` (torch's AdamW follows the weights)
    state_dtype_option: bool = True
    #: why the method cannot train an FSDP2-sharded (DTensor) model ("" when it can; ``pretrain --fsdp``)
    no_fsdp: str = ""

    @property
    def ranked(self) -> bool:
        """Whether `--rank` means something for this method (projection or adapters)."""
        return self.projected or self.kind == "adapter"


_METHODS = (
    # The GaLore family keeps the paper's 1e-2 (scale 0.25); the others are the best of a sweep over
    # {1e-3, 3e-3, 1e-2} on `tiny` (300 steps, default corpus), see docs/pretraining.md.
    # finetune_lr: the best of one sweep, lr in {3e-4, 1e-3, 3e-3, 1e-2}, seed 0, on the offline fine-tuning
    # demo (RESULTS.md, "Fine-tuning"); GaLore-mini's lr and α·r = 4 (α = 0.5 at r = 8) from a second sweep
    # over lr × α × T with 3 seeds each, confirmed on 3 held-out seeds (same section).
    Method("full", "Full (AdamW)", "AdamW", "optimizer", "AdamW", default_lr=3e-3, state_dtype_option=False,
           finetune_lr=1e-3),
    Method("adam_mini", "Adam-mini", "Adam-mini", "optimizer", "AdamMini", blocked=True, default_lr=1e-3,
           finetune_lr=1e-3),
    Method("galore", "GaLore", "GaLore", "optimizer", "GaLoreAdamW", projected=True, eps=1e-6, finetune_lr=3e-3),
    Method("galore_mini", "GaLore-mini", "GaLore-mini", "optimizer", "GaLoreMini", projected=True, blocked=True,
           finetune_lr=2e-3, finetune_scale_rank=4.0),
    Method("galore_mini_a1", "GaLore-mini (approach 1)", "GaLore-mini a1", "optimizer", "GaLoreMini",
           projected=True, blocked=True, options={"approach": 1}),
    Method("galore_mini_a2", "GaLore-mini (approach 2)", "GaLore-mini a2", "optimizer", "GaLoreMini",
           projected=True, blocked=True, options={"approach": 2}),
    Method("galore_adafactor", "GaLore-Adafactor", "GaLore-Adafactor", "optimizer", "GaLoreAdafactor",
           projected=True, eps=None, options={"relative_step": False, "scale_parameter": False},
           state_dtype_option=False),
    Method("galore_8bit", "8-bit GaLore", "8-bit GaLore", "optimizer", "GaLoreAdamW8bit", projected=True, eps=1e-6),
    Method("galore_mini_8bit", "8-bit GaLore-mini", "8-bit GaLore-mini", "optimizer", "GaLoreMini", projected=True,
           blocked=True, options={"moment_bits": 8}),
    Method("low_rank", "Low-Rank", "Low-Rank", "adapter", "AdamW", default_lr=1e-3, state_dtype_option=False),
    Method("lora", "LoRA", "LoRA", "adapter", "AdamW", default_lr=3e-3, state_dtype_option=False,
           finetune_lr=1e-3),
    Method("relora", "ReLoRA", "ReLoRA", "adapter", "AdamW", default_lr=1e-3, state_dtype_option=False,
           no_fsdp="ReLoRA's merge of the adapters into sharded frozen weights is not implemented"),
)

REGISTRY: dict[str, Method] = {m.name: m for m in _METHODS}

#: what `compare` runs by default, and the paper's comparison (``--methods all`` in `memory`)
DEMO_METHODS = ("full", "adam_mini", "galore", "galore_mini", "low_rank", "lora", "relora")
FIGURE_METHODS = ("full", "adam_mini", "galore", "galore_mini", "galore_8bit", "galore_mini_8bit",
                  "low_rank", "lora", "relora")


def names(kind: str | None = None) -> tuple[str, ...]:
    """Every method name in registry order, or those of one kind (``"optimizer"`` / ``"adapter"``)."""
    return tuple(m.name for m in _METHODS if kind is None or m.kind == kind)


def get(name: str, what: str = "method") -> Method:
    """The registry entry for `name`; a `UsageError` with a did-you-mean for anything else."""
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{what}={name!r} is unknown{hint}; use one of {', '.join(REGISTRY)}")
    return method


def label(name: str) -> str:
    """The paper's name for `name` (the name itself for anything unregistered)."""
    method = REGISTRY.get(name)
    return method.label if method else name


METHODS = names()
OPTIMIZER_METHODS = names("optimizer")
ADAPTER_METHODS = names("adapter")
