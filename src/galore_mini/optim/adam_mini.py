"""Adam-mini: Adam with one second-moment scalar per block of parameters; and the block-Adam update rule
that GaLore-mini (approach 3) shares, in its reference, multi-tensor and capturable executions.

Per parameter W with gradient G and block layout B (param group key
``block``, see :mod:`galore_mini.optim.blocks`), step t:
``m ← β1 m + (1-β1) G``; for each block b, ``v_b ← β2 v_b + (1-β2)·mean_{i∈b} G_i²``;
``W ← W(1-ηλ) - η/(1-β1ᵗ) · m / (√v_b/√(1-β2ᵗ) + ε)``.
GaLore-mini feeds ``m`` the projected gradient ``R`` instead and back-projects it (times α) before the
block division; with the identity projection the two rules are one.

The block layout is data, not a guess made inside ``step()``: build groups
with :func:`galore_mini.param_groups` (``method="adam_mini"``), which reads
heads, kv-heads and head_dim from the model, or set ``block`` per group
yourself. A group without ``block`` uses one block per row for matrices and
one per tensor otherwise. With the layouts of ``param_groups`` this
reproduces the adam-mini 1.1.1 package on Llama models.

Memory: ``m`` is full-size; ``v`` is one fp32 scalar per block (per head,
neuron or token), so Adam's second moment nearly vanishes.

Example::

    >>> import torch, galore_mini as gm
    >>> w = torch.nn.Parameter(torch.randn(8, 4))
    >>> opt = gm.AdamMini([{"params": [w], "block": "heads:2"}], lr=1e-3)
    >>> w.sum().backward(); opt.step()
    >>> tuple(opt.state[w]["exp_avg_sq"].shape)
    (4,)
"""

from __future__ import annotations

import torch

from galore_mini.optim import multi_tensor
from galore_mini.optim.capturable import CapturableMixin, advance_counters, low_rank_gradient
from galore_mini.optim.core import PROJECTION_DEFAULTS, ParamStep, WorkItem
from galore_mini.optim.distributed import ShardedOptimizer
from galore_mini.optim.primitives import (Tensors, Update, bias_corrections, block_mean_sq_from_norms, ema_,
                                          inverse_block_denominator)
from galore_mini.optim.projection import back_factors


# -- the rule ---------------------------------------------------------------------------------------


def block_moments(m: Tensors, v: Tensors, low: Tensors, mean_sq: Tensors, beta1: float, beta2: float, eps: float,
                  bc2, ok: torch.Tensor | None = None) -> Tensors:
    """The block-Adam rule: ``v_b ← β2 v_b + (1-β2)·mean_sq_b``; ``M ← β1 M + (1-β1)·low``; returns the
    per-block multiplier ``1/(√v_b/√(1-β2ᵗ) + ε)``. One tensor, lists (foreach) or device coefficients."""
    ema_(v, mean_sq, beta2, ok)
    ema_(m, low, beta1, ok)
    return inverse_block_denominator(v, bc2, eps)


def block_step_size(lr, bc1, scale: float):
    """``η/(1-β1ᵗ)·α`` (α = 1 for weights that are not projected)."""
    return lr / bc1 * scale


def block_adam_update(ps: ParamStep, v_from_back_projection: bool = False) -> Update:
    """The single-tensor execution (reference path and sharded step): `ps.layout` gives the blocks.
    `v_from_back_projection`: feed ``v`` from ``back(R)`` (the gradient's part in the subspace, formed
    as a temporary) instead of the whole gradient (GaLore-mini's ``v_source="projected"``)."""
    beta1, beta2 = ps.group["betas"]
    bc1, bc2 = ps.bias_corrections(beta1, beta2)
    low = ps.project(ps.grad)
    fed = ps.back(low).materialize() if v_from_back_projection else ps.grad
    m = ps.read("exp_avg", low.shape, signed=True)
    v = ps.read("exp_avg_sq", (ps.layout.n_blocks,), signed=False)
    inverse = block_moments(m, v, low, ps.layout.block_mean_sq(fed), beta1, beta2, ps.group["eps"], bc2)
    ps.write("exp_avg_sq", v, signed=False)
    ps.write("exp_avg", m, signed=True)
    return Update(ps.back(m), block_step_size(ps.group["lr"], bc1, ps.scale), ps.layout.expand(inverse))


def block_adam_multi_tensor(optimizer, items: list[WorkItem], steps: list[int]) -> None:
    """The multi-tensor execution: every parameter in `items` (each with its block `layout` and
    gradient block `norms`) at its step in `steps`. States exist and projectors are refreshed."""
    for entries in multi_tensor.by_group(items, steps):
        group = entries[0].group
        beta1, beta2 = group["betas"]
        states, sides, low = multi_tensor.start(optimizer, entries)
        corrections = [bias_corrections(group, beta1, beta2, e.step) for e in entries]
        squares = block_mean_sq_from_norms([e.norms for e in entries], [e.layout.block_numel() for e in entries])
        first = [state["exp_avg"] for state in states]
        inverse = block_moments(first, [state["exp_avg_sq"] for state in states], low, squares, beta1, beta2,
                                group["eps"], [bc2 for _, bc2 in corrections])
        del low
        scale = group["scale"] if "rank" in group else 1.0
        for e, state, side, m, d, (bc1, _) in zip(entries, states, sides, first, inverse, corrections):
            direction = back_factors(m, state, side) if side else m
            optimizer.apply_update(e.param, group, Update(direction, block_step_size(group["lr"], bc1, scale),
                                                          e.layout.expand(d)))


def block_adam_capturable(optimizer, group: dict, chosen: list[tuple]) -> None:
    """The capturable execution (no host read): `chosen` holds ``(param, block layout, side or None)``."""
    beta1, beta2 = group["betas"]
    states = [optimizer.state[p] for p, *_ in chosen]
    squares = []
    for p, layout, _ in chosen:
        g = p.grad
        norms = layout.block_norms(g)
        squares.append(layout.block_mean_sq(g if g.dtype == torch.float32 else g.float()) if norms is None
                       else block_mean_sq_from_norms(norms, layout.block_numel()))
    oks, steps = advance_counters(optimizer, group, states, squares)
    scale = group["scale"] if "rank" in group else 1.0
    for i, (p, layout, side) in enumerate(chosen):
        ok = None if oks is None else oks[i]
        state = states[i]
        bc1, bc2 = bias_corrections(group, beta1, beta2, steps[i])
        m = state["exp_avg"]
        inverse = block_moments(m, state["exp_avg_sq"], low_rank_gradient(p, state, side), squares[i], beta1, beta2,
                                group["eps"], bc2, ok)
        direction = back_factors(m, state, side) if side else m
        optimizer.apply_update(p, group, Update(direction, block_step_size(group["lr"], bc1, scale),
                                                layout.expand(inverse)), ok=ok)


# -- the optimizer ----------------------------------------------------------------------------------


class BlockAdam(CapturableMixin, ShardedOptimizer):
    """The optimizers whose rule is block-Adam (Adam-mini, GaLore-mini): the rule's single-tensor,
    multi-tensor and capturable executions, and blocks in the groups."""

    uses_blocks = True

    def compute_update(self, ps: ParamStep) -> Update:
        return block_adam_update(ps)

    def _multi_tensor_layout(self, p, group):
        return multi_tensor.block_layout_if_eligible(self, p, group)

    def _multi_tensor_step(self, items, steps):
        block_adam_multi_tensor(self, items, steps)

    def capturable_step(self, group, chosen):
        block_adam_capturable(self, group, chosen)


class AdamMini(BlockAdam):
    """Adam-mini (see module docstring). Args: ``lr``, ``betas``, ``eps``, ``weight_decay``
    (decoupled, before the update), ``nonfinite``, ``state_dtype``, ``foreach`` (``False`` forces the
    single-tensor reference path instead of the multi-tensor one), ``capturable`` (the
    sync-free step of :mod:`galore_mini.optim.capturable`); group key ``block``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, nonfinite: str = "skip", state_dtype=None,
                 foreach: bool | None = None, capturable: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        nonfinite=nonfinite, state_dtype=state_dtype, foreach=foreach, capturable=capturable)
        super().__init__(params, defaults)

    def _allowed_keys(self):
        # Adam-mini has no projector: a `rank` here is a mistake worth naming
        return super()._allowed_keys() - {"rank"} - set(PROJECTION_DEFAULTS)

    def _state_layout(self, shape, work_shape, group):
        layout = self._moment("exp_avg", shape, group)
        blocks = self.block_layout(shape, group)
        layout.update(self._moment("exp_avg_sq", (blocks.n_blocks,) if blocks.kind != "elementwise" else shape, group))
        return layout
