"""Tensor-only state: save → torch.load(weights_only=True) → load resumes bit-for-bit."""

import io

import pytest
import torch

import galore_mini as gm
from conftest import batches, tiny_llama

METHOD_OPTIONS = {
    "galore": {},
    "galore_mini": {},
    "galore_mini_a1": {},
    "galore_mini_a2": {},
    "adam_mini": {},
    "galore_adafactor": {"beta1": 0.9},
    "galore_8bit": {"min_8bit_size": 64},
    "galore_mini_8bit": {"min_8bit_size": 64},
    "galore_mini_adaptive": {"adaptive_gap": True, "gap_window": 2, "gap_threshold": 0.0, "max_gap": 12},
    "galore_mini_power_project": {"proj_method": "power", "moment_policy": "project"},
    "galore_random_reset": {"proj_method": "random", "moment_policy": "reset"},
}


def _make(method_key, model):
    method = method_key
    for suffix in ("_adaptive", "_power_project", "_random_reset"):
        method = method.replace(suffix, "")
    options = METHOD_OPTIONS[method_key]
    return gm.create_optimizer(model, method, lr=1e-2, rank=8, update_proj_gap=3, weight_decay=0.01, **options)


def _train(model, opt, data, steps, scheduler=None):
    for step in range(steps):
        ids = data[step % len(data)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_resume_is_exact(method):
    data = batches(vocab=128, n=3, batch=2, seq=12)
    # uninterrupted: 4 + 10 steps (the save at step 4 is in the middle of a projector window of 3)
    model_a = tiny_llama(hidden=32, intermediate=64)
    opt_a = _make(method, model_a)
    _train(model_a, opt_a, data, 14)

    model_b = tiny_llama(hidden=32, intermediate=64)
    opt_b = _make(method, model_b)
    _train(model_b, opt_b, data, 4)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model_c = tiny_llama(hidden=32, intermediate=64, seed=123)  # different init: everything must come from the file
    model_c.load_state_dict(checkpoint["model"])
    opt_c = _make(method, model_c)
    opt_c.load_state_dict(checkpoint["optim"])
    data_rest = data[4 % 3:] + data[: 4 % 3]
    _train(model_c, opt_c, data_rest, 10)
    for (name, p_a), p_c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p_a, p_c), f"{method}: {name} differs after resume"


def test_state_is_tensors_only_and_adaptive_gap_grows():
    model = tiny_llama()
    opt = _make("galore_mini_adaptive", model)
    _train(model, opt, batches(n=2, batch=2, seq=12), 12)
    for state in opt.state.values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    gaps = [int(s["refresh"][1]) for s in opt.state.values() if "refresh" in s]
    # threshold 0 with a window of 2: the gap doubles after every 2 refreshes, capped at max_gap=12
    assert gaps and all(g in (6, 12) for g in gaps), gaps


def test_fp32_state_survives_loading_into_bf16_params():
    model = tiny_llama()
    opt = gm.create_optimizer(model, "galore_mini", rank=8)
    _train(model, opt, batches(n=1, batch=2, seq=12), 2)
    saved = opt.state_dict()
    model_bf16 = tiny_llama().to(torch.bfloat16)
    opt_bf16 = gm.create_optimizer(model_bf16, "galore_mini", rank=8)
    opt_bf16.load_state_dict(saved)
    for p_src, p_dst in zip(model.parameters(), model_bf16.parameters()):
        for key, value in opt.state[p_src].items():
            restored = opt_bf16.state[p_dst][key]
            assert restored.dtype == value.dtype, key
            assert torch.equal(restored, value), key


def test_lr_scheduler_state_round_trip():
    data = batches(n=2, batch=2, seq=12)

    def run(split):
        model = tiny_llama()
        opt = gm.create_optimizer(model, "galore_mini", lr=1e-2, rank=8, update_proj_gap=2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        _train(model, opt, data, split, sched)
        if split < 8:
            state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
            model2 = tiny_llama()
            model2.load_state_dict(model.state_dict())
            opt = gm.create_optimizer(model2, "galore_mini", lr=1e-2, rank=8, update_proj_gap=2)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            model = model2
            _train(model, opt, data[split % 2:] + data[:split % 2], 8 - split, sched)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(8), run(3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("corrupt", ["wrong_shape", "not_tensor", "foreign_key", "not_a_checkpoint"])
def test_corrupt_checkpoint_gets_a_clear_error(corrupt):
    model = tiny_llama()
    opt = gm.create_optimizer(model, "galore_mini", rank=8)
    _train(model, opt, batches(n=1, batch=2, seq=12), 1)
    saved = opt.state_dict()
    first = next(i for i, s in saved["state"].items() if "projector" in s)
    if corrupt == "wrong_shape":
        saved["state"][first]["projector"] = torch.zeros(3, 3)
        match = "shape"
    elif corrupt == "not_tensor":
        saved["state"][first]["step"] = 5
        match = "expected a tensor"
    elif corrupt == "foreign_key":
        saved["state"][first]["ortho_matrix"] = torch.zeros(1)
        match = "ortho_matrix"
    else:
        saved = {"weights": 1}
        match = "not an optimizer checkpoint"
    fresh = gm.create_optimizer(tiny_llama(), "galore_mini", rank=8)
    with pytest.raises(gm.UsageError, match=match):
        fresh.load_state_dict(saved)


def test_rank_change_between_save_and_load_is_named():
    model = tiny_llama()
    opt = gm.create_optimizer(model, "galore", rank=8)
    _train(model, opt, batches(n=1, batch=2, seq=12), 1)
    other = gm.create_optimizer(tiny_llama(), "galore", rank=4)
    with pytest.raises(gm.UsageError, match="different rank or model"):
        other.load_state_dict(opt.state_dict())
