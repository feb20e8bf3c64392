"""The registry's record, :class:`Method`, what it is built with, :class:`Settings`, and its behaviours.

A :class:`Method` carries its behaviour as three callables, chosen from the small set below when the
catalog declares it:

* **transform** (the model): :func:`unchanged`, :func:`low_rank` (factorised linears),
  :func:`lora` (``peft`` adapters; ``lora(use_dora=True)`` for DoRA);
* **optimizer_builder**: :func:`own_optimizer` (``create_optimizer`` with the method's own optimizer,
  rank, scale, gap and options) or :func:`adamw_on_trainable` (torch's AdamW over what the transform
  left trainable);
* **hooks** (per step): :func:`no_hooks` or :func:`relora_hooks` (jagged LR, merge and restart).

Example::

    >>> import torch
    >>> from galore_mini import methods
    >>> from galore_mini.models import build_model
    >>> model = build_model("tiny", vocab_size=64, seed=0)
    >>> entry = methods.get("galore_mini")
    >>> settings = methods.Settings(rank=8, lr=1e-2)
    >>> model = entry.build_model(model, settings)
    >>> optimizer = entry.build_optimizer(model, settings)
    >>> hooks = entry.step_hooks(model, optimizer, settings)
    >>> hooks.lr_factor(0), hooks.after_step(0)
    (1.0, False)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from galore_mini.methods import adapters
from galore_mini.methods.adapters import LORA_ALPHA, LORA_DROPOUT, RELORA_PRUNE
# the module, not its names: groups looks methods up in the registry (see adapters)
from galore_mini.optim import groups

#: GaLore's refresh interval T in the fine-tuning recipe (the paper's GLUE runs)
FINETUNE_GAP = 500


@dataclass(frozen=True)
class Settings:
    """What a method is built with; the harness fills it from its own config (every field has a default).

    The optimizer fields go to ``create_optimizer`` (an optimizer method's own optimizer; torch's AdamW
    for the adapters takes `lr`, `weight_decay` and `betas` only), the adapter fields to the
    re-parametrisation, the ReLoRA fields to its step hooks. :meth:`Method.finetune_settings` gives the
    fine-tuning recipe's.
    """

    rank: int = 128
    """rank of the projection (GaLore family) or of the adapters / factors (LoRA, ReLoRA, Low-Rank)"""
    lr: float | None = None
    """peak learning rate (None: ``create_optimizer``'s default, the method's ``default_lr``)"""
    weight_decay: float = 0.0
    """decoupled weight decay"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas"""
    scale: float = 0.25
    """GaLore's α, applied to the back-projected update"""
    update_proj_gap: int = 200
    """GaLore's T: updates between subspace refreshes"""
    proj_type: str = "std"
    """which side GaLore projects (std, reverse_std, left, right, full)"""
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    """further ``create_optimizer`` keywords of an optimizer method (``moment_policy``, ``state_dtype`` …)"""
    lora_alpha: float = LORA_ALPHA
    """LoRA's alpha (the adapters' product is scaled by alpha / rank); the paper's 32 for pretraining"""
    lora_dropout: float = LORA_DROPOUT
    """dropout on the adapters' input; the paper's 0.05 for pretraining"""
    targets: tuple[str, ...] | None = None
    """module names to adapt (None: every linear GaLore would project, with the rank checked against them)"""
    freeze_embeddings: bool = False
    """fine-tuning: freeze the token embeddings for the ranked methods"""
    relora_every: int = 1
    """ReLoRA: merge the adapters into the weights and restart after every this many updates"""
    relora_warmup: int = 0
    """ReLoRA: updates over which the LR ramps back up after a restart"""
    relora_prune: float = RELORA_PRUNE
    """ReLoRA: fraction of each adapter moment zeroed (smallest magnitudes first) at a restart"""
    broadcast: Callable[[torch.Tensor], None] | None = None
    """distributed runs: broadcast a tensor from process 0 (ReLoRA's restarts agree on every process)"""


class StepHooks(Protocol):
    """What the training loop calls around each update."""

    def lr_factor(self, step: int) -> float:
        """Multiplier on the LR schedule for the update with 0-based index `step`."""

    def after_step(self, step: int) -> bool:
        """After update `step` (0-based; optimizer and scheduler stepped): True when it changed the model."""


@dataclass(frozen=True)
class Method:
    """One training method: its names, its optimizer, its behaviour and its fine-tuning recipe.

    The harness and the estimator call :meth:`build_model` (or :meth:`finetune_model`),
    :meth:`build_optimizer` and :meth:`step_hooks`, and never ask which method they hold.
    """

    name: str
    """the name on the command line and in ``create_optimizer``"""
    label: str
    """the name the paper's tables use"""
    short_label: str
    """for narrow table columns and plot ticks"""
    kind: str
    """``"optimizer"`` (the model is unchanged, the optimizer differs) or ``"adapter"`` (the model is
    re-parametrised and trained with torch's AdamW)"""
    optimizer: str
    """class name in ``galore_mini.optim``, or ``"AdamW"`` for ``torch.optim.AdamW``"""
    transform: Callable[[nn.Module, Settings], nn.Module]
    """how the model is re-parametrised (:func:`unchanged` for optimizer methods); may work in place"""
    optimizer_builder: Callable[[Method, nn.Module, Settings], torch.optim.Optimizer]
    """how the optimizer is built over the model :attr:`transform` returned"""
    hooks: Callable[[nn.Module, torch.optim.Optimizer, Settings], StepHooks]
    """the per-step hooks (ReLoRA's jagged LR and merge-and-restart; :func:`no_hooks` for the others)"""
    projected: bool = False
    """GaLore low-rank projection of the selected 2-D weights"""
    blocked: bool = False
    """Adam-mini block second moments (the param groups carry ``block``)"""
    default_lr: float = 1e-2
    """peak LR for pretraining when ``--lr`` is not given"""
    finetune_lr: float | None = None
    """peak LR for ``galore-mini finetune`` (None: the method has no fine-tuning recipe); docs/finetuning.md"""
    finetune_scale_rank: float = 16.0
    """α·r of the fine-tuning recipe: GaLore's α = this / rank, LoRA's alpha = this (the paper's GLUE: 16)"""
    layerwise: bool = False
    """fine-tuning's ``--layerwise`` (updates inside ``backward()``) applies to this method"""
    eps: float | None = 1e-8
    """the optimizer's eps default (None: the optimizer's own)"""
    options: dict[str, Any] = field(default_factory=dict)
    """fixed constructor options (the ablations' approach, 8-bit moments)"""
    state_dtype_option: bool = True
    """the optimizer keeps its moments in ``state_dtype`` (torch's AdamW follows the weights)"""
    no_fsdp: str = ""
    """why the method cannot train an FSDP2-sharded (DTensor) model ("" when it can; ``pretrain --fsdp``)"""

    @property
    def ranked(self) -> bool:
        """Whether `--rank` means something for this method (projection or adapters)."""
        return self.projected or self.kind == "adapter"

    def build_model(self, model: nn.Module, settings: Settings) -> nn.Module:
        """The model pretraining trains: ``settings.rank`` checked against the projected linears (ranked
        methods), then :attr:`transform`. Use the returned module (LoRA wraps the model)."""
        if self.ranked:
            adapters.check_rank(model, settings.rank)
        return self.transform(model, settings)

    def finetune_model(self, model: nn.Module, settings: Settings) -> nn.Module:
        """The model fine-tuning trains: embeddings frozen on request (ranked methods), then :attr:`transform`
        on ``settings.targets`` (their rank checked beforehand by :func:`galore_mini.methods.check_targets`)."""
        if self.ranked and settings.freeze_embeddings:
            adapters.freeze_embeddings(model)
        return self.transform(model, settings)

    def build_optimizer(self, model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
        """The optimizer over `model` as :meth:`build_model` / :meth:`finetune_model` left it."""
        return self.optimizer_builder(self, model, settings)

    def step_hooks(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: Settings) -> StepHooks:
        """What the loop calls around each update: ``lr_factor(step)`` and ``after_step(step)``."""
        return self.hooks(model, optimizer, settings)

    def finetune_settings(self, rank: int, *, lr: float | None = None, scale: float | None = None,
                          update_proj_gap: int = FINETUNE_GAP, targets=None,
                          freeze_embeddings: bool = False) -> Settings:
        """:class:`Settings` of the fine-tuning recipe: LR ``finetune_lr``, α = ``finetune_scale_rank / rank``
        (GaLore family), LoRA alpha = ``finetune_scale_rank`` without dropout, T 500; `lr`, `scale` override."""
        return Settings(rank=rank, lr=self.finetune_lr if lr is None else lr,
                        scale=self.finetune_scale_rank / rank if scale is None else scale,
                        update_proj_gap=update_proj_gap, lora_alpha=self.finetune_scale_rank, lora_dropout=0.0,
                        targets=None if targets is None else tuple(targets), freeze_embeddings=freeze_embeddings)


# -- the behaviours a catalog entry chooses from --------------------------------------------------------


def unchanged(model: nn.Module, settings: Settings) -> nn.Module:
    """The optimizer methods' transform: the model as it is."""
    return model


def low_rank(model: nn.Module, settings: Settings) -> nn.Module:
    """Every projected linear replaced by trainable factors B·A of rank ``settings.rank`` (in place)."""
    return adapters.low_rank_model(model, settings.rank)


def lora(**peft_options) -> Callable[[nn.Module, Settings], nn.Module]:
    """A transform that wraps the model in ``peft`` LoRA (``settings.rank``, ``lora_alpha``, ``lora_dropout``,
    ``targets``); `peft_options` go to ``LoraConfig`` as they are (``use_dora=True``: DoRA)."""
    return functools.partial(_lora, peft_options=peft_options)


def _lora(model: nn.Module, settings: Settings, peft_options: dict[str, Any]) -> nn.Module:
    return adapters.lora_model(model, settings.rank, settings.lora_alpha, settings.lora_dropout, settings.targets,
                               **peft_options)


def own_optimizer(method: Method, model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """``create_optimizer(model, method.name, …)``: the method's optimizer with rank, scale, gap, side and options."""
    return groups.create_optimizer(model, method.name, lr=settings.lr, rank=settings.rank,
                                   update_proj_gap=settings.update_proj_gap, scale=settings.scale,
                                   weight_decay=settings.weight_decay, betas=settings.betas,
                                   proj_type=settings.proj_type, **settings.optimizer_options)


def adamw_on_trainable(method: Method, model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """torch's AdamW (``create_optimizer(model, "full")``) over the parameters the transform left trainable."""
    return groups.create_optimizer(model, "full", lr=settings.lr, weight_decay=settings.weight_decay,
                                   betas=settings.betas)


class NoHooks:
    """The hooks of a method that has none: the schedule as it is, nothing after a step."""

    def lr_factor(self, step: int) -> float:
        return 1.0

    def after_step(self, step: int) -> bool:
        return False


def no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer, settings: Settings) -> StepHooks:
    """:class:`NoHooks`."""
    return NoHooks()


def relora_hooks(model: nn.Module, optimizer: torch.optim.Optimizer, settings: Settings) -> StepHooks:
    """ReLoRA's merge-and-restart every ``relora_every`` updates (:class:`galore_mini.methods.adapters.ReLoRA`)."""
    return adapters.ReLoRA(model, optimizer, settings.relora_every, settings.relora_warmup, settings.relora_prune,
                           broadcast=settings.broadcast)
