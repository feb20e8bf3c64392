"""The state an optimizer will allocate, read from the optimizer itself, without allocating it.

galore-mini's optimizers declare every state tensor a parameter gets in
:meth:`~galore_mini.optim.core.ComposedOptimizer.state_layout` (the method their first step
allocates from), so the estimate cannot drift from the code. torch's Adam/AdamW keep ``exp_avg``
and ``exp_avg_sq`` like the parameter (``max_exp_avg_sq`` too with ``amsgrad``) and a scalar
``step``. Built over meta-device parameters, an optimizer costs no memory, so LLaMA-7B is cheap.

Example::

    >>> import torch, galore_mini as gm
    >>> from galore_mini.memory.layout import optimizer_state_layout
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    >>> opt = gm.create_optimizer(model, "full")
    >>> [sorted(layout) for _, layout in optimizer_state_layout(opt)]
    [['exp_avg', 'exp_avg_sq', 'step'], ['exp_avg', 'exp_avg_sq', 'step']]
"""

from __future__ import annotations

import math

import torch

from galore_mini.errors import UsageError
from galore_mini.optim import distributed
from galore_mini.optim.core import ComposedOptimizer

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _torch_adam_layout(p: torch.Tensor, group: dict) -> Layout:
    # torch keeps `step` as a scalar tensor of its "scalar dtype": float64 under a float64 default dtype
    # (unless fused), else float32
    fused = bool(group.get("fused"))
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32
    layout: Layout = {"step": ((), step_dtype), "exp_avg": (tuple(p.shape), p.dtype),
                      "exp_avg_sq": (tuple(p.shape), p.dtype)}
    if group.get("amsgrad"):
        layout["max_exp_avg_sq"] = (tuple(p.shape), p.dtype)
    return layout


def optimizer_state_layout(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, Layout]]:
    """``(parameter, {state key: (shape, dtype)})`` for every parameter `optimizer` manages, in group order."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(optimizer, ComposedOptimizer):
                layout = optimizer.state_layout(tuple(p.shape), group)
            elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
                layout = _torch_adam_layout(p, group)
            else:
                raise UsageError(f"cannot read the state layout of {type(optimizer).__name__}: the estimator knows "
                                 "galore-mini's optimizers and torch's Adam/AdamW")
            out.append((p, layout))
    return out


def layout_sizes(layout: Layout) -> dict[str, tuple[int, int]]:
    """``{state key: (entries, bytes)}`` of one parameter's layout."""
    out = {}
    for key, (shape, dtype) in layout.items():
        numel = math.prod(shape)
        out[key] = (numel, numel * dtype.itemsize)
    return out


def sharded_state_keys(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> set[str]:
    """The state keys of `p` that FSDP2 shards with `p`'s rows (``Shard(0)``); the others are whole on every rank.

    galore-mini's optimizers: :func:`galore_mini.optim.distributed.sharded_keys`, the rule their
    DTensor step allocates by (it reads shapes and group options only, so a meta-device `p` works).
    torch's Adam/AdamW allocate their moments with ``zeros_like(p)``, which keeps `p`'s placements;
    ``step`` is a plain scalar.
    """
    if isinstance(optimizer, ComposedOptimizer):
        return distributed.sharded_keys(optimizer, p, group)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return {key for key in _torch_adam_layout(p, group) if key != "step"}
    raise UsageError(f"cannot read the state layout of {type(optimizer).__name__}: the estimator knows "
                     "galore-mini's optimizers and torch's Adam/AdamW")


def sharded_layout(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict, layout: Layout) -> Layout:
    """`p`'s `layout` as FSDP2 allocates it (global shapes): galore-mini's 8-bit moments laid out by W's
    rows take their row form (codes m×cols, absmax m×K: :func:`galore_mini.optim.distributed.sharded_layout`);
    everything else is as in one process."""
    return distributed.sharded_layout(optimizer, p, group) if isinstance(optimizer, ComposedOptimizer) else layout


def rank_layout(layout: Layout, sharded: set[str], rows: int) -> Layout:
    """One rank's part of a parameter's `layout`: the `sharded` keys cut to `rows` rows, the others whole."""
    return {key: ((rows, *shape[1:]) if key in sharded else shape, dtype) for key, (shape, dtype) in layout.items()}

