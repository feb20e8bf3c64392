"""The projector of a row-sharded weight, found without gathering its gradient: sketches and Gram matrices
summed across ranks, refreshes of many weights run side by side (:func:`run_in_lockstep`). See
:mod:`.distributed`, "Refresh".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from galore_mini.optim.projection import OVERSAMPLE, RANDOMIZED_POWER_STEPS, compute_projector
from galore_mini.optim.shards import ShardSpec, gather_whole, reduce_sums

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
        for i, value in zip(sums, reduce_sums([(requests[i].spec, requests[i].tensor) for i in sums])):
            answers[i] = value
        gathers = [i for i in order if isinstance(requests[i], _Gather)]
        for i, value in zip(gathers, gather_whole([(requests[i].spec, requests[i].rows) for i in gathers])):
            answers[i] = value
        for i in order:
            advance(i, answers[i])
    return results


