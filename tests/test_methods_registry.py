"""The methods registry carries each method's behaviour: the model it trains, its optimizer, its step hooks.

Every test goes through the entries' own calls (``build_model``, ``finetune_model``,
``build_optimizer``, ``step_hooks``), never through a list of method names, so a method added
to the catalog is tested by the parametrised cases here without editing them.
"""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest
import torch

import galore_mini as gm
from galore_mini import methods
from galore_mini.methods import Settings, adapters
from galore_mini.methods.method import NoHooks
from galore_mini.train.loop import TrainConfig, build_training
from conftest import tiny_llama

SRC = Path(__file__).resolve().parents[1] / "src" / "galore_mini"


def _loss(model, seed=0):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_method_builds_steps_and_hooks_through_its_entry(name):
    entry = methods.get(name)
    settings = Settings(rank=4, lr=1e-3, relora_every=2, relora_warmup=1)
    torch.manual_seed(0)
    model = entry.build_model(tiny_llama(), settings)
    optimizer = entry.build_optimizer(model, settings)
    hooks = entry.step_hooks(model, optimizer, settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(2):
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(step)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed, f"{name}: two steps changed no trainable parameter"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert 0.0 <= hooks.lr_factor(3) <= 1.0


@pytest.mark.parametrize("name", methods.OPTIMIZER_METHODS)
def test_optimizer_methods_leave_the_model_and_build_create_optimizers_optimizer(name):
    entry = methods.get(name)
    model = tiny_llama()
    settings = Settings(rank=4, lr=2e-3, scale=0.5, update_proj_gap=7, weight_decay=0.1)
    assert entry.build_model(model, settings) is model
    optimizer = entry.build_optimizer(model, settings)
    reference = gm.create_optimizer(tiny_llama(), name, lr=2e-3, rank=4, scale=0.5, update_proj_gap=7,
                                    weight_decay=0.1)
    assert type(optimizer) is type(reference)
    strip = {"params"}
    assert [{k: v for k, v in g.items() if k not in strip} for g in optimizer.param_groups] == \
        [{k: v for k, v in g.items() if k not in strip} for g in reference.param_groups]
    hooks = entry.step_hooks(model, optimizer, settings)
    assert isinstance(hooks, NoHooks) and hooks.lr_factor(10) == 1.0 and hooks.after_step(10) is False


@pytest.mark.parametrize("name", methods.ADAPTER_METHODS)
def test_adapter_methods_train_what_is_trainable_with_torch_adamw(name):
    entry = methods.get(name)
    model = entry.build_model(tiny_llama(), Settings(rank=4))
    optimizer = entry.build_optimizer(model, Settings(rank=4, lr=5e-4, weight_decay=0.01, betas=(0.8, 0.9)))
    assert type(optimizer) is torch.optim.AdamW and entry.optimizer == "AdamW"
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (5e-4, 0.01, (0.8, 0.9))
    # the adapted matrices are frozen or replaced: fewer parameters train than in the full model
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < \
        sum(p.numel() for p in tiny_llama().parameters())


def test_relora_hooks_restart_and_ramp_as_configured():
    entry = methods.get("relora")
    settings = Settings(rank=4, lr=1e-3, lora_dropout=0.0, relora_every=4, relora_warmup=3, relora_prune=1.0)
    model = entry.build_model(tiny_llama(), settings)
    optimizer = entry.build_optimizer(model, settings)
    hooks = entry.step_hooks(model, optimizer, settings)
    assert isinstance(hooks, adapters.ReLoRA)
    assert (hooks.reset_every, hooks.restart_warmup, hooks.prune) == (4, 3, 1.0)
    assert [hooks.lr_factor(s) for s in range(8)] == [1.0, 1.0, 1.0, 1.0, 0.25, 0.5, 0.75, 1.0]
    layer = adapters.lora_layers(model)[0]
    for step in range(4):
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert hooks.after_step(step) is (step == 3)
    # after the restart B is zero again and prune=1 zeroed its moments
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(optimizer.state[layer.lora_B["default"].weight]["exp_avg"]) == 0


def test_one_lora_alpha_pretraining_and_the_fine_tuning_recipe():
    lora = methods.get("lora")
    pretrain = lora.build_model(tiny_llama(), Settings(rank=4))
    config = pretrain.peft_config["default"]
    assert (config.lora_alpha, config.lora_dropout) == (methods.LORA_ALPHA, methods.LORA_DROPOUT) == (32, 0.05)
    recipe = lora.finetune_settings(8, targets=["model.layers.0.self_attn.q_proj"])
    tuned = lora.finetune_model(tiny_llama(), recipe)
    config = tuned.peft_config["default"]
    assert (config.lora_alpha, config.lora_dropout, config.r) == (16.0, 0.0, 8)
    assert sorted(config.target_modules) == ["model.layers.0.self_attn.q_proj"]
    assert recipe.lr == lora.finetune_lr == 1e-3


@pytest.mark.parametrize("name,scale", [("galore", 16 / 8), ("galore_mini", 4 / 8)])
def test_fine_tuning_recipe_scale_and_overrides(name, scale):
    entry = methods.get(name)
    recipe = entry.finetune_settings(8)
    assert (recipe.scale, recipe.lr, recipe.update_proj_gap) == (scale, entry.finetune_lr, methods.FINETUNE_GAP)
    given = entry.finetune_settings(8, lr=0.5, scale=0.125, update_proj_gap=10)
    assert (given.scale, given.lr, given.update_proj_gap) == (0.125, 0.5, 10)


def test_fine_tuning_freezes_embeddings_for_ranked_methods_only():
    for name in methods.FINETUNE_METHODS:
        entry = methods.get(name)
        model = tiny_llama()
        settings = entry.finetune_settings(4, targets=[n for n, _ in adapters.adapted_modules(model)],
                                           freeze_embeddings=True)
        built = entry.finetune_model(model, settings)
        assert built.get_input_embeddings().weight.requires_grad is not entry.ranked, name


def test_the_pretraining_loop_takes_its_hooks_from_the_entry(tmp_path):
    for name, kind in (("relora", adapters.ReLoRA), ("galore_mini", NoHooks), ("lora", NoHooks)):
        config = TrainConfig(model="tiny", method=name, steps=8, out=str(tmp_path / name), device="cpu")
        model, optimizer, hooks = build_training(config, 256, torch.device("cpu"))
        assert isinstance(hooks, kind)
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
            {id(p) for p in model.parameters() if p.requires_grad}


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(methods.get("lora"))


def test_the_lookup_sits_below_the_optimizer_layer():
    """registry.py imports only the errors module, so create_optimizer can read it without a cycle."""
    tree = ast.parse((SRC / "methods" / "registry.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                and node.module.startswith("galore_mini")}
    assert imported <= {"galore_mini.errors", "galore_mini.methods.method"}  # the latter for annotations only
    from galore_mini.methods import registry

    assert registry.OPTIMIZER_METHODS == methods.OPTIMIZER_METHODS and registry.METHODS == methods.METHODS


@pytest.mark.parametrize("name", ["galore_mini.methods", "galore_mini.methods.registry", "galore_mini.methods.method"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
