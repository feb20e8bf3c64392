"""Bytes of live objects: optimizer state by key and by part, weights, gradients; one measured step.

The part a state tensor belongs to (:data:`STATE_PARTS`) is decided by one rule,
:func:`part_of`, for measured optimizers and for estimates alike.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from galore_mini import methods
from galore_mini.errors import UsageError
from galore_mini.methods import Settings

#: create_optimizer keywords that :class:`~galore_mini.methods.Settings` carries as fields of its own
_SETTINGS_KEYWORDS = ("lr", "weight_decay", "betas", "scale", "update_proj_gap", "proj_type")
STATE_PARTS = ("projectors", "first_moments", "second_moments", "block_scalars", "quant_scales", "bookkeeping")


def nbytes(t: torch.Tensor) -> int:
    """numel × element size, not the storage size: a view must not count its whole base."""
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, projectors, scales, step counters)."""
    return sum(optimizer_state_breakdown(optimizer).values())


def optimizer_state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of ``optimizer.state`` by state key (``exp_avg``, ``exp_avg_sq``, ``projector``, ``step`` …)."""
    out: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[key] = out.get(key, 0) + nbytes(value)
    return dict(sorted(out.items()))


def optimizer_state_parts(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of ``optimizer.state`` by part (:data:`STATE_PARTS`)."""
    per_param = [{key: (v.numel(), nbytes(v)) for key, v in state.items() if isinstance(v, torch.Tensor)}
                 for state in optimizer.state.values()]
    return parts(per_param)


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters, each shared (tied) one once."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each shared parameter once; buffers not counted)."""
    return sum(nbytes(p) for p in unique_parameters(model))


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the model's parameters hold now."""
    return sum(nbytes(p.grad) for p in unique_parameters(model) if p.grad is not None)


def part_of(key: str, numel: int, state_numels: dict[str, int]) -> str:
    """The part one state tensor of a parameter belongs to, given the entries of that parameter's others."""
    if key in ("step", "host_step", "refresh", "similarity"):
        return "bookkeeping"
    if key.startswith("projector"):
        return "projectors"
    if key.endswith("_absmax"):
        return "quant_scales"
    if key == "exp_avg":
        return "first_moments"
    if key == "exp_avg_sq" and "exp_avg" in state_numels and numel < state_numels["exp_avg"]:
        # fewer second-moment entries than first-moment entries: one v shared per block (Adam-mini)
        return "block_scalars"
    return "second_moments"


def parts(per_param: Iterable[dict[str, tuple[int, int]]]) -> dict[str, int]:
    """Bytes by part over parameters given as ``{state key: (entries, bytes)}``."""
    out = dict.fromkeys(STATE_PARTS, 0)
    for state in per_param:
        numels = {key: numel for key, (numel, _) in state.items()}
        for key, (numel, b) in state.items():
            out[part_of(key, numel, numels)] += b
    return out


def measure(model: nn.Module, method: str, rank: int = 128, *, state_dtype=None, input_ids: torch.Tensor | None = None,
            **optimizer_options) -> dict[str, Any]:
    """One real optimizer step on `model` with `method`; what the state, weights and gradients then hold.

    Optimizer methods: the optimizer is ``galore_mini.create_optimizer(model, method, rank=rank,
    **optimizer_options)``; gradients already present are used as they are (so several methods can be
    measured on one backward), else one forward and backward pass of the model's own language-model
    loss (``model(input_ids=ids, labels=ids).loss``, Hugging Face style) on `input_ids` (random tokens,
    2 × 16, when None) produces them. Adapter methods (``low_rank``, ``lora``, ``relora``): `model` is
    converted by the method's own transform (:mod:`galore_mini.methods.adapters`: in place for
    ``low_rank``; LoRA wraps it), gradients are recomputed and torch AdamW over the trainable
    parameters (``create_optimizer(model, "full")``, as the harness does) takes the step. Returns
    ``measured_optimizer_bytes``, ``measured_optimizer_parts``, ``measured_optimizer_by_key``,
    ``measured_weights_bytes``, ``measured_gradient_bytes``, ``measured_params``.
    """
    entry = methods.get(method)
    if input_ids is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise UsageError("measure: pass input_ids (the model has no config.vocab_size)")
        input_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    options = dict(optimizer_options)
    if state_dtype is not None and entry.state_dtype_option:
        options["state_dtype"] = state_dtype
    named = {key: options.pop(key) for key in _SETTINGS_KEYWORDS if key in options}  # Settings has fields for these
    settings = Settings(rank=rank, optimizer_options=options, **named)
    if entry.kind == "adapter":
        for p in model.parameters():
            p.grad = None  # the adapted model's gradients differ from the base model's
    model = entry.transform(model, settings)
    if all(p.grad is None for p in model.parameters() if p.requires_grad):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer = entry.build_optimizer(model, settings)
    optimizer.step()
    return {
        "measured_optimizer_bytes": optimizer_state_bytes(optimizer),
        "measured_optimizer_parts": optimizer_state_parts(optimizer),
        "measured_optimizer_by_key": optimizer_state_breakdown(optimizer),
        "measured_weights_bytes": weights_bytes(model),
        "measured_gradient_bytes": gradient_bytes(model),
        "measured_params": sum(p.numel() for p in unique_parameters(model)),
    }
