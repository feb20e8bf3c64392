"""Low-Rank, LoRA and ReLoRA: what each does to the model and to the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

import galore_mini as gm
from galore_mini.errors import UsageError
from galore_mini.methods import adapters as B
from conftest import tiny_llama

PROJECTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(vocab=128, batch=4, seq=16, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_projected_linears_are_the_attention_and_mlp_weights():
    names = [name for name, _ in B.projected_linears(tiny_llama())]
    assert len(names) == 2 * 7 and all(name.rsplit(".", 1)[-1] in PROJECTED for name in names)


def test_low_rank_factorises_every_projected_linear_with_the_full_weights_scale():
    torch.manual_seed(0)
    full = tiny_llama(hidden=64, intermediate=128)
    full_params = sum(p.numel() for p in full.parameters())
    shapes = {name: tuple(m.weight.shape) for name, m in B.projected_linears(full)}
    model = B.low_rank_model(full, rank=8)
    for name, (rows, cols) in shapes.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, B.LowRankLinear)
        assert layer.up.weight.shape == (rows, 8) and layer.down.weight.shape == (8, cols)
    expected = full_params - sum(r * c - 8 * (r + c) for r, c in shapes.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # the product B A starts with the entry scale of a freshly initialised weight (initializer_range 0.02)
    product = torch.cat([(m.up.weight @ m.down.weight).flatten() for m in model.modules()
                         if isinstance(m, B.LowRankLinear)])
    assert product.std().item() == pytest.approx(0.02, rel=0.1)


def test_low_rank_model_trains():
    torch.manual_seed(0)
    model = B.low_rank_model(tiny_llama(), rank=4)
    opt = gm.create_optimizer(model, "full", lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_lora_freezes_the_random_base_and_starts_as_it():
    base = tiny_llama()
    ids = _ids()
    before = base(input_ids=ids).logits.detach()
    model = B.lora_model(base, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(("lora_A" in n or "lora_B" in n) for n in trainable if any(k in n for k in PROJECTED))
    assert all(n.endswith("base_layer.weight") for n in frozen) and len(frozen) == 14
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, before)  # B = 0: the adapters add nothing yet
    layer = B.lora_layers(model)[0]
    assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(32 / 4)


def test_rank_must_be_below_the_smallest_projected_side():
    with pytest.raises(UsageError, match=r"--rank=32 is too large.*below 32"):
        B.low_rank_model(tiny_llama(hidden=32), rank=32)
    with pytest.raises(UsageError, match="rank"):
        B.lora_model(tiny_llama(hidden=32), rank=0)


def test_prune_by_magnitude_keeps_the_largest_entries():
    t = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 4.0, -0.01, 1.0, 0.6])
    B.prune_by_magnitude(t, 0.7)
    assert t.tolist() == [0.0, -5.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]
    ones = torch.ones(4)
    B.prune_by_magnitude(ones, 1.0)
    assert ones.sum() == 0


def _relora(reset_every=3, warmup=2, prune=0.9):
    torch.manual_seed(0)
    model = B.lora_model(tiny_llama(), rank=4, dropout=0.0)
    opt = gm.create_optimizer(model, "full", lr=1e-2)
    return model, opt, B.ReLoRA(model, opt, reset_every, warmup, prune)


def test_relora_merge_keeps_the_function_resets_adapters_and_prunes_their_moments():
    model, opt, relora = _relora()
    ids = _ids()
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert not relora.after_step(step)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    layer = B.lora_layers(model)[0]
    base_before = layer.get_base_layer().weight.detach().clone()
    moments_before = {id(p): opt.state[p]["exp_avg"].clone() for p in relora.adapter_params}
    embed = model.get_base_model().model.embed_tokens.weight
    embed_moment = opt.state[embed]["exp_avg"].clone()
    delta = layer.get_delta_weight("default").detach().clone()
    assert delta.abs().sum() > 0
    model.eval()
    before = model(input_ids=ids).logits.detach()
    assert relora.after_step(2)  # the third update ends a cycle of 3
    torch.testing.assert_close(layer.get_base_layer().weight, base_before + delta, rtol=0, atol=1e-6)
    assert layer.lora_B["default"].weight.abs().sum() == 0
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    for p in relora.adapter_params:
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert int((state[key] == 0).sum()) == round(0.9 * p.numel())
        kept = state["exp_avg"] != 0
        old = moments_before[id(p)]
        assert torch.equal(state["exp_avg"][kept], old[kept])  # survivors keep their value
        assert old[kept].abs().min() >= old[~kept].abs().max()  # and they are the largest
    # the other parameters' moments are untouched
    assert torch.equal(opt.state[embed]["exp_avg"], embed_moment) and embed_moment.abs().sum() > 0


def test_relora_jagged_restart_factor():
    _, _, relora = _relora(reset_every=10, warmup=4)
    factors = [relora.lr_factor(s) for s in range(25)]
    assert factors[:10] == [1.0] * 10  # the first cycle follows the ordinary warm-up only
    assert factors[10:15] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert factors[20] == pytest.approx(0.2) and math.isclose(factors[24], 1.0)
