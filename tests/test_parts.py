"""The small parts: block layouts, 8-bit storage, projector maths."""

import math

import pytest
import torch

from galore_mini.optim import quant
from galore_mini.optim.blocks import parse_block
from galore_mini.optim.projection import (
    basis_change,
    compute_projector,
    project,
    project_back,
    resolve_side,
    subspace_overlap,
)


@pytest.mark.parametrize("spec,shape,expected_blocks", [
    ("rows", (6, 4), 6), ("cols", (6, 4), 4), ("heads:3", (6, 4), 2), ("col_heads:2", (6, 4), 2),
    ("tensor", (6, 4), 1), ("elementwise", (6, 4), 24), ("rows:1x2,4x1", (6, 4), 5), ("cols:2x1,1x2", (6, 4), 3),
])
def test_block_mean_and_expand_against_loops(spec, shape, expected_blocks):
    x = torch.randn(shape, dtype=torch.float64)
    layout = parse_block(spec, shape)
    assert layout.n_blocks == expected_blocks
    means = layout.block_mean(x)
    # an explicit map from entry to block id, built independently
    ids = torch.empty(shape, dtype=torch.long)
    if spec == "tensor":
        ids[:] = 0
    elif spec == "elementwise":
        ids = torch.arange(x.numel()).reshape(shape)
    else:
        axis = 0 if spec.startswith(("rows", "heads")) else 1
        sizes = {"rows": [1] * shape[0], "cols": [1] * shape[1], "heads:3": [3, 3], "col_heads:2": [2, 2],
                 "rows:1x2,4x1": [2, 1, 1, 1, 1], "cols:2x1,1x2": [1, 1, 2]}[spec]
        index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        ids = index[:, None].expand(shape) if axis == 0 else index[None, :].expand(shape)
    for b in range(expected_blocks):
        assert means.reshape(-1)[b].item() == pytest.approx(x[ids == b].mean().item())
    expanded = torch.broadcast_to(layout.expand(means), shape)
    assert torch.equal(expanded, means.reshape(-1)[ids])


def test_quantize_round_trip_relative_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * torch.logspace(-4, 0, 5000)
    for signed, values in ((True, x), (False, x.abs() ** 2)):
        codes, absmax = quant.quantize(values, signed)
        assert codes.dtype == torch.uint8 and absmax.numel() == math.ceil(5000 / 256)
        back = quant.dequantize(codes, absmax, signed)
        block_max = absmax.repeat_interleave(256)[:5000]
        floor = (1e-6 if signed else 1e-12) * block_max
        rel = (back - values).abs() / values.abs().clamp_min(1e-30)
        ok = (rel <= 0.06) | ((values.abs() < floor) & ((back - values).abs() <= floor))
        assert bool(ok.all()), rel[~ok][:5]


def test_quantize_exact_zero_and_sign():
    codes, absmax = quant.quantize(torch.tensor([0.0, -2.0, 2.0, 0.0]), signed=True)
    assert quant.dequantize(codes, absmax, True).tolist() == [0.0, -2.0, 2.0, 0.0]


@pytest.mark.parametrize("proj_type,shape,side", [("std", (8, 4), "right"), ("std", (4, 8), "left"),
                                                  ("std", (6, 6), "right"), ("reverse_std", (6, 6), "left"),
                                                  ("reverse_std", (8, 4), "left"), ("full", (8, 4), "full")])
def test_side_and_round_trip(proj_type, shape, side):
    assert resolve_side(proj_type, shape) == side
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(shape, generator=gen)
    state = compute_projector(g, 2, side, "svd", {})
    low = project(g, state, side)
    back = project_back(low, state, side, 1.0)
    # back∘project is the orthogonal projection onto the subspace: idempotent, and the square case stays consistent
    again = project_back(project(back, state, side), state, side, 1.0)
    torch.testing.assert_close(again, back, rtol=1e-5, atol=1e-6)
    u, s, vh = torch.linalg.svd(g)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    if side != "full":  # one-sided projection onto the top-2 singular subspace is the best rank-2 approximation
        torch.testing.assert_close(back, best, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["randomized", "power"])
def test_fast_subspaces_match_svd(method):
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(96, 96, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    s = torch.cat([torch.linspace(10, 5, 8), torch.full((56,), 0.05)])
    g = (u[:, :64] * s) @ v.t()
    exact = compute_projector(g, 8, "left", "svd", {})
    state = compute_projector(g + 0.01 * torch.randn(96, 64, generator=gen), 8, "left", "randomized", {})
    fast = compute_projector(g, 8, "left", method, state)
    assert subspace_overlap(fast["projector"], exact["projector"], "left") > 0.999
    # warm-started power iteration keeps signs aligned with the previous basis
    if method == "power":
        assert bool(((fast["projector"] * state["projector"]).sum(0) > 0).all())


def test_overlap_and_basis_change():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(20, 4, generator=gen))
    assert subspace_overlap(q, q, "left") == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(q, -q, "left") == pytest.approx(1.0, abs=1e-6)  # signs don't matter
    other, _ = torch.linalg.qr(torch.randn(20, 4, generator=gen))
    m = torch.randn(4, 7, generator=gen)
    change = basis_change(other, q, "left")
    # carrying M to the new basis and back-projecting equals projecting the old back-projection onto the new subspace
    torch.testing.assert_close(other @ (change @ m), other @ other.t() @ (q @ m), rtol=1e-5, atol=1e-6)


def test_projector_follows_gradient_device_and_dtype():
    g = torch.randn(12, 6, dtype=torch.bfloat16)
    state = compute_projector(g, 2, "right", "svd", {}, dtype=torch.bfloat16)
    assert state["projector"].dtype == torch.bfloat16 and state["projector"].device == g.device
    assert project(g, state, "right").dtype == torch.float32


def test_staggered_refresh_spreads_second_refreshes():
    import galore_mini as gm

    weights = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(4)]
    opt = gm.GaLoreMini([{"params": weights, "rank": 2, "update_proj_gap": 8, "stagger_refresh": True}])
    for w in weights:
        w.grad = torch.randn(12, 8)
    opt.step()
    assert [int(opt.state[w]["refresh"][0]) for w in weights] == [9, 7, 5, 3]
    for _ in range(3):
        opt.step()
    # after its own first (shortened) window each weight refreshes every 8 steps again
    assert int(opt.state[weights[3]]["refresh"][0]) == 11


@pytest.mark.parametrize("method", ["svd", "randomized", "power", "random"])
def test_batched_step_equals_per_parameter_steps(method, monkeypatch):
    """`step()` refreshes same-shaped weights in one batched call (as on GPUs); `step_param` one at a time."""
    import galore_mini as gm
    from galore_mini.optim import refresh

    monkeypatch.setattr(refresh, "BATCH_REFRESH_ON_CPU", True)

    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(24, 16, generator=gen) for _ in range(3)] for _ in range(7)]

    def run(batched):
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(3)]
        opt = gm.GaLoreMini([{"params": weights, "rank": 4, "update_proj_gap": 3, "proj_method": method}], lr=1e-2)
        for step_grads in grads:
            for w, g in zip(weights, step_grads):
                w.grad = g.clone()
            if batched:
                opt.step()
            else:
                for w in weights:
                    opt.step_param(w)
        return weights

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
