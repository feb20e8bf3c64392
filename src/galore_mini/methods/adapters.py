"""The one adapter builder: Low-Rank factors, LoRA (and DoRA) adapters, ReLoRA's merge-and-restart.

Pretraining uses them as the paper's low-rank baselines, each trained from a random init;
fine-tuning puts LoRA on a pretrained model's target matrices (:func:`lora_model` with `targets`).

All three change the *model*, not the optimizer; they are then trained with plain
AdamW (``gm.create_optimizer(model, "full")`` over the trainable parameters).
The weights they touch are the ones GaLore projects — the ``nn.Linear`` weights of the
model's repeated blocks, as :func:`galore_mini.optim.groups.read_model` reads them — so
every method works on the same matrices. Embeddings, norms and the output layer
stay full-rank and trainable in all three (as in the GaLore paper's baselines).

* **Low-Rank** (:func:`low_rank_model`): each such ``W`` (m×n) is replaced by
  ``B A`` with ``B`` m×r and ``A`` r×n, both trained from scratch. Both factors are
  drawn from ``N(0, s²)`` with ``s² = σ/√r`` (σ = the model's ``initializer_range``),
  so that the product's entries have the standard deviation σ of a freshly
  initialised full weight (``Var((BA)_ij) = r s⁴ = σ²``): the network starts with the
  same signal scale as the full-rank model.
* **LoRA** (:func:`lora_model`): ``peft`` LoRA adapters (rank r, alpha 32, dropout
  0.05 as in the GaLore paper) on top of the *frozen random* weights ``W₀``; the
  adapters start at ``B = 0`` (so the model starts as ``W₀``) and ``A`` Kaiming-uniform.
* **ReLoRA** (:class:`ReLoRA`): LoRA whose adapters are merged into ``W₀`` every
  ``reset_every`` steps and re-initialised (B = 0, A Kaiming-uniform, so the merged
  model is unchanged by the restart). At each merge the adapters' AdamW moments are
  magnitude-pruned as in ReLoRA (Lialin et al., 2023): in each moment tensor the
  ``prune`` fraction (default 0.99) of entries with the smallest magnitude is set
  to zero and the rest kept; ``prune=1`` zeroes them. The learning rate restarts
  "jagged": after each merge it ramps linearly from 0 back to the cosine envelope
  over ``restart_warmup`` steps. No full-rank warm-up (as in the GaLore paper's table).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn

from galore_mini.errors import UsageError
from galore_mini.methods import registry
# the module, not its names: create_optimizer (in groups) looks methods up in the registry, and whichever of
# the two packages is imported first, the other is then still loading
from galore_mini.optim import groups

LORA_ALPHA = 32
LORA_DROPOUT = 0.05
RELORA_PRUNE = 0.99


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, module)`` of every module whose weight GaLore would project (and the adapters adapt):
    the attention and MLP matrices of the repeated blocks, as :func:`galore_mini.optim.groups.read_model` reads them."""
    projectable = {id(info.param) for info in groups.read_model(model) if info.projectable}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and id(module.weight) in projectable]


def projected_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(module name, module)`` of every ``nn.Linear`` whose weight GaLore would project."""
    return [(name, module) for name, module in adapted_modules(model) if isinstance(module, nn.Linear)]


def check_rank(model: nn.Module, rank: int) -> None:
    """A `rank` every projected weight can take (below its smaller side), else a `UsageError` naming it."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UsageError(f"--rank={rank!r} must be a positive integer")
    linears = projected_linears(model)
    if not linears:
        raise UsageError("the model has no nn.Linear weights in repeated blocks to make low-rank (the weights "
                         "GaLore would project)")
    name, smallest = min(linears, key=lambda nm: min(nm[1].weight.shape))
    limit = min(smallest.weight.shape)
    if rank >= limit:
        raise UsageError(f"--rank={rank} is too large for this model: it must be below {limit}, the smaller side of "
                         f"{name}.weight {list(smallest.weight.shape)}")


def check_targets(model: nn.Module, methods: Sequence[str], rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """Fine-tuning's targets: ``(module name, weight shape)`` of :func:`adapted_modules`, refusing a `rank`
    the ranked methods among `methods` cannot use (as ``galore-mini finetune`` does before training)."""
    shapes = {id(info.param): info.shape for info in groups.read_model(model) if info.projectable}
    targets = [(name, shapes[id(module.weight)]) for name, module in adapted_modules(model)]
    ranked = [m for m in methods if registry.get(m).ranked]
    if ranked:
        if not targets:
            raise UsageError(f"--methods {','.join(ranked)}: the model has no attention/MLP matrices to project "
                             "or adapt")
        name, shape = min(targets, key=lambda t: min(t[1]))
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
        if rank >= min(shape):
            raise UsageError(f"--rank={rank} is too large for this model (hidden size {hidden}): it must be "
                             f"below {min(shape)}, the smaller side of {name}.weight {list(shape)}")
    return targets


def freeze_embeddings(model: nn.Module) -> None:
    """Stop training the token embeddings (fine-tuning's ``--freeze-embeddings``)."""
    for info in groups.read_model(model):
        if info.role == "embedding":
            info.param.requires_grad_(False)


class LowRankLinear(nn.Module):
    """``y = B (A x) + b``: a linear layer of rank `rank`, both factors trainable."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, std: float):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)  # A: r×n
        self.up = nn.Linear(rank, out_features, bias=bias)  # B: m×r
        factor_std = math.sqrt(std / math.sqrt(rank))
        nn.init.normal_(self.down.weight, std=factor_std)
        nn.init.normal_(self.up.weight, std=factor_std)
        if bias:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_model(model: nn.Module, rank: int) -> nn.Module:
    """`model` with every projected linear replaced by a trainable factorisation (in place; uses torch's RNG)."""
    check_rank(model, rank)
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    for name, linear in projected_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None, std)
        setattr(parent, child, replacement.to(device=linear.weight.device, dtype=linear.weight.dtype))
    return model


def lora_model(model: nn.Module, rank: int, alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT,
               targets: Sequence[str] | None = None, **peft_options) -> nn.Module:
    """`model` wrapped by ``peft`` LoRA on `targets`, their weights frozen; the rest as trainable as it was.

    `targets` None: every projected linear, with `rank` checked against them (pretraining); given
    (fine-tuning), the caller has checked the rank (:func:`check_targets`), and GPT-2's ``Conv1D``
    targets are handled. `peft_options` go to ``LoraConfig`` (``use_dora=True`` makes it DoRA).
    Embeddings, norms, biases and the output layer or head keep training (no baseline makes them low-rank).
    """
    # peft imports bitsandbytes, whose CPU backend warns about an optional kernel package we never use
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model  # an optional dependency, needed by the adapter methods only

    if targets is None:
        check_rank(model, rank)
        targets = [name for name, _ in projected_linears(model)]
    targets = list(targets)
    keep = [p for name, p in model.named_parameters() if p.requires_grad and name.rpartition(".")[0] not in targets]
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        fan_in_fan_out=conv1d, **peft_options)
    wrapped = get_peft_model(model, config)
    for p in keep:  # peft freezes everything but the adapters; the rest trains as in every other method
        p.requires_grad_(True)
    return wrapped


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The ``peft`` LoRA layers of `model`."""
    from peft.tuners.lora import LoraLayer  # an optional dependency, needed by the adapter methods only

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def prune_by_magnitude(tensor: torch.Tensor, fraction: float) -> None:
    """Zero the `fraction` of entries with the smallest magnitude, in place (ReLoRA's optimizer reset)."""
    total = tensor.numel()
    drop = int(round(fraction * total))
    if drop <= 0:
        return
    if drop >= total:
        tensor.zero_()
        return
    threshold = tensor.abs().flatten().kthvalue(drop).values
    tensor.masked_fill_(tensor.abs() <= threshold, 0)


class ReLoRA:
    """ReLoRA's merge-and-restart around a LoRA model and its optimizer (see the module docstring).

    Call :meth:`lr_factor` from the LR schedule and :meth:`after_step` after every optimizer
    step; both are pure functions of the step count, so resuming needs no extra state.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, reset_every: int,
                 restart_warmup: int, prune: float = RELORA_PRUNE, adapter: str = "default",
                 broadcast=None):
        if reset_every < 1:
            raise UsageError(f"--relora-every={reset_every} must be at least 1")
        if restart_warmup < 0:
            raise UsageError(f"--relora-warmup={restart_warmup} must be non-negative")
        if not 0.0 <= prune <= 1.0:
            raise UsageError(f"--relora-prune={prune} must be between 0 and 1")
        self.model, self.optimizer = model, optimizer
        self.reset_every, self.restart_warmup, self.prune = reset_every, restart_warmup, prune
        self.adapter = adapter
        self.broadcast = broadcast
        self.layers = lora_layers(model)
        if not self.layers:
            raise UsageError("ReLoRA needs a model with LoRA adapters (baselines.lora_model)")
        self.adapter_params = [p for layer in self.layers
                               for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters())]

    def lr_factor(self, step: int) -> float:
        """Multiplier on the base schedule for the update with 0-based index `step` (the jagged restart)."""
        since_reset = step % self.reset_every if step >= self.reset_every else None
        if since_reset is None or self.restart_warmup == 0:
            return 1.0
        return min(1.0, (since_reset + 1) / (self.restart_warmup + 1))

    def after_step(self, step: int) -> bool:
        """After update `step` (0-based): merge, re-initialise and prune when a restart is due."""
        if (step + 1) % self.reset_every:
            return False
        self.merge_and_reinit()
        return True

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        for layer in self.layers:
            base = layer.get_base_layer()
            base.weight.add_(layer.get_delta_weight(self.adapter).to(base.weight.dtype))
            layer.reset_lora_parameters(self.adapter, True)
        if self.broadcast is not None:
            # ranks re-draw A from the same RNG stream, but one broadcast makes agreement a fact, not a hope
            for p in self.adapter_params:
                self.broadcast(p.data)
        for p in self.adapter_params:
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if isinstance(state.get(key), torch.Tensor):
                    prune_by_magnitude(state[key], self.prune)
