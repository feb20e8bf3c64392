"""Where a DTensor parameter's rows live, which of its state is laid out by those rows, its blocks seen
from one rank, and the collectives the sharded step makes (one all-reduce / all-gather per process
group for a whole batch of tensors). The lowest layer of FSDP2 support: see :mod:`.distributed`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from galore_mini.errors import UsageError
from galore_mini.optim.blocks import BlockLayout
from galore_mini.optim.core import HOST_STATE
from galore_mini.optim.projection import resolve_side

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Partial
except ImportError:  # pragma: no cover - older torch: no DTensor, nothing to shard
    DTensor = None



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


def describe_param(p: torch.Tensor, group: dict | None, index: int | None) -> str:
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
            f"{describe_param(p, group, index)} is a DTensor with placement {kind} on mesh dimension {dim}: the "
            "optimizers support row sharding only (Shard(0), as FSDP2's fully_shard produces, with Replicate on "
            "other mesh dimensions); for tensor parallelism (Shard(1)) leave that weight out of the projected "
            "groups and use an optimizer that shards nothing, or shard it by rows"
        )
    if len(sharded_dims) > 1:
        raise UsageError(f"{describe_param(p, group, index)} is sharded by rows on {len(sharded_dims)} mesh dimensions "
                         f"{placements}; shard it on one mesh dimension (FSDP2 or HSDP)")
    local_shape, offset = compute_local_shape_and_global_offset(tuple(p.shape), mesh, placements)
    pg = mesh.get_group(sharded_dims[0]) if sharded_dims and mesh.size(sharded_dims[0]) > 1 else None
    rows_total = p.shape[0] if p.dim() else 1
    return ShardSpec(mesh, placements, pg, rows_total, int(offset[0]) if p.dim() else 0,
                     int(local_shape[0]) if p.dim() else 1, key=(id(mesh), placements))


# -- state layout --------------------------------------------------------------------------------


def rows_layout(layout: BlockLayout) -> bool:
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
            if rows_layout(blocks) and blocks.shape[0] == p.shape[0] and (
                    tuple(blocks.shape) == tuple(p.shape) or side == "right"):
                keys.add(key)
        elif side in (None, "right"):
            keys.add(key)  # full-size moments, or an m×r low-rank moment (Adafactor: its per-row EMA)
    return keys


def _v_blocks(optimizer, shape, group: dict) -> BlockLayout | None:
    """The blocks `v` is kept over: the weight's, or (GaLore-mini approach 1) blocks counted on R."""
    return optimizer.v_layout(tuple(shape), group)


def grad_blocks(optimizer, p: torch.Tensor, group: dict) -> BlockLayout | None:
    """The blocks whose sums of squares of G a sharded step takes (None: `v` is not fed from G's
    blocks — no blocks, or GaLore-mini's approach 1, whose `v` is fed from R by ``partial_row_sums``)."""
    if not optimizer.uses_blocks or ("rank" in group and group.get("approach", 3) == 1):
        return None
    return optimizer.block_layout(p.shape, group)


def unsupported_reason(optimizer, group: dict) -> str | None:
    """Why `group` cannot take DTensor parameters (None when it can); read from the optimizer and the
    group's options only, so the memory estimator asks the same question without a process group.
    (GaLoreAdafactor refuses DTensor parameters of more than 2 dimensions itself, by shape.)"""
    problem = getattr(optimizer, "sharding_problem", None)  # torch's own optimizers have none
    return problem(group) if problem is not None else None


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
            f"{describe_param(params[plain], group, plain)}: shard the whole model with fully_shard (each decoder layer "
            "and the root), or put the plain parameters in a group of their own"
        )
    why = unsupported_reason(optimizer, group)
    if why:
        index = flags.index(True)
        raise UsageError(f"{name}: {describe_param(params[index], group, index)} is a DTensor (FSDP2-sharded): {why}. "
                         "Use another optimizer for this parameter, or leave it unsharded")
    for index, p in enumerate(params):
        if flags[index]:
            shard_spec(p, group, index)


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
        self.local_v = base.kind == "elementwise" or rows_layout(base)
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



# -- collectives, batched ----------------------------------------------------------------------


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


def reduce_sums(pieces: list[tuple[ShardSpec, torch.Tensor]]) -> list[torch.Tensor]:
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
    reduced = reduce_sums([(spec, bad[i:i + 1]) for i, (spec, _) in enumerate(probes)])
    return (torch.cat(reduced) == 0).tolist()


def gather_whole(pieces: list[tuple[ShardSpec, torch.Tensor]]) -> list[torch.Tensor]:
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


