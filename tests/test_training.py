"""Every optimizer trains a tiny Llama, with the usual torch machinery around it."""

import pytest
import torch

import galore_mini as gm
from conftest import batches, tiny_llama

ALL_METHODS = [m for m in gm.METHODS]


def _loss_drop(model, opt, steps=30, clip=None, scheduler=None, dtype_autocast=None):
    data = batches(vocab=128, n=2, batch=4, seq=16)
    losses = []
    for step in range(steps):
        ids = data[step % 2]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("method", ALL_METHODS)
def test_tiny_llama_learns(method):
    model = tiny_llama()
    opt = gm.create_optimizer(model, method, rank=8, update_proj_gap=10,
                              lr=3e-3 if method in ("full", "adam_mini") else 1e-2)
    losses = _loss_drop(model, opt, steps=40)
    # ln(128) = 4.85 at start; two memorised batches must go well below
    assert losses[0] > 4.5
    assert min(losses[-5:]) < 0.75 * losses[0], (method, losses[::5])


def test_scheduler_clipping_and_params_without_grad():
    model = tiny_llama()
    frozen = model.model.layers[1].mlp.down_proj.weight
    frozen.requires_grad_(False)
    opt = gm.create_optimizer(model, "galore_mini", rank=8, lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=25)
    before = frozen.detach().clone()
    losses = _loss_drop(model, opt, steps=25, clip=0.5, scheduler=sched)
    assert losses[-1] < losses[0]
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])


def test_param_without_grad_in_group_is_left_alone():
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
    opt = gm.GaLoreMini([{"params": [a, b], "rank": 2}], lr=1e-2)
    a.grad = torch.randn(8, 16)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b, b_before) and len(opt.state[b]) == 0 and int(opt.state[a]["step"]) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["galore", "galore_mini", "adam_mini"])
def test_low_precision_params_keep_fp32_state(dtype, method):
    model = tiny_llama().to(dtype)
    opt = gm.create_optimizer(model, method, rank=8, lr=1e-2)
    losses = _loss_drop(model, opt, steps=20)
    assert losses[-1] < losses[0] - 0.5
    for state in opt.state.values():
        for key, value in state.items():
            if key not in ("refresh",) and value.is_floating_point():
                assert value.dtype == torch.float32, key
    assert all(p.dtype == dtype for p in model.parameters())


def test_state_dtype_option_stores_moments_in_bf16():
    model = tiny_llama()
    opt = gm.create_optimizer(model, "galore_mini", rank=8, state_dtype="bf16")
    _loss_drop(model, opt, steps=2)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[q]["projector"].dtype == torch.float32


def test_compiled_model_trains_identically():
    torch._dynamo.reset()
    eager, compiled_src = tiny_llama(), tiny_llama()
    compiled = torch.compile(compiled_src, backend="eager")
    opt_e = gm.create_optimizer(eager, "galore_mini", rank=8, lr=1e-2)
    opt_c = gm.create_optimizer(compiled, "galore_mini", rank=8, lr=1e-2)
    _loss_drop(eager, opt_e, steps=4)
    _loss_drop(compiled, opt_c, steps=4)
    for p_e, p_c in zip(eager.parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p_e, p_c, rtol=1e-5, atol=1e-6)


def test_closure_returns_loss():
    model = tiny_llama()
    opt = gm.create_optimizer(model, "galore_mini", rank=8)
    ids = batches(n=1, batch=2, seq=8)[0]

    def closure():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    assert float(opt.step(closure)) > 0


def test_amp_grad_scaler_skips_inf_steps():
    model = tiny_llama()
    opt = gm.create_optimizer(model, "galore_mini", rank=8, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ids = batches(n=1, batch=2, seq=8)[0]
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert int(opt.state[model.model.layers[0].mlp.up_proj.weight]["step"]) == 3
