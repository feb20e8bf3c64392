"""GaLore-Adafactor: Adafactor on GaLore-projected gradients (galore-torch 1.0's ``GaLoreAdafactor``).

The rule (one definition, :meth:`GaLoreAdafactor.compute_update`, used by the reference path and the
sharded step; there is no multi-tensor or capturable execution): ``R = project(G)``; a factored second
moment of ``R² + ε₁`` (row and column EMAs with ``β2ₜ = 1 - t^decay_rate``; unfactored for 1-D);
``U = R / √V̂`` clipped to RMS ``clip_threshold``, times the step size; an optional first moment on that
scaled update; weight decay ``W ← W - λ·lr_t·W``; ``W ← W - α·back(U)``. Groups without ``rank`` get
plain Adafactor.

Example::

    >>> import torch, galore_mini as gm
    >>> w = torch.nn.Parameter(torch.randn(64, 32))
    >>> opt = gm.GaLoreAdafactor([{"params": [w], "rank": 8}], lr=1e-2, relative_step=False)
    >>> (w ** 2).sum().backward(); opt.step()
    >>> tuple(opt.state[w]["exp_avg_sq_row"].shape), tuple(opt.state[w]["exp_avg_sq_col"].shape)
    ((64,), (8,))
"""

from __future__ import annotations

import math

import torch

from galore_mini.errors import UsageError
from galore_mini.optim.core import ParamStep
from galore_mini.optim.distributed import ShardedOptimizer, is_dtensor
from galore_mini.optim.primitives import Update


class GaLoreAdafactor(ShardedOptimizer):
    """Adafactor on GaLore-projected gradients; arguments as Hugging Face's / galore-torch's Adafactor.

    Per step: ``R = project(G)``; factored second moment of ``R² + ε₁`` (row and
    column EMAs with ``β2ₜ = 1 - t^decay_rate``; unfactored for 1-D);
    ``U = R / √V̂`` clipped to RMS ``clip_threshold``, times the step size
    (``lr``, or the relative step ``min(1e-2, 1/√t)`` scaled by ``max(ε₂, RMS(W))``);
    optional first moment on that scaled update (``beta1``); weight decay
    ``W ← W - λ·lr_t·W``; ``W ← W - back(U)``.

    On FSDP2 (DTensor) parameters each rank holds rows of W: where the work tensor's rows are W's
    rows (right projection, unprojected weights, 1-D parameters) the row EMA is local and sharded, the
    column EMA replicated, and one all-reduce per step (shared with every other parameter) carries the
    column sums of ``R² + ε₁``, the row EMA's sum, the update's column sums of squares (``partial_row_sums``)
    and ``‖W‖²``; for left projections R is reduced already and only ``‖W‖²`` crosses ranks. Parameters
    of more than 2 dimensions are refused there.
    """

    #: state reduced over W's rows: replicated on FSDP2 (see galore_mini.optim.distributed.sharded_keys)
    replicated_state = ("exp_avg_sq_col",)

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1=None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, relative_step: bool = True, warmup_init: bool = False,
                 *, nonfinite: str = "skip", state_dtype=None, **projection_defaults):
        if lr is not None and relative_step:
            raise UsageError("lr and relative_step=True cannot be combined: pass relative_step=False with an lr")
        if warmup_init and not relative_step:
            raise UsageError("warmup_init=True requires relative_step=True")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init, nonfinite=nonfinite,
                        state_dtype=state_dtype)
        super().__init__(params, defaults, projection_defaults)

    def validate_group(self, group):
        super().validate_group(group)
        for p in group["params"]:
            if is_dtensor(p) and p.dim() > 2:
                raise UsageError(f"GaLoreAdafactor: a DTensor (FSDP2-sharded) parameter of shape {list(p.shape)} has "
                                 "more than 2 dimensions, whose factored second moment is not implemented on shards; "
                                 "train it in a group of another optimizer or reshape it to 2-D")

    def _state_layout(self, shape, work_shape, group):
        layout = {}
        if group["beta1"] is not None:
            layout.update(self._moment("exp_avg", work_shape, group))
        if len(work_shape) >= 2:
            layout.update(self._moment("exp_avg_sq_row", tuple(work_shape[:-1]), group))
            layout.update(self._moment("exp_avg_sq_col", tuple(work_shape[:-2]) + tuple(work_shape[-1:]), group))
        else:
            layout.update(self._moment("exp_avg_sq", tuple(work_shape), group))
        return layout

    def low_rank_moment_keys(self, group):
        return ["exp_avg"] if group["beta1"] is not None else []

    def _step_size(self, group, t: int, param: torch.Tensor, param_sq: torch.Tensor | None = None,
                   numel: int | None = None) -> float:
        """`param_sq`: ‖W‖² summed across ranks (sharded W of `numel` entries in all)."""
        step = group["lr"]
        if group["relative_step"]:
            floor = 1e-6 * t if group["warmup_init"] else 1e-2
            step = min(floor, 1.0 / math.sqrt(t))
        if group["scale_parameter"]:
            if param_sq is None:
                rms = float(param.float().norm(2) / math.sqrt(param.numel()))
            else:
                rms = math.sqrt(float(param_sq) / numel)
            step *= max(group["eps"][1], rms)
        return step

    def decay_rate(self, group):
        # Adafactor decays by its own step size, which `compute_update` has just computed for this parameter
        return self._current_step_size * group["weight_decay"]

    def partial_row_sums(self, ps: ParamStep) -> dict[str, torch.Tensor]:
        """This rank's parts of what ``compute_update`` sums over all rows (FSDP2): ``param_sq`` = ‖W_i‖² for
        ``scale_parameter``; where R's rows are W's rows, ``col`` = Σ_i (R²+ε₁)_ij (a cols-vector),
        ``row`` = Σ_i r_i of the new row EMA and ``update_sq`` = Σ_i R_ij² / r_i, from which
        ``‖U‖² = r̄ Σ_j update_sq_j / c_j`` (so the clipping RMS needs no second all-reduce); 1-D:
        ``update_sq`` = Σ_i R_i² / v_i. The EMAs are formed on copies: state changes in ``compute_update`` only."""
        group = ps.group
        sums = {}
        if group["scale_parameter"]:
            sums["param_sq"] = torch.linalg.vector_norm(ps.param, dtype=torch.float32).square()
        if ps.side in ("left", "full"):
            return sums  # R is reduced by the step itself: row, column and RMS are whole on every rank
        low = ps.project(ps.grad)
        beta2t = 1.0 - math.pow(ps.t, group["decay_rate"])
        squared = low * low + group["eps"][0]
        if low.dim() == 2:
            row = ps.read("exp_avg_sq_row", squared.shape[:-1], signed=False).clone()
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            sums["col"] = squared.sum(dim=-2)
            sums["row"] = row.sum()
            sums["update_sq"] = (low * low / row.unsqueeze(-1)).sum(dim=-2)
        else:
            v = ps.read("exp_avg_sq", squared.shape, signed=False).clone()
            v.mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            sums["update_sq"] = (low * low / v).sum()
        return sums

    def compute_update(self, ps: ParamStep) -> Update:
        group = ps.group
        low = ps.project(ps.grad)
        across = ps.row_totals  # None when ps holds all of W; else sums over all rows (partial_row_sums)
        step_size = self._step_size(group, ps.t, ps.param, None if across is None else across.get("param_sq"),
                                    math.prod(ps.shape))
        self._current_step_size = step_size
        beta2t = 1.0 - math.pow(ps.t, group["decay_rate"])
        squared = low * low + group["eps"][0]
        split = across is not None and "update_sq" in across  # R's rows are split over the ranks
        if low.dim() >= 2:
            row = ps.ema("exp_avg_sq_row", squared.mean(dim=-1), beta2t)
            rows = ps.shape[0]
            col = ps.ema("exp_avg_sq_col", across["col"] / rows if split else squared.mean(dim=-2), beta2t)
            row_mean = across["row"] / rows if split else row.mean(dim=-1, keepdim=True)
            row_factor = (row / row_mean).rsqrt().unsqueeze(-1)
            update = row_factor * col.unsqueeze(-2).rsqrt() * low
            update_sq = row_mean * (across["update_sq"] / col).sum() if split else None
        else:
            update = ps.ema("exp_avg_sq", squared, beta2t).rsqrt() * low
            update_sq = across["update_sq"] if split else None
        if split:
            rms = (update_sq / (ps.shape[0] * math.prod(low.shape[1:]))).sqrt()
        else:
            rms = update.norm(2) / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(step_size)
        if group["beta1"] is not None:
            update = ps.ema("exp_avg", update, group["beta1"])
        return Update(ps.back(update), ps.scale)


__all__ = ["GaLoreAdafactor"]
