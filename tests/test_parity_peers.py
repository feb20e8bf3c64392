"""Parity with the packages we replace: galore-torch 1.0 and adam-mini 1.1.1 (test-only dependencies)."""

import copy

import pytest
import torch

import galore_mini as gm
from conftest import batches, tiny_llama

galore_torch = pytest.importorskip("galore_torch")
adam_mini = pytest.importorskip("adam_mini")


def _shared_grads(shape, steps, seed):
    # low-rank-ish gradients that drift, so successive SVD subspaces differ and refreshes matter
    gen = torch.Generator().manual_seed(seed)
    base_left = torch.randn(shape[0], 6, generator=gen)
    base_right = torch.randn(6, shape[1], generator=gen)
    grads = []
    for t in range(steps):
        drift = 0.3 * torch.randn(shape, generator=gen)
        grads.append(base_left @ base_right * (1 + 0.1 * t) + drift)
    return grads


def _run(opt_cls, grads, shape, group_extra, **kwargs):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    bias = torch.nn.Parameter(torch.randn(shape[0]))
    groups = [{"params": [weight], **group_extra}, {"params": [bias]}]
    opt = opt_cls(groups, **kwargs)
    trajectory = []
    for g in grads:
        weight.grad = g.clone()
        bias.grad = g[:, 0].clone()
        opt.step()
        trajectory.append((weight.detach().clone(), bias.detach().clone()))
    return trajectory


CASES = [(shape, proj_type) for shape in [(48, 24), (24, 48), (32, 32)]
         for proj_type in ["std", "reverse_std", "left", "right"]]


@pytest.mark.parametrize("shape,proj_type", CASES, ids=[f"{s[0]}x{s[1]}-{t}" for s, t in CASES])
def test_galore_adamw_matches_galore_torch(shape, proj_type):
    grads = _shared_grads(shape, steps=13, seed=1)
    group = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ours = _run(gm.GaLoreAdamW, grads, shape, group, **kwargs)
    theirs = _run(galore_torch.GaLoreAdamW, grads, shape, group, **kwargs)
    # 13 steps with gap 5: refreshes at steps 1, 6 and 11
    for (w_ours, b_ours), (w_ref, b_ref) in zip(ours, theirs):
        torch.testing.assert_close(w_ours, w_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[-1][0], ours[0][0])


def test_galore_adamw_full_projection_matches_galore_torch():
    shape = (40, 24)
    grads = _shared_grads(shape, steps=9, seed=3)
    group = {"rank": 5, "update_proj_gap": 4, "scale": 0.5, "proj_type": "full"}
    # two-sided projection makes R = Σ_r (diagonal) at each refresh: its off-diagonal entries are pure round-off,
    # which Adam with a tiny eps blows up to ±1; an eps above that noise keeps the comparison about the algorithm
    ours = _run(gm.GaLoreAdamW, grads, shape, group, lr=1e-2, eps=1e-4, weight_decay=0.0)
    theirs = _run(galore_torch.GaLoreAdamW, grads, shape, group, lr=1e-2, eps=1e-4, weight_decay=0.0)
    torch.testing.assert_close(ours[-1][0], theirs[-1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_galore_adafactor_matches_galore_torch(beta1):
    shape = (36, 20)
    grads = _shared_grads(shape, steps=9, seed=4)
    group = {"rank": 4, "update_proj_gap": 4, "scale": 0.25, "proj_type": "std"}
    kwargs = dict(lr=1e-2, relative_step=False, scale_parameter=True, beta1=beta1, weight_decay=0.05)
    ours = _run(gm.GaLoreAdafactor, grads, shape, group, **kwargs)
    theirs = _run(galore_torch.GaLoreAdafactor, grads, shape, group, **kwargs)
    for (w_ours, b_ours), (w_ref, b_ref) in zip(ours, theirs):
        torch.testing.assert_close(w_ours, w_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-5, atol=1e-6)


def test_adam_mini_matches_adam_mini_package_on_llama():
    model_ours = tiny_llama(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=3)
    model_ref = copy.deepcopy(model_ours)
    config = model_ours.config
    ours = gm.create_optimizer(model_ours, "adam_mini", lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = adam_mini.Adam_mini(model_ref.named_parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              dim=config.hidden_size, n_heads=config.num_attention_heads,
                              n_kv_heads=config.num_key_value_heads, verbose=False)
    losses = []
    data = batches(vocab=96, n=2, batch=2, seq=12)
    for step in range(12):
        ids = data[step % 2]
        for model, opt in ((model_ours, ours), (model_ref, ref)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    for (name, p_ours), p_ref in zip(model_ours.named_parameters(), model_ref.parameters()):
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the run really trained: the loss moved and the weights left their start
    assert losses[-1] < losses[0]
    # adam-mini's v per head for k_proj under grouped-query attention equals ours, block for block
    k_name = "model.layers.0.self_attn.k_proj.weight"
    k_ours = dict(model_ours.named_parameters())[k_name]
    k_ref = dict(model_ref.named_parameters())[k_name]
    torch.testing.assert_close(ours.state[k_ours]["exp_avg_sq"], ref.state[k_ref]["vmean"].reshape(-1),
                               rtol=1e-5, atol=1e-12)


def test_batched_refresh_of_same_shaped_weights_matches_galore_torch():
    """Several same-shaped weights in one group are refreshed with one batched SVD; results must not change."""
    shape = (40, 24)
    grads = [_shared_grads(shape, steps=7, seed=s) for s in (5, 6, 7)]

    def run(opt_cls):
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(shape)) for _ in grads]
        opt = opt_cls([{"params": weights, "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
                      lr=1e-2, weight_decay=0.01)
        for step in range(7):
            for w, g in zip(weights, grads):
                w.grad = g[step].clone()
            opt.step()
        return weights

    for ours, theirs in zip(run(gm.GaLoreAdamW), run(galore_torch.GaLoreAdamW)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
