"""Bad input gets one clear error naming the parameter and the fix."""

import pytest
import torch

import galore_mini as gm
from conftest import tiny_llama


def _w(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("rank,match", [(0, "rank=0 must be a positive integer"), (-3, "rank=-3"),
                                        (16, r"rank=16 must be below min\(rows, cols\)=16"),
                                        (40, "rank=40 must be below"), (2.5, "rank=2.5")])
def test_bad_rank(rank, match):
    with pytest.raises(gm.UsageError, match=match):
        gm.GaLoreAdamW([{"params": [_w(16, 32)], "rank": rank}])


def test_projection_on_1d_param_is_named():
    with pytest.raises(gm.UsageError, match=r"shape \[16\].*only 2-D weights can be projected"):
        gm.GaLoreMini([{"params": [_w(16)], "rank": 4}])


@pytest.mark.parametrize("cls", [gm.GaLoreAdamW, gm.GaLoreMini, gm.AdamMini, gm.GaLoreAdafactor, gm.GaLoreAdamW8bit])
def test_unknown_group_option_suggests_the_right_one(cls):
    with pytest.raises(gm.UsageError, match=r"'weight_decy' \(did you mean 'weight_decay'\?\)"):
        cls([{"params": [_w(8, 8)], "weight_decy": 0.1}])
    if cls is not gm.AdamMini:
        with pytest.raises(gm.UsageError, match=r"'update_gap' \(did you mean 'update_proj_gap'\?\)"):
            cls([{"params": [_w(8, 8)], "rank": 2, "update_gap": 10}])


def test_unknown_constructor_option():
    with pytest.raises(gm.UsageError, match="unknown option"):
        gm.GaLoreMini([_w(8, 8)], proj_mehtod="power")


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr=-1.0"), (dict(eps=-1e-8), "eps"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lr=float("nan")), "lr=nan"), (dict(nonfinite="ignore"), "nonfinite"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(gm.UsageError, match=match):
        gm.GaLoreMini([_w(8, 8)], **kwargs)


@pytest.mark.parametrize("key,value", [("proj_type", "diagonal"), ("proj_method", "qr"), ("moment_policy", "rotate"),
                                       ("update_proj_gap", 0)])
def test_bad_projection_options(key, value):
    with pytest.raises(gm.UsageError, match=key):
        gm.GaLoreAdamW([{"params": [_w(16, 32)], "rank": 4, key: value}])


def test_bad_block_layouts():
    with pytest.raises(gm.UsageError, match="not a multiple of the head size 5"):
        gm.AdamMini([{"params": [_w(16, 8)], "block": "heads:5"}])
    with pytest.raises(gm.UsageError, match="not a block layout"):
        gm.AdamMini([{"params": [_w(16, 8)], "block": "neurons"}])
    with pytest.raises(gm.UsageError, match="covers 10 indices"):
        gm.AdamMini([{"params": [_w(16, 8)], "block": "rows:2x5"}])
    with pytest.raises(gm.UsageError, match="full-size second moment"):
        gm.GaLoreMini([{"params": [_w(16, 8)], "rank": 2, "block": "elementwise"}])


def test_adam_mini_rejects_rank():
    with pytest.raises(gm.UsageError, match="unknown param-group option"):
        gm.AdamMini([{"params": [_w(16, 8)], "rank": 2}])


def test_sparse_and_complex_gradients():
    w = _w(8, 4)
    opt = gm.GaLoreMini([w])
    w.grad = torch.randn(8, 4).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(TypeError, match="complex parameters"):
        gm.AdamMini([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])


@pytest.mark.parametrize("method", ["galore", "galore_mini", "adam_mini", "galore_8bit"])
def test_nonfinite_gradient_is_skipped_and_counted(method):
    model = tiny_llama()
    opt = gm.create_optimizer(model, method, rank=8, lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    poisoned = model.model.layers[0].self_attn.q_proj.weight
    poisoned.grad[0, 0] = float("nan")
    model.model.norm.weight.grad[0] = float("inf")
    opt.step()
    assert opt.nonfinite_skips == 2
    after = dict(model.named_parameters())
    assert torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    for key, value in opt.state[poisoned].items():
        assert torch.equal(value, state_before[id(poisoned)][key]), key  # moments not poisoned
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_raise_policy():
    w = _w(8, 8)
    opt = gm.GaLoreMini([w], nonfinite="raise")
    w.grad = torch.full((8, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
        opt.step()


@pytest.mark.parametrize("cls", [gm.GaLoreMini, gm.GaLoreAdamW, gm.AdamMini])
def test_nonfinite_off_checks_nothing_and_never_syncs(cls, monkeypatch):
    """'off' behaves as torch.optim: no probe (so no host sync), a NaN gradient reaches the weight."""
    torch.manual_seed(0)
    w, b = _w(8, 8), torch.nn.Parameter(torch.zeros(8))
    checked = torch.nn.Parameter(torch.zeros(8))
    groups = [{"params": [w], **({"rank": 2} if cls is not gm.AdamMini else {})},
              {"params": [b]}, {"params": [checked], "nonfinite": "skip"}]
    opt = cls(groups, lr=1e-2, nonfinite="off")
    probed = []
    real = type(opt)._finite_flags
    monkeypatch.setattr(type(opt), "_finite_flags", staticmethod(lambda probes: (probed.append(len(probes)),
                                                                                   real(probes))[1]))
    w.grad, b.grad = torch.randn(8, 8), torch.full((8,), float("nan"))
    checked.grad = torch.full((8,), float("nan"))
    opt.step()
    assert probed == [1]  # only the group that asked for the check
    assert torch.isnan(b).all() and torch.isfinite(w).all() and torch.equal(checked, torch.zeros(8))
    assert opt.nonfinite_skips == 1
    with pytest.raises(gm.UsageError, match="'skip', 'raise' or 'off'"):
        cls([torch.nn.Parameter(torch.zeros(3))], nonfinite="ignore")


def test_param_groups_errors():
    model = tiny_llama()
    with pytest.raises(gm.UsageError, match="method='adamw' is unknown"):
        gm.param_groups(model, "adamw")
    with pytest.raises(gm.UsageError, match="matches no parameter"):
        gm.param_groups(model, "galore_mini", rank=8, overrides={r"attention\.wq": {"rank": 4}})
    with pytest.raises(gm.UsageError, match="only 2-D weights"):
        gm.param_groups(model, "galore", rank=8, overrides={r"norm": {"project": True}})
    with pytest.raises(gm.UsageError, match="unknown option"):
        gm.create_optimizer(model, "galore", rank=8, gap=10)


def test_communication_bytes_names_a_bad_side_or_method():
    from galore_mini.optim.distributed import communication_bytes

    with pytest.raises(gm.UsageError, match=r"side='Right'; use 'left', 'right', 'full' or None"):
        communication_bytes((64, 32), 4, "Right", 4)
    with pytest.raises(gm.UsageError, match=r"method='pow'; use one of svd, randomized, power, random"):
        communication_bytes((64, 32), 4, "right", 4, method="pow")
    # a right projection's step sends nothing but what the options add: here 3 block maxima per 8-bit moment
    assert communication_bytes((64, 32), 4, "right", 4, moments_8bit=2)["step"] == 2 * 3 / 4 * 4 * 3 * 2
