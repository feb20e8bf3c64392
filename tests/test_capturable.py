"""capturable=True: the sync-free step against the foreach=False reference, and under torch.compile."""

import copy
import io
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import galore_mini as gm
from conftest import tiny_llama
from galore_mini.errors import UsageError

CONFIGS = {
    "galore_mini": ("galore_mini", {}),
    "galore_mini_full_project_decay": ("galore_mini", {"proj_type": "full", "moment_policy": "project",
                                                       "weight_decay": 0.1, "proj_method": "svd"}),
    "galore_mini_reset_stagger_bf16_proj": ("galore_mini", {"moment_policy": "reset", "stagger_refresh": True,
                                                             "proj_dtype": "bf16"}),
    "adam_mini_decay": ("adam_mini", {"weight_decay": 0.1}),
    "galore_adamw": ("galore", {}),
    "galore_adamw_no_bias_correction_decay_left": ("galore", {"correct_bias": False, "weight_decay": 0.1,
                                                              "proj_type": "left"}),
}
POISON = "model.layers.0.mlp.up_proj.weight"


def _build(method, options, capturable, gap=3, model_dtype=torch.float32, lr=1e-2):
    model = tiny_llama(hidden=32, intermediate=64).to(model_dtype)
    kwargs = dict(lr=lr, **options)
    if method != "adam_mini":
        kwargs.update(rank=8, update_proj_gap=gap)
    if capturable:
        kwargs["capturable"] = True
    else:
        kwargs["foreach"] = False
    return model, gm.create_optimizer(model, method, **kwargs)


def _train(model, opt, steps=6, poison_at=None, poison=POISON, gen=None):
    """`steps` updates from the same synthetic gradients whatever the weights (so both paths see equal
    inputs: through a model, fp32 round-off in the weights would reach tiny gradients that Adam's small
    eps magnifies). Rows span eight decades, as embedding and output rows do."""
    gen = gen or torch.Generator().manual_seed(7)
    for i in range(steps):
        for name, p in model.named_parameters():
            rows = torch.logspace(-7, 0, p.shape[0], dtype=torch.float64).float()
            g = torch.randn(p.shape, generator=gen) * rows.reshape((-1,) + (1,) * (p.dim() - 1))
            p.grad = g.to(p.dtype)
        if i == poison_at:
            dict(model.named_parameters())[poison].grad.view(-1)[5] = float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)


def _max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_capturable_step_equals_reference(config):
    """Six steps with refreshes at 1 and 4: weights and moments within fp32 round-off of the reference
    (a wrong bias correction or a missed refresh moves them by ~1e-3)."""
    method, options = CONFIGS[config]
    (fast, fast_opt), (ref, ref_opt) = (_build(method, options, c) for c in (True, False))
    _train(fast, fast_opt)
    _train(ref, ref_opt)
    assert _max_diff(fast, ref) < 2e-6
    for p, q in zip(fast.parameters(), ref.parameters()):
        s, r = fast_opt.state[p], ref_opt.state[q]
        assert float(s["step"]) == float(r["step"]) == 6 and s["step"].device == p.device
        if "host_step" in s:
            assert int(s["host_step"]) == 6 and torch.equal(s["refresh"], r["refresh"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[key], r[key], rtol=1e-4, atol=1e-5 * float(r[key].abs().max()))


@pytest.mark.parametrize("method", ["galore_mini", "galore", "adam_mini"])
def test_skip_on_device_equals_reference_skip(method):
    """A NaN gradient between refreshes: the parameter and its state are left exactly as they were, the
    count is the reference's, and the run continues in step with the reference."""
    (fast, fast_opt), (ref, ref_opt) = (_build(method, {}, c, gap=50) for c in (True, False))
    gen = torch.Generator().manual_seed(7)
    _train(fast, fast_opt, steps=2, gen=gen)
    before = {k: v.clone() for k, v in fast_opt.state[dict(fast.named_parameters())[POISON]].items()}
    weight_before = dict(fast.named_parameters())[POISON].detach().clone()
    _train(fast, fast_opt, steps=1, poison_at=0, gen=gen)
    p = dict(fast.named_parameters())[POISON]
    assert torch.equal(p, weight_before)
    state = fast_opt.state[p]
    for key, value in before.items():
        if key == "host_step":
            assert int(state[key]) == int(value) + 1  # the host clock counts calls, skipped or not
        else:
            assert torch.equal(state[key], value), key
    assert fast_opt.nonfinite_skips == 1
    fast_opt.nonfinite_skips = 0
    assert fast_opt.nonfinite_skips == 0
    # the same poisoned run on both paths stays together
    (fast, fast_opt), (ref, ref_opt) = (_build(method, {}, c, gap=50) for c in (True, False))
    _train(fast, fast_opt, poison_at=2)
    _train(ref, ref_opt, poison_at=2)
    assert fast_opt.nonfinite_skips == ref_opt.nonfinite_skips == 1
    assert _max_diff(fast, ref) < 2e-6


def test_nonfinite_off_and_bf16_weights():
    (fast, fast_opt), (ref, ref_opt) = (_build("galore_mini", {"nonfinite": "off"}, c, model_dtype=torch.bfloat16)
                                        for c in (True, False))
    _train(fast, fast_opt, steps=4)
    _train(ref, ref_opt, steps=4)
    # bf16 weights: one bf16 rounding of the same update; differences are at most a few ulps
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2 ** -6, atol=1e-4)


def test_checkpoint_resumes_exactly_and_converts_between_modes():
    straight, straight_opt = _build("galore_mini", {}, True)
    _train(straight, straight_opt, steps=6, poison_at=1)
    first, first_opt = _build("galore_mini", {}, True)
    gen = torch.Generator().manual_seed(7)
    _train(first, first_opt, steps=3, poison_at=1, gen=gen)
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    saved_model = copy.deepcopy(first.state_dict())
    second, second_opt = _build("galore_mini", {}, True)
    second.load_state_dict(saved_model)
    buffer.seek(0)
    second_opt.load_state_dict(torch.load(buffer, weights_only=True))
    _train(second, second_opt, steps=3, gen=gen)
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
    # into the reference path: the host clock goes, the due step moves back by the skipped update
    ref, ref_opt = _build("galore_mini", {}, False)
    buffer.seek(0)
    ref_opt.load_state_dict(torch.load(buffer, weights_only=True))
    p = dict(ref.named_parameters())[POISON]
    assert "host_step" not in ref_opt.state[p] and int(ref_opt.state[p]["step"]) == 2
    assert int(ref_opt.state[p]["refresh"][0]) == 3 and ref_opt.state[p]["step"].device.type == "cpu"
    # and back: a reference checkpoint starts the clock at the step count
    back, back_opt = _build("galore_mini", {}, True)
    back_opt.load_state_dict(ref_opt.state_dict())
    assert int(back_opt.state[dict(back.named_parameters())[POISON]]["host_step"]) == 2


@pytest.mark.parametrize("cls, kwargs, match", [
    (gm.GaLoreMini, {"moment_bits": 8}, "8-bit"),
    (gm.GaLoreMini, {"approach": 1}, "approach=1"),
    (gm.GaLoreMini, {"approach": 2}, "approach=2"),
    (gm.GaLoreMini, {"state_dtype": "bf16"}, "state_dtype"),
    (gm.GaLoreMini, {"foreach": False}, "foreach=False"),
    (gm.AdamMini, {"nonfinite": "raise"}, "nonfinite='raise'"),
    (gm.GaLoreAdamW, {"capturable": "yes"}, "capturable='yes'"),
    (gm.GaLoreAdamW8bit, {}, "capturable"),
    (gm.GaLoreAdafactor, {}, "capturable"),
])
def test_unsupported_configurations_are_refused(cls, kwargs, match):
    w = torch.nn.Parameter(torch.randn(16, 24))
    group = {"params": [w]} if cls is gm.AdamMini else {"params": [w], "rank": 4}
    options = {"capturable": True, **kwargs}
    with pytest.raises(UsageError, match=match):
        cls([group], **options)


def test_layerwise_and_compile_set_capturable_fall_back_clearly():
    w = torch.nn.Parameter(torch.randn(16, 24))
    opt = gm.GaLoreMini([{"params": [w], "rank": 4}], capturable=True)
    w.grad = torch.randn_like(w)
    with pytest.raises(UsageError, match="step_params"):
        opt.step_params([w])
    # torch.compile sets group["capturable"] = True on CUDA groups by itself; an unsupported one falls back
    ablation = gm.GaLoreMini([{"params": [w], "rank": 4}], approach=1)
    ablation.param_groups[0]["capturable"] = True
    with pytest.warns(UserWarning, match="approach=1"):
        ablation.step()
    assert ablation.state[w]["step"].device.type == "cpu" and "host_step" not in ablation.state[w]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ablation.step()  # once only


# -- torch.compile -------------------------------------------------------------------------------


def _small(cls, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
    w1, b1, w2, b2 = model.parameters()
    if cls is gm.AdamMini:
        groups = [{"params": [w1, w2], "block": "rows"}, {"params": [b1, b2]}]
    else:
        groups = [{"params": [w1, w2], "rank": 4, "update_proj_gap": 3}, {"params": [b1, b2]}]
    return model, cls(groups, lr=torch.tensor(1e-2), capturable=True, weight_decay=0.1, **options)


def _data(n=7):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 16, generator=gen), torch.randn(5, 8, generator=gen)) for _ in range(n)]


def _backward(model, x, y):
    ((model(x) - y) ** 2).mean().backward()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("cls", [gm.GaLoreMini, gm.GaLoreAdamW, gm.AdamMini])
def test_step_compiles_to_one_graph_without_recompiles(cls):
    """0 graph breaks (as torch's AdamW); steps 1-7 (refreshes at 1, 4, 7, a NaN at 5, the lr changed by a
    scheduler) reuse one graph; the result is the eager capturable step's to fp32 round-off."""
    model, opt = _small(cls)
    data = _data()
    _backward(model, *data[0])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: opt.step())()  # noqa: PLW0108 -- explain needs a function
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model, opt = _small(cls)
    eager_model, eager_opt = _small(cls)
    compiled = torch.compile(opt.step, backend="eager", fullgraph=True)
    # after compiling: a scheduler wraps opt.step in a function dynamo will not trace (torch's own rule);
    # the compiled bound method bypasses that wrapper, so the scheduler warns about the call order
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in (opt, eager_opt)]
    torch._dynamo.reset()
    counters.clear()
    for i, (x, y) in enumerate(data):
        for m, step in ((model, compiled), (eager_model, eager_opt.step)):
            _backward(m, x, y)
            if i == 4:
                m[2].bias.grad[0] = float("nan")
            step()
        for o, s in zip((opt, eager_opt), schedulers):
            o.zero_grad(set_to_none=True)
            s.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    assert opt.nonfinite_skips == eager_opt.nonfinite_skips == 1
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_inductor_step_equals_eager(monkeypatch):
    """Inductor's generated C++ (CPU) against the eager capturable step, across a refresh (step 4)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool for one small graph
    model, opt = _small(gm.GaLoreMini)
    eager_model, eager_opt = _small(gm.GaLoreMini)
    compiled = torch.compile(opt.step, fullgraph=True)  # inductor
    torch._dynamo.reset()
    for x, y in _data(4):
        for m, step, o in ((model, compiled, opt), (eager_model, eager_opt.step, eager_opt)):
            _backward(m, x, y)
            step()
            o.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_training_step_breaks_only_where_torch_adamw_does():
    """Forward, backward and step under one torch.compile: the optimizer adds no graph and no break
    beyond torch's own (``Tensor.backward`` breaks the graph for torch.optim.AdamW alike)."""
    def graphs(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
        opt = make_opt(model)

        def train_step(x, y):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        torch._dynamo.reset()
        x, y = _data(1)[0]
        explained = torch._dynamo.explain(train_step)(x, y)
        return explained.graph_count, explained.graph_break_count, model, opt, train_step

    adamw = graphs(lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-2)))
    ours = graphs(lambda m: gm.GaLoreMini([{"params": [m[0].weight, m[2].weight], "rank": 4, "update_proj_gap": 2},
                                           {"params": [m[0].bias, m[2].bias]}], lr=torch.tensor(1e-2),
                                          capturable=True))
    assert ours[:2] == adamw[:2]
    _, _, model, opt, train_step = ours
    opt.zero_grad(set_to_none=True)  # explain ran one step
    eager_model = copy.deepcopy(model)
    eager_opt = gm.GaLoreMini([{"params": [eager_model[0].weight, eager_model[2].weight], "rank": 4,
                                "update_proj_gap": 2}, {"params": [eager_model[0].bias, eager_model[2].bias]}],
                              lr=torch.tensor(1e-2), capturable=True)
    eager_opt.load_state_dict(opt.state_dict())
    compiled = torch.compile(train_step, backend="eager")
    counters.clear()
    for x, y in _data(4):
        compiled(x, y)
        opt.zero_grad(set_to_none=True)
        ((eager_model(x) - y) ** 2).mean().backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)
    assert not counters["recompiles"]
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_the_steady_step():
    """The README recipe: warm up eagerly (step 1 refreshes), capture ``step()`` (capture records the device
    half only), then per step ``host_phase()`` (clocks, refreshes) and ``replay()``."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 96, device="cuda"))
    ref = torch.nn.Parameter(w.detach().clone())
    opts = [gm.GaLoreMini([{"params": [p], "rank": 8, "update_proj_gap": 100}], lr=torch.tensor(1e-2, device="cuda"),
                          capturable=True) for p in (w, ref)]
    grads = [torch.randn(64, 96, device="cuda") for _ in range(6)]
    for p, o in zip((w, ref), opts):  # warm-up on a side stream, as torch.cuda.graphs asks; step 1 refreshes
        p.grad = grads[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            o.step()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    w.grad = grads[1].clone()
    with torch.cuda.graph(graph):
        opts[0].step()
    for g in grads[1:]:
        w.grad.copy_(g)
        opts[0].host_phase()
        graph.replay()
        ref.grad = g.clone()
        opts[1].step()
    torch.cuda.synchronize()
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
