"""Block layouts: which entries of a tensor share one second-moment scalar.

Adam-mini (and GaLore-mini's second moment) keep one `v` per *block* of a
parameter instead of one per entry. A layout is written as a short string so it
can live in a param group (and so in `state_dict()` as plain data):

=====================  ===================================================
``"elementwise"``      every entry its own block: plain Adam
``"tensor"``           the whole tensor is one block
``"rows"``             one block per row (output neuron of ``nn.Linear``,
                       token of an embedding or output layer)
``"cols"``             one block per column (GPT-2 ``Conv1D`` stores in×out)
``"heads:D"``          rows in consecutive groups of D (one per attention head)
``"col_heads:D"``      the same along columns
``"rows:AxB,CxD,..."`` run-length: A blocks of B rows, then C blocks of D rows
``"cols:AxB,..."``     the same along columns (fused q/k/v weights)
=====================  ===================================================

A layout is turned into a :class:`BlockLayout` for a concrete shape; the two
operations the optimizers need are :meth:`BlockLayout.block_mean` (mean of a
tensor over each block, shape ``(n_blocks,)``) and :meth:`BlockLayout.expand`
(a per-block vector broadcast back to the tensor's shape).

Example::

    >>> import torch
    >>> layout = parse_block("heads:2", (4, 3))
    >>> layout.n_blocks
    2
    >>> layout.block_mean(torch.arange(12.).reshape(4, 3)).tolist()
    [2.5, 8.5]
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from galore_mini.errors import UsageError

_RUNS = re.compile(r"^(rows|cols):(\d+x\d+(?:,\d+x\d+)*)$")
_HEADS = re.compile(r"^(heads|col_heads):(\d+)$")


@dataclass(frozen=True)
class BlockLayout:
    """Blocks of a tensor of `shape` along `axis` (None: elementwise or whole tensor).

    `runs` is a tuple of ``(count, size)``: `count` consecutive blocks each
    spanning `size` indices along `axis`.
    """

    kind: str  # "elementwise" | "tensor" | "axis"
    shape: tuple[int, ...]
    axis: int | None = None
    runs: tuple[tuple[int, int], ...] = ()

    @property
    def n_blocks(self) -> int:
        if self.kind == "elementwise":
            return math.prod(self.shape)
        if self.kind == "tensor":
            return 1
        return sum(count for count, _ in self.runs)

    @functools.cached_property
    def uniform(self) -> bool:
        return len({size for _, size in self.runs}) <= 1

    def _as_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """View `x` as (n_blocks, block_numel) when all blocks have equal size."""
        moved = x if self.axis == 0 else x.transpose(0, self.axis)
        size = self.runs[0][1]
        return moved.reshape(self.n_blocks, size * (x.numel() // x.shape[self.axis]))

    def block_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of `x` over each block: shape ``(n_blocks,)`` (elementwise: `x` itself)."""
        if self.kind == "elementwise":
            return x
        if self.kind == "tensor":
            return x.mean().reshape(1)
        if self.uniform:
            return self._as_blocks(x).mean(dim=1)
        parts = []
        for chunk, (count, size) in zip(self._split(x), self.runs):
            moved = chunk if self.axis == 0 else chunk.transpose(0, self.axis)
            parts.append(moved.reshape(count, -1).mean(dim=1))
        return torch.cat(parts)

    @property
    def block_numel_along(self) -> int:
        """Indices along `axis` in each block (uniform layouts only)."""
        return self.runs[0][1]

    def block_norms(self, x: torch.Tensor) -> torch.Tensor | None:
        """L2 norm of `x` over each block, shape ``(n_blocks,)``, read in one pass without a copy (fp32 for
        bf16/fp16 `x`); ``None`` where the blocks are not a view of `x` (elementwise, uneven runs,
        non-contiguous `x`)."""
        cast = {"dtype": torch.float32} if x.dtype in (torch.bfloat16, torch.float16) else {}
        if self.kind == "tensor":
            return torch.linalg.vector_norm(x, **cast).reshape(1)
        if self.kind != "axis" or not self.uniform or not x.is_contiguous():
            return None
        if self.axis == 0:
            return torch.linalg.vector_norm(x.view(self.n_blocks, -1), dim=1, **cast)
        if x.dim() == 2:
            blocks = x.view(x.shape[0], self.n_blocks, self.block_numel_along)
            return torch.linalg.vector_norm(blocks, dim=(0, 2), **cast)
        return None

    def block_numel(self) -> int:
        """Entries in each block, for the layouts :meth:`block_norms` handles."""
        if self.kind == "tensor":
            return math.prod(self.shape)
        return math.prod(self.shape) // self.shape[self.axis] * self.block_numel_along

    def block_mean_sq(self, x: torch.Tensor) -> torch.Tensor:
        """``block_mean(x * x)`` without a full-size temporary (a norm per block, squared)."""
        if self.kind == "elementwise":
            return x * x
        norms = self.block_norms(x)
        if norms is None:
            return self.block_mean(x * x)
        return norms.square_().div_(self.block_numel())

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """A per-block vector shaped to broadcast against the tensor."""
        if self.kind == "elementwise":
            return per_block
        if self.kind == "tensor":
            return per_block.reshape((1,) * len(self.shape))
        sizes = [size for _, size in self.runs]
        if self.uniform:
            along = per_block.repeat_interleave(sizes[0]) if sizes[0] > 1 else per_block
        else:
            repeats = torch.tensor(
                [size for count, size in self.runs for _ in range(count)], device=per_block.device
            )
            along = per_block.repeat_interleave(repeats)
        view = [1] * len(self.shape)
        view[self.axis] = self.shape[self.axis]
        return along.reshape(view)

    def _split(self, x: torch.Tensor):
        return torch.split(x, [count * size for count, size in self.runs], dim=self.axis)


def parse_block(spec: str, shape: tuple[int, ...] | torch.Size, *, name: str = "block") -> BlockLayout:
    """Turn a layout string into a :class:`BlockLayout` for `shape`, checking it fits."""
    if not isinstance(spec, str):
        raise UsageError(f"{name}={spec!r} must be a string such as 'rows', 'heads:64' or 'tensor'")
    return _parse_block(spec, tuple(shape), name)


@functools.lru_cache(maxsize=4096)
def _parse_block(spec: str, shape: tuple[int, ...], name: str) -> BlockLayout:
    # cached: every optimizer step asks for each parameter's layout, and layouts are immutable
    if spec in ("elementwise", "tensor"):
        return BlockLayout(spec, shape)
    if len(shape) < 2 and spec not in ("rows",):
        raise UsageError(
            f"{name}={spec!r} needs a 2-D parameter but got shape {list(shape)}; "
            "use 'tensor' or 'elementwise' for 1-D parameters"
        )
    if spec in ("rows", "cols"):
        axis = 0 if spec == "rows" else 1
        return BlockLayout("axis", shape, axis, ((shape[axis], 1),))
    heads = _HEADS.match(spec)
    if heads:
        axis = 0 if heads.group(1) == "heads" else 1
        width = int(heads.group(2))
        if width <= 0 or shape[axis] % width:
            raise UsageError(
                f"{name}={spec!r}: axis {axis} of shape {list(shape)} is not a multiple of the head size {width}; "
                "pass the model's head_dim"
            )
        return BlockLayout("axis", shape, axis, ((shape[axis] // width, width),))
    runs = _RUNS.match(spec)
    if runs:
        axis = 0 if runs.group(1) == "rows" else 1
        pairs = tuple(tuple(int(v) for v in part.split("x")) for part in runs.group(2).split(","))
        covered = sum(count * size for count, size in pairs)
        if covered != shape[axis] or any(count <= 0 or size <= 0 for count, size in pairs):
            raise UsageError(
                f"{name}={spec!r} covers {covered} indices along axis {axis}, "
                f"but the parameter has shape {list(shape)}"
            )
        return BlockLayout("axis", shape, axis, pairs)
    raise UsageError(
        f"{name}={spec!r} is not a block layout; use 'elementwise', 'tensor', 'rows', 'cols', "
        "'heads:D', 'col_heads:D' or a run-length spec like 'cols:12x64,12x64,768x1'"
    )


def default_block(shape: tuple[int, ...] | torch.Size) -> str:
    """The layout used when a group names none: one per row for matrices, one per tensor otherwise."""
    return "rows" if len(shape) >= 2 else "tensor"
