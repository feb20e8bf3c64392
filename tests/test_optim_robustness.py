"""Optimizer misuse ends in a clear error that changes nothing, and torch.compile of a default optimizer's
step works: refused checkpoints leave the optimizer as it was, a checkpoint of another optimizer class
names both classes, compiling after an eager step equals the eager step, and create_optimizer suggests
the option a typo meant."""

import copy
import itertools
import pickle

import pytest
import torch
from torch._dynamo.utils import counters

import galore_mini as gm
from conftest import batches, tiny_llama

# one method per optimizer class built on the base
CLASS_METHODS = {"GaLoreAdamW": "galore", "GaLoreAdamW8bit": "galore_8bit", "GaLoreAdafactor": "galore_adafactor",
                 "AdamMini": "adam_mini", "GaLoreMini": "galore_mini"}


def _trained(method, lr=1e-2, intermediate=64, steps=1, **options):
    model = tiny_llama(intermediate=intermediate)
    opt = gm.create_optimizer(model, method, lr=lr, rank=4, update_proj_gap=2, **options)
    for ids in batches(vocab=128, n=steps, batch=2, seq=8):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(opt):
    return [dict(group, params=None) for group in opt.param_groups], {
        id(p): {k: v.clone() for k, v in state.items()} for p, state in opt.state.items()}


def _assert_same(opt, snapshot):
    groups, states = snapshot
    assert [dict(group, params=None) for group in opt.param_groups] == groups
    assert {id(p) for p in opt.state} == set(states)
    for p, state in opt.state.items():
        assert state.keys() == states[id(p)].keys()
        for key, value in state.items():
            assert torch.equal(value, states[id(p)][key]), key


@pytest.mark.parametrize("method", ["galore_mini", "galore", "adam_mini"])
def test_refused_load_state_dict_changes_nothing(method):
    """A checkpoint of a model with a wider MLP is refused before the lr or any state entry changes, and
    the next step is the one the optimizer would have taken anyway."""
    model, opt = _trained(method, lr=0.01)
    _, other = _trained(method, lr=0.5, intermediate=96)
    twin_model, twin = _trained(method, lr=0.01)
    snapshot = _snapshot(opt)
    with pytest.raises(gm.UsageError, match="shape"):
        opt.load_state_dict(other.state_dict())
    _assert_same(opt, snapshot)
    ids = batches(vocab=128, n=1, batch=2, seq=8, seed=7)[0]
    for m, o in ((model, opt), (twin_model, twin)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_refused_structure_changes_nothing():
    """A checkpoint saved with another rank is refused with nothing changed (the option check runs first)."""
    _, opt = _trained("galore_mini")
    model = tiny_llama()
    other = gm.create_optimizer(model, "galore_mini", lr=0.5, rank=8)
    ids = batches(vocab=128, n=1, batch=2, seq=8)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    other.step()
    snapshot = _snapshot(opt)
    with pytest.raises(gm.UsageError, match="rank=8"):
        opt.load_state_dict(other.state_dict())
    _assert_same(opt, snapshot)


@pytest.mark.parametrize("saved, loading", list(itertools.permutations(CLASS_METHODS, 2)))
def test_checkpoint_of_another_optimizer_class_names_both(saved, loading):
    _, source = _trained(CLASS_METHODS[saved])
    _, target = _trained(CLASS_METHODS[loading], lr=0.5)
    snapshot = _snapshot(target)
    with pytest.raises(gm.UsageError) as error:
        target.load_state_dict(source.state_dict())
    message = str(error.value)
    assert f"saved by {saved}, not {loading}" in message and "\n" not in message
    _assert_same(target, snapshot)


@pytest.mark.parametrize("cls", [gm.GaLoreMini, gm.GaLoreAdamW, gm.AdamMini])
def test_compiled_step_after_eager_steps_equals_eager(cls):
    """Built without capturable=True, stepped eagerly, then stepped through torch.compile (which switches
    the group to its sync-free step): the state is brought to that step's layout (device counter, host
    clock) and every result equals the eager optimizer's to fp32 round-off; one graph, no recompiles,
    across refreshes (gap 2) and a skipped non-finite gradient."""
    def build():
        torch.manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(32, 64)), torch.nn.Parameter(torch.zeros(32))
        first = {"params": [w], "rank": 8, "update_proj_gap": 2} if cls is not gm.AdamMini else {"params": [w]}
        return [w, b], cls([first, {"params": [b]}], lr=1e-2, weight_decay=0.1)

    params, opt = build()
    eager_params, eager = build()
    gen = torch.Generator().manual_seed(3)
    compiled = torch.compile(lambda: opt.step(), backend="eager")  # noqa: PLW0108 -- the issue's recipe
    torch._dynamo.reset()
    counters.clear()
    for i in range(7):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if i == 4:
            grads[1][0] = float("nan")
        for ps in (params, eager_params):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        eager.step()
        if i < 2:
            opt.step()
        else:
            compiled()
        for a, b in zip(params, eager_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert opt.nonfinite_skips == eager.nonfinite_skips == 1
    assert opt.param_groups[0]["capturable"] is True
    # its checkpoint loads into the eager optimizer's mode and the schedule carries on
    resumed = build()[1]
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    if cls is not gm.AdamMini:
        assert torch.equal(resumed.state[resumed.param_groups[0]["params"][0]]["refresh"],
                           eager.state[eager_params[0]]["refresh"])


@pytest.mark.parametrize("typo, meant", [("rnak", "rank"), ("update_proj_gp", "update_proj_gap"),
                                         ("weight_decya", "weight_decay"), ("proj_typ", "proj_type"),
                                         ("target_module", "target_modules")])
def test_create_optimizer_suggests_every_option(typo, meant):
    with pytest.raises(gm.UsageError) as error:
        gm.create_optimizer(tiny_llama(), "galore_mini", **{typo: 4})
    message = str(error.value)
    assert f"{typo!r} (did you mean {meant!r}?)" in message
    options = message.split("its options are ", 1)[1]
    assert "rank" in options.split("; ")[0].split(", ")


def test_unpickled_optimizer_loads_its_own_checkpoint():
    """torch adds `differentiable` to an unpickled optimizer's defaults (Trainer checkpoints do this); that is
    not another optimizer class."""
    _, opt = _trained("galore_mini", steps=2)
    clone = pickle.loads(pickle.dumps(opt))
    assert "differentiable" in clone.defaults
    clone.load_state_dict(opt.state_dict())
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(clone.state_dict()["state"].items())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
