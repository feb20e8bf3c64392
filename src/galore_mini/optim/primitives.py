"""The step primitives: the only copies of the moment EMAs, Adam's bias corrections, the block mean of
squares and the weight update with decoupled decay. Every update rule and every path is built from them.

Each primitive serves three callers with one definition:

* **one tensor** (the single-tensor reference path and the sharded step);
* **a list of tensors** (the multi-tensor path: ``torch._foreach_*`` kernels, one launch per
  operation for the whole list, element for element the same arithmetic as one tensor);
* **tensor-valued coefficients** (the capturable path: bias corrections and learning rates that are
  device scalars, and a device flag `ok` per parameter that leaves its state exactly as it was where
  the gradient is not finite, with no host read).

Example::

    >>> import torch
    >>> m = torch.zeros(3)
    >>> ema_(m, torch.full((3,), 2.0), 0.5).tolist()
    [1.0, 1.0, 1.0]
    >>> ms = [torch.zeros(2), torch.zeros(1)]
    >>> [t.tolist() for t in ema_(ms, [torch.ones(2), torch.ones(1)], 0.5)]
    [[0.5, 0.5], [0.5]]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from galore_mini.optim.projection import LowRankProduct

Tensors = torch.Tensor | list[torch.Tensor]


def ema_(buf: Tensors, x: Tensors, beta: float, ok: torch.Tensor | None = None) -> Tensors:
    """``buf ← β·buf + (1-β)·x`` in place (the first-moment rule); returns `buf`.

    `ok` (a device bool, single tensors only): where False, `buf` keeps its value exactly.
    """
    if isinstance(buf, list):
        torch._foreach_mul_(buf, beta)
        torch._foreach_add_(buf, x, alpha=1.0 - beta)
        return buf
    return buf.add_(_decay_(buf, x, beta, ok), alpha=1.0 - beta)


def ema_sq_(buf: Tensors, x: Tensors, beta: float, ok: torch.Tensor | None = None) -> Tensors:
    """Elementwise ``buf ← β·buf + (1-β)·x²`` in place (Adam's second moment); returns `buf`."""
    if isinstance(buf, list):
        torch._foreach_mul_(buf, beta)
        torch._foreach_addcmul_(buf, x, x, value=1.0 - beta)
        return buf
    x = _decay_(buf, x, beta, ok)
    return buf.addcmul_(x, x, value=1.0 - beta)


def _decay_(buf: torch.Tensor, x: torch.Tensor, beta: float, ok: torch.Tensor | None) -> torch.Tensor:
    """``buf ← β·buf`` (kept where not `ok`); returns what the EMA adds: `x`, zero where not `ok`."""
    if ok is None:
        buf.mul_(beta)
        return x
    buf.mul_(torch.where(ok, beta, 1.0))
    return torch.where(ok, x, 0.0)


def block_mean_sq_from_norms(norms: Tensors, block_numel: int | list[int]) -> Tensors:
    """``mean_{i∈b} g_i²`` per block from the blocks' L2 norms (``‖g_b‖²/|b|``), as
    :meth:`~galore_mini.optim.blocks.BlockLayout.block_mean_sq` forms it (the same bits)."""
    if isinstance(norms, list):
        squares = torch._foreach_mul(norms, norms)
        torch._foreach_div_(squares, [float(n) for n in block_numel])
        return squares
    return norms * norms / float(block_numel)


def bias_corrections(group: dict, beta1: float, beta2: float, t):
    """Adam's ``(1-β1ᵗ, 1-β2ᵗ)``; ``(1, 1)`` where the group sets ``correct_bias=False``.

    `t` an int gives floats. `t` a device tensor (the capturable step counter) gives device tensors,
    computed as ``-expm1(t·ln β)``: ``1 - β2ᵗ`` formed in fp32 would lose ~1e-5 of its value to
    cancellation at small t (β2 = 0.999); this keeps it to fp32 round-off, with no host read.
    """
    if not group.get("correct_bias", True):
        return 1.0, 1.0
    if not isinstance(t, torch.Tensor):
        return 1.0 - beta1 ** t, 1.0 - beta2 ** t
    out = []
    for beta in (beta1, beta2):
        out.append(torch.ones_like(t) if beta == 0 else torch.expm1(t * math.log(beta)).neg_())
    return out[0], out[1]


def sqrt(x):
    """√x of a host float or a device tensor (bias corrections come as either)."""
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def inverse_block_denominator(v: Tensors, bc2, eps: float) -> Tensors:
    """``1 / (√v/√(1-β2ᵗ) + ε)`` per block (Adam-mini's and GaLore-mini's multiplier)."""
    if isinstance(v, list):
        inverse = torch._foreach_sqrt(v)
        torch._foreach_div_(inverse, [b ** 0.5 for b in bc2])
        torch._foreach_add_(inverse, eps)
        torch._foreach_reciprocal_(inverse)
        return inverse
    root = bc2.sqrt() if isinstance(bc2, torch.Tensor) else bc2 ** 0.5
    return (v.sqrt() / root).add_(eps).reciprocal_()


def adam_normalized(m: Tensors, v: Tensors, eps: float) -> Tensors:
    """``M / (√V + ε)`` (ε outside the bias correction, Hugging Face AdamW style)."""
    if isinstance(m, list):
        denominators = torch._foreach_sqrt(v)
        torch._foreach_add_(denominators, eps)
        return torch._foreach_div(m, denominators)
    return m / v.sqrt().add_(eps)


class Update(NamedTuple):
    """What an update rule returns: the parameter moves by ``-step_size · direction [· multiplier]``.

    `direction` is full-size, or a :class:`LowRankProduct` for projected weights (fused into one GEMM);
    `multiplier`, when given, is a small tensor broadcast over blocks (Adam-mini's ``1/(√v+ε)``), so no
    full-size quotient is ever formed. `step_size` is a host float, or a device scalar on the
    capturable path.
    """

    direction: torch.Tensor | LowRankProduct
    step_size: float | torch.Tensor
    multiplier: torch.Tensor | None = None


def apply_update(p: torch.Tensor, update: Update, decay=0.0, *, decay_after: bool = False,
                 ok: torch.Tensor | None = None) -> None:
    """``p ← p(1-d) - step_size · direction [· multiplier]``, the decoupled decay `d` (``lr·λ``) taken
    before the update or, `decay_after`, after it: ``(p - s·U)(1-d) = p(1-d) - s(1-d)·U``.

    Host scalars (`step_size`, `decay` floats, no `ok`) go into addmm's ``alpha``/``beta``, so a
    projected update is one GEMM with `p` as accumulator. Device scalars (the capturable step) are
    folded into the small factor instead, and `ok` False leaves `p` exactly as it was. bf16/fp16
    weights are updated through one fp32 temporary, rounded once.
    """
    direction, step_size, multiplier = update
    if ok is None and not isinstance(step_size, torch.Tensor) and not isinstance(decay, torch.Tensor):
        _apply_host(p, direction, step_size, multiplier, decay, decay_after)
        return
    keep = 1.0 - decay if (isinstance(decay, torch.Tensor) or decay) else 1.0
    if ok is not None and (isinstance(keep, torch.Tensor) or keep != 1.0):
        keep = torch.where(ok, keep, 1.0)
    coef = -step_size * keep if decay_after and (isinstance(keep, torch.Tensor) or keep != 1.0) else -step_size
    if ok is not None:
        coef = coef * ok
    if not isinstance(coef, torch.Tensor):
        coef = torch.tensor(coef, device=p.device)
    _apply_device(p, direction, coef, keep, multiplier)


def _apply_host(p, direction, step_size: float, multiplier, decay: float, decay_after: bool) -> None:
    keep = 1.0 - decay
    alpha = -step_size * (keep if decay_after else 1.0)
    if isinstance(direction, LowRankProduct):
        if multiplier is not None:
            direction = direction.scaled(multiplier)
        if fused_low_rank_update(p, direction, keep, alpha):
            return
        direction = direction.materialize()
        multiplier = None
    if p.dtype != torch.float32 and not decay:
        # one fp32 temporary read from the low-precision weight, rounded once back into it (not an
        # fp32 copy of the weight plus a scaled copy of the direction)
        target = (torch.addcmul(p, direction, multiplier, value=alpha) if multiplier is not None
                  else torch.add(p, direction, alpha=alpha))
        p.copy_(target)
        return
    target = p if p.dtype == torch.float32 else p.float()
    if decay:
        target.mul_(keep)
    if multiplier is not None:
        target.addcmul_(direction, multiplier, value=alpha)
    else:
        target.add_(direction, alpha=alpha)
    if target is not p:
        p.copy_(target)


def _apply_device(p, direction, coef: torch.Tensor, keep, multiplier) -> None:
    """``p ← keep·p + coef·direction [· multiplier]``: `coef` a device scalar (zero where skipped), `keep`
    a float, or a device scalar where skipping or a tensor lr makes the decay data-dependent."""
    scaled = coef if multiplier is None else multiplier * coef
    if isinstance(direction, LowRankProduct):
        fusable = p.dtype in (torch.float32, torch.bfloat16) and (
            p.dtype == direction.dtype or (p.is_cuda and p.dtype == torch.float32))
        if fusable:
            update = direction.scaled(scaled)
            if isinstance(keep, torch.Tensor):
                # addmm's beta must be a number: the decay is its own pass over the weight
                p.mul_(keep)
                keep = 1.0
            if fused_low_rank_update(p, update, keep, 1.0):
                return
        # multiplied out (a low-precision product for a wider weight): the coefficient stays out of
        # the product's rounding, as on the host path
        direction = (direction.scaled(multiplier) if multiplier is not None else direction).materialize()
        scaled = coef
    if p.dtype != torch.float32 and not isinstance(keep, torch.Tensor) and keep == 1.0:
        p.copy_(torch.addcmul(p, direction, scaled))  # one fp32 temporary, rounded once into p
        return
    target = p if p.dtype == torch.float32 else p.float()
    if isinstance(keep, torch.Tensor) or keep != 1.0:
        target.mul_(keep)
    target.addcmul_(direction, scaled)
    if target is not p:
        p.copy_(target)


def fused_low_rank_update(p: torch.Tensor, update: LowRankProduct, keep: float, alpha: float) -> bool:
    """``p ← keep·p + alpha·a@b`` as one GEMM with `p` as accumulator; False where that is not possible.

    fp32 `p` with fp32 factors uses ``addmm_`` on any device. fp32 `p` with bf16 factors needs an fp32
    output from bf16 inputs, which CUDA's ``addmm(out_dtype=…)`` gives; CPUs lack it (there a bf16
    product plus an add is faster than an fp32 GEMM), so the caller multiplies out. bf16 `p` with bf16
    factors is one bf16 ``addmm_`` (fp32 accumulation, one rounding into `p`), where the multiplied-out
    path would pass over the weight five times through an fp32 copy.
    """
    if p.dtype == torch.bfloat16:
        if update.dtype != torch.bfloat16:
            return False
        p.addmm_(*update.factors(), beta=keep, alpha=alpha)
        return True
    if p.dtype != torch.float32:
        return False
    if update.dtype == torch.float32:
        p.addmm_(*update.factors(), beta=keep, alpha=alpha)
        return True
    if p.is_cuda and update.dtype == torch.bfloat16 and _CUDA_OUT_DTYPE_ADDMM[0]:
        try:
            torch.addmm(p, *update.factors(), beta=keep, alpha=alpha, out_dtype=torch.float32, out=p)
            return True
        except (TypeError, RuntimeError):
            _CUDA_OUT_DTYPE_ADDMM[0] = False  # this torch build lacks it: multiply out from now on
    return False


# whether this torch build's CUDA addmm takes out_dtype (cleared at the first refusal)
_CUDA_OUT_DTYPE_ADDMM = [True]
