"""The multi-tensor driver: what every rule's multi-tensor execution shares.

The single-tensor path (:meth:`ComposedOptimizer._step_param` calling a rule's ``compute_update``) is
the reference: one small composition per parameter, a couple of dozen device operations each. On a
GPU each operation is a kernel launch that costs host time whatever the tensor's size, so a model with
hundreds of parameter tensors can make the step bound by the host rather than the device (counts and
timings at LLaMA-1B's parameter count: BENCHMARKS.md, "Host cost of a step" and "GPU"). A rule's
multi-tensor execution (``_multi_tensor_step`` beside its ``compute_update``, in the rule's own file:
:func:`galore_mini.optim.adam_mini.block_adam_multi_tensor`, :func:`galore_mini.optim.galore.adam_multi_tensor`)
runs the same primitives (:mod:`.primitives`) on lists, as ``torch._foreach_*`` operations over every
parameter of a param group at once, leaving per parameter only what cannot be batched: the per-block
norms of the gradient (which double as the step's finiteness probe, so the gradient is read once), the
projection GEMM and the fused back-projection GEMM. The results equal the reference bit for bit in
fp32 (tested).

This module decides who may take that path (fp32 moments, not ``foreach=False``, a block layout that
is a view of the gradient), batches the work by param group and projects the gradients.
"""

from __future__ import annotations

import torch

from galore_mini.optim.blocks import BlockLayout
from galore_mini.optim.core import WorkItem
from galore_mini.optim.projection import project, resolve_side


def _fp32_moments(group: dict) -> bool:
    """The group lets the multi-tensor path run: not ``foreach=False``, moments stored in fp32."""
    return (group.get("foreach") is not False and group.get("moment_bits", 32) == 32
            and group.get("state_dtype") in (None, "fp32", "float32", torch.float32))


def block_layout_if_eligible(optimizer, p: torch.Tensor, group: dict) -> BlockLayout | None:
    """For Adam-mini / GaLore-mini: the block layout when `p` may take the block-Adam multi-tensor step, else
    None. Needs fp32 moments, a layout that is not elementwise and (GaLore-mini) approach 3."""
    if not _fp32_moments(group) or ("rank" in group and group.get("approach", 3) != 3):
        return None
    layout = optimizer.block_layout(p.shape, group)
    return None if layout.kind == "elementwise" else layout


def elementwise_if_eligible(p: torch.Tensor, group: dict) -> BlockLayout | None:
    """For GaLore-AdamW: an elementwise layout (no block norms) when `p` may take GaLore-AdamW's multi-tensor step."""
    return BlockLayout("elementwise", tuple(p.shape)) if _fp32_moments(group) else None


def by_group(items: list[WorkItem], steps: list[int]) -> list[list[WorkItem]]:
    """`items`, each given its step, batched by param group (betas, eps, lr, decay are per group)."""
    batches: dict[int, list[WorkItem]] = {}
    for item, t in zip(items, steps):
        item.step = t
        batches.setdefault(id(item.group), []).append(item)
    return list(batches.values())


def start(optimizer, entries: list[WorkItem]):
    """The entries' states (step counters advanced), projection sides and low-rank gradients."""
    group = entries[0].group
    states = [optimizer.state[e.param] for e in entries]
    torch._foreach_add_([state["step"] for state in states], 1.0)
    projected = "rank" in group
    sides = [resolve_side(group["proj_type"], e.param.shape) if projected else None for e in entries]
    low = [project(e.grad, state, side) if side else e.grad for e, state, side in zip(entries, states, sides)]
    return states, sides, low
