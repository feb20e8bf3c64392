"""Block-wise 8-bit storage for optimizer moments (works on any device, CPU included).

A flat fp32 tensor is cut into blocks of 256 entries; each block keeps its
absolute maximum in fp32 and each entry one uint8 code into a fixed,
logarithmically spaced codebook of the value divided by that maximum. Moments
of Adam span many orders of magnitude, so a linear 8-bit grid would round most
second-moment entries to zero; the log grid keeps the relative error near 6%
across 6 decades (first moment, signed) and 12 decades (second moment,
non-negative). Memory: 1 byte per entry + 4 bytes per 256 entries.

Example::

    >>> import torch
    >>> x = torch.randn(1000)
    >>> codes, absmax = quantize(x, signed=True)
    >>> y = dequantize(codes, absmax, signed=True)
    >>> bool(((y - x).abs() <= 0.07 * x.abs() + 1e-6 * absmax.max()).all())
    True
"""

from __future__ import annotations

import math

import torch

BLOCK = 256

_SIGNED_MAGNITUDES = torch.logspace(-6, 0, 127, dtype=torch.float64)
# ascending: 127 negatives, zero, 127 positives (255 codes used)
SIGNED_CODEBOOK = torch.cat([-_SIGNED_MAGNITUDES.flip(0), torch.zeros(1, dtype=torch.float64), _SIGNED_MAGNITUDES]).float()
SIGNED_ZERO_CODE = 127
UNSIGNED_CODEBOOK = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-12, 0, 255, dtype=torch.float64)]).float()
UNSIGNED_ZERO_CODE = 0

_cache: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def codebook(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (signed, device)
    if key not in _cache:
        book = (SIGNED_CODEBOOK if signed else UNSIGNED_CODEBOOK).to(device)
        bounds = (book[1:] + book[:-1]) / 2  # nearest code by linear distance
        _cache[key] = (book, bounds)
    return _cache[key]


def n_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def zero_code(signed: bool) -> int:
    return SIGNED_ZERO_CODE if signed else UNSIGNED_ZERO_CODE


def quantize(x: torch.Tensor, signed: bool, out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, x.numel()) and per-block absmax (fp32, ceil(numel/256)) of `x`."""
    flat = x.detach().reshape(-1).float()
    numel = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, n_blocks(numel) * BLOCK - numel)).view(-1, BLOCK)
    absmax = padded.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (padded / safe[:, None]).reshape(-1)[:numel]
    book, bounds = codebook(signed, flat.device)
    codes = torch.bucketize(normalized, bounds).to(torch.uint8)
    if out is None:
        return codes, absmax
    out[0].copy_(codes)
    out[1].copy_(absmax)
    return out


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The fp32 values (flat) that `codes` and `absmax` stand for."""
    book, _ = codebook(signed, codes.device)
    numel = codes.numel()
    values = book[codes.long()]
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * BLOCK - numel)).view(-1, BLOCK)
    return (padded * absmax[:, None]).reshape(-1)[:numel]
