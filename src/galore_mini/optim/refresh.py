"""The projector's refresh schedule: what happens to the moments when the subspace changes, and when
the next refresh falls (fixed gap, staggered first window, or Q-GaLore's adaptive gap).

Every path (reference, multi-tensor, capturable host phase, sharded) adopts a new projector through
:func:`adopt_projector`; the projector itself is computed by :mod:`.projection` (one process) or by
the sharded layer (:mod:`.distributed`). State is tensors only: ``refresh`` is an int64 triple
``(next due step, current gap, similarities held)`` and ``similarity`` the adaptive gap's window.

Moment policies at a refresh (group option ``moment_policy``):

* ``"keep"`` (default, as reference GaLore): the low-rank moments stay as they are;
* ``"project"``: rotate them into the new basis, ``M ← (P_newᵀ P_old) M`` (squared entries of the
  change for second moments, an approximation);
* ``"reset"``: zero them.

Adaptive gap: keep the last ``gap_window`` subspace overlaps ``‖P_newᵀ P_old‖²_F / r``; when their mean
reaches ``gap_threshold``, multiply the gap by ``gap_growth`` (capped at ``max_gap``) and clear the window.

Example::

    >>> import torch
    >>> group = {"update_proj_gap": 4, "stagger_refresh": False, "adaptive_gap": False,
    ...          "moment_policy": "keep"}
    >>> state = {"refresh": torch.tensor([1, 4, 0])}
    >>> schedule_next(group, state, t=1, had_projector=False)
    >>> state["refresh"].tolist()
    [5, 4, 0]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import torch

from galore_mini.errors import UsageError, check_number
from galore_mini.optim import quant
from galore_mini.optim.dtypes import resolve_dtype
from galore_mini.optim.projection import (PROJ_METHODS, PROJ_TYPES, basis_change, compute_projector, resolve_side,
                                         subspace_overlap)

MOMENT_POLICIES = ("keep", "project", "reset")
# Options a group may carry when it has `rank`; filled in when missing.
PROJECTION_DEFAULTS: dict[str, Any] = dict(
    update_proj_gap=200,
    scale=0.25,
    proj_type="std",
    proj_method="svd",
    moment_policy="keep",
    adaptive_gap=False,
    gap_threshold=0.4,
    gap_growth=2,
    gap_window=5,
    max_gap=None,
    proj_dtype=None,
    stagger_refresh=False,
)
# Largest stack of same-shaped gradients refreshed in one batched call.
REFRESH_BATCH_BYTES = 256 * 2 ** 20
BATCH_REFRESH_ON_CPU = False


class MomentAccess(Protocol):
    """Reads and writes a parameter's moments as fp32 (dequantised if stored in 8 bits)."""

    def read(self, key: str, shape, signed: bool) -> torch.Tensor: ...

    def write(self, key: str, value: torch.Tensor, signed: bool) -> None: ...


def adopt_projector(group: dict, state: dict, side: str, t: int, new: dict[str, torch.Tensor],
                    had_projector: bool, *, low_rank_keys: list[str], moments: MomentAccess,
                    old: dict | None = None, localize: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    position: tuple[int, int] | None = None) -> None:
    """Adopt new projector tensors `new` into `state`: treat the low-rank moments per ``moment_policy``,
    adapt the gap, schedule the next refresh.

    `old` is the state with whole previous projectors (a sharded layer gathers its shards; default:
    `state`), `localize` turns a whole new projector into what `state` stores (default: itself),
    `position` the parameter's ``(index, count)`` in its group for ``stagger_refresh``.
    """
    if had_projector:
        old = state if old is None else old
        apply_moment_policy(group, old, side, new, low_rank_keys, moments)
        if group["adaptive_gap"]:
            adapt_gap(group, state, old, side, new)
    for key, value in new.items():
        state[key].copy_(value if localize is None else localize(key, value))
    schedule_next(group, state, t, had_projector, position)


def schedule_next(group: dict, state: dict, t: int, had_projector: bool,
                  position: tuple[int, int] | None = None) -> None:
    """Set the next refresh to ``t + gap``; the first window is shortened per parameter with
    ``stagger_refresh`` so no single step pays for every refresh."""
    refresh = state["refresh"]
    gap = int(refresh[1])
    if not had_projector and group["stagger_refresh"] and position is not None:
        index, count = position
        gap = max(1, gap - (index * gap) // count)
    refresh[0] = t + gap


def apply_moment_policy(group: dict, state: dict, side: str, new: dict[str, torch.Tensor], keys: list[str],
                        moments: MomentAccess) -> None:
    """``keep``, ``reset`` or ``project`` (rotate into the new basis) the low-rank moments `keys`."""
    policy = group["moment_policy"]
    if policy == "keep":
        return
    if policy == "reset":
        for key in keys:
            buf = state[key]
            if buf.dtype == torch.uint8:
                buf.fill_(quant.zero_code(not key.startswith("exp_avg_sq")))
                state[key + "_absmax"].zero_()
            else:
                buf.zero_()
        return
    for key in keys:
        signed = not key.startswith("exp_avg_sq")
        current = moments.read(key, low_rank_shape_of(state, side), signed).clone()
        moments.write(key, rotate(current, state, new, side, squared=not signed), signed)


def low_rank_shape_of(state: dict, side: str) -> tuple[int, int]:
    """The low-rank moment's shape from the projector tensors (-1: the unprojected side)."""
    basis = state["projector"]
    if side == "left":
        return (basis.shape[1], -1)
    if side == "right":
        return (-1, basis.shape[0])
    return (basis.shape[1], state["projector_right"].shape[0])


def rotate(moment: torch.Tensor, state: dict, new: dict, side: str, squared: bool) -> torch.Tensor:
    """Express a low-rank moment in the new basis; squares use the squared map (approximate)."""
    if side in ("left", "full"):
        change = basis_change(new["projector"], state["projector"], "left")
        moment = (change.pow(2) if squared else change) @ moment
    if side in ("right", "full"):
        key = "projector" if side == "right" else "projector_right"
        change = basis_change(new[key], state[key], "right")
        moment = moment @ (change.pow(2) if squared else change)
    return moment


def adapt_gap(group: dict, state: dict, old: dict, side: str, new: dict) -> None:
    """Q-GaLore's rule, guarded: grow the gap after `gap_window` similar refreshes, capped.

    `state` holds the schedule (``refresh``, ``similarity``); `old` the whole previous projector."""
    overlap = subspace_overlap(new["projector"], old["projector"], "left" if side == "full" else side)
    refresh, window = state["refresh"], state["similarity"]
    held = int(refresh[2])
    window[held % window.numel()] = overlap
    held += 1
    if held >= window.numel() and float(window.mean()) >= group["gap_threshold"]:
        grown = int(math.ceil(int(refresh[1]) * group["gap_growth"]))
        cap = group["max_gap"] if group["max_gap"] is not None else grown
        refresh[1] = min(grown, cap)
        window.zero_()
        held = 0
    refresh[2] = held


def validate_projection(group: dict[str, Any]) -> None:
    """Refuse a projected group's bad options (rank, gap, scale, types, adaptive-gap settings, 2-D weights)."""
    rank = group["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UsageError(f"rank={rank!r} must be a positive integer")
    gap = group["update_proj_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise UsageError(f"update_proj_gap={gap!r} must be an integer >= 1")
    check_number("scale", group["scale"])
    for key, allowed in (("proj_type", PROJ_TYPES), ("proj_method", PROJ_METHODS),
                         ("moment_policy", MOMENT_POLICIES)):
        if group[key] not in allowed:
            raise UsageError(f"{key}={group[key]!r}: use one of {', '.join(allowed)}")
    if group["adaptive_gap"]:
        check_number("gap_threshold", group["gap_threshold"])
        if not isinstance(group["gap_window"], int) or group["gap_window"] < 1:
            raise UsageError(f"gap_window={group['gap_window']!r} must be an integer >= 1")
        check_number("gap_growth", group["gap_growth"], low=1.0)
        if group["max_gap"] is not None and (not isinstance(group["max_gap"], int) or group["max_gap"] < gap):
            raise UsageError(f"max_gap={group['max_gap']!r} must be an integer >= update_proj_gap ({gap})")
    resolve_dtype(group["proj_dtype"], "proj_dtype")
    for p in group["params"]:
        if p.dim() != 2:
            raise UsageError(
                f"a parameter of shape {list(p.shape)} is in a group with rank={rank}, but only 2-D weights can be "
                "projected; put 1-D parameters (biases, norms) and embeddings in a group without `rank` "
                "(galore_mini.param_groups does this for you)"
            )
        if rank >= min(p.shape):
            raise UsageError(
                f"rank={rank} must be below min(rows, cols)={min(p.shape)} for a weight of shape {list(p.shape)}: "
                "at that rank projection saves nothing; use a smaller rank or leave this weight out of the "
                "projected group (galore_mini.param_groups does this and logs it)"
            )


def refresh_due(optimizer, ready: list) -> None:
    """Refresh, in batches of same-shaped matrices, every projector whose refresh falls on this step
    (`ready`: the step's work items, with their step numbers, of `optimizer`).

    One batched QR/eigen/SVD call per shape replaces a call per matrix (on a GPU, one sequence of
    kernel launches per shape instead of per matrix); stacks are capped at REFRESH_BATCH_BYTES of
    gradient.
    """
    projected = [item for item in ready if "rank" in item.group]
    if not projected:
        return
    due_at = torch.stack([optimizer.state[item.param]["refresh"] for item in projected])[:, 0].tolist()
    buckets: dict[tuple, list] = {}
    for item, due in zip(projected, due_at):
        if item.step < due:
            continue
        side = resolve_side(item.group["proj_type"], item.param.shape)
        key = (id(item.group), tuple(item.param.shape), side, item.grad.device, item.step > 1)
        buckets.setdefault(key, []).append(item)
    for (_, shape, side, device, had_projector), items in buckets.items():
        # CPU LAPACK's SVD gains nothing from batching (BENCHMARKS.md, "Batched refresh on the CPU"),
        # so on the CPU it stays per matrix
        batched = device.type != "cpu" or BATCH_REFRESH_ON_CPU
        per_chunk = max(1, REFRESH_BATCH_BYTES // (4 * math.prod(shape))) if batched else 1
        for start in range(0, len(items), per_chunk):
            chunk = items[start:start + per_chunk]
            group = chunk[0].group
            states = [optimizer.state[item.param] for item in chunk]
            if len(chunk) == 1:  # 2-D products (mm) beat a batch of one (bmm copies its operands)
                new = [compute_projector(chunk[0].grad, group["rank"], side, group["proj_method"],
                                         states[0] if had_projector else {},
                                         optimizer.sketch_generator(chunk[0].param, chunk[0].step),
                                         resolve_dtype(group["proj_dtype"], "proj_dtype"))]
            else:
                old = {key: torch.stack([state[key] for state in states])
                       for key in ("projector", "projector_right") if key in states[0]} if had_projector else {}
                stacked = compute_projector(torch.stack([item.grad.float() for item in chunk]), group["rank"],
                                            side, group["proj_method"], old,
                                            [optimizer.sketch_generator(item.param, item.step) for item in chunk],
                                            resolve_dtype(group["proj_dtype"], "proj_dtype"))
                new = [{k: v[i] for k, v in stacked.items()} for i in range(len(chunk))]
            for item, state, projector in zip(chunk, states, new):
                optimizer.install_projector(item.param, group, state, side, item.step, projector, had_projector)
