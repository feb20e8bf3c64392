"""8-bit moments across shards: a sharded 8-bit moment keeps one process's global quantisation blocks, so
every entry gets the code one process gives it (see the comment below and :mod:`.distributed`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from galore_mini.optim import quant
from galore_mini.optim.quant import BLOCK
from galore_mini.optim.shards import Replicate, Shard, ShardSpec, is_dtensor, shard_rows, sharded_keys

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


