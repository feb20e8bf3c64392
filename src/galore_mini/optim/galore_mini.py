"""GaLore-mini: GaLore's low-rank first moment with Adam-mini's block second moment.

For a projected weight W (m×n) with gradient G, rank r, scale α, block layout
B (neuron-wise as in Adam-mini: per head for query/key, per output neuron
otherwise), step t:

**approach 3** (default, the paper's choice):

1. ``v_b ← β2 v_b + (1-β2)·mean_{i∈b} G_i²`` from the *full* gradient; ``v̂ = v/(1-β2ᵗ)``.
2. Refresh the projector on schedule (``(t-1) mod T == 0``, or the adaptive gap).
3. ``R = project(G)``; ``M ← β1 M + (1-β1) R``; ``M̂ = M/(1-β1ᵗ)``.
4. ``U = α·back(M̂)`` — a full-size temporary, never stored.
5. ``W ← W - ηλW - η·U / (√v̂_b + ε)``, ``v̂_b`` broadcast over its block.

**approach 1** (ablation): ``v`` is fed from ``R`` and lives in the low-rank
space; ``N = M̂ / (√v̂ + ε)`` is formed there and back-projected. Blocks are
counted on R: if the block axis survives the projection (right projection
keeps rows, left keeps columns) the same blocks apply along it; if it is the
projected axis, each of the r low-rank directions is one block.

**approach 2** (ablation): ``v`` is fed from the full ``G`` (blocks as in
approach 3) but applied to ``M̂`` in the low-rank space before
back-projection. Blocks along a surviving axis apply directly (and then the
result equals approach 3 exactly: a per-row scaling commutes with the right
projection); blocks along the projected axis collapse to the mean of their ``√v̂``.

**v_source="projected"** (a variant of approach 3): step 1 is fed from the gradient's part in the
subspace, ``back(R) = P Pᵀ G`` (left; ``G Q Qᵀ`` right), instead of ``G``, so that the normaliser
sees the energy the update carries rather than the energy the projector discards. It forms
``back(R)`` as a temporary (one m×n GEMM per step) and runs on the single-tensor path only (no
multi-tensor, capturable or FSDP2 step). Measured at h128 over 2,000 steps it trains worse than the
paper's ``"gradient"`` (RESULTS.md, "GaLore-mini variants"); it is there to reproduce that.

Parameters in groups without ``rank`` (embeddings, output layer, norms,
biases) get Adam-mini with their group's ``block``. State per projected weight:
projector (m×r or r×n), ``M`` (low-rank), ``v`` (one scalar per block) — no
m×n tensor. With ``moment_bits=8`` the first moment is stored in 8 bits.

Example::

    >>> import torch, galore_mini as gm
    >>> w = torch.nn.Parameter(torch.randn(32, 64))
    >>> opt = gm.GaLoreMini([{"params": [w], "rank": 8, "block": "rows"}], lr=1e-2)
    >>> (w ** 2).sum().backward(); opt.step()
    >>> sorted((k, tuple(v.shape)) for k, v in opt.state[w].items())[:3]
    [('exp_avg', (8, 64)), ('exp_avg_sq', (32,)), ('projector', (32, 8))]
"""

from __future__ import annotations

from galore_mini.errors import UsageError
from galore_mini.optim.adam_mini import BlockAdam, block_adam_update, block_step_size
from galore_mini.optim.blocks import BlockLayout
from galore_mini.optim.core import ParamStep
from galore_mini.optim.distributed import ShardLayout
from galore_mini.optim.primitives import Update
from galore_mini.optim.projection import low_rank_shape, resolve_side

APPROACHES = (1, 2, 3)
#: what approach 3's block second moment is fed from: the whole gradient G (the paper's), or its part in
#: the subspace, the back-projection P Pᵀ G (the energy the update carries)
V_SOURCES = ("gradient", "projected")


def _surviving_axis(side: str) -> int | None:
    """The axis of W left intact by the projection (None when both are projected)."""
    return {"right": 0, "left": 1}.get(side)


def low_rank_blocks(layout: BlockLayout, side: str, low_shape: tuple[int, int]) -> BlockLayout:
    """Approach 1's blocks on the low-rank matrix R (see module docstring)."""
    if layout.kind in ("elementwise", "tensor"):
        return BlockLayout(layout.kind, low_shape)
    if layout.axis == _surviving_axis(side):
        return BlockLayout("axis", low_shape, layout.axis, layout.runs)
    return BlockLayout("axis", low_shape, layout.axis, ((low_shape[layout.axis], 1),))


class GaLoreMini(BlockAdam):
    """GaLore-mini (see module docstring).

    Args: ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled),
    ``approach`` (3, or the ablations 1 and 2), ``v_source`` (``"gradient"``, the paper's, or
    ``"projected"``; see the module docstring), ``moment_bits`` (32 or 8 for the
    first moment), ``nonfinite``, ``state_dtype``, ``foreach`` (``None``/``True``: the multi-tensor
    step of :mod:`galore_mini.optim.multi_tensor` wherever it applies; ``False``: the single-tensor
    reference path), ``capturable`` (the sync-free step of :mod:`galore_mini.optim.capturable`, which
    ``torch.compile`` traces into one graph), and the projection options
    of :class:`~galore_mini.GaLoreAdamW` as defaults for groups with ``rank``
    (here ``proj_method`` defaults to ``"power"``; pass ``"svd"`` for the exact
    reference, and ``proj_dtype="bf16"`` for faster projections where the
    hardware has bf16 matrix units; timings in BENCHMARKS.md, "Subspace refresh"). Group keys: ``rank`` (+ projection options), ``block``.
    """

    #: a checkpoint written before `v_source` existed means the paper's
    added_options = {"v_source": "gradient"}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, approach: int = 3, *, v_source: str = "gradient", moment_bits: int = 32,
                 nonfinite: str = "skip", state_dtype=None, min_8bit_size: int = 4096, foreach: bool | None = None,
                 capturable: bool = False, **projection_defaults):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, approach=approach,
                        v_source=v_source, moment_bits=moment_bits, nonfinite=nonfinite, state_dtype=state_dtype,
                        min_8bit_size=min_8bit_size, foreach=foreach, capturable=capturable)
        # No peer to match bit for bit, so the fast refresh is the default: a warm-started subspace
        # iteration (randomized range finder at the first refresh) costs a fraction of the exact SVD
        # (BENCHMARKS.md, "Subspace refresh") and trains no worse than it (RESULTS.md).
        # proj_method="svd" gives the reference.
        projection_defaults.setdefault("proj_method", "power")
        super().__init__(params, defaults, projection_defaults)

    def validate_group(self, group):
        super().validate_group(group)
        if group["approach"] not in APPROACHES:
            raise UsageError(f"approach={group['approach']!r}: use 3 (the paper's GaLore-mini), or 1 or 2 (ablations)")
        v_source = group["v_source"]
        if v_source not in V_SOURCES:
            raise UsageError(f"v_source={v_source!r}: use 'gradient' (the paper's) or 'projected'")
        if v_source != "gradient" and group["approach"] != 3:
            raise UsageError(f"v_source={v_source!r} applies to approach 3 only (approach={group['approach']})")
        if group["moment_bits"] not in (8, 32):
            raise UsageError(f"moment_bits={group['moment_bits']!r}: use 32 or 8")
        if "rank" in group and group.get("block") == "elementwise":
            raise UsageError("block='elementwise' would store a full-size second moment for projected weights; "
                             "use 'rows', 'heads:D' or 'tensor' (or GaLoreAdamW for an elementwise v)")

    @staticmethod
    def _v_from_back_projection(group) -> bool:
        return "rank" in group and group.get("v_source", "gradient") == "projected"

    def _multi_tensor_layout(self, p, group):
        # v_source="projected" runs on the single-tensor path: the back-projection feeds v there
        return None if self._v_from_back_projection(group) else super()._multi_tensor_layout(p, group)

    def _capturable_problem(self, group) -> str | None:
        if self._v_from_back_projection(group):
            return "v_source='projected' (only the host path)"
        return super()._capturable_problem(group)

    def sharding_problem(self, group) -> str | None:
        """Why `group` has no sharded (FSDP2) step, or None."""
        return "v_source='projected' has no sharded step" if self._v_from_back_projection(group) else None

    def v_layout(self, shape, group) -> BlockLayout:
        layout = self.block_layout(shape, group)
        if "rank" in group and group["approach"] == 1:
            side = resolve_side(group["proj_type"], shape)
            return low_rank_blocks(layout, side, low_rank_shape(shape, group["rank"], side))
        return layout

    def _state_layout(self, shape, work_shape, group):
        layout = self._moment("exp_avg", work_shape, group, group["moment_bits"])
        blocks = self.v_layout(shape, group)
        v_shape = tuple(shape) if blocks.kind == "elementwise" else (blocks.n_blocks,)
        layout.update(self._moment("exp_avg_sq", v_shape, group))
        return layout

    def partial_row_sums(self, ps: ParamStep) -> dict:
        """This rank's parts of what the ablations sum over all of W's rows (FSDP2; approach 3 needs
        nothing beyond the step's own block sums). Approach 1 on a right projection: the block sums of
        squares of R's local rows, for blocks other than one per row (those are local). Approach 2 where
        the blocks run along the projected axis and `v` is per row of W (sharded): the local sum of the
        new √v̂, whose mean over all rows scales M̂. Left projections reduce R itself: nothing more."""
        group = ps.group
        approach = group["approach"] if ps.projected else 3
        if approach == 1 and ps.side == "right":
            layout = ShardLayout(self.v_layout(ps.shape, group), ps.spec)
            return {"low_rank_blocks": layout.partial_sums(ps.project(ps.grad))} if layout.needs_reduction else {}
        if approach == 2 and self._collapses(ps.layout, ps.side) and ps.layout.kind != "elementwise" \
                and ps.layout.local_v:
            beta1, beta2 = group["betas"]
            v = ps.read("exp_avg_sq", (ps.layout.n_blocks,), signed=False).clone()
            v.mul_(beta2).add_(ps.layout.block_mean_sq(ps.grad), alpha=1.0 - beta2)
            return {"sqrt_v": (v.sqrt() / ps.bias_corrections(beta1, beta2)[1] ** 0.5).sum()}
        return {}

    def _low_rank_blocks(self, ps: ParamStep, low):
        """Approach 1's blocks on R; on a sharded right projection, with block means over all of R's rows."""
        blocks = self.v_layout(ps.shape, ps.group)
        if ps.row_totals is None or ps.side != "right":
            return blocks
        layout = ShardLayout(blocks, ps.spec)
        sums = ps.row_totals.get("low_rank_blocks")
        layout.set_sums(sums if sums is not None else layout.partial_sums(low))
        return layout

    @staticmethod
    def _collapses(layout, side) -> bool:
        """Approach 2: whether the blocks do not survive the projection (their √v̂ collapse to a mean)."""
        return not (layout.kind == "axis" and layout.axis == _surviving_axis(side))

    def compute_update(self, ps: ParamStep) -> Update:
        group = ps.group
        approach = group["approach"] if ps.projected else 3
        if approach == 3:  # the paper's GaLore-mini: Adam-mini's block rule around a projected first moment
            return block_adam_update(ps, v_from_back_projection=ps.projected and self._v_from_back_projection(group))
        beta1, beta2 = group["betas"]
        bc1, bc2 = ps.bias_corrections(beta1, beta2)
        if approach == 1:
            low = ps.project(ps.grad)
            blocks = self._low_rank_blocks(ps, low)
            v = ps.block_ema_sq("exp_avg_sq", low, beta2, blocks)
            m = ps.ema("exp_avg", low, beta1)
            denom = blocks.expand((v.sqrt() / bc2 ** 0.5).add_(group["eps"]))
            return Update(ps.back(m / denom), block_step_size(group["lr"], bc1, ps.scale))
        # approach 2: v from G as approach 3, the division in the low-rank space
        v = ps.block_ema_sq("exp_avg_sq", ps.grad, beta2, ps.layout)
        m = ps.ema("exp_avg", ps.project(ps.grad), beta1)
        v_hat_sqrt = v.sqrt() / bc2 ** 0.5
        if not self._collapses(ps.layout, ps.side):
            # the surviving axis is the same in W and in M (rows of a right projection, columns of a left one)
            denom = ps.layout.expand(v_hat_sqrt.add_(group["eps"]))
        elif ps.row_totals is not None and "sqrt_v" in ps.row_totals:  # v per row of W, rows split over ranks
            denom = (ps.row_totals["sqrt_v"] / ps.shape[0]).add_(group["eps"])
        else:
            denom = v_hat_sqrt.mean().add_(group["eps"])
        return Update(ps.back(m / denom), block_step_size(group["lr"], bc1, ps.scale))
