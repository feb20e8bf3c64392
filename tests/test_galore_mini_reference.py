"""GaLore-mini's three approaches against plain float64 loops written from SPEC.md.

The references share only the SVD with the optimizer (computed from the same fp32 gradient, then
promoted), so a sign convention cannot differ; every other operation is float64 and written out
long-hand, block by block.
"""

import math

import pytest
import torch

import galore_mini as gm


def _svd_basis(G, rank, side):
    u, _, vh = torch.linalg.svd(G.float(), full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank].t()).double()  # left: m×r; right: n×r


def _blocks_of_rows(m, rows_per_block):
    return [list(range(b, b + rows_per_block)) for b in range(0, m, rows_per_block)]


def reference(W0, grads, *, approach, rank, gap, scale, lr, betas, eps, wd, rows_per_block):
    """GaLore-mini from SPEC.md with row blocks (`rows_per_block` rows share one v)."""
    beta1, beta2 = betas
    W = W0.double().clone()
    m, n = W.shape
    side = "right" if m >= n else "left"
    blocks = _blocks_of_rows(m, rows_per_block)
    P = M = v = None
    for t, G32 in enumerate(grads, start=1):
        G = G32.double()
        if (t - 1) % gap == 0:
            P = _svd_basis(G32, rank, side)
        R = P.t() @ G if side == "left" else G @ P
        M = (1 - beta1) * R if M is None else beta1 * M + (1 - beta1) * R
        M_hat = M / (1 - beta1 ** t)
        back = (lambda X: scale * (P @ X)) if side == "left" else (lambda X: scale * (X @ P.t()))
        if approach == 3:
            fed = torch.tensor([float((G[rows] ** 2).mean()) for rows in blocks], dtype=torch.float64)
        elif approach == 2:
            fed = torch.tensor([float((G[rows] ** 2).mean()) for rows in blocks], dtype=torch.float64)
        else:
            # approach 1: v from R; blocks of rows survive a right projection, else one block per row of R
            low_blocks = blocks if side == "right" else [[i] for i in range(rank)]
            fed = torch.tensor([float((R[rows] ** 2).mean()) for rows in low_blocks], dtype=torch.float64)
        v = (1 - beta2) * fed if v is None else beta2 * v + (1 - beta2) * fed
        v_hat = v / (1 - beta2 ** t)
        denom_blocks = v_hat.sqrt() + eps
        if approach == 3:
            U = back(M_hat)
            denom = torch.empty(m, dtype=torch.float64)
            for b, rows in enumerate(blocks):
                denom[rows] = denom_blocks[b]
            step = U / denom[:, None]
        elif approach == 2:
            if side == "right":  # rows survive: each row of M̂ (m×r) divided by its block's v
                denom = torch.empty(m, dtype=torch.float64)
                for b, rows in enumerate(blocks):
                    denom[rows] = denom_blocks[b]
                step = back(M_hat / denom[:, None])
            else:  # rows were projected away: the blocks collapse to the mean of √v̂
                step = back(M_hat / (v_hat.sqrt().mean() + eps))
        else:
            low_rows = blocks if side == "right" else [[i] for i in range(rank)]
            denom = torch.empty(M_hat.shape[0], dtype=torch.float64)
            for b, rows in enumerate(low_rows):
                denom[rows] = denom_blocks[b]
            step = back(M_hat / denom[:, None])
        W = W - lr * wd * W - lr * step
    return W


def _gradients(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randn(shape[0], 5, generator=gen), torch.randn(5, shape[1], generator=gen)
    return [left @ right * (1 + 0.2 * math.sin(t)) + 0.5 * torch.randn(shape, generator=gen) for t in range(steps)]


@pytest.mark.parametrize("approach", [1, 2, 3])
@pytest.mark.parametrize("shape,rows_per_block", [((48, 20), 1), ((48, 20), 8), ((20, 48), 1), ((20, 48), 4)],
                         ids=["tall-rows", "tall-heads", "wide-rows", "wide-heads"])
def test_galore_mini_matches_float64_reference(approach, shape, rows_per_block):
    grads = _gradients(shape, steps=11, seed=approach)
    hp = dict(rank=4, gap=4, scale=0.25, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, wd=0.05)
    torch.manual_seed(0)
    W0 = torch.randn(shape)
    expected = reference(W0, grads, approach=approach, rows_per_block=rows_per_block, **hp)

    weight = torch.nn.Parameter(W0.clone())
    block = "rows" if rows_per_block == 1 else f"heads:{rows_per_block}"
    opt = gm.GaLoreMini([{"params": [weight], "rank": hp["rank"], "update_proj_gap": hp["gap"], "scale": hp["scale"],
                          "block": block, "proj_method": "svd"}], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"],
                        approach=approach)
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    torch.testing.assert_close(weight.detach().double(), expected, rtol=2e-5, atol=2e-6)
    assert (weight.detach() - W0).abs().max() > 1e-3  # it moved


def _final(approach, shape, grads):
    weight = torch.nn.Parameter(torch.zeros(shape))
    opt = gm.GaLoreMini([{"params": [weight], "rank": 4, "block": "heads:4", "proj_method": "svd"}], lr=1e-2,
                        approach=approach)
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    return weight.detach().clone()


def test_approaches_differ_where_they_should():
    """Approach 1 always differs; 2 equals 3 exactly when the blocks' axis survives the projection
    (a row scaling commutes with right-multiplication by Qᵀ) and differs when it is projected away."""
    tall = _gradients((48, 20), steps=6, seed=9)  # right projection: rows survive
    a1, a2, a3 = (_final(k, (48, 20), tall) for k in (1, 2, 3))
    assert not torch.allclose(a1, a3)
    torch.testing.assert_close(a2, a3, rtol=1e-5, atol=1e-7)
    wide = _gradients((20, 48), steps=6, seed=9)  # left projection: rows are projected
    b2, b3 = (_final(k, (20, 48), wide) for k in (2, 3))
    assert not torch.allclose(b2, b3, rtol=1e-3, atol=1e-6)


def test_galore_mini_state_has_no_full_size_tensor():
    weight = torch.nn.Parameter(torch.randn(64, 32))
    opt = gm.GaLoreMini([{"params": [weight], "rank": 8, "block": "rows"}], lr=1e-3)
    weight.grad = torch.randn(64, 32)
    opt.step()
    sizes = {k: v.numel() for k, v in opt.state[weight].items()}
    assert max(sizes.values()) < weight.numel() / 2, sizes
    assert sizes["exp_avg_sq"] == 64 and sizes["exp_avg"] == 64 * 8 and sizes["projector"] == 8 * 32


def test_non_projected_params_in_galore_mini_are_adam_mini():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(16, 8))
    w2 = torch.nn.Parameter(w1.detach().clone())
    a = gm.GaLoreMini([{"params": [w1], "block": "heads:4"}], lr=1e-2, weight_decay=0.1)
    b = gm.AdamMini([{"params": [w2], "block": "heads:4"}], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(16, 8)
        w1.grad, w2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(w1, w2)
