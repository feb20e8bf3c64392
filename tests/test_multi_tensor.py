"""The multi-tensor steps (foreach) against the single-tensor reference path, bit for bit."""

import copy
import io

import pytest
import torch

import galore_mini as gm
from conftest import batches, tiny_llama
from galore_mini.optim import adam_mini as adam_mini_module

CONFIGS = {
    "galore_mini": ("galore_mini", {}),
    "galore_mini_svd_decay": ("galore_mini", {"proj_method": "svd", "weight_decay": 0.1}),
    "galore_mini_stagger_project": ("galore_mini", {"stagger_refresh": True, "moment_policy": "project"}),
    "galore_mini_full_side": ("galore_mini", {"proj_type": "full"}),
    "galore_mini_left": ("galore_mini", {"proj_type": "left"}),
    "galore_mini_bf16_proj": ("galore_mini", {"proj_dtype": "bf16"}),
    "adam_mini": ("adam_mini", {"weight_decay": 0.1}),
    "galore_adamw": ("galore", {}),
    "galore_adamw_power_bf16_decay": ("galore", {"proj_method": "power", "proj_dtype": "bf16", "weight_decay": 0.1}),
    "galore_adamw_no_bias_correction_project": ("galore", {"correct_bias": False, "moment_policy": "project"}),
}


def _group(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def _pair(method, options, model_dtype=torch.float32, kv_heads=None):
    models, opts = [], []
    for foreach in (True, False):
        model = tiny_llama(hidden=32, intermediate=64, kv_heads=kv_heads).to(model_dtype)
        kwargs = dict(lr=1e-2, foreach=foreach, **options)
        if method != "adam_mini":
            kwargs.update(rank=8, update_proj_gap=4)
        models.append(model)
        opts.append(gm.create_optimizer(model, method, **kwargs))
    return models, opts


def _step_both(models, opts, ids, poison=None):
    for model, opt in zip(models, opts):
        model(input_ids=ids, labels=ids).loss.backward()
        if poison is not None:
            dict(model.named_parameters())[poison].grad.view(-1)[3] = float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)


def _assert_identical(models, opts):
    fast, ref = models
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), f"{name} differs by {(a.float() - b.float()).abs().max():.3g}"
    for (p_fast, p_ref) in zip(fast.parameters(), ref.parameters()):
        state_fast, state_ref = opts[0].state[p_fast], opts[1].state[p_ref]
        assert state_fast.keys() == state_ref.keys()
        for key in state_fast:
            assert torch.equal(state_fast[key], state_ref[key]), key


@pytest.mark.parametrize("config", list(CONFIGS))
def test_multi_tensor_step_equals_reference_bitwise(config):
    method, options = CONFIGS[config]
    models, opts = _pair(method, options, kv_heads=2)
    data = batches(vocab=128, n=3, batch=2, seq=12)
    # 11 steps: refreshes at 1, 5, 9 (staggered ones elsewhere); a NaN gradient on one weight at step 6
    # leaves that weight a step behind the rest of its group, so bias corrections differ within a group
    for step in range(11):
        _step_both(models, opts, data[step % 3], poison="model.layers.0.mlp.up_proj.weight" if step == 5 else None)
        _assert_identical(models, opts)
    assert opts[0].nonfinite_skips == opts[1].nonfinite_skips == 1


def test_multi_tensor_path_is_taken_and_can_be_turned_off(monkeypatch):
    calls = []
    real = adam_mini_module.block_adam_multi_tensor
    monkeypatch.setattr(adam_mini_module, "block_adam_multi_tensor",
                        lambda opt, items, steps: (calls.append(len(items)), real(opt, items, steps)))
    models, opts = _pair("galore_mini", {})
    ids = batches(vocab=128, n=1, batch=2, seq=12)[0]
    _step_both(models, opts, ids)
    # every parameter of the foreach=True optimizer, none of the reference one
    assert calls == [sum(1 for _ in models[0].parameters())]


@pytest.mark.parametrize("groups_for, cls, options", [
    ("galore_mini", gm.GaLoreMini, {"approach": 1}),
    ("galore_mini", gm.GaLoreMini, {"approach": 2}),
    ("galore_mini", gm.GaLoreMini, {"moment_bits": 8, "min_8bit_size": 64}),
    ("galore_mini", gm.GaLoreMini, {"state_dtype": "bf16"}),
    ("galore_mini", gm.GaLoreMini, {"foreach": False}),
    ("galore", gm.GaLoreAdamW8bit, {"min_8bit_size": 64}),
    ("galore", gm.GaLoreAdamW, {"foreach": False}),
    ("galore", gm.GaLoreAdafactor, {"lr": 1e-2, "relative_step": False}),
])
def test_ineligible_options_fall_back_to_the_reference_path(groups_for, cls, options):
    model = tiny_llama(hidden=32, intermediate=64)
    opt = cls(gm.param_groups(model, groups_for, rank=8), **options)
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert all(opt._multi_tensor_layout(p, _group(opt, p)) is None for p in projected)


def test_elementwise_override_falls_back_only_for_that_group():
    model = tiny_llama(hidden=32, intermediate=64)
    groups = gm.param_groups(model, "galore_mini", rank=8, overrides={r"embed|lm_head": {"block": "elementwise"}})
    opt = gm.GaLoreMini(groups, lr=1e-2)
    embed = model.model.embed_tokens.weight
    assert opt._multi_tensor_layout(embed, _group(opt, embed)) is None
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt._multi_tensor_layout(q, _group(opt, q)) is not None


def test_bf16_parameters_match_reference():
    models, opts = _pair("galore_mini", {"weight_decay": 0.1}, model_dtype=torch.bfloat16)
    data = batches(vocab=128, n=3, batch=2, seq=12)
    for step in range(6):
        _step_both(models, opts, data[step % 3])
        _assert_identical(models, opts)


def test_checkpoint_moves_between_paths():
    """A state saved by the multi-tensor path resumes exactly on the reference path and vice versa."""
    data = batches(vocab=128, n=3, batch=2, seq=12)
    models, opts = _pair("galore_mini", {})
    for step in range(3):
        _step_both(models, opts, data[step % 3])
    buffer = io.BytesIO()
    torch.save(opts[0].state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    reference_model = copy.deepcopy(models[0])
    reference = gm.create_optimizer(reference_model, "galore_mini", lr=1e-2, rank=8, update_proj_gap=4,
                                    foreach=False)
    reference.load_state_dict(saved)
    for step in range(3, 9):
        _step_both([models[0], reference_model], [opts[0], reference], data[step % 3])
        _assert_identical([models[0], reference_model], [opts[0], reference])


def test_block_norms_equal_the_definition():
    from galore_mini.optim.blocks import parse_block

    x = torch.randn(12, 8, dtype=torch.float64)
    for spec, expected in [
        ("rows", x.pow(2).sum(1).sqrt()),
        ("cols", x.pow(2).sum(0).sqrt()),
        ("heads:4", x.pow(2).reshape(3, 32).sum(1).sqrt()),
        ("col_heads:2", x.pow(2).reshape(12, 4, 2).sum((0, 2)).sqrt()),
        ("tensor", x.pow(2).sum().sqrt().reshape(1)),
    ]:
        layout = parse_block(spec, x.shape)
        torch.testing.assert_close(layout.block_norms(x.float()), expected.float())
        torch.testing.assert_close(layout.block_mean_sq(x), expected.pow(2) / layout.block_numel())
    assert parse_block("rows:2x4,2x2", x.shape).block_norms(x) is None  # uneven runs: no view
    assert parse_block("rows", x.shape).block_norms(x.t().contiguous().t()) is None  # not contiguous


def test_bf16_weight_takes_one_gemm_rounded_once():
    """bf16 weight, bf16 factors: p ← keep·p + α·a@b in one addmm, within one bf16 ulp of the exact value
    everywhere and closer on average than multiplying out in bf16 first (the path it replaces)."""
    from galore_mini.optim.primitives import fused_low_rank_update
    from galore_mini.optim.projection import LowRankProduct

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(64, 48, generator=gen).bfloat16()
    a, b = (torch.randn(64, 8, generator=gen) * 0.3).bfloat16(), torch.randn(8, 48, generator=gen).bfloat16()
    keep, alpha = 0.999, -0.05
    exact = keep * p.double() + alpha * (a.double() @ b.double())
    fused = p.clone()
    assert fused_low_rank_update(fused, LowRankProduct(a, b), keep, alpha)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs())) - 7)
    assert ((fused.double() - exact).abs() <= ulp).all()
    multiplied_out = (p.float() * keep + alpha * (a @ b).float()).bfloat16()
    assert (fused.double() - exact).abs().mean() <= (multiplied_out.double() - exact).abs().mean()
    fp32_factors = p.clone()  # fp32 factors with a bf16 weight: multiplied out in fp32 by the caller
    assert not fused_low_rank_update(fp32_factors, LowRankProduct(a.float(), b.float()), keep, alpha)
