"""GaLore-AdamW and its 8-bit form: Adam on low-rank projected gradients (GaLore-Adafactor is in
:mod:`.adafactor`, re-exported here).

Drop-in replacements for galore-torch 1.0's classes (same constructor
arguments, same param-group keys ``rank``, ``update_proj_gap``, ``scale``,
``proj_type``), with tensor-only state. Groups without ``rank`` get the plain
optimizer (AdamW) on the full gradient.

The rule is written once, :func:`adam_moments` and :func:`adam_step_size`, and run by every path:
:func:`adam_update` (the single-tensor reference, 8-bit moments, and the sharded step of
:mod:`.distributed`), :func:`adam_multi_tensor` (lists, foreach kernels) and :func:`adam_capturable`
(device coefficients, no host read).

Algorithm (GaLore-AdamW, per projected weight W with gradient G, step t):
the projector is recomputed from G when ``(t-1) mod T == 0``;
``R = project(G)``; ``M ← β1 M + (1-β1) R``; ``V ← β2 V + (1-β2) R²``;
``N = M / (√V + ε)``; ``W ← W - η·√(1-β2ᵗ)/(1-β1ᵗ) · α·back(N)``; then
``W ← W - ηλW`` (decoupled decay after the update, as galore-torch does; ε sits
outside the bias correction, Hugging Face AdamW style).

Limits: only 2-D weights can be projected and ``rank`` must be below
``min(rows, cols)``; the exact SVD refresh is slow on CPUs for big matrices
(use ``proj_method="randomized"`` or ``"power"``).

Example::

    >>> import torch, galore_mini as gm
    >>> w = torch.nn.Parameter(torch.randn(64, 32))
    >>> b = torch.nn.Parameter(torch.zeros(64))
    >>> opt = gm.GaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 50, "scale": 0.25},
    ...                       {"params": [b]}], lr=1e-2)
    >>> (w.sum() ** 2 + b.sum()).backward(); opt.step(); opt.zero_grad()
    >>> tuple(opt.state[w]["exp_avg"].shape)   # m ≥ n: the right side is projected
    (64, 8)
"""

from __future__ import annotations

import torch

from galore_mini.errors import UsageError
from galore_mini.optim import multi_tensor
from galore_mini.optim.adafactor import GaLoreAdafactor
from galore_mini.optim.capturable import CapturableMixin, advance_counters, low_rank_gradient
from galore_mini.optim.core import ParamStep, WorkItem
from galore_mini.optim.distributed import ShardedOptimizer
from galore_mini.optim.primitives import Tensors, Update, adam_normalized, bias_corrections, ema_, ema_sq_, sqrt
from galore_mini.optim.projection import back_factors


# -- the rule ---------------------------------------------------------------------------------------


def adam_moments(m: Tensors, v: Tensors, low: Tensors, beta1: float, beta2: float, eps: float,
                 ok: torch.Tensor | None = None) -> Tensors:
    """GaLore-AdamW's rule in the low-rank space: ``M ← β1 M + (1-β1) R``; ``V ← β2 V + (1-β2) R²``;
    returns ``N = M / (√V + ε)``. One tensor, lists (foreach) or a device flag `ok`."""
    ema_(m, low, beta1, ok)
    ema_sq_(v, low, beta2, ok)
    return adam_normalized(m, v, eps)


def adam_step_size(lr, bc1, bc2, scale: float):
    """``η·√(1-β2ᵗ)/(1-β1ᵗ)·α`` (host floats, or device scalars on the capturable path)."""
    return lr * sqrt(bc2) / bc1 * scale


def adam_update(ps: ParamStep) -> Update:
    """The single-tensor execution (reference path and sharded step); moments may be 8-bit."""
    beta1, beta2 = ps.group["betas"]
    low = ps.project(ps.grad)
    m = ps.read("exp_avg", low.shape, signed=True)
    v = ps.read("exp_avg_sq", low.shape, signed=False)
    normalized = adam_moments(m, v, low, beta1, beta2, ps.group["eps"])
    ps.write("exp_avg", m, signed=True)
    ps.write("exp_avg_sq", v, signed=False)
    bc1, bc2 = ps.bias_corrections(beta1, beta2)
    return Update(ps.back(normalized), adam_step_size(ps.group["lr"], bc1, bc2, ps.scale))


def adam_multi_tensor(optimizer, items: list[WorkItem], steps: list[int]) -> None:
    """The multi-tensor execution: every parameter in `items` (fp32 moments) at its step in `steps`."""
    for entries in multi_tensor.by_group(items, steps):
        group = entries[0].group
        beta1, beta2 = group["betas"]
        states, sides, low = multi_tensor.start(optimizer, entries)
        normalized = adam_moments([state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states],
                                  low, beta1, beta2, group["eps"])
        del low
        scale = group["scale"] if "rank" in group else 1.0
        for e, state, side, n in zip(entries, states, sides, normalized):
            bc1, bc2 = bias_corrections(group, beta1, beta2, e.step)
            direction = back_factors(n, state, side) if side else n
            optimizer.apply_update(e.param, group, Update(direction, adam_step_size(group["lr"], bc1, bc2, scale)))


def adam_capturable(optimizer, group: dict, chosen: list[tuple]) -> None:
    """The capturable execution (no host read): `chosen` holds ``(param, layout, side or None)``; the
    probe is ``R``, whose entries are non-finite whenever ``G``'s are."""
    beta1, beta2 = group["betas"]
    states = [optimizer.state[p] for p, *_ in chosen]
    lows = [low_rank_gradient(p, state, side) for (p, _, side), state in zip(chosen, states)]
    oks, steps = advance_counters(optimizer, group, states, lows)
    scale = group["scale"] if "rank" in group else 1.0
    for i, ((p, _, side), state) in enumerate(zip(chosen, states)):
        ok = None if oks is None else oks[i]
        normalized = adam_moments(state["exp_avg"], state["exp_avg_sq"], lows[i], beta1, beta2, group["eps"], ok)
        bc1, bc2 = bias_corrections(group, beta1, beta2, steps[i])
        direction = back_factors(normalized, state, side) if side else normalized
        optimizer.apply_update(p, group, Update(direction, adam_step_size(group["lr"], bc1, bc2, scale)), ok=ok)


# -- the optimizers ---------------------------------------------------------------------------------


class GaLoreAdamW(CapturableMixin, ShardedOptimizer):
    """AdamW on GaLore-projected gradients (see module docstring).

    Args: ``lr``, ``betas``, ``eps`` (added to √V before bias correction),
    ``weight_decay`` (decoupled, applied after the update), ``correct_bias``,
    ``nonfinite`` (``"skip"``, ``"raise"`` or ``"off"``), ``state_dtype`` (moments' dtype,
    fp32 by default), ``foreach`` (``False``: the single-tensor reference path instead of the
    multi-tensor step), ``capturable`` (the sync-free step of :mod:`galore_mini.optim.capturable`; not
    for the 8-bit subclass). Per-group projection options: ``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``, ``proj_method``,
    ``moment_policy``, ``adaptive_gap`` (+ ``gap_threshold``, ``gap_growth``,
    ``gap_window``, ``max_gap``), ``proj_dtype``.
    """

    decay_after_update = True
    moment_bits = 32
    _extra_defaults: dict = {}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, *, nonfinite: str = "skip",
                 state_dtype=None, foreach: bool | None = None, capturable: bool = False,
                 **projection_defaults):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, nonfinite=nonfinite, state_dtype=state_dtype, foreach=foreach)
        defaults.update(self._extra_defaults)
        if self.moment_bits == 32:
            defaults["capturable"] = capturable
        elif capturable:
            raise UsageError(f"{type(self).__name__}: capturable=True does not support 8-bit moments")
        super().__init__(params, defaults, projection_defaults)

    def _state_layout(self, shape, work_shape, group):
        layout = self._moment("exp_avg", work_shape, group, self.moment_bits)
        layout.update(self._moment("exp_avg_sq", work_shape, group, self.moment_bits))
        return layout

    def low_rank_moment_keys(self, group):
        return ["exp_avg", "exp_avg_sq"]

    def compute_update(self, ps: ParamStep) -> Update:
        return adam_update(ps)

    def _multi_tensor_layout(self, p, group):
        return multi_tensor.elementwise_if_eligible(p, group) if self.moment_bits == 32 else None

    def _multi_tensor_step(self, items, steps):
        adam_multi_tensor(self, items, steps)

    def capturable_step(self, group, chosen):
        adam_capturable(self, group, chosen)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with both moments stored block-wise in 8 bits (see :mod:`galore_mini.optim.quant`).

    Moments of tensors smaller than ``min_8bit_size`` entries (default 4096, as
    bitsandbytes) stay fp32. Runs on any device, CPU included, with no
    per-parameter device synchronisation.
    """

    moment_bits = 8

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, *, min_8bit_size: int = 4096,
                 nonfinite: str = "skip", **projection_defaults):
        self._extra_defaults = {"min_8bit_size": min_8bit_size}
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, nonfinite=nonfinite,
                         **projection_defaults)


__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"]
