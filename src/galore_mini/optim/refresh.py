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
from typing import Callable, Protocol

import torch

from galore_mini.optim import quant
from galore_mini.optim.projection import basis_change, subspace_overlap

MOMENT_POLICIES = ("keep", "project", "reset")


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
