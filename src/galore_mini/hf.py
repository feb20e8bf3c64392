"""Hugging Face ``transformers.Trainer``: every galore-mini optimizer, and layer-wise updates.

**Ordinary updates.** Build the optimizer from the model and the ``TrainingArguments``
and hand it to any ``Trainer`` (``trl``'s ``SFTTrainer`` included)::

    import galore_mini as gm
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments("out", learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="cosine",
                             warmup_steps=100, gradient_accumulation_steps=4, max_grad_norm=1.0,
                             save_steps=500)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=gm.hf.trainer_optimizers(model, args, "galore_mini", rank=128))
    trainer.train()                                   # later: trainer.train(resume_from_checkpoint=True)

:func:`trainer_optimizers` returns ``(optimizer, None)``. The optimizer takes
``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2`` and
``adam_epsilon`` from the arguments (weight decay goes to every weight except
norms and biases, the same split Trainer makes). The scheduler slot is ``None``
on purpose: Trainer then builds ``lr_scheduler_type`` with warm-up on this
optimizer itself, from the number of optimizer steps it computes (which depends on
the dataset, epochs and accumulation). Gradient accumulation, clipping
(``max_grad_norm``), ``save_steps`` checkpoints and
``train(resume_from_checkpoint=...)`` are Trainer's own. Our optimizer state
is tensors and plain numbers, so Trainer's ``torch.load(..., weights_only=True)``
restores it, projectors and refresh schedule included. A resumed run ends
bit-for-bit where an uninterrupted one does (tested).

Why this route: ``optim="galore_adamw"`` only reaches the ``galore-torch``
classes, and ``TrainingArguments.optim`` accepts no other names.
``optimizer_cls_and_kwargs`` hands the class Trainer's own two param groups and
no learning rate. Our optimizers need the model itself to pick projected weights
and Adam-mini blocks.

**Layer-wise updates** (:func:`galore_mini.layerwise`: each parameter is updated
inside ``backward()`` and its gradient freed at once). Use :class:`LayerwiseTrainer`
in place of ``Trainer``, with the same ``optimizers`` argument::

    trainer = gm.hf.LayerwiseTrainer(model=model, args=args, train_dataset=data,
                                     optimizers=gm.hf.trainer_optimizers(model, args, "galore_mini", rank=128))

It maps ``gradient_accumulation_steps`` to the layer-wise ``accumulation_steps``
and ``max_grad_norm`` to the layer-wise ``max_grad_norm``. Clipping then uses the
previous step's global norm as its bound (see :mod:`galore_mini.optim.layerwise`),
and the logged ``grad_norm`` is the true pre-clip norm. Trainer's
``optimizer.step()`` only checks that the update happened. When Trainer closes a
short accumulation window at the end of an epoch, that step applies the window's
gradients (``flush``). The scheduler advances once per optimizer step, and
checkpoints and resume work as above. Without ``optimizers``, Trainer's own
optimizer (``args.optim``, per-parameter state such as AdamW) is made layer-wise.
Other ``Trainer`` subclasses take layer-wise updates through
:class:`LayerwiseTrainerMixin` (``class MySFT(gm.hf.LayerwiseTrainerMixin, SFTTrainer)``).

Refused with a :class:`~galore_mini.errors.UsageError`, because each would
silently train something else: several processes (DDP, FSDP, DeepSpeed) or
``DataParallel`` (the hooks fire on each replica's local gradient before any
reduction), fp16 with a gradient scaler (the updates would use gradients before
unscaling; bf16 works), Hugging Face's own ``*_layerwise`` optimizers, and an
accumulation or clipping setting that disagrees with ``TrainingArguments``.

Do not pass a model with a :func:`galore_mini.layerwise` handle already attached
to a plain ``Trainer``. Its ``optimizer.step()`` then does nothing (the update
already happened), Trainer's clipping sees no gradients (it clips nothing and
logs ``grad_norm`` 0), and an accumulation setting that disagrees with Trainer's
either trips the layer-wise guard or, when the handle accumulates fewer
micro-batches, updates more often than Trainer steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from torch import nn

from galore_mini import methods
from galore_mini.errors import UsageError
from galore_mini.optim.groups import create_optimizer as _create_optimizer
from galore_mini.optim.layerwise import DEFAULT_BUCKET_BYTES, LayerwiseUpdates

__all__ = ["LayerwiseOptimizer", "LayerwiseTrainer", "LayerwiseTrainerMixin", "create_optimizer",
           "trainer_optimizers"]

# hyperparameters that belong to TrainingArguments: a second value here would be a second source of truth
_FROM_ARGS = {"lr": "learning_rate", "weight_decay": "weight_decay", "betas": "adam_beta1/adam_beta2",
              "eps": "adam_epsilon"}


def _field_default(name: str):
    return {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}[name]


def create_optimizer(model: nn.Module, args: transformers.TrainingArguments, method: str = "galore_mini",
                     **options) -> torch.optim.Optimizer:
    """``galore_mini.create_optimizer`` with the hyperparameters Trainer owns taken from `args`.

    ``lr`` ← ``args.learning_rate``, ``weight_decay`` ← ``args.weight_decay`` (norms and
    biases excluded), ``betas`` ← ``(args.adam_beta1, args.adam_beta2)``, ``eps`` ←
    ``args.adam_epsilon`` (GaLore's reference uses 1e-6: set ``adam_epsilon=1e-6`` to match
    galore-torch). GaLore-Adafactor has neither betas nor eps, so it refuses non-default Adam
    fields. `options` are the galore-mini options (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_method``, ``overrides`` …); passing one of the four above here is an error, and so
    are a non-default ``args.optim`` and ``args.optim_args`` (Trainer would ignore them).
    ``args.optim_target_modules`` is honoured as ``target_modules`` (same semantics as Hugging
    Face's: ``"all-linear"``, a list of names or substrings, or a regex).

    Example::

        opt = gm.hf.create_optimizer(model, args, "adam_mini")
    """
    if not isinstance(args, transformers.TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    entry = methods.get(method)
    if entry.kind != "optimizer":
        raise UsageError(f"method={method!r} re-parametrises the model ({entry.label}); Trainer integration takes "
                         f"an optimizer method: {', '.join(methods.OPTIMIZER_METHODS)}")
    doubled = sorted(set(options) & set(_FROM_ARGS))
    if doubled:
        fields = ", ".join(f"{k} (TrainingArguments.{_FROM_ARGS[k]})" for k in doubled)
        raise UsageError(f"{fields}: Trainer's hyperparameters come from TrainingArguments; set them there, "
                         "not as optimizer options")
    if args.optim_target_modules is not None:
        # Hugging Face's GaLore knob means the same thing as ours (which weights are projected), so it is honoured
        if not entry.projected:
            raise UsageError(f"TrainingArguments.optim_target_modules={args.optim_target_modules!r} selects weights to "
                             f"project, but {entry.label} projects nothing; leave it unset or choose a GaLore method")
        if "target_modules" in options and options["target_modules"] != args.optim_target_modules:
            raise UsageError(f"target_modules={options['target_modules']!r} disagrees with "
                             f"TrainingArguments.optim_target_modules={args.optim_target_modules!r}; set one of them")
        options = {**options, "target_modules": args.optim_target_modules}
    optim = str(getattr(args.optim, "value", args.optim))
    if optim != str(_field_default("optim")):
        raise UsageError(f"TrainingArguments.optim={optim!r} would be ignored: Trainer uses the optimizer passed in "
                         f"optimizers=, here {entry.label}; leave optim at its default")
    if args.optim_args:
        raise UsageError(f"TrainingArguments.optim_args={args.optim_args!r} would be ignored: pass galore-mini "
                         "options as keywords (rank=..., update_proj_gap=..., scale=...)")
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if entry.eps is not None:  # Adam-type: betas and eps apply
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    else:
        changed = [name for name in ("adam_beta1", "adam_beta2", "adam_epsilon")
                   if getattr(args, name) != _field_default(name)]
        if changed:
            raise UsageError(f"TrainingArguments {', '.join(changed)} cannot apply to {entry.label}, which has no "
                             "Adam betas/eps; leave them at their defaults (Adafactor's own options go in as keywords, "
                             "e.g. beta1=0.9)")
    return _create_optimizer(model, method, **kwargs, **options)


def trainer_optimizers(model: nn.Module, args: transformers.TrainingArguments, method: str = "galore_mini",
                       **options) -> tuple[torch.optim.Optimizer, None]:
    """``(optimizer, None)`` for ``Trainer(optimizers=...)``; Trainer builds the scheduler from `args`.

    See :func:`create_optimizer` for what comes from `args`. Example::

        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizers=gm.hf.trainer_optimizers(model, args, "galore_mini", rank=128))
    """
    return create_optimizer(model, args, method, **options), None


class LayerwiseOptimizer(torch.optim.Optimizer):
    """What Trainer holds under layer-wise updates: the wrapped optimizer, stepped inside backward.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's (so Trainer's scheduler
    sets its learning rates); ``state_dict()`` / ``load_state_dict()`` go through the
    :class:`~galore_mini.optim.layerwise.LayerwiseUpdates` handle (optimizer state plus clip
    bookkeeping). ``step()`` does no arithmetic. It checks that exactly one layer-wise update
    happened since the previous call. If the window was closed early (Trainer's short last window of
    an epoch), it applies the pending gradients. Otherwise it raises: the two step counts disagree.
    """

    def __init__(self, params, optimizer: torch.optim.Optimizer, *, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        # torch.optim.Optimizer.__init__ would copy the param groups; ours must stay the wrapped optimizer's
        # (load_state_dict replaces them), so only the hook tables it sets up are created here
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._patch_step_function()  # step hooks registered on this object run, as on any optimizer
        self.optimizer = optimizer
        self.handle = LayerwiseUpdates(params, optimizer, accumulation_steps=accumulation_steps,
                                       max_grad_norm=max_grad_norm, bucket_bytes=bucket_bytes)
        self._steps_seen = self.handle.step_count
        self._closed = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def close_window(self) -> None:
        """Check that this optimizer step's layer-wise update happened, applying a window Trainer closed early.

        Idempotent until the next ``step()``; Trainer's clipping hook calls it so that the logged norm
        is this step's.
        """
        if self._closed:
            return
        handle = self.handle
        if handle.step_count == self._steps_seen:
            if not handle.flush():  # a window Trainer closed early: update from the gradients it left
                raise RuntimeError(
                    "optimizer.step() was called but no backward() reached the layer-wise parameters since the last "
                    "step: nothing to update")
        elif handle.step_count != self._steps_seen + 1:
            raise RuntimeError(
                f"{handle.step_count - self._steps_seen} layer-wise updates happened between two optimizer.step() "
                f"calls: the accumulation windows disagree (layer-wise accumulation_steps="
                f"{handle.accumulation_steps}); set them from TrainingArguments.gradient_accumulation_steps")
        self._steps_seen = handle.step_count
        self._closed = True

    def step(self, closure=None):
        if closure is not None:
            raise UsageError("layer-wise updates take no closure: the update happens inside backward()")
        self.close_window()
        self._closed = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.handle.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.handle.load_state_dict(state_dict)
        self._steps_seen = self.handle.step_count
        self._closed = False

    def add_param_group(self, param_group) -> None:
        raise UsageError("layer-wise updates hook the parameters when they start; build the optimizer with all "
                         "its param groups before training")

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        return self.handle.last_grad_norm

    def remove(self) -> None:
        """Back to ordinary ``optimizer.step()`` training (removes the gradient hooks)."""
        self.handle.remove()

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.handle!r})"


def _unwrap(optimizer):
    while optimizer is not None and not isinstance(optimizer, LayerwiseOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
    return optimizer


def _max_grad_norm(args: transformers.TrainingArguments) -> float | None:
    return float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None  # 0: no clipping


def _check_layerwise_args(args: transformers.TrainingArguments) -> None:
    from transformers.training_args import ParallelMode

    if args.parallel_mode not in (ParallelMode.NOT_PARALLEL,) or args.world_size > 1:
        raise UsageError(
            f"layer-wise updates with TrainingArguments parallel_mode={args.parallel_mode.value!r} (world size "
            f"{args.world_size}) are not supported: each process would update from its own gradient before DDP/FSDP "
            "reduces it, so the replicas drift apart; train on one process, or use gm.hf.trainer_optimizers with "
            "the plain Trainer")
    if args.deepspeed or args.fsdp:
        raise UsageError("layer-wise updates do not work with DeepSpeed or FSDP (they own the optimizer step); "
                         "use gm.hf.trainer_optimizers with the plain Trainer")
    if args.fp16:
        raise UsageError("layer-wise updates with fp16=True are not supported: the gradient scaler unscales after "
                         "backward, but the updates happen inside it; use bf16=True (needs no scaler)")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim.endswith("layerwise"):
        raise UsageError(f"TrainingArguments.optim={optim!r} is Hugging Face's own layer-wise mode; with "
                         "LayerwiseTrainer pick the optimizer with optimizers=gm.hf.trainer_optimizers(...) instead")


class LayerwiseTrainerMixin:
    """Makes a ``Trainer`` (sub)class train with layer-wise updates; see the module docstring.

    Put it first: ``class MyTrainer(LayerwiseTrainerMixin, SomeTrainer)``. The optimizer Trainer
    would use (the one passed in ``optimizers`` or the one ``args.optim`` names) is wrapped in a
    :class:`LayerwiseOptimizer` when training starts. ``layerwise_bucket_bytes`` sets the
    layer-wise bucket size (default 64 MiB).
    """

    def __init__(self, *args, layerwise_bucket_bytes: int = DEFAULT_BUCKET_BYTES, **kwargs):
        for name in ("_clip_grad_norm", "_get_grad_norm"):  # the hooks below replace these private methods
            if not callable(getattr(transformers.Trainer, name, None)):
                raise RuntimeError(f"LayerwiseTrainer needs transformers.Trainer.{name}, which transformers "
                                   f"{transformers.__version__} lacks; this version is not supported")
        super().__init__(*args, **kwargs)
        _check_layerwise_args(self.args)
        self._layerwise_bucket_bytes = layerwise_bucket_bytes

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        inner = _unwrap(optimizer)
        if isinstance(inner, LayerwiseOptimizer):
            self._check_matches(inner)
            return optimizer
        if getattr(inner, "_layerwise_handle", None) is not None:
            raise UsageError("the optimizer already has a gm.layerwise() handle; give LayerwiseTrainer the plain "
                             "optimizer (it sets layer-wise updates up from TrainingArguments)")
        self.optimizer = LayerwiseOptimizer(self.model if model is None else model, optimizer,
                                            accumulation_steps=self.args.gradient_accumulation_steps,
                                            max_grad_norm=_max_grad_norm(self.args),
                                            bucket_bytes=self._layerwise_bucket_bytes)
        return self.optimizer

    def _check_matches(self, layerwise: LayerwiseOptimizer) -> None:
        handle = layerwise.handle
        if (handle.accumulation_steps != self.args.gradient_accumulation_steps
                or handle.max_grad_norm != _max_grad_norm(self.args)):
            raise UsageError(
                f"the LayerwiseOptimizer has accumulation_steps={handle.accumulation_steps}, max_grad_norm="
                f"{handle.max_grad_norm} but TrainingArguments say gradient_accumulation_steps="
                f"{self.args.gradient_accumulation_steps}, max_grad_norm={self.args.max_grad_norm}; pass the plain "
                "optimizer and let LayerwiseTrainer set it up")

    def _clip_grad_norm(self, model):
        # clipping happened inside backward; report the step's true (pre-clip) global norm, as Trainer does
        layerwise = _unwrap(self.optimizer)
        layerwise.close_window()
        return layerwise.last_grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        # the gradients are gone by now: only a norm the clipping measured exists (none without clipping)
        return grad_norm


class LayerwiseTrainer(LayerwiseTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with layer-wise updates (see :mod:`galore_mini.hf`).

    Example::

        trainer = gm.hf.LayerwiseTrainer(model=model, args=args, train_dataset=data,
                                         optimizers=gm.hf.trainer_optimizers(model, args, "galore_mini", rank=128))
        trainer.train()
    """
