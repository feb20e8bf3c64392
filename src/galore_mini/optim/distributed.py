"""The sharded layer: the optimizers on FSDP2 / DTensor parameters, working on the local shard and reducing
only what must cross ranks. :class:`ShardedOptimizer` sits above the base optimizer (:mod:`.core`, which
knows no DTensor) and drives its step through the base's public step protocol; every optimizer of the
package is built on it. Beneath it: :mod:`.shards` (where rows live, which state follows them, batched
collectives), :mod:`.shard_8bit` (8-bit moments across shards), :mod:`.shard_refresh` (the projector
found without gathering a gradient). This module re-exports their public names.

``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor whose rows are split over
the ranks (``Shard(0)``; when the rows do not divide by the world size the last ranks hold fewer, or
none). The optimizers take such parameters as they come: each rank updates the rows it holds, from
the gradient rows FSDP2's reduce-scatter handed it, and the arithmetic is the one-process arithmetic
(equal to fp32 round-off of the reductions; tested at 2 and 3 ranks). What crosses ranks:

* **Right projection** of a row-sharded weight (``std`` with rows ≥ cols): the projector ``Q`` (r×n)
  is replicated, ``R = G_i Qᵀ``, the moments (rows of the m×r low-rank matrix) and ``back`` are local.
  **No communication in the step.**
* **Left projection** (``std`` with rows < cols, e.g. ``down_proj`` and GQA ``k_proj``/``v_proj``):
  ``P`` (m×r) is sharded like the rows of W, ``R = Pᵀ G = Σ_i P_iᵀ G_i`` is one all-reduce of an r×n
  matrix (never the gradient); the moments (r×n) are replicated; ``back`` is local (``P_i · N``).
  ``proj_type="right"`` is the documented shard-local choice: every weight then projects its columns,
  so the step needs no communication at all (a different algorithm for m < n weights than ``std``).
* **Adam-mini / GaLore-mini blocks**: one ``v`` per row ("rows": output neurons, tokens) is sharded
  with the rows and needs nothing; any other layout (heads — a head's rows may straddle a shard
  boundary —, GQA key heads, columns, whole tensor) keeps its few scalars replicated, and the block
  sums of squares of the local rows are summed across ranks.
* **GaLoreAdafactor**: where R's rows are W's rows (right projection, unprojected weights, 1-D
  parameters) the row EMA is local and sharded, the column EMA replicated; the column sums of
  ``R² + ε₁`` (cols-vector), the row EMA's sum and the update's column sums of squares (so the
  clipping RMS needs no second round: ``‖U‖² = r̄ Σ_j (Σ_i R_ij²/r_i) / c_j``) are summed across
  ranks, and ``‖W‖²`` for ``scale_parameter``. Left projections: R is reduced already, only ``‖W‖²``.
* **GaLore-mini's ablations**: approach 1 (``v`` of R's blocks) on a right projection sums R's block
  sums of squares across ranks for blocks other than one per row (heads that straddle a boundary,
  the r low-rank columns, the whole tensor); on a left projection R is whole. Approach 2 takes
  ``v`` from G as approach 3; where its blocks collapse to the mean of √v̂ and ``v`` is per row of W
  (sharded), the local sum of √v̂ is summed (one scalar).
* **Non-finite gradients**: one flag per parameter, reduced, so a NaN on one rank skips that
  parameter on every rank.
* **8-bit moments** (``GaLoreAdamW8bit``, ``moment_bits=8``): quantised in one process's global
  blocks of 256 consecutive entries, so every entry gets the code one process gives it. A moment laid
  out like W's rows keeps its codes as an (m, cols) uint8 DTensor and its block absmax "row-expanded"
  as an (m, K) one, both sharded with the rows (see :mod:`.shard_8bit`); a block that
  straddles a shard boundary takes its max across ranks: world − 1 values per such tensor, all of a
  step in one all-reduce (MAX) per process group (one more after a refresh that rotates them,
  ``moment_policy="project"``). Replicated 8-bit moments (left projections) are flat, as in one process.

All sums of a step (left projections, block sums and what an optimizer's update sums over W's rows,
``partial_row_sums``, of every parameter) travel in **one** all-reduce per process group, plus one for
the finiteness flags (which the one-process step reads on the host anyway: no new host
synchronisation per parameter).

**Refresh.** The warm-started power iteration (``proj_method="power"``) and the randomized range
finder never gather a gradient: for a right projection ``Gᵀ(G Q) = Σ_i G_iᵀ(G_i Q)`` is one all-reduce
of an n×k sketch per power step and the Rayleigh–Ritz step one of a k×k Gram matrix; for a left
projection ``Gᵀ P = Σ_i G_iᵀ P_i`` (n×k all-reduce), the m×k product's rows are gathered for the QR,
and the Ritz step reduces a k×n matrix (k = r, or r + 8 for the range finder). Random sketches are
drawn whole with the one-process seeds on every rank (each takes its rows), so every rank reaches
the same projector, and the one-process one. All weights due a refresh in a step are refreshed side by side
(:func:`run_in_lockstep`): one all-reduce and one all-gather per round serve every weight. ``proj_method="svd"`` gathers the gradient (m×n) and
takes the exact SVD on every rank: the slow reference. ``docs/distributed.md`` has the byte counts.

**State** is DTensors on the parameter's mesh: ``Shard(0)`` for anything laid out like the rows of W
(full-size moments, low-rank moments of a right projection, a left projector, per-row ``v``),
``Replicate()`` for the rest (right projectors, left-projection moments, head / tensor ``v``); 8-bit
moments laid out by rows in their row form (codes m×cols, absmax m×K: the same at every world size); step
counters and the refresh schedule stay plain host tensors (identical on every rank). So
``torch.distributed.checkpoint`` saves, loads and reshards the optimizer like the model.

**Supported placements**: ``Shard(0)`` on one mesh dimension and ``Replicate()`` on any others (FSDP2,
HSDP), or all-``Replicate``. ``Shard(1)`` (tensor parallelism), ``_StridedShard``, ``Partial`` and a
projected group that mixes DTensor and plain parameters are refused with a :class:`UsageError`.
Not yet on DTensors: ``GaLoreAdafactor`` on parameters of more than 2 dimensions; it raises at
construction. DTensor parameters take the
single-tensor reference step (the multi-tensor path is one-process only for now).

Example (``torchrun --nproc_per_node 2 train.py``)::

    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = gm.create_optimizer(model, "galore_mini", lr=1e-2, rank=128)
    loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from galore_mini.errors import UsageError
from galore_mini.optim import quant
from galore_mini.optim.core import HOST_STATE, ComposedOptimizer, ParamStep
from galore_mini.optim.dtypes import resolve_dtype
from galore_mini.optim.projection import OVERSAMPLE, PROJ_METHODS, RANDOMIZED_POWER_STEPS, resolve_side
from galore_mini.optim.shard_8bit import (RowQuantizedStep, RowQuantizer, absmax_slots, eight_bit_keys,
                                          fit_to_checkpoint, flat_to_rows_absmax, loadable_shapes, row_form_shapes,
                                          rows_dequantize, rows_to_flat_absmax, sharded_layout, to_8bit_state)
from galore_mini.optim.shard_refresh import projector_refresh, run_in_lockstep
from galore_mini.optim.shards import (Replicate, Shard, ShardLayout, ShardSpec, check_group, describe_param,
                                      global_finite_flags, grad_blocks, is_dtensor, local, reduce_sums, shard_rows,
                                      shard_spec, sharded_keys, unsupported_reason)

# the names of the FSDP2 layer that code outside optim/ and the tests use, whichever file defines them
__all__ = ["ShardedOptimizer", "ShardLayout", "ShardSpec", "RowQuantizer", "is_dtensor", "local", "shard_spec",
           "shard_rows", "sharded_keys", "sharded_layout", "unsupported_reason", "fit_to_checkpoint",
           "communication_bytes", "run_in_lockstep", "absmax_slots", "row_form_shapes", "rows_dequantize",
           "rows_to_flat_absmax", "flat_to_rows_absmax", "eight_bit_keys", "projector_refresh", "check_group"]


def init_state(optimizer, p: torch.Tensor, group: dict, state: dict) -> None:
    """Allocate `p`'s state as DTensors (see module docstring for the placements)."""
    spec = optimizer.shard_spec(p)
    sharded = sharded_keys(optimizer, p, group)
    for key, (dims, dtype) in sharded_layout(optimizer, p, group).items():
        if key in HOST_STATE:
            state[key] = torch.zeros(dims, dtype=dtype, device="cpu")
            continue
        fill = quant.zero_code(not key.startswith("exp_avg_sq")) if dtype == torch.uint8 else 0
        if key in sharded:
            state[key] = spec.sharded(torch.full(spec.local_shape(dims), fill, dtype=dtype, device=p.device), dims)
        else:
            state[key] = spec.replicated(torch.full(dims, fill, dtype=dtype, device=p.device))
    if "refresh" in state:
        state["refresh"].copy_(torch.tensor([1, group["update_proj_gap"], 0]))


def to_state_tensor(optimizer, p: torch.Tensor, group: dict, key: str, value: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor in the layout this run's parameter needs (a one-process checkpoint into a
    sharded run takes this rank's rows; a DTensor into a plain run is gathered)."""
    if key in HOST_STATE:
        return (value.full_tensor() if is_dtensor(value) else value).to("cpu").clone()
    eight_bit = eight_bit_keys(optimizer, p, group).get(key)
    if eight_bit is not None:
        return to_8bit_state(optimizer, p, group, key, value, eight_bit)
    if not is_dtensor(p):
        return (value.full_tensor() if is_dtensor(value) else value).to(p.device).clone()
    spec = optimizer.shard_spec(p)
    wanted = [Shard(0) if isinstance(x, Shard) else Replicate() for x in spec.placements] \
        if key in sharded_keys(optimizer, p, group) else [Replicate()] * spec.mesh.ndim
    if is_dtensor(value):
        if tuple(value.placements) != tuple(wanted) or value.device_mesh != spec.mesh:
            value = value.redistribute(spec.mesh, wanted) if value.device_mesh == spec.mesh else value.full_tensor()
        if is_dtensor(value):
            return value.to(p.device).clone()
    full = value.to(p.device)
    if key in sharded_keys(optimizer, p, group):
        return spec.sharded(spec.local_rows(full).clone(), full.shape)
    return spec.replicated(full.clone())


# -- the step -------------------------------------------------------------------------------------


class ShardStep(RowQuantizedStep, ParamStep):
    """A :class:`ParamStep` on local shards: ``param`` and ``grad`` are this rank's rows, `shape` the whole
    weight's, a left projection arrives reduced across ranks (`low`), and ``row_totals`` holds the sums
    over all rows that the rule asked for (:meth:`ComposedOptimizer.partial_row_sums`)."""

    def __init__(self, param, grad, state, group, t, side, layout, low, spec=None, shape=None):
        super().__init__(param, grad, state, group, t, side, layout)
        self._low, self._right = low, None
        # (a refresh's view of the moments has no parameter, and needs no shape)
        whole = shape if shape is not None else (param.shape if param is not None else None)
        self.spec, self._shape = spec, None if whole is None else torch.Size(whole)
        self.row_totals = {}

    @property
    def shape(self):
        return self._shape

    def set_reduced_projection(self, low: torch.Tensor) -> None:
        """The low-rank gradient of a left (or two-sided) projection, summed across ranks."""
        self._low = low

    def project(self, g):
        if self._low is not None and g is self.grad:
            return self._low
        if self.side in ("left", "full"):
            raise RuntimeError("internal: a left projection of a sharded weight must be reduced across ranks")
        if self.side == "right" and g is self.grad:
            # local; kept, as ``partial_row_sums`` and ``compute_update`` both read it
            if self._right is None:
                self._right = super().project(g)
            return self._right
        return super().project(g)


class ShardedProjectors:
    """The :class:`~galore_mini.optim.core.ShardView` of one DTensor parameter: how a refresh adopts whole
    projectors into its local state."""

    def __init__(self, spec: ShardSpec, sharded: set[str], quantizer: "RowQuantizer | None" = None):
        self.spec, self.sharded, self.quantizer = spec, sharded, quantizer

    def moments(self, state: dict, group: dict, side: str) -> ShardStep:
        """A step view of `state` (local shards) for reading and writing moments at a refresh."""
        ps = ShardStep(None, None, state, group, 0, side, None, None, self.spec)
        ps.quantizer = self.quantizer
        return ps

    def localize(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return self.spec.local_rows(value) if key in self.sharded else value

    def whole(self, state: dict) -> dict:
        """`state` with sharded projectors gathered (for rotating moments and comparing subspaces)."""
        view = dict(state)
        for key in ("projector", "projector_right"):
            if key in view and key in self.sharded:
                view[key] = self.spec.gather_rows(view[key])
        return view


def _local_state(state: dict) -> dict:
    return {key: local(value) for key, value in state.items()}


class _ShardWork(NamedTuple):
    """One DTensor parameter's share of a sharded step: `grad` is the local shard of its gradient."""

    param: torch.Tensor
    grad: torch.Tensor
    group: dict
    spec: ShardSpec


def step_sharded(optimizer: "ShardedOptimizer", items: list[tuple[torch.Tensor, dict]]) -> None:
    """One update of DTensor parameters (see module docstring); `items` are ``(param, group)``. Drives
    the optimizer through its public step protocol (see :class:`~galore_mini.optim.core.ComposedOptimizer`)."""
    work = []
    for p, group in items:
        grad = optimizer.checked_grad(p)
        spec = optimizer.shard_spec(p)
        if not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
            found = tuple(grad.placements) if is_dtensor(grad) else "a plain tensor"
            raise UsageError(f"{type(optimizer).__name__}: the gradient of {describe_param(p, group, None)} is {found}, "
                             f"but the parameter is sharded {tuple(p.placements)}; FSDP2 hands each rank its "
                             "rows of the reduced gradient — do not replace .grad by hand")
        work.append(_ShardWork(p, local(grad), group, spec))
    # block sums of squares of the local rows; they double as the finiteness probe (the gradient is read once)
    layouts, sums = [], []
    for p, g, group, spec in work:
        blocks = grad_blocks(optimizer, p, group)
        layout = ShardLayout(blocks, spec) if blocks is not None else None
        blocked = layout is not None and layout.kind != "elementwise"
        layouts.append(layout)
        sums.append(layout.partial_sums(g) if blocked else None)
    checked = [i for i, item in enumerate(work) if item.group.get("nonfinite", "skip") != "off"]
    flags = [True] * len(work)
    probes = [(work[i].spec, sums[i] if sums[i] is not None else work[i].grad) for i in checked]
    for i, ok in zip(checked, global_finite_flags(probes)):
        flags[i] = ok
    admitted = [i for i, (item, ok) in enumerate(zip(work, flags)) if optimizer.admit(item.param, item.group, ok)]
    ready = [work[i] for i in admitted]
    layouts = [layouts[i] for i in admitted]
    sums = [sums[i] for i in admitted]
    steps = optimizer.start_steps([(item.param, item.group) for item in ready])
    if not ready:
        return
    views = [_local_state(optimizer.state[item.param]) for item in ready]
    quantizer = RowQuantizer()  # sharded 8-bit moments: straddling blocks settled once per phase
    due_at = [int(view["refresh"][0]) if "refresh" in view else None for view in views]
    # every weight due a refresh, side by side: as many collectives as one weight's refresh
    due_now = [i for i, (t, due) in enumerate(zip(steps, due_at)) if due is not None and t >= due]
    refreshes = []
    for i in due_now:
        p, g, group, spec = ready[i]
        side = resolve_side(group["proj_type"], p.shape)
        refreshes.append(projector_refresh(spec, g, group["rank"], side, group["proj_method"],
                                           views[i] if steps[i] > 1 else {}, optimizer.sketch_generator(p, steps[i]),
                                           resolve_dtype(group["proj_dtype"], "proj_dtype")))
    for i, new in zip(due_now, run_in_lockstep(refreshes)):
        p, g, group, spec = ready[i]
        side = resolve_side(group["proj_type"], p.shape)
        optimizer.install_projector(p, group, views[i], side, steps[i], new, steps[i] > 1,
                                    view=ShardedProjectors(spec, sharded_keys(optimizer, p, group), quantizer))
    quantizer.flush()  # moments rotated at a refresh are read by the update below
    # every sum this step needs, in one all-reduce: left projections, block sums of squares and what
    # the rule sums over all of W's rows (``partial_row_sums``)
    pieces, owners = [], []
    shard_steps = []
    for index, ((p, g, group, spec), view, t) in enumerate(zip(ready, views, steps)):
        if sums[index] is not None:
            if not layouts[index].needs_reduction:
                layouts[index].set_sums(sums[index])  # local: ready for ``partial_row_sums``
            else:
                pieces.append((spec, sums[index]))
                owners.append(("sums", index, None))
        ps = ShardStep(local(p), g if g.dtype == torch.float32 else g.float(), view, group, t,
                       resolve_side(group["proj_type"], p.shape) if "rank" in group else None,
                       layouts[index], None, spec, p.shape)
        ps.quantizer = quantizer
        shard_steps.append(ps)
        for name, part in optimizer.partial_row_sums(ps).items():
            pieces.append((spec, part.float()))
            owners.append(("rows", index, name))
        if "rank" in group:
            side = resolve_side(group["proj_type"], p.shape)
            if side in ("left", "full"):
                basis = view["projector"]
                low = basis.t() @ (g if g.dtype == basis.dtype else g.to(basis.dtype))
                if side == "full":
                    low = low @ view["projector_right"].t()
                pieces.append((spec, low.float()))
                owners.append(("low", index, None))
    for (kind, index, name), value in zip(owners, reduce_sums(pieces)):
        if kind == "sums":
            layouts[index].set_sums(value)
        elif kind == "low":
            shard_steps[index].set_reduced_projection(value)
        else:
            shard_steps[index].row_totals[name] = value
    for (p, _, group, _), view, ps in zip(ready, views, shard_steps):
        view["step"] += 1
        optimizer.apply_update(local(p), group, optimizer.compute_update(ps))
    quantizer.flush()


class ShardedOptimizer(ComposedOptimizer):
    """The sharded layer: a :class:`~galore_mini.optim.core.ComposedOptimizer` that also takes FSDP2 /
    DTensor parameters (see the module docstring). Plain parameters take the base's step unchanged;
    DTensor parameters take :func:`step_sharded`, with state allocated, loaded and counted as
    DTensors. Every optimizer of the package is built on this layer; the base knows no DTensor."""

    def validate_group(self, group):
        super().validate_group(group)
        check_group(self, group)

    def shard_spec(self, p: torch.Tensor) -> ShardSpec:
        """Where `p`'s rows live (cached: a parameter's placements do not change while the optimizer holds it)."""
        cache = self.__dict__.setdefault("_shard_specs", {})
        spec = cache.get(id(p))
        if spec is None:
            spec = cache[id(p)] = shard_spec(p)
        return spec

    def init_state(self, p, group, state):
        if is_dtensor(p):
            init_state(self, p, group, state)
        else:
            super().init_state(p, group, state)

    def update_params(self, items):
        sharded = [item for item in items if is_dtensor(item[0])]
        if sharded:
            # FSDP2 / DTensor parameters: local shards, explicit small collectives
            step_sharded(self, sharded)
            items = [item for item in items if not is_dtensor(item[0])]
        super().update_params(items)

    def loadable_shapes(self, p, group, key, dims):
        # a sharded run's 8-bit moments are laid out by rows (see eight_bit_keys)
        return loadable_shapes(self, p, group, key, dims)

    def restore_state_tensor(self, p, group, key, value, dims):
        if is_dtensor(value) or is_dtensor(p) or tuple(value.shape) != tuple(dims):
            return to_state_tensor(self, p, group, key, value)
        return super().restore_state_tensor(p, group, key, value, dims)

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (on this rank: a DTensor counts its local shard)."""
        return sum(local(v).numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))


# -- communication, counted ----------------------------------------------------------------------


def communication_bytes(shape: tuple[int, ...], rank: int, side: str | None, world: int, *, method: str = "power",
                        first: bool = False, n_blocks_reduced: int = 0, adafactor: bool = False,
                        scale_parameter: bool = False, moments_8bit: int = 0,
                        bytes_per_value: int = 4) -> dict[str, float]:
    """Bytes one rank sends for one row-sharded parameter of `shape` (m×n, or m), with ring collectives.

    A ring all-reduce of B bytes sends ``2(W-1)/W·B`` per rank, an all-gather of B bytes in all
    ``(W-1)/W·B``. Returns ``{"step": …, "refresh": …}``: the step (left / full projections' partial
    products, `n_blocks_reduced` block sums, GaLoreAdafactor's sums over rows when `adafactor` — and
    ‖W‖² for `scale_parameter` —, and W−1 block maxima per 8-bit moment laid out by rows,
    `moments_8bit`; right projections send none of the first) and one refresh (``method`` power, or
    randomized for the first refresh — `first` — with k = r + 8, or svd, which gathers the gradient).
    `side` None is an unprojected parameter (no refresh). The finiteness flags (one value per
    parameter) are left out: a few bytes. ``tests/test_fsdp_more.py`` checks these counts against the
    collectives a step makes.
    """
    if side not in (None, "left", "right", "full"):
        raise UsageError(f"communication_bytes: side={side!r}; use 'left', 'right', 'full' or None (unprojected)")
    if method not in PROJ_METHODS:
        raise UsageError(f"communication_bytes: method={method!r}; use one of {', '.join(PROJ_METHODS)}")
    m, n = shape[0], math.prod(shape[1:])
    if world <= 1:
        return {"step": 0.0, "refresh": 0.0}
    reduce, gather = 2 * (world - 1) / world * bytes_per_value, (world - 1) / world * bytes_per_value
    values = n_blocks_reduced + (world - 1) * moments_8bit + int(scale_parameter)
    if side == "left":
        values += rank * n
    elif side == "full":
        values += rank * rank
    elif adafactor:
        # R's rows are W's rows: column sums and Σ R²/r over c columns, and the row EMA's sum (1-D: one value)
        values += 1 if len(shape) == 1 else 2 * (rank if side == "right" else n) + 1
    step = reduce * values
    if side is None or method == "random":
        return {"step": step, "refresh": 0.0}
    if method == "svd":
        return {"step": step, "refresh": gather * m * n}
    randomized = first or method == "randomized"
    k = min(rank + OVERSAMPLE, m, n) if randomized else rank
    passes = 1 + RANDOMIZED_POWER_STEPS if randomized else 1
    refresh = 0.0
    if side in ("right", "full"):
        # Gᵀ(G Q) or GᵀS per pass (n×k), then the k×k Gram matrix of the Ritz step
        refresh += reduce * (passes * n * k + k * k)
    if side in ("left", "full"):
        # per pass: the m×k product's rows gathered for the QR (+ Gᵀq, n×k, after the first pass or
        # Gᵀ P_old warm-starting); the Ritz step's k×n matrix; the r sign agreements when warm
        reduced_passes = passes - 1 if randomized else 1
        refresh += gather * passes * m * k + reduce * (reduced_passes * n * k + k * n)
        if not randomized or not first:
            refresh += reduce * rank
    return {"step": step, "refresh": refresh}
