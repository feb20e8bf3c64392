"""Layer-wise updates inside backward: same result as the ordinary loop, accumulation-aware, grads freed."""

import copy
import io
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import galore_mini as gm
from galore_mini.errors import UsageError
from conftest import batches, tiny_llama
from galore_mini.optim.layerwise import LayerwiseUpdates, layerwise

METHODS = ["galore_mini", "galore", "adam_mini"]


def _make(method, model, gap=2, **options):
    lr = 3e-3 if method in ("full", "adam_mini") else 1e-2
    return gm.create_optimizer(model, method, rank=4, update_proj_gap=gap, lr=lr, weight_decay=0.01, **options)


def _micro_batches(steps, accumulation):
    return batches(vocab=128, n=steps * accumulation, batch=2, seq=12, seed=7)


def _ordinary(model, opt, data, accumulation, sched=None):
    for start in range(0, len(data), accumulation):
        for ids in data[start:start + accumulation]:
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)


def _layerwise(model, handle, data, accumulation, sched=None, check_freed=True):
    params = [p for p in model.parameters() if p.requires_grad]
    for i, ids in enumerate(data):
        (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        final = (i + 1) % accumulation == 0
        assert handle.stepped == final
        if check_freed:
            if final:
                assert all(p.grad is None for p in params), "gradients must be freed after the update"
            else:
                assert all(p.grad is not None for p in params), "gradients must accumulate until the window ends"
        if handle.stepped and sched is not None:
            sched.step()


def _assert_same(model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("method", METHODS + ["full"])
def test_layerwise_matches_ordinary_loop(method, accumulation):
    steps = 5  # gap 2: refreshes at optimizer steps 1, 3, 5 — per-micro-batch counters would refresh elsewhere
    data = _micro_batches(steps, accumulation)
    ref_model = tiny_llama()
    lw_model = copy.deepcopy(ref_model)
    ref_opt, lw_opt = _make(method, ref_model), _make(method, lw_model)
    _ordinary(ref_model, ref_opt, data, accumulation)
    handle = layerwise(lw_model, lw_opt, accumulation_steps=accumulation)
    _layerwise(lw_model, handle, data, accumulation)
    assert handle.step_count == steps
    _assert_same(ref_model, lw_model)
    if method != "full":
        steps_taken = {int(s["step"]) for s in lw_opt.state.values()}
        assert steps_taken == {steps}
    before = [p.detach().clone() for p in ref_model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, tiny_llama().parameters()))


def test_scheduler_once_per_optimizer_step():
    accumulation, steps = 2, 4
    data = _micro_batches(steps, accumulation)
    ref_model = tiny_llama()
    lw_model = copy.deepcopy(ref_model)
    ref_opt, lw_opt = _make("galore_mini", ref_model), _make("galore_mini", lw_model)
    decay = lambda s: 1.0 / (1 + s)  # noqa: E731
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, decay)
    lw_sched = torch.optim.lr_scheduler.LambdaLR(lw_opt, decay)
    _ordinary(ref_model, ref_opt, data, accumulation, ref_sched)
    handle = layerwise(lw_model, lw_opt, accumulation_steps=accumulation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        _layerwise(lw_model, handle, data, accumulation, lw_sched)
    assert lw_sched.last_epoch == steps
    assert lw_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    _assert_same(ref_model, lw_model)


def test_fused_torch_adamw_falls_back_per_parameter():
    data = _micro_batches(3, 2)
    ref_model = tiny_llama()
    lw_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, fused=True)
    lw_opt = torch.optim.AdamW(lw_model.parameters(), lr=1e-3, fused=True)
    _ordinary(ref_model, ref_opt, data, 2)
    handle = layerwise(lw_model, lw_opt, accumulation_steps=2)
    _layerwise(lw_model, handle, data, 2)
    _assert_same(ref_model, lw_model)
    # the state lives in the wrapped optimizer, so its state_dict is the usual one
    state = handle.state_dict()
    assert len(state["state"]) == len(list(lw_model.parameters()))
    assert all(float(s["step"]) == 3 for s in lw_opt.state.values())


def test_remove_restores_ordinary_training():
    model = tiny_llama()
    opt = _make("galore_mini", model)
    handle = layerwise(model, opt)
    ids = _micro_batches(1, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "no update inside backward"
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    layerwise(model, opt).remove()  # a removed handle frees the optimizer for a new one


def test_optimizer_step_with_pending_grads_is_refused():
    model = tiny_llama()
    opt = _make("galore_mini", model)
    handle = layerwise(model, opt, accumulation_steps=2)
    ids = _micro_batches(1, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="inside backward"):
        opt.step()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # nothing pending: a harmless no-op
    with pytest.raises(gm.UsageError, match="already has layer-wise"):
        layerwise(model, opt)
    handle.remove()


def test_parameter_missing_from_optimizer_is_an_error():
    model = tiny_llama()
    opt = gm.GaLoreMini([{"params": [model.model.embed_tokens.weight]}], lr=1e-3)
    with pytest.raises(gm.UsageError, match="not in the optimizer"):
        layerwise(model, opt)
    opt = _make("galore_mini", model)
    with pytest.raises(gm.UsageError, match="not among those given"):
        layerwise([model.model.embed_tokens.weight], opt)
    with pytest.raises(gm.UsageError, match="accumulation_steps"):
        layerwise(model, opt, accumulation_steps=0)
    with pytest.raises(gm.UsageError, match="max_grad_norm"):
        layerwise(model, opt, max_grad_norm=-1.0)


class _Branchy(torch.nn.Module):
    """A model whose `side` weight gets a gradient only when asked to."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.main = torch.nn.Linear(8, 8)
        self.side = torch.nn.Linear(8, 8)

    def forward(self, x, use_side):
        y = self.main(x)
        return (y + self.side(x) if use_side else y).pow(2).mean()


def test_parameter_without_grad_in_last_micro_batch_is_updated_at_window_end():
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    uses = [True, False, True, False, True, False]  # `side` misses every window's last micro-batch
    ref, lw = _Branchy(), _Branchy()
    ref_opt = gm.AdamMini(ref.parameters(), lr=1e-2)
    lw_opt = gm.AdamMini(lw.parameters(), lr=1e-2)
    for i, (x, use) in enumerate(zip(xs, uses)):
        (ref(x, use) / 2).backward()
        if i % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()
    handle = layerwise(lw, lw_opt, accumulation_steps=2)
    for x, use in zip(xs, uses):
        (lw(x, use) / 2).backward()
    assert handle.step_count == 3 and lw.side.weight.grad is None
    _assert_same(ref, lw)


def test_flush_closes_a_partial_window():
    ref, lw = _Branchy(), _Branchy()
    ref_opt, lw_opt = gm.AdamMini(ref.parameters(), lr=1e-2), gm.AdamMini(lw.parameters(), lr=1e-2)
    x = torch.randn(4, 8)
    ref(x, True).backward()
    ref_opt.step()
    handle = layerwise(lw, lw_opt, accumulation_steps=3)
    lw(x, True).backward()
    assert lw.main.weight.grad is not None
    assert handle.flush() and handle.step_count == 1 and lw.main.weight.grad is None
    _assert_same(ref, lw)
    assert not handle.flush()


class _Stack(torch.nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.reentrant = reentrant

    def forward(self, ids, ckpt=True):
        h = self.embed(ids)
        for layer in self.layers:
            h = checkpoint(layer, h, use_reentrant=self.reentrant) if ckpt else layer(h)
        return h.pow(2).mean()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_one_micro_batch_per_backward(reentrant):
    data = [torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    ref, lw = _Stack(reentrant), _Stack(reentrant)
    ref_opt = gm.GaLoreMini([{"params": [l.weight for l in ref.layers], "rank": 2, "update_proj_gap": 1},
                             {"params": [ref.embed.weight] + [l.bias for l in ref.layers]}], lr=1e-2)
    lw_opt = gm.GaLoreMini([{"params": [l.weight for l in lw.layers], "rank": 2, "update_proj_gap": 1},
                            {"params": [lw.embed.weight] + [l.bias for l in lw.layers]}], lr=1e-2)
    for i, ids in enumerate(data):
        (ref(ids) / 2).backward()
        if i % 2:
            ref_opt.step()
            ref_opt.zero_grad()
    handle = layerwise(lw, lw_opt, accumulation_steps=2)
    for ids in data:
        (lw(ids) / 2).backward()
    assert handle.step_count == 3
    _assert_same(ref, lw)


@pytest.mark.parametrize("bucket_bytes", [0, 20_000])
def test_grads_freed_keep_peak_memory_low(bucket_bytes):
    """Gradients are freed as soon as their bucket is stepped: never more than `bucket_bytes` of them alive
    (bucket_bytes=0: each is gone right after its own update)."""
    model = tiny_llama(layers=4)
    opt = _make("galore_mini", model)
    alive_bytes, calls = [], []
    inner = opt.step_params
    opt.step_params = lambda params: (calls.append(len(params)), inner(params))

    def spy(p):
        alive_bytes.append(sum(q.grad.numel() * q.grad.element_size() for q in model.parameters()
                               if q.grad is not None))

    handle = layerwise(model, opt, bucket_bytes=bucket_bytes)
    hooks = [p.register_post_accumulate_grad_hook(spy) for p in model.parameters()]  # runs after ours
    ids = _micro_batches(1, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    n = len(list(model.parameters()))
    assert len(alive_bytes) == n and sum(calls) == n
    assert max(alive_bytes) < max(bucket_bytes, 1)
    assert all(p.grad is None for p in model.parameters())
    if bucket_bytes:
        assert len(calls) < n / 2  # batched: far fewer host syncs than parameters
    for h in hooks:
        h.remove()
    handle.remove()


@pytest.mark.parametrize("method", METHODS)
def test_bucket_size_does_not_change_the_result(method):
    """One parameter at a time, small buckets, or the whole model in one bucket: bit-identical training."""
    data = _micro_batches(4, 2)
    results = []
    for bucket_bytes in (0, 5_000, 1 << 40):
        model = tiny_llama()
        handle = layerwise(model, _make(method, model), accumulation_steps=2, max_grad_norm=0.5,
                           bucket_bytes=bucket_bytes)
        _layerwise(model, handle, data, 2)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_bucket_bytes_is_validated():
    model = tiny_llama()
    with pytest.raises(UsageError, match="bucket_bytes"):
        layerwise(model, _make("galore_mini", model), bucket_bytes=-1)


def test_state_dict_round_trip_resumes_exactly():
    data = _micro_batches(6, 1)
    model = tiny_llama()
    opt = _make("galore_mini", model, gap=2)
    handle = layerwise(model, opt, max_grad_norm=0.5)
    _layerwise(model, handle, data[:3], 1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": handle.state_dict()}, buffer)
    _layerwise(model, handle, data[3:], 1)
    expected = copy.deepcopy(model)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = tiny_llama()
    model2.load_state_dict(saved["model"])
    opt2 = _make("galore_mini", model2, gap=2)
    handle2 = layerwise(model2, opt2, max_grad_norm=0.5)
    handle2.load_state_dict(saved["opt"])
    assert handle2.step_count == 3
    _layerwise(model2, handle2, data[3:], 1)
    _assert_same(expected, model2)
    opt3 = _make("galore_mini", tiny_llama(), gap=2)
    opt3.load_state_dict(saved["opt"])  # a plain optimizer reads the checkpoint too


# -- clipping ---------------------------------------------------------------------------------


def _clip_run(scales, max_norm, seed=0):
    """Layer-wise with clipping; returns per step (true grads, grads the optimizer saw)."""
    model = tiny_llama(seed=seed)
    opt = _make("galore_mini", model)
    seen = {}
    inner = opt.step_params

    def recording_step_params(params):
        for p in params:
            seen[id(p)] = p.grad.detach().clone()
        inner(params)

    opt.step_params = recording_step_params
    reference = copy.deepcopy(model)
    handle = layerwise(model, opt, max_grad_norm=max_norm)
    data = _micro_batches(len(scales), 1)
    records = []
    for scale, ids in zip(scales, data):
        # the true gradient of this step, from an identical model copy
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        (scale * reference(input_ids=ids, labels=ids).loss).backward()
        true = {id(p): q.grad.clone() for p, q in zip(model.parameters(), reference.parameters())}
        seen.clear()
        (scale * model(input_ids=ids, labels=ids).loss).backward()
        records.append((true, dict(seen), handle.last_grad_norm))
    return [p for p in model.parameters()], records


def _norm(grads):
    return float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads.values())))


def test_clipping_bounds_the_update_as_documented():
    max_norm = 0.3
    scales = [1.0, 1.0, 8.0, 8.0, 0.5, 0.05, 0.05, 30.0]  # steady, spike, fall, tiny, spike again
    _, records = _clip_run(scales, max_norm)
    prev = None
    for step, (true, seen, last_norm) in enumerate(records):
        n_true = _norm(true)
        assert float(last_norm) == pytest.approx(n_true, rel=1e-4), "last_grad_norm is the true global norm"
        assert set(seen) == set(true)
        for key, g in true.items():
            h = seen[key]
            coef = float(h.norm() / g.norm())
            # 1. a scaled copy, never amplified
            torch.testing.assert_close(h, g * coef, rtol=1e-4, atol=1e-7)
            assert 0.0 < coef <= 1.0 + 1e-6
            # 2. every tensor within max_norm
            assert float(h.norm()) <= max_norm * (1 + 1e-5)
        n_seen = _norm(seen)
        # 3. global bound: max_norm · max(1, N / N_prev)
        bound = max_norm * (max(1.0, n_true / prev) if prev is not None else float("inf"))
        assert n_seen <= min(bound, n_true) * (1 + 1e-5), (step, n_seen, bound)
        if prev is not None and n_true <= prev:
            assert n_seen <= max_norm * (1 + 1e-5)
        prev = n_true


def test_clipping_is_inactive_below_the_threshold():
    _, records = _clip_run([1.0, 1.0, 1.0], max_norm=1e6)
    for true, seen, _ in records:
        for key, g in true.items():
            torch.testing.assert_close(seen[key], g, rtol=1e-6, atol=0)


def test_nonfinite_gradient_does_not_poison_other_tensors_or_next_step():
    model = tiny_llama()
    opt = _make("galore_mini", model)
    handle = layerwise(model, opt, max_grad_norm=1.0)
    bad = model.model.layers[0].mlp.up_proj.weight
    poison = bad.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _micro_batches(1, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    poison.remove()
    assert opt.nonfinite_skips == 1
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before) - 1
    assert torch.isfinite(handle.last_grad_norm) and torch.isfinite(handle._prev_norm)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_handle_repr_and_context_manager():
    model = tiny_llama()
    opt = _make("galore_mini", model)
    with layerwise(model, opt, accumulation_steps=2, max_grad_norm=1.0) as handle:
        assert isinstance(handle, LayerwiseUpdates) and "accumulation_steps=2" in repr(handle)
    assert layerwise(model, opt) is not None  # removed on exit, so a new handle may be made
