"""GaLore-mini's variants of approach 3: ``v_source="projected"`` (v fed from the back-projected gradient)
against a float64 reference loop, and ``embedding_block`` (the embedding/output layers' v blocks)."""

import pytest
import torch

import galore_mini as gm
from galore_mini.errors import UsageError

LR, BETAS, EPS, SCALE, RANK = 1e-2, (0.9, 0.999), 1e-8, 0.25, 3


def reference_projected_v(w0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Approach 3 with v from back(R), in float64: exact SVD at step 1 (T is longer than the run),
    one v per row, the shorter side projected."""
    w = w0.double().clone()
    m, n = w.shape
    left = m <= n
    moment = None
    v = torch.zeros(m, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if t == 1:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = u[:, :RANK] if left else vh[:RANK].t()
        low = basis.t() @ g if left else g @ basis
        back = basis @ low if left else low @ basis.t()
        v = BETAS[1] * v + (1 - BETAS[1]) * back.pow(2).mean(dim=1)
        moment = (1 - BETAS[0]) * low if moment is None else BETAS[0] * moment + (1 - BETAS[0]) * low
        bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        update = basis @ moment if left else moment @ basis.t()
        w = w - LR / bc1 * SCALE * update / ((v / bc2).sqrt() + EPS)[:, None]
    return w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["left", "right"])
def test_projected_v_source_matches_a_float64_loop(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    grads = [torch.randn(shape) for _ in range(4)]
    opt = gm.GaLoreMini([{"params": [w], "rank": RANK, "block": "rows"}], lr=LR, betas=BETAS, eps=EPS,
                        v_source="projected", proj_method="svd", scale=SCALE)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach().double(), reference_projected_v(w0, grads), rtol=1e-5, atol=1e-6)
    assert opt.state[w]["exp_avg_sq"].shape == (shape[0],)  # still one scalar per row


def test_projected_v_source_differs_from_the_papers_and_its_checkpoint_loads():
    torch.manual_seed(1)
    grads = [torch.randn(16, 24) for _ in range(3)]
    finals, opts = [], []
    for source in ("gradient", "projected"):
        w = torch.nn.Parameter(torch.zeros(16, 24))
        opt = gm.GaLoreMini([{"params": [w], "rank": 4, "block": "rows"}], lr=LR, v_source=source)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        finals.append(w.detach().clone())
        opts.append(opt)
    assert not torch.allclose(finals[0], finals[1])  # the variant is not a no-op
    # a state saved before the option existed (no "v_source" in its groups) loads as the paper's
    saved = opts[0].state_dict()
    for group in saved["param_groups"]:
        del group["v_source"]
    w = torch.nn.Parameter(finals[0].clone())
    fresh = gm.GaLoreMini([{"params": [w], "rank": 4, "block": "rows"}], lr=LR)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["v_source"] == "gradient"
    w.grad = grads[0].clone()
    fresh.step()


def test_projected_v_source_refusals():
    w = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(UsageError, match="v_source='bogus'"):
        gm.GaLoreMini([{"params": [w], "rank": 2}], v_source="bogus")
    with pytest.raises(UsageError, match="approach 3 only"):
        gm.GaLoreMini([{"params": [w], "rank": 2}], approach=1, v_source="projected")
    with pytest.raises(UsageError, match="v_source='projected'"):
        gm.GaLoreMini([{"params": [w], "rank": 2}], v_source="projected", capturable=True)
    opt = gm.GaLoreMini([{"params": [w], "rank": 2}], v_source="projected")
    assert "no sharded step" in opt.sharding_problem(opt.param_groups[0])


def test_embedding_block_gives_the_embedding_and_output_an_elementwise_v(llama):
    model = llama
    opt = gm.create_optimizer(model, "galore_mini", rank=4, embedding_block="elementwise")
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    infos = {i.param: i for i in gm.param_groups(model, "galore_mini", rank=4).infos}
    roles = {info.role for p, info in infos.items() if opt.state[p]["exp_avg_sq"].shape == p.shape}
    assert roles == {"embedding", "output"}  # element-wise there, and nowhere else
    with pytest.raises(UsageError, match="embedding_block='elementwise' only applies"):
        gm.create_optimizer(model, "galore", rank=4, embedding_block="elementwise")
