"""The optimizers on FSDP2 / DTensor parameters: work on the local shard, reduce only what must cross ranks.

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
  as an (m, K) one, both sharded with the rows (see "8-bit moments across shards" below); a block that
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

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from galore_mini.errors import UsageError
from galore_mini.optim import quant
from galore_mini.optim.blocks import BlockLayout
from galore_mini.optim.core import HOST_STATE, ComposedOptimizer, ParamStep
from galore_mini.optim.dtypes import resolve_dtype
from galore_mini.optim.projection import (OVERSAMPLE, PROJ_METHODS, RANDOMIZED_POWER_STEPS, compute_projector,
                                         resolve_side)
from galore_mini.optim.quant import BLOCK

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Partial
except ImportError:  # pragma: no cover - older torch: no DTensor, nothing to shard
    DTensor = None

__all__ = ["ShardedOptimizer", "is_dtensor", "ShardSpec", "shard_spec", "shard_rows", "sharded_keys",
           "unsupported_reason", "sharded_layout", "fit_to_checkpoint", "communication_bytes"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), `t` otherwise."""
    return t.to_local() if is_dtensor(t) else t


@dataclass
class ShardSpec:
    """Where one DTensor parameter's rows live: its mesh and placements, the process group that holds
    the other rows (None when nothing is sharded), and this rank's rows ``[offset, offset + rows)``."""

    mesh: object
    placements: tuple
    group: object
    rows_total: int
    offset: int
    rows: int
    key: tuple = field(default=())

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(0, self.offset, self.rows)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        """The full tensor whose rows are sharded as this parameter's (uneven shards included)."""
        if self.group is None:
            return part
        shape = (self.rows_total, *part.shape[1:])
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(part.contiguous(), self.mesh, self.placements, run_check=False, shape=shape,
                                  stride=stride).full_tensor()

    def sharded(self, local_part: torch.Tensor, shape) -> "DTensor":
        """A state DTensor laid out like the parameter's rows."""
        shape = tuple(shape)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local_part, self.mesh, self.placements, run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    def replicated(self, full: torch.Tensor) -> "DTensor":
        return DTensor.from_local(full, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)

    def local_shape(self, shape) -> tuple[int, ...]:
        return (self.rows, *tuple(shape)[1:])


def _describe(p: torch.Tensor, group: dict | None, index: int | None) -> str:
    names = (group or {}).get("param_names")
    if names and index is not None and index < len(names):
        return f"parameter {names[index]!r} (shape {list(p.shape)})"
    return f"a parameter of shape {list(p.shape)}"


def shard_spec(p: torch.Tensor, group: dict | None = None, index: int | None = None) -> ShardSpec:
    """The :class:`ShardSpec` of a DTensor parameter; a clear error for placements we cannot serve."""
    placements = tuple(p.placements)
    mesh = p.device_mesh
    sharded_dims = []
    for dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is Shard and placement.dim == 0:
            sharded_dims.append(dim)
            continue
        kind = "Partial (an unreduced gradient)" if isinstance(placement, Partial) else repr(placement)
        raise UsageError(
            f"{_describe(p, group, index)} is a DTensor with placement {kind} on mesh dimension {dim}: the "
            "optimizers support row sharding only (Shard(0), as FSDP2's fully_shard produces, with Replicate on "
            "other mesh dimensions); for tensor parallelism (Shard(1)) leave that weight out of the projected "
            "groups and use an optimizer that shards nothing, or shard it by rows"
        )
    if len(sharded_dims) > 1:
        raise UsageError(f"{_describe(p, group, index)} is sharded by rows on {len(sharded_dims)} mesh dimensions "
                         f"{placements}; shard it on one mesh dimension (FSDP2 or HSDP)")
    local_shape, offset = compute_local_shape_and_global_offset(tuple(p.shape), mesh, placements)
    pg = mesh.get_group(sharded_dims[0]) if sharded_dims and mesh.size(sharded_dims[0]) > 1 else None
    rows_total = p.shape[0] if p.dim() else 1
    return ShardSpec(mesh, placements, pg, rows_total, int(offset[0]) if p.dim() else 0,
                     int(local_shape[0]) if p.dim() else 1, key=(id(mesh), placements))


# -- state layout --------------------------------------------------------------------------------


def _rows_layout(layout: BlockLayout) -> bool:
    """One block per row: `v` is laid out like the rows of W, so it shards with them."""
    return layout.kind == "axis" and layout.axis == 0 and all(size == 1 for _, size in layout.runs)


def sharded_keys(optimizer, p: torch.Tensor, group: dict) -> set[str]:
    """State keys laid out like the rows of `p` (sharded with them); the others are replicated."""
    keys = set()
    side = resolve_side(group["proj_type"], p.shape) if "rank" in group else None
    blocks = _v_blocks(optimizer, p.shape, group)
    for key in optimizer.state_layout(p.shape, group):
        if key in HOST_STATE or key == "projector_right" or key in getattr(optimizer, "replicated_state", ()):
            continue
        if key == "projector":
            if side in ("left", "full"):
                keys.add(key)
        elif key == "exp_avg_sq" and blocks is not None and blocks.kind != "elementwise":
            # one v per row of W: per row of the gradient, or (approach 1) per row of a right projection's R
            if _rows_layout(blocks) and blocks.shape[0] == p.shape[0] and (
                    tuple(blocks.shape) == tuple(p.shape) or side == "right"):
                keys.add(key)
        elif side in (None, "right"):
            keys.add(key)  # full-size moments, or an m×r low-rank moment (Adafactor: its per-row EMA)
    return keys


def _v_blocks(optimizer, shape, group: dict) -> BlockLayout | None:
    """The blocks `v` is kept over: the weight's, or (GaLore-mini approach 1) blocks counted on R."""
    return optimizer.v_layout(tuple(shape), group)


def _grad_blocks(optimizer, p: torch.Tensor, group: dict) -> BlockLayout | None:
    """The blocks whose sums of squares of G a sharded step takes (None: `v` is not fed from G's
    blocks — no blocks, or GaLore-mini's approach 1, whose `v` is fed from R by ``partial_row_sums``)."""
    if not optimizer.uses_blocks or ("rank" in group and group.get("approach", 3) == 1):
        return None
    return optimizer.block_layout(p.shape, group)


def unsupported_reason(optimizer, group: dict) -> str | None:
    """Why `group` cannot take DTensor parameters (None when it can); read from the optimizer and the
    group's options only, so the memory estimator asks the same question without a process group.
    (GaLoreAdafactor refuses DTensor parameters of more than 2 dimensions itself, by shape.)"""
    if getattr(optimizer, "distributed_unsupported", None):
        return optimizer.distributed_unsupported
    return None


def shard_rows(rows_total: int, world: int, rank: int) -> tuple[int, int]:
    """``(offset, rows)`` of rank `rank`'s rows of a dim-0 size `rows_total` split over `world` ranks, as
    ``fully_shard`` and ``Shard(0)`` split it (``torch.chunk``): ⌈rows_total/world⌉ rows per rank from
    rank 0 on, so the last ranks hold fewer, or none. No process group needed.

    >>> [shard_rows(7, 3, r) for r in range(3)], shard_rows(4, 3, 2)
    ([(0, 3), (3, 3), (6, 1)], (4, 0))
    """
    chunk = -(-rows_total // world)
    offset = min(rows_total, chunk * rank)
    return offset, min(rows_total, offset + chunk) - offset


def check_group(optimizer, group: dict) -> None:
    """Refuse at construction what the sharded step cannot do (named, with what to do instead)."""
    params = group["params"]
    flags = [is_dtensor(p) for p in params]
    if not any(flags):
        return
    name = type(optimizer).__name__
    if "rank" in group and not all(flags):
        plain = next(i for i, f in enumerate(flags) if not f)
        raise UsageError(
            f"{name}: a projected group mixes DTensor (FSDP2-sharded) parameters with plain ones, e.g. "
            f"{_describe(params[plain], group, plain)}: shard the whole model with fully_shard (each decoder layer "
            "and the root), or put the plain parameters in a group of their own"
        )
    why = unsupported_reason(optimizer, group)
    if why:
        index = flags.index(True)
        raise UsageError(f"{name}: {_describe(params[index], group, index)} is a DTensor (FSDP2-sharded): {why}. "
                         "Use another optimizer for this parameter, or leave it unsharded")
    for index, p in enumerate(params):
        if flags[index]:
            shard_spec(p, group, index)


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


# -- 8-bit moments across shards -----------------------------------------------------------------
#
# One process quantises a moment as one flat tensor in blocks of quant.BLOCK consecutive entries
# (entry f is in block f // BLOCK). A sharded 8-bit moment (laid out like W's rows) keeps those global
# blocks, so every entry gets the code one process gives it. Per rank it stores
#   codes   (m, cols) uint8, rows sharded like W (cols = entries per row; a 1-D moment is (m, 1));
#   absmax  (m, K) fp32, "row-expanded": row i's slot j holds the absmax of the j-th block row i
#           touches (block (i·cols) // BLOCK + j), 0 in slots past its last block.
# Neither shape depends on the world size, so DCP reshards both like any row-sharded tensor. A block
# that straddles a shard boundary needs the max over the ranks that hold part of it: one slot per
# boundary (world − 1 values per tensor), all-reduced (MAX) once per step for every such tensor.


def absmax_slots(cols: int) -> int:
    """K: the most blocks of ``quant.BLOCK`` entries that one row of `cols` entries touches when rows
    are laid end to end. Row i starts at entry ``i·cols``, whose offset in its block runs over the
    multiples of ``g = gcd(cols, BLOCK)``; the worst start, ``BLOCK - g``, touches
    ``⌈(BLOCK - g + cols) / BLOCK⌉`` blocks (``cols / BLOCK`` when BLOCK divides cols: g = BLOCK).

    >>> [absmax_slots(c) for c in (1, 4, 100, 256, 300, 512, 4096)]
    [1, 1, 2, 1, 3, 2, 16]
    """
    g = math.gcd(cols, BLOCK)
    return -(-(BLOCK - g + cols) // BLOCK)


def row_form_shapes(numel: int, rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(codes shape, absmax shape)`` of a sharded 8-bit moment of `numel` entries in `rows` rows."""
    cols = numel // rows if rows else 0
    return (rows, cols), (rows, absmax_slots(cols) if cols else 0)


def eight_bit_keys(optimizer, p: torch.Tensor, group: dict) -> dict[str, tuple[str, int, int]]:
    """The sharded 8-bit state keys of `p`: ``{key: (codes key, m, cols)}`` for each codes key and its
    ``_absmax``. Empty where nothing is 8-bit or laid out by rows (replicated 8-bit moments keep the
    flat one-process layout)."""
    layout = optimizer.state_layout(p.shape, group)
    if not any(dtype == torch.uint8 for _, dtype in layout.values()):
        return {}
    sharded = sharded_keys(optimizer, p, group)
    m = p.shape[0] if p.dim() else 1
    out = {}
    for key, (dims, dtype) in layout.items():
        if dtype == torch.uint8 and key in sharded:
            cols = math.prod(dims) // m
            out[key] = out[key + "_absmax"] = (key, m, cols)
    return out


def sharded_layout(optimizer, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``optimizer.state_layout`` as a DTensor parameter holds it (global shapes): sharded 8-bit
    moments in the row form above, everything else as in one process."""
    layout = dict(optimizer.state_layout(p.shape, group))
    for key, (codes_key, m, cols) in eight_bit_keys(optimizer, p, group).items():
        codes, absmax = row_form_shapes(m * cols, m)
        layout[key] = (codes, torch.uint8) if key == codes_key else (absmax, torch.float32)
    return layout


@functools.lru_cache(maxsize=4096)
def _row_blocks(offset: int, rows: int, cols: int, device: torch.device):
    """Where rows ``[offset, offset + rows)`` of `cols` entries sit among the global blocks.

    Returns ``(first, lead, n_local, table_index, table_mask, block_row, block_slot)``: the first global
    block they touch, how many entries of that block come before them, how many blocks they touch; for
    the absmax table (rows×K) each slot's local block and whether the row touches it; for each local
    block a (row, slot) of the table that holds it (the row of its first local entry)."""
    K = absmax_slots(cols)
    start = offset * cols
    first, lead = divmod(start, BLOCK)
    n_local = -(-(start + rows * cols) // BLOCK) - first
    if not rows:
        lead = n_local = 0
    row_start = (torch.arange(offset, offset + rows, dtype=torch.int64) * cols)
    row_first = row_start // BLOCK
    row_last = (row_start + cols - 1) // BLOCK
    blocks = row_first[:, None] + torch.arange(K, dtype=torch.int64)
    table_mask = blocks <= row_last[:, None]
    table_index = torch.where(table_mask, blocks - first, 0)
    block_start = torch.clamp(torch.arange(first, first + n_local, dtype=torch.int64) * BLOCK, min=start)
    block_row = block_start // cols - offset
    block_slot = block_start // BLOCK - row_first[block_row]
    return (first, lead, n_local, table_index.to(device), table_mask.to(device), block_row.to(device),
            block_slot.to(device))


def _padded_blocks(flat: torch.Tensor, lead: int, n_local: int) -> torch.Tensor:
    """`flat` placed at offset `lead` in `n_local` blocks, zeros around it (as one process pads)."""
    return torch.nn.functional.pad(flat, (lead, n_local * BLOCK - lead - flat.numel())).view(n_local, BLOCK)


def rows_dequantize(codes: torch.Tensor, table: torch.Tensor, offset: int, signed: bool) -> torch.Tensor:
    """The fp32 values of local rows ``codes`` (rows×cols) given their absmax `table` (rows×K); the same
    product of codebook value and block absmax as :func:`quant.dequantize`, so the same bits."""
    rows, cols = codes.shape
    _, lead, n_local, _, _, block_row, block_slot = _row_blocks(offset, rows, cols, codes.device)
    book, _ = quant.codebook(signed, codes.device)
    values = book[codes.reshape(-1).long()]
    absmax = table[block_row, block_slot]
    product = (_padded_blocks(values, lead, n_local) * absmax[:, None]).reshape(-1)
    return product[lead:lead + rows * cols].view(rows, cols)


def rows_to_flat_absmax(table: torch.Tensor, cols: int) -> torch.Tensor:
    """A whole row-expanded absmax table (m×K) as one process's flat ``(n_blocks,)``."""
    _, _, _, _, _, block_row, block_slot = _row_blocks(0, table.shape[0], cols, table.device)
    return table[block_row, block_slot].clone()


def flat_to_rows_absmax(flat: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
    """Rows ``[offset, offset + rows)`` of the row-expanded table of one process's flat absmax."""
    first, _, n_local, table_index, table_mask, _, _ = _row_blocks(offset, rows, cols, flat.device)
    return torch.where(table_mask, flat[first:first + n_local][table_index], 0.0)


@functools.lru_cache(maxsize=1024)
def _boundaries(rows_total: int, world: int, cols: int) -> tuple[int, ...]:
    """The global block holding each shard boundary (ranks 1..world-1), -1 where the boundary falls
    on a block edge (nothing to reduce there)."""
    out = []
    for r in range(1, world):
        at = shard_rows(rows_total, world, r)[0] * cols
        out.append(at // BLOCK if at % BLOCK else -1)
    return tuple(out)


class _PendingWrite(NamedTuple):
    codes: torch.Tensor
    table: torch.Tensor
    block_max: torch.Tensor  # local blocks' maxima (of this rank's entries)
    values: torch.Tensor  # the padded blocks that straddle (k×BLOCK), kept to recode them
    straddling: list[int]  # which local blocks those are
    slots: list[int]  # per shard boundary: its local block, or -1 (this rank holds none of it)
    offset: int
    signed: bool


class RowQuantizer:
    """Writes sharded 8-bit moments for one step and settles their straddling blocks together.

    :meth:`write` codes every entry at once, with local block maxima; blocks whose entries other ranks
    hold too are coded provisionally and recoded in :meth:`flush` once the maxima of those blocks are
    reduced (MAX) across ranks: one all-reduce per process group for every write of the step, of
    world − 1 values per tensor (one per shard boundary). Every rank writes the same tensors in the
    same order (a rank without rows contributes zeros), so the collectives match. Between a write and
    the flush the moment must not be read (the step reads each moment once, before writing it).
    """

    def __init__(self):
        self.pending: list[tuple[ShardSpec, _PendingWrite]] = []

    def write(self, spec: ShardSpec, codes: torch.Tensor, table: torch.Tensor, value: torch.Tensor,
              signed: bool) -> None:
        rows, cols = codes.shape
        first, lead, n_local, table_index, table_mask, _, _ = _row_blocks(spec.offset, rows, cols, codes.device)
        padded = _padded_blocks(value.detach().reshape(-1).float(), lead, n_local)
        block_max = padded.abs().amax(dim=1)
        _code(codes, padded, block_max, lead, signed)
        table.copy_(torch.where(table_mask, block_max[table_index], 0.0))
        if spec.group is None:
            return
        world = dist.get_world_size(spec.group)
        slots = [b - first if b >= 0 and 0 <= b - first < n_local else -1
                 for b in _boundaries(spec.rows_total, world, cols)]
        straddling = sorted({s for s in slots if s >= 0})
        values = padded[straddling].clone() if straddling else padded[:0]
        self.pending.append((spec, _PendingWrite(codes, table, block_max, values, straddling, slots, spec.offset,
                                                 signed)))

    def flush(self) -> None:
        """Reduce the straddling blocks' maxima of every pending write and recode those blocks."""
        pending, self.pending = self.pending, []
        by_group: dict[int, list[int]] = {}
        for i, (spec, _) in enumerate(pending):
            by_group.setdefault(id(spec.group), []).append(i)
        for indices in by_group.values():
            parts = []
            for i in indices:
                w = pending[i][1]
                padded_max = torch.cat([w.block_max, w.block_max.new_zeros(1)])
                gather = torch.tensor([s if s >= 0 else w.block_max.numel() for s in w.slots], device=padded_max.device)
                parts.append(padded_max[gather])
            reduced = torch.cat(parts)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=pending[indices[0]][0].group)
            for i, maxima in zip(indices, reduced.split([part.numel() for part in parts])):
                w = pending[i][1]
                if not w.straddling:
                    continue
                mine = [k for k, s in enumerate(w.slots) if s >= 0]
                # the reduced max covers this rank's part too (several boundaries may share a block)
                w.block_max.scatter_reduce_(0, torch.tensor([w.slots[k] for k in mine], device=maxima.device),
                                            maxima[mine], "amax")
                rows, cols = w.codes.shape
                _, lead, _, table_index, table_mask, _, _ = _row_blocks(w.offset, rows, cols, w.codes.device)
                recoded = torch.empty(w.values.shape, dtype=torch.uint8, device=w.values.device)
                _code(recoded, w.values, w.block_max[w.straddling], 0, w.signed)
                flat_codes = w.codes.view(-1)
                for k, block in enumerate(w.straddling):
                    lo = max(0, block * BLOCK - lead)
                    hi = min(rows * cols, (block + 1) * BLOCK - lead)
                    flat_codes[lo:hi] = recoded[k, lo + lead - block * BLOCK:hi + lead - block * BLOCK]
                w.table.copy_(torch.where(table_mask, w.block_max[table_index], 0.0))


def _code(out: torch.Tensor, padded: torch.Tensor, block_max: torch.Tensor, lead: int, signed: bool) -> None:
    """``out`` ← codes of the entries of `padded` (blocks×BLOCK, entries from `lead` on) with these block
    maxima: the division and bucketing of :func:`quant.quantize`, so the same codes."""
    safe = torch.where(block_max > 0, block_max, torch.ones_like(block_max))
    normalized = (padded / safe[:, None]).reshape(-1)[lead:lead + out.numel()]
    _, bounds = quant.codebook(signed, padded.device)
    out.copy_(torch.bucketize(normalized, bounds).view(out.shape))


class RowQuantizedStep:
    """Mixin for :class:`ParamStep` on local shards: moments stored in the sharded 8-bit row form
    (2-D uint8 codes) are read and written through :class:`RowQuantizer`; everything else as usual.
    Set ``quantizer`` (the step's :class:`RowQuantizer`) and ``spec`` before use."""

    quantizer: "RowQuantizer | None" = None
    spec: "ShardSpec | None" = None

    def read(self, key, shape, signed):
        buf = self.state[key]
        if buf.dtype == torch.uint8 and buf.dim() == 2:
            if any(w.codes is buf for _, w in self.quantizer.pending):
                raise RuntimeError(f"internal: 8-bit moment {key!r} read before its straddling blocks were settled")
            return rows_dequantize(buf, self.state[key + "_absmax"], self.spec.offset, signed).view(shape)
        return super().read(key, shape, signed)

    def write(self, key, value, signed):
        buf = self.state[key]
        if buf.dtype == torch.uint8 and buf.dim() == 2:
            self.quantizer.write(self.spec, buf, self.state[key + "_absmax"], value.reshape(buf.shape), signed)
        else:
            super().write(key, value, signed)


def to_8bit_state(optimizer, p: torch.Tensor, group: dict, key: str, value: torch.Tensor, kind: tuple[str, int, int]
                  ) -> torch.Tensor:
    """A loaded 8-bit codes / absmax tensor in the form this run needs: row form (this rank's rows) for
    a DTensor parameter, flat for a plain one; either form accepted (flat is 1-D, row form 2-D)."""
    codes_key, m, cols = kind
    is_codes = key == codes_key
    if is_dtensor(value) and value.dim() == 2 and is_dtensor(p):
        spec = optimizer.shard_spec(p)
        wanted = [Shard(0) if isinstance(x, Shard) else Replicate() for x in spec.placements]
        if value.device_mesh == spec.mesh:
            if tuple(value.placements) != tuple(wanted):
                value = value.redistribute(spec.mesh, wanted)
            return value.to(p.device).clone()
    whole = (value.full_tensor() if is_dtensor(value) else value).to(p.device)
    if not is_dtensor(p):
        if whole.dim() == 1:
            return whole.clone()
        return whole.reshape(-1).clone() if is_codes else rows_to_flat_absmax(whole, cols)
    spec = optimizer.shard_spec(p)
    codes_shape, table_shape = row_form_shapes(m * cols, m)
    if whole.dim() == 2:
        rows_whole = whole
    elif is_codes:
        rows_whole = whole.view(codes_shape)
    else:
        local = flat_to_rows_absmax(whole, spec.offset, spec.rows, cols)
        return spec.sharded(local, table_shape)
    return spec.sharded(spec.local_rows(rows_whole).clone(), codes_shape if is_codes else table_shape)


def loadable_shapes(optimizer, p: torch.Tensor, group: dict, key: str, dims) -> set[tuple[int, ...]]:
    """Shapes a checkpoint's `key` may have for `p`: the one-process shape `dims`, and for a sharded
    8-bit moment also its row form (checkpoints of sharded runs)."""
    shapes = {tuple(dims)}
    kind = eight_bit_keys(optimizer, p, group).get(key)
    if kind is not None:
        codes_key, m, cols = kind
        codes, absmax = row_form_shapes(m * cols, m)
        shapes.add(codes if key == codes_key else absmax)
    return shapes


def fit_to_checkpoint(state: dict, checkpoint_id) -> dict:
    """Make a DCP load template (``get_state_dict``'s dicts, nested as given to ``dcp.load``) take a
    checkpoint whose 8-bit moments are in the other form: a one-process checkpoint (flat codes and
    absmax) into a sharded run, or a sharded run's (row form) into one process. DCP refuses a tensor
    whose saved size differs from the template's; such uint8 codes and their ``_absmax`` are replaced
    in place by plain tensors of the saved size (each rank reads them whole, 1 byte per entry), which
    ``set_state_dict`` → ``load_state_dict`` converts. Other entries are left alone; returns `state`.

    Example::

        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(fit_to_checkpoint(state, path), checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = checkpoint_id if hasattr(checkpoint_id, "read_metadata") else FileSystemReader(str(checkpoint_id))
    saved = reader.read_metadata().state_dict_metadata

    def visit(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, torch.Tensor):
                md = saved.get(path)
                eight_bit = v.dtype == torch.uint8 or str(k).endswith("_absmax")
                if eight_bit and isinstance(md, TensorStorageMetadata) and tuple(md.size) != tuple(v.shape) \
                        and len(md.size) != v.dim():
                    node[k] = torch.zeros(tuple(md.size), dtype=md.properties.dtype,
                                          device=distributed_device(v))
            else:
                visit(v, path)

    visit(state, "")
    return state


def distributed_device(t: torch.Tensor) -> torch.device:
    return (t.to_local() if is_dtensor(t) else t).device


# -- blocks across shards ------------------------------------------------------------------------


class ShardLayout:
    """A parameter's block layout seen from one rank's rows.

    ``v`` per row is sharded with the rows: its local entries need only the local gradient. Any other
    layout keeps ``v`` whole on every rank: :meth:`partial_sums` are this rank's block sums of squares,
    summed across ranks before :meth:`set_sums` (so a block that straddles a shard boundary gets one
    ``v`` from all its rows). Offers what ``ParamStep`` and the rules' ``compute_update`` use of a
    :class:`BlockLayout`: ``kind``, ``axis``, ``runs``, ``n_blocks``, ``block_mean_sq``, ``expand``.
    """

    def __init__(self, base: BlockLayout, spec: ShardSpec):
        self.base, self.spec, self.kind = base, spec, base.kind
        self.axis, self.runs = base.axis, base.runs  # read as a BlockLayout's
        self.local_v = base.kind == "elementwise" or _rows_layout(base)
        self.means: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return self.spec.rows if self.local_v and self.kind != "elementwise" else self.base.n_blocks

    @property
    def needs_reduction(self) -> bool:
        return not self.local_v

    def partial_sums(self, g: torch.Tensor) -> torch.Tensor:
        """Sums of squares of the local rows per block: local rows (sharded v) or all blocks (replicated v)."""
        rows = g.reshape(g.shape[0], -1) if g.dim() else g.reshape(1, 1)
        # norms squared: one pass over the gradient, no full-size temporary (fp32 accumulation)
        if self.kind == "tensor":
            return torch.linalg.vector_norm(rows, dtype=torch.float32).square().reshape(1)
        if self.local_v or self.base.axis == 0:
            per_row = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()
            if self.local_v:
                return per_row
            out = torch.zeros(self.base.n_blocks, dtype=torch.float32, device=g.device)
            return out.index_add_(0, self.spec.local_rows(_block_index(self.base, g.device)), per_row)
        out = torch.zeros(self.base.n_blocks, dtype=torch.float32, device=g.device)
        per_col = torch.linalg.vector_norm(rows, dim=0, dtype=torch.float32).square()
        return out.index_add_(0, _block_index(self.base, g.device), per_col)

    def set_sums(self, sums: torch.Tensor) -> None:
        """Global block sums of squares → block means (the blocks' sizes are the full parameter's)."""
        if self.kind == "tensor":
            self.means = sums / math.prod(self.base.shape)
        elif self.local_v:
            self.means = sums / (math.prod(self.base.shape) // self.base.shape[0])
        else:
            self.means = sums / _block_numels(self.base, sums.device)

    def block_mean_sq(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elementwise":
            return x * x
        return self.means

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        if self.kind == "elementwise":
            return per_block
        if self.kind == "tensor":
            return per_block.reshape((1,) * len(self.base.shape))
        if self.local_v:
            return per_block.reshape((per_block.shape[0],) + (1,) * (len(self.base.shape) - 1))
        full = self.base.expand(per_block)
        return self.spec.local_rows(full) if self.base.axis == 0 else full


@functools.lru_cache(maxsize=1024)
def _block_index(base: BlockLayout, device: torch.device) -> torch.Tensor:
    """The block of each index along the layout's axis (cached: read every step)."""
    sizes = torch.tensor([size for count, size in base.runs for _ in range(count)], device=device)
    return torch.repeat_interleave(torch.arange(base.n_blocks, device=device), sizes)


@functools.lru_cache(maxsize=1024)
def _block_numels(base: BlockLayout, device: torch.device) -> torch.Tensor:
    sizes = torch.tensor([size for count, size in base.runs for _ in range(count)], dtype=torch.float32, device=device)
    return sizes * (math.prod(base.shape) // base.shape[base.axis])


# -- the projector, found without gathering gradients -------------------------------------------


def _ritz(q: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    _, eigvecs = torch.linalg.eigh(gram)
    return q @ eigvecs[..., -rank:].flip(-1)


class _Reduce(NamedTuple):
    """A refresh's request: the sum of `tensor` over the ranks that hold `spec`'s rows."""

    spec: ShardSpec
    tensor: torch.Tensor


class _Gather(NamedTuple):
    """A refresh's request: the whole matrix whose rows are sharded as `spec`'s (`rows` are this rank's)."""

    spec: ShardSpec
    rows: torch.Tensor


def _right_basis(spec: ShardSpec, g: torch.Tensor, rank: int, method: str, previous, generator,
                 dtype: torch.dtype):
    """n×r basis of the leading right singular subspace of G (rows sharded), the same on every rank:
    the one-process ``_left_basis_from(Gᵀ …)`` with its products summed over the ranks. A generator
    (see :func:`run_in_lockstep`): it yields each sum it needs and returns the basis."""
    n, m = g.shape[1], spec.rows_total
    gc = g.to(dtype)

    def sketch_of(y):  # Gᵀ (G y): n×k, one all-reduce
        return (yield _Reduce(spec, (gc.mT @ (gc @ y.to(dtype))).float()))

    if method == "random":
        basis, _ = torch.linalg.qr(torch.randn((n, rank), generator=generator).to(g.device))
        return basis
    if method == "power" and previous is not None:
        q, _ = torch.linalg.qr((yield from sketch_of(previous)))
    else:
        k = min(rank + OVERSAMPLE, n, m)
        sketch = torch.randn((m, k), generator=generator).to(device=g.device, dtype=dtype)
        q, _ = torch.linalg.qr((yield _Reduce(spec, (gc.mT @ spec.local_rows(sketch)).float())))
        for _ in range(RANDOMIZED_POWER_STEPS):
            q, _ = torch.linalg.qr((yield from sketch_of(q)))
    h = (gc @ q.to(dtype)).float()  # Ritz step: qᵀGᵀ G q = Σ_i (G_i q)ᵀ(G_i q), one k×k all-reduce
    basis = _ritz(q, (yield _Reduce(spec, h.mT @ h)), rank)
    if previous is not None:
        basis = basis * torch.where((basis * previous).sum(dim=-2, keepdim=True) < 0, -1.0, 1.0)
    return basis


def _left_basis(spec: ShardSpec, g: torch.Tensor, rank: int, method: str, previous_rows, generator,
                dtype: torch.dtype):
    """m×r basis (whole, on every rank) of the leading left singular subspace of G (rows sharded);
    `previous_rows` is this rank's rows of the previous basis. The m×k products are gathered for the
    QR (k-column matrices, never the gradient). A generator, as :func:`_right_basis`."""
    m, n = spec.rows_total, g.shape[1]
    gc = g.to(dtype)

    def gathered(x):  # G x for x n×k replicated: this rank's rows, gathered
        return (yield _Gather(spec, (gc @ x.to(dtype)).float()))

    def t_times(q_rows):  # Gᵀ q = Σ_i G_iᵀ q_i: n×k all-reduce
        return (yield _Reduce(spec, (gc.mT @ q_rows.to(dtype)).float()))

    if method == "random":
        basis, _ = torch.linalg.qr(torch.randn((m, rank), generator=generator).to(g.device))
        return basis
    if method == "power" and previous_rows is not None:
        q, _ = torch.linalg.qr((yield from gathered((yield from t_times(previous_rows)))))
    else:
        k = min(rank + OVERSAMPLE, m, n)
        sketch = torch.randn((n, k), generator=generator).to(device=g.device, dtype=dtype)
        q, _ = torch.linalg.qr((yield from gathered(sketch)))
        for _ in range(RANDOMIZED_POWER_STEPS):
            q, _ = torch.linalg.qr((yield from gathered((yield from t_times(spec.local_rows(q))))))
    # Ritz step: small = qᵀ G = Σ_i q_iᵀ G_i, one k×n all-reduce
    small = yield _Reduce(spec, (spec.local_rows(q).to(dtype).mT @ gc).float())
    basis = _ritz(q, small @ small.mT, rank)
    if previous_rows is not None:
        agreement = yield _Reduce(spec, (spec.local_rows(basis) * previous_rows.float()).sum(dim=-2, keepdim=True))
        basis = basis * torch.where(agreement < 0, -1.0, 1.0)
    return basis


def projector_refresh(spec: ShardSpec, g: torch.Tensor, rank: int, side: str, method: str, state: dict,
                      generator: torch.Generator, dtype: torch.dtype):
    """Whole new projector tensors (identical on every rank) from this rank's gradient rows `g`;
    `state` holds the local views of the previous projector (empty at the first refresh). A generator
    of the sums and gathers it needs (run it with :func:`run_in_lockstep`)."""
    if method == "svd":
        # the exact reference: gather G (m×n) and take its SVD on every rank, as one process does
        whole = yield _Gather(spec, g.float())
        return compute_projector(whole, rank, side, "svd", {}, generator, dtype)
    g = g.float()
    out = {}
    old = state.get("projector")
    if side in ("left", "full"):
        out["projector"] = yield from _left_basis(spec, g, rank, method, old, generator, dtype)
    if side == "right":
        out["projector"] = (yield from _right_basis(spec, g, rank, method, old.float().mT if old is not None
                                                    else None, generator, dtype)).mT
    if side == "full":
        prev = state.get("projector_right")
        out["projector_right"] = (yield from _right_basis(spec, g, rank, method, prev.float().mT if prev is not None
                                                          else None, generator, dtype)).mT
    return {key: value.to(dtype).contiguous() for key, value in out.items()}


def run_in_lockstep(refreshes: list) -> list:
    """Run refresh generators side by side and return what each returns.

    Each round collects the next request of every unfinished generator and serves them all with
    one all-reduce (the sums) and one all-gather (the gathers) per process group, so refreshing
    many weights costs as many collectives as the longest single refresh, not their total. Every
    rank holds the same weights with the same shapes and methods, so the requests come in the same
    order on every rank. Gathers pad each rank's rows to the largest shard (uneven shards) and are
    exact; a sum is each element's sum over the ranks (the batched buffer may round differently
    from one collective per tensor, equally on every rank).
    """
    results: list = [None] * len(refreshes)
    requests: dict[int, object] = {}

    def advance(i, value=None, first=False):
        try:
            requests[i] = next(refreshes[i]) if first else refreshes[i].send(value)
        except StopIteration as done:
            requests.pop(i, None)
            results[i] = done.value

    for i in range(len(refreshes)):
        advance(i, first=True)
    while requests:
        order = list(requests)
        answers: dict[int, torch.Tensor] = {}
        sums = [i for i in order if isinstance(requests[i], _Reduce)]
        for i, value in zip(sums, _reduce_flat([(requests[i].spec, requests[i].tensor) for i in sums])):
            answers[i] = value
        gathers = [i for i in order if isinstance(requests[i], _Gather)]
        for i, value in zip(gathers, _gather_flat([(requests[i].spec, requests[i].rows) for i in gathers])):
            answers[i] = value
        for i in order:
            advance(i, answers[i])
    return results


def _gather_flat(pieces: list[tuple[ShardSpec, torch.Tensor]]) -> list[torch.Tensor]:
    """Each piece's whole matrix (rows sharded as its spec's), with one all-gather per process group:
    every rank sends its rows of every piece padded to the largest shard, ⌈rows/world⌉."""
    out, by_group = _split_by_group(pieces)
    for indices in by_group:
        group = pieces[indices[0]][0].group
        world = dist.get_world_size(group)
        padded, chunks = [], []
        for i in indices:
            spec, rows = pieces[i]
            chunk = -(-spec.rows_total // world)
            flat = rows.reshape(rows.shape[0], -1)
            padded.append(torch.nn.functional.pad(flat, (0, 0, 0, chunk - flat.shape[0])).reshape(-1))
            chunks.append(chunk)
        mine = torch.cat(padded)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        start = 0
        for i, chunk in zip(indices, chunks):
            spec, rows = pieces[i]
            width = math.prod(rows.shape[1:])
            size = chunk * width
            parts = [each[start:start + size].view(chunk, width) for each in every]
            start += size
            whole = torch.cat(parts)[:spec.rows_total]  # torch.chunk's split: the padding is at the end
            out[i] = whole.reshape(spec.rows_total, *rows.shape[1:])
    return out


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


def _split_by_group(pieces: list[tuple[ShardSpec, torch.Tensor]]) -> tuple[list, list[list[int]]]:
    """Results with the unsharded pieces (no process group) already in place, and the indices of the
    others grouped by process group, in order: one collective per group serves each list."""
    out: list[torch.Tensor | None] = [None] * len(pieces)
    by_group: dict[int, list[int]] = {}
    for i, (spec, t) in enumerate(pieces):
        if spec.group is None:
            out[i] = t
        else:
            by_group.setdefault(id(spec.group), []).append(i)
    return out, list(by_group.values())


def _reduce_flat(pieces: list[tuple[ShardSpec, torch.Tensor]]) -> list[torch.Tensor]:
    """All-reduce (sum) every tensor with one collective per process group; results in order."""
    out, by_group = _split_by_group(pieces)
    for indices in by_group:
        flat = torch.cat([pieces[i][1].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=pieces[indices[0]][0].group)
        start = 0
        for i in indices:
            t = pieces[i][1]
            out[i] = flat[start:start + t.numel()].view_as(t)
            start += t.numel()
    return out


def global_finite_flags(probes: list[tuple[ShardSpec, torch.Tensor]]) -> list[bool]:
    """Whether each probe (a local gradient, or its block sums of squares) is finite on every rank: one
    multi-tensor norm, one all-reduce per process group and one host read in all (the one-process step
    reads its flags on the host too)."""
    if not probes:
        return []
    norms = torch._foreach_norm([t for _, t in probes], 1, dtype=torch.float32)
    bad = (~torch.isfinite(torch.stack(norms))).float()
    reduced = _reduce_flat([(spec, bad[i:i + 1]) for i, (spec, _) in enumerate(probes)])
    return (torch.cat(reduced) == 0).tolist()


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
            raise UsageError(f"{type(optimizer).__name__}: the gradient of {_describe(p, group, None)} is {found}, "
                             f"but the parameter is sharded {tuple(p.placements)}; FSDP2 hands each rank its "
                             "rows of the reduced gradient — do not replace .grad by hand")
        work.append(_ShardWork(p, local(grad), group, spec))
    # block sums of squares of the local rows; they double as the finiteness probe (the gradient is read once)
    layouts, sums = [], []
    for p, g, group, spec in work:
        blocks = _grad_blocks(optimizer, p, group)
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
    for (kind, index, name), value in zip(owners, _reduce_flat(pieces)):
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
