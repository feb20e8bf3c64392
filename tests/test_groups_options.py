"""Options the caller gives the optimizer are never overridden by the param groups.

`param_groups` writes an option into a group only where the caller passed it to `param_groups` or where it
must hold (no weight decay on norms and biases), so `GaLoreMini(gm.param_groups(model, ...), weight_decay=0.1)`
decays. Checked on the weights after a real step against the decoupled-decay formula in float64.
"""

import copy

import pytest
import torch

import galore_mini as gm
from test_groups_structure import TinyLM, _random_grads

LR, WD = 1e-2, 0.1


def _step(model, cls, method, **options):
    groups = gm.param_groups(model, method, rank=4) if gm.methods.get(method).projected \
        else gm.param_groups(model, method)
    opt = cls(groups, lr=LR, **options)
    _random_grads(model, seed=1)
    opt.step()
    return groups


@pytest.mark.parametrize("method, cls", [
    ("galore_mini", gm.GaLoreMini),
    ("adam_mini", gm.AdamMini),
    ("galore", gm.GaLoreAdamW),
    ("full", torch.optim.AdamW),
])
def test_constructor_weight_decay_applies_to_every_weight_but_norms_and_biases(method, cls):
    model = TinyLM(bias=True)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    plain = copy.deepcopy(model)
    groups = _step(model, cls, method, weight_decay=WD)
    _step(plain, cls, method, weight_decay=0.0)
    without = {n: p.detach().double() for n, p in plain.named_parameters()}
    decay = LR * WD
    # decoupled decay: W(1 - ηλ) - ηU; galore-torch decays after the update: (W - ηU)(1 - ηλ)
    after = cls is gm.GaLoreAdamW
    decayed = 0
    for info in groups.infos:
        got = info.param.detach().double()
        if info.decay:
            expected = without[info.name] * (1 - decay) if after else without[info.name] - decay * before[info.name]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # fp32 rounding
            decayed += 1
        else:
            assert info.role in ("norm", "bias")
            assert torch.equal(got, without[info.name]), info.name
    assert decayed == 2 + 2 * 7  # embedding, head and the block matrices
    # the decay moves each weight by ηλ = 1e-3 of itself, a thousand times the tolerance
    assert decay > 100 * 1e-6


def test_param_groups_weight_decay_is_kept_and_wins_over_the_constructor():
    model = TinyLM(bias=True)
    groups = gm.param_groups(model, "galore_mini", rank=4, weight_decay=0.05)
    opt = gm.GaLoreMini(groups, lr=LR, weight_decay=0.3)
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.blocks[0].q_proj.weight)] == 0.05
    assert by_param[id(model.embed.weight)] == 0.05
    assert by_param[id(model.blocks[0].q_proj.bias)] == 0.0
    assert by_param[id(model.norm.weight)] == 0.0


def test_constructor_projection_options_apply_to_projected_groups():
    model = TinyLM()
    groups = gm.param_groups(model, "galore", rank=4)
    assert all(set(g) - {"params"} <= {"rank", "weight_decay"} for g in groups)
    opt = gm.GaLoreAdamW(groups, lr=LR, update_proj_gap=7, scale=0.5, proj_type="left", proj_method="power")
    projected = [g for g in opt.param_groups if "rank" in g]
    assert projected and all((g["update_proj_gap"], g["scale"], g["proj_type"], g["proj_method"])
                             == (7, 0.5, "left", "power") for g in projected)
    # given to param_groups, an option is the group's own and the constructor's keyword does not replace it
    opt = gm.GaLoreAdamW(gm.param_groups(model, "galore", rank=4, update_proj_gap=3), update_proj_gap=7)
    assert {g["update_proj_gap"] for g in opt.param_groups if "rank" in g} == {3}


def test_create_optimizer_passes_its_options_to_the_optimizer():
    model = TinyLM(bias=True)
    opt = gm.create_optimizer(model, "galore_mini", rank=4, weight_decay=WD, update_proj_gap=9, scale=0.5,
                              proj_method="svd", moment_policy="project")
    projected = [g for g in opt.param_groups if "rank" in g]
    assert {(g["update_proj_gap"], g["scale"], g["proj_method"], g["moment_policy"]) for g in projected} == \
        {(9, 0.5, "svd", "project")}
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.blocks[0].down_proj.weight)] == WD and decays[id(model.blocks[0].norm1.bias)] == 0.0
