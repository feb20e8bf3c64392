"""Multi-tensor steps: Adam-mini and GaLore-mini (approach 3) with block ``v``; GaLore-AdamW.

The single-tensor path (:meth:`ComposedOptimizer._step_param` calling an optimizer's ``_update``) is
the reference: one small composition per parameter, a couple of dozen device operations each. On a
GPU each operation is a kernel launch that costs host time whatever the tensor's size, so a model with
hundreds of parameter tensors can make the step bound by the host rather than the device (counts and
timings at LLaMA-1B's parameter count: BENCHMARKS.md, "Host cost of a step" and "GPU"). This path
computes the same arithmetic with ``torch._foreach_*`` operations over every parameter of a param group at once, leaving per parameter
only what cannot be batched: the per-block norms of the gradient (which double as the step's
finiteness probe, so the gradient is read once), the projection GEMM and the fused back-projection
GEMM. The results equal the reference bit for bit in fp32 (tested).

For each parameter ``p`` of a group, with gradient ``G``, blocks ``b``, step ``t``:

* ``v_b ← β2 v_b + (1-β2)·‖G_b‖²/|b|`` (``norms`` are the ``‖G_b‖`` computed by the probe);
* ``M ← β1 M + (1-β1)·R`` with ``R = project(G)`` for projected weights, ``R = G`` otherwise;
* ``d_b = 1 / (√v_b/√(1-β2ᵗ) + ε)``;
* ``p ← p(1-ηλ) - η/(1-β1ᵗ)·α·back(M)·d`` through :meth:`ComposedOptimizer._apply`, the same tail as
  the reference path (the multiplier is folded into the small factor of a projected update).

GaLore-AdamW's step (:func:`adam_step`) is the same batching of its elementwise moments in the
low-rank space: ``M``, ``V`` and ``N = M/(√V+ε)`` by foreach operations, then the shared tail; its
probe is the gradient itself (one multi-tensor norm over all gradients).
"""

from __future__ import annotations

import math

import torch

from galore_mini.optim.blocks import BlockLayout
from galore_mini.optim.core import Update, WorkItem, bias_corrections
from galore_mini.optim.projection import back_factors, project, resolve_side


def _fp32_moments(group: dict) -> bool:
    """The group lets the multi-tensor path run: not ``foreach=False``, moments stored in fp32."""
    return (group.get("foreach") is not False and group.get("moment_bits", 32) == 32
            and group.get("state_dtype") in (None, "fp32", "float32", torch.float32))


def block_layout_if_eligible(optimizer, p: torch.Tensor, group: dict) -> BlockLayout | None:
    """For Adam-mini / GaLore-mini: the block layout when `p` may take :func:`block_adam_step`, else
    None. Needs fp32 moments, a layout that is not elementwise and (GaLore-mini) approach 3."""
    if not _fp32_moments(group) or ("rank" in group and group.get("approach", 3) != 3):
        return None
    layout = optimizer._block_layout(p.shape, group)
    return None if layout.kind == "elementwise" else layout


def elementwise_if_eligible(p: torch.Tensor, group: dict) -> BlockLayout | None:
    """For GaLore-AdamW: an elementwise layout (no block norms) when `p` may take :func:`adam_step`."""
    return BlockLayout("elementwise", tuple(p.shape)) if _fp32_moments(group) else None


def _by_group(items: list[WorkItem], steps: list[int]) -> list[list[WorkItem]]:
    """`items`, each given its step, batched by param group (betas, eps, lr, decay are per group)."""
    by_group: dict[int, list[WorkItem]] = {}
    for item, t in zip(items, steps):
        item.step = t
        by_group.setdefault(id(item.group), []).append(item)
    return list(by_group.values())


def _start(optimizer, entries: list[WorkItem]):
    """The entries' states (step counters advanced), projection sides and low-rank gradients."""
    group = entries[0].group
    states = [optimizer.state[e.param] for e in entries]
    torch._foreach_add_([state["step"] for state in states], 1.0)
    projected = "rank" in group
    sides = [resolve_side(group["proj_type"], e.param.shape) if projected else None for e in entries]
    low = [project(e.grad, state, side) if side else e.grad for e, state, side in zip(entries, states, sides)]
    return states, sides, low


def _ema(buffers: list[torch.Tensor], values: list[torch.Tensor], beta: float) -> None:
    torch._foreach_mul_(buffers, beta)
    torch._foreach_add_(buffers, values, alpha=1.0 - beta)


def block_adam_step(optimizer, items: list[WorkItem], steps: list[int]) -> None:
    """Update every parameter in `items` (each with its block `layout` and gradient block `norms`) at
    its step in `steps`. States must already exist (and projectors be refreshed for this step)."""
    for entries in _by_group(items, steps):
        _block_group_step(optimizer, entries)


def _block_group_step(optimizer, entries: list[WorkItem]) -> None:
    group = entries[0].group
    beta1, beta2 = group["betas"]
    states, sides, low = _start(optimizer, entries)
    corrections = [bias_corrections(group, beta1, beta2, e.step) for e in entries]

    norms = [e.norms for e in entries]
    squares = torch._foreach_mul(norms, norms)
    torch._foreach_div_(squares, [float(e.layout.block_numel()) for e in entries])
    second = [state["exp_avg_sq"] for state in states]
    _ema(second, squares, beta2)
    first = [state["exp_avg"] for state in states]
    _ema(first, low, beta1)
    del low

    inverse = torch._foreach_sqrt(second)
    torch._foreach_div_(inverse, [bc2 ** 0.5 for _, bc2 in corrections])
    torch._foreach_add_(inverse, group["eps"])
    torch._foreach_reciprocal_(inverse)

    scale = group["scale"] if "rank" in group else 1.0
    for e, state, side, m, d, (bc1, _) in zip(entries, states, sides, first, inverse, corrections):
        direction = back_factors(m, state, side) if side else m
        optimizer._apply(e.param, group, Update(direction, group["lr"] / bc1 * scale, e.layout.expand(d)))


def adam_step(optimizer, items: list[WorkItem], steps: list[int]) -> None:
    """GaLore-AdamW's update of every parameter in `items` (norms unused) at its step `t`."""
    for entries in _by_group(items, steps):
        group = entries[0].group
        beta1, beta2 = group["betas"]
        states, sides, low = _start(optimizer, entries)
        first = [state["exp_avg"] for state in states]
        _ema(first, low, beta1)
        second = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(second, beta2)
        torch._foreach_addcmul_(second, low, low, value=1.0 - beta2)
        del low
        denominators = torch._foreach_sqrt(second)
        torch._foreach_add_(denominators, group["eps"])
        normalized = torch._foreach_div(first, denominators)
        del denominators
        scale = group["scale"] if "rank" in group else 1.0
        for e, state, side, n in zip(entries, states, sides, normalized):
            bc1, bc2 = bias_corrections(group, beta1, beta2, e.step)
            direction = back_factors(n, state, side) if side else n
            optimizer._apply(e.param, group, Update(direction, group["lr"] * math.sqrt(bc2) / bc1 * scale))
