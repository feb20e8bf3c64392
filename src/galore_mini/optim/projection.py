"""GaLore's gradient projector, as functions over tensors.

A projected weight's gradient ``G`` (m×n) is mapped into a rank-r subspace
found from ``G`` itself, and updates are mapped back:

* **left** (``P`` is m×r, orthonormal columns): ``R = Pᵀ G`` (r×n), back: ``P X``.
* **right** (``Q`` stored r×n, orthonormal rows): ``R = G Qᵀ`` (m×r), back: ``X Q``.
* **full** (both): ``R = Pᵀ G Qᵀ`` (r×r), back: ``P X Q``.

`proj_type` chooses the side from the parameter's shape, exactly as galore-torch
1.0 does: ``std`` projects the right side when rows ≥ cols (so square matrices
go right) and the left side otherwise; ``reverse_std`` the opposite. The side
is a function of the parameter's shape only, so back-projection can never pick
the other side (galore-torch's ``reverse_std`` does, for square matrices).

How the subspace is found (`proj_method`):

* ``"svd"``: exact ``torch.linalg.svd`` in fp32 (the reference; slow for big matrices on CPUs).
* ``"randomized"``: a randomized range finder (Gaussian sketch with 8 extra
  columns, 2 power steps, Rayleigh–Ritz), seeded per parameter and step so a
  resumed run draws the same sketch.
* ``"power"``: one step of subspace iteration warm-started from the previous
  projector (``QR(G Gᵀ P_old)``) followed by a Rayleigh–Ritz rotation so the
  basis is ordered by singular value; the first refresh uses the randomized SVD.
* ``"random"``: a Gaussian random matrix, orthonormalised (no SVD at all).

The non-exact methods also flip each new basis vector's sign to agree with the
previous projector, so moments kept across a refresh stay meaningful.

The projector is a plain tensor stored in optimizer state; none of these
functions hold state of their own.
"""

from __future__ import annotations

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_METHODS = ("svd", "randomized", "power", "random")
OVERSAMPLE = 8
RANDOMIZED_POWER_STEPS = 2


def resolve_side(proj_type: str, shape: tuple[int, ...]) -> str:
    """`left`, `right` or `full` for a parameter of `shape` under `proj_type`."""
    rows, cols = shape[0], shape[1]
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    return proj_type


def low_rank_shape(shape: tuple[int, ...], rank: int, side: str) -> tuple[int, int]:
    rows, cols = shape[0], shape[1]
    if side == "left":
        return (rank, cols)
    if side == "right":
        return (rows, rank)
    return (rank, rank)


def projector_shapes(shape: tuple[int, ...], rank: int, side: str) -> dict[str, tuple[int, int]]:
    """State keys and shapes of the projector tensors for one parameter."""
    rows, cols = shape[0], shape[1]
    if side == "left":
        return {"projector": (rows, rank)}
    if side == "right":
        return {"projector": (rank, cols)}
    return {"projector": (rows, rank), "projector_right": (rank, cols)}


def project(grad: torch.Tensor, state: dict, side: str) -> torch.Tensor:
    """``R``: the gradient in the low-rank space (fp32)."""
    basis = state["projector"]
    # dtype checks in Python: a no-op `.to` still costs a dispatch, and the step is launch-bound on GPUs
    g = grad if grad.dtype == basis.dtype else grad.to(basis.dtype)
    if side == "left":
        low = basis.t() @ g
    elif side == "right":
        low = g @ basis.t()
    else:
        low = basis.t() @ g @ state["projector_right"].t()
    return low if low.dtype == torch.float32 else low.float()


class LowRankProduct:
    """``a @ b`` not yet multiplied out: a back-projected update (m×r times r×n) in precision `dtype`.

    Keeping the factors lets the final update be one GEMM with the weight as accumulator
    (``W ← βW + α·a@b``), so the m×n product is never written to memory, and lets a per-row or
    per-column multiplier be folded into the small factor. A factor may be held in higher precision
    than `dtype` (the fp32 moment beside a bf16 projector) until :meth:`factors` is called, so a
    multiplier folded into it costs one rounding, not two, and one operation fewer.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None):
        self.a, self.b = a, b
        self.dtype = dtype or a.dtype

    def scaled(self, multiplier: torch.Tensor) -> "LowRankProduct":
        """``multiplier ⊙ (a @ b)`` for a multiplier broadcast along rows (m×1), columns (1×n) or a scalar."""
        if multiplier.dim() == 2 and multiplier.shape[1] == 1:
            return LowRankProduct(self.a * _as(multiplier, self.a.dtype), self.b, self.dtype)
        if multiplier.dim() == 2 and multiplier.shape[0] == 1:
            return LowRankProduct(self.a, self.b * _as(multiplier, self.b.dtype), self.dtype)
        return LowRankProduct(self.a * _as(multiplier.reshape(()), self.a.dtype), self.b, self.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` in the product's precision."""
        return _as(self.a, self.dtype), _as(self.b, self.dtype)

    def materialize(self) -> torch.Tensor:
        a, b = self.factors()
        return a @ b


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def back_factors(low: torch.Tensor, state: dict, side: str) -> LowRankProduct:
    """``back(low)`` as factors ``a @ b`` multiplied in the projector's dtype: left ``P·low``, right
    ``low·Q``, full ``(P·low)·Q``."""
    basis = state["projector"]
    if side == "left":
        return LowRankProduct(basis, low, basis.dtype)
    if side == "right":
        return LowRankProduct(low, basis, basis.dtype)
    return LowRankProduct(basis @ _as(low, basis.dtype), state["projector_right"])


def project_back(low: torch.Tensor, state: dict, side: str, scale: float = 1.0) -> torch.Tensor:
    """``scale · back(low)``: the full-size m×n tensor, in the projector's dtype.

    The optimizers use :func:`back_factors` instead, so the product is formed inside the update.
    """
    full = back_factors(low, state, side).materialize()
    return full.mul_(scale) if scale != 1.0 else full


# -- finding the subspace ----------------------------------------------------------------------


def _ritz(matrix_c: torch.Tensor, q: torch.Tensor, rank: int) -> torch.Tensor:
    """Rotate the orthonormal basis `q` (…×m×k) so its first `rank` columns are ordered by singular value."""
    small = (q.to(matrix_c.dtype).mT @ matrix_c).float()  # k×n
    _, eigvecs = torch.linalg.eigh(small @ small.mT)
    return q @ eigvecs[..., -rank:].flip(-1)


def _sketch(shape: tuple[int, int], generators: list[torch.Generator], batched: bool) -> torch.Tensor:
    draws = [torch.randn(shape, generator=gen) for gen in generators]
    return torch.stack(draws) if batched else draws[0]


def _left_basis_from(matrix: torch.Tensor, rank: int, method: str, previous: torch.Tensor | None,
                     generators: list[torch.Generator], compute_dtype: torch.dtype) -> torch.Tensor:
    """An m×r orthonormal basis of the leading left singular subspace of `matrix` (fp32 result).

    `matrix` may carry leading batch dimensions (one basis each). The big products run in
    `compute_dtype` (bf16 when the projector is kept in bf16); QR and the small eigenproblem stay fp32.
    """
    rows, cols = matrix.shape[-2:]
    batched = matrix.dim() == 3
    matrix_c = matrix.to(compute_dtype)
    if method == "random":
        basis, _ = torch.linalg.qr(_sketch((rows, rank), generators, batched).to(matrix.device))
        return basis
    if method == "power" and previous is not None:
        # one subspace-iteration step from the old basis, then order by singular value
        q, _ = torch.linalg.qr((matrix_c @ (matrix_c.mT @ previous.to(compute_dtype))).float())
        basis = _ritz(matrix_c, q, rank)
    else:
        # randomized range finder (Halko et al.): Gaussian sketch, RANDOMIZED_POWER_STEPS power steps, Ritz
        k = min(rank + OVERSAMPLE, rows, cols)
        sketch = _sketch((cols, k), generators, batched).to(device=matrix.device, dtype=compute_dtype)
        q, _ = torch.linalg.qr((matrix_c @ sketch).float())
        for _ in range(RANDOMIZED_POWER_STEPS):
            q, _ = torch.linalg.qr((matrix_c @ (matrix_c.mT @ q.to(compute_dtype))).float())
        basis = _ritz(matrix_c, q, rank)
    if previous is not None:
        # singular vectors' signs are arbitrary; agree with the previous basis so kept moments stay aligned
        agreement = (basis * previous).sum(dim=-2, keepdim=True)
        basis = basis * torch.where(agreement < 0, -1.0, 1.0)
    return basis


def compute_projector(grad: torch.Tensor, rank: int, side: str, method: str, state: dict,
                      generator: torch.Generator | list[torch.Generator] | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """New projector tensor(s) for `grad`, keyed as in :func:`projector_shapes`.

    `grad` may be a stack (b×m×n) of same-shaped gradients: every operation is batched, which on a GPU
    turns many small QR/eigen/SVD calls into one. The previous projector (if `state` has one, stacked
    alike) warm-starts ``power`` and fixes signs. Stored in `dtype`; the non-exact methods also run
    their big products in it. `generator` (one per matrix) seeds the random sketches, so a resumed
    run draws the same ones.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    generators = generator if isinstance(generator, list) else [generator]
    g = grad.float()
    old = state.get("projector")
    old = old.float() if old is not None else None
    out: dict[str, torch.Tensor] = {}
    if method == "svd":
        # one exact SVD of G itself, as galore-torch takes it (signs included)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        if side in ("left", "full"):
            out["projector"] = u[..., :rank]
        if side == "right":
            out["projector"] = vh[..., :rank, :]
        if side == "full":
            out["projector_right"] = vh[..., :rank, :]
    else:
        if side in ("left", "full"):
            out["projector"] = _left_basis_from(g, rank, method, old, generators, dtype)
        if side == "right":
            # the right basis of G is the left basis of Gᵀ; stored transposed (r×n) like galore-torch
            prev_right = old.mT if old is not None else None
            out["projector"] = _left_basis_from(g.mT, rank, method, prev_right, generators, dtype).mT
        if side == "full":
            prev = state.get("projector_right")
            prev_right = prev.float().mT if prev is not None else None
            out["projector_right"] = _left_basis_from(g.mT, rank, method, prev_right, generators, dtype).mT
    return {key: value.to(dtype).contiguous() for key, value in out.items()}


def subspace_overlap(new: torch.Tensor, old: torch.Tensor, side: str) -> float:
    """``‖P_newᵀ P_old‖²_F / r`` in [0, 1]: 1 when the subspaces coincide, ~r/m when unrelated."""
    new, old = new.float(), old.float()
    cross = new.t() @ old if side in ("left", "full") else new @ old.t()
    return float(cross.pow(2).sum() / cross.shape[0])


def basis_change(new: torch.Tensor, old: torch.Tensor, side: str) -> torch.Tensor:
    """The r×r matrix that carries low-rank coordinates from the old basis to the new one.

    left: ``M_new = C M_old`` with ``C = P_newᵀ P_old``;
    right: ``M_new = M_old C`` with ``C = Q_old Q_newᵀ``.
    """
    new, old = new.float(), old.float()
    return new.t() @ old if side == "left" else old @ new.t()
