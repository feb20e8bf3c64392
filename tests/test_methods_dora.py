"""DoRA, added as one registry entry: it trains, its magnitudes are real trainable vectors, and the memory
estimator counts its state as a live optimizer allocates it (pretraining and fine-tuning)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from galore_mini import methods
from galore_mini.memory import estimate, measure
from galore_mini.memory.finetune import estimate_finetune, measure_finetune
from galore_mini.methods import Settings, adapters
from galore_mini.models import build_model
from galore_mini.train.finetune import FinetuneConfig, run_finetune
from galore_mini.train.loop import read_metrics, train
from conftest import tiny_llama
from pretrain_fixtures import small_config
from test_finetune import write_task
from test_memory_finetune import llama, roberta  # grouped-query attention; biases and LayerNorms

DORA = methods.get("dora")


def _magnitudes(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}


def test_dora_is_an_adapter_method_with_fine_tuning_and_pretraining_recipes():
    assert DORA.kind == "adapter" and DORA.ranked and "dora" in methods.ADAPTER_METHODS
    assert "dora" in methods.FINETUNE_METHODS and DORA.finetune_lr is not None and DORA.default_lr > 0


def test_dora_learns_and_trains_one_magnitude_per_output_row_of_every_adapted_matrix():
    torch.manual_seed(0)
    settings = Settings(rank=4, lr=1e-2, lora_dropout=0.0)
    base = tiny_llama()
    rows = {name: module.weight.shape[0] for name, module in adapters.projected_linears(base)}
    model = DORA.build_model(base, settings)
    optimizer = DORA.build_optimizer(model, settings)
    magnitudes = _magnitudes(model)
    assert len(magnitudes) == len(rows) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers
    for name, p in magnitudes.items():
        module = name.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
        assert p.shape == (rows[module],) and p.requires_grad and p.dtype == torch.float32
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in stepped for p in magnitudes.values())
    start = {n: p.detach().clone() for n, p in magnitudes.items()}
    data = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    losses = []
    for step in range(30):
        ids = data[step % 2]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[0] > 4.5 and min(losses[-5:]) < 0.5 * losses[0], losses[::5]  # ln(128) = 4.85 at start
    assert all(not torch.equal(start[n], p) for n, p in magnitudes.items())  # every magnitude was trained


@pytest.mark.parametrize("name,dtype", [("tiny", "fp32"), ("tiny", "bf16")])
def test_estimate_equals_one_measured_dora_step(name, dtype):
    model = build_model(name, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    got = measure(model, "dora", rank=16)
    est = estimate(name, "dora", rank=16, dtype=dtype)
    assert got["measured_optimizer_by_key"] == est.optimizer_by_key
    assert got["measured_optimizer_bytes"] == est.optimizer_bytes
    assert got["measured_weights_bytes"] == est.weights_bytes
    assert got["measured_gradient_bytes"] == est.gradient_bytes
    assert got["measured_params"] == est.params


def test_dora_is_lora_plus_a_magnitude_per_row_by_hand_at_llama_7b():
    h, i, layers, r = 4096, 11008, 32, 1024
    rows = layers * (4 * h + 2 * i + h)  # output rows of q, k, v, o, gate, up, down
    lora = estimate("llama_7b", "lora", rank=r, dtype="bf16")
    dora = estimate("llama_7b", "dora", rank=r, dtype="bf16")
    assert dora.params - lora.params == dora.trainable_params - lora.trainable_params == rows
    assert dora.weights_bytes - lora.weights_bytes == dora.gradient_bytes - lora.gradient_bytes == 4 * rows
    # AdamW: two fp32 moments per magnitude entry and one 4-byte step per magnitude vector
    assert dora.optimizer_bytes - lora.optimizer_bytes == 2 * 4 * rows + 4 * 7 * layers


@pytest.mark.parametrize("make", [llama, roberta])
@pytest.mark.parametrize("freeze", [False, True])
def test_fine_tuning_estimate_equals_one_measured_dora_step(make, freeze):
    est = estimate_finetune(make(), "dora", rank=4, num_labels=3, freeze_embeddings=freeze)
    est.measured = measure_finetune(make(), "dora", rank=4, num_labels=3, freeze_embeddings=freeze)
    assert est.matches_measurement(), (est.optimizer_bytes, est.measured)
    lora = estimate_finetune(make(), "lora", rank=4, num_labels=3, freeze_embeddings=freeze)
    assert est.trainable_params > lora.trainable_params and est.optimizer_bytes > lora.optimizer_bytes


def test_a_dora_pretraining_run_learns_and_reports_the_estimated_state(tmp_path):
    config = small_config(tmp_path, method="dora", steps=12, eval_every=0, save_every=0)
    result = train(config)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < losses[0], losses
    est = estimate(config.model, "dora", rank=8, dtype="fp32", vocab_size=300)
    assert result["optimizer_bytes"] == est.optimizer_bytes and result["weights_bytes"] == est.weights_bytes
    assert json.loads((tmp_path / "run" / "final.json").read_text())["method"] == "dora"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    config = small_config(tmp)
    train(config)
    return config.out, write_task(tmp / "task.jsonl")


def test_dora_fine_tunes_beside_lora_and_its_state_is_the_estimate(pretrained, tmp_path):
    run, task = pretrained
    config = FinetuneConfig(model=run, task=str(task), methods=("lora", "dora"), rank=4, epochs=2,
                            lr={"lora": 1e-2, "dora": 1e-2}, out=str(tmp_path / "ft"), progress=False, device="cpu")
    by = {r["method"]: r for r in run_finetune(config, log=lambda m: None)}
    assert by["dora"]["score"] >= 75.0, by["dora"]["epoch_scores"]  # chance is 50
    est = estimate_finetune(run, "dora", rank=4, num_labels=2)
    assert by["dora"]["optimizer_state_bytes"] == est.optimizer_bytes
    assert by["dora"]["trainable_params"] == est.trainable_params
    # the same adapters as LoRA, plus one magnitude per output row of each adapted matrix
    rows = sum(shape[0] for _, shape in methods.check_targets(_classifier(run), ["dora"], 4))
    assert by["dora"]["trainable_params"] - by["lora"]["trainable_params"] == rows


def _classifier(run):
    return AutoModelForSequenceClassification.from_pretrained(run, num_labels=2)


def test_the_adding_a_method_page_example_runs():
    page = (Path(__file__).parents[1] / "docs" / "adding-a-method.md").read_text()
    example = re.search(r"The same calls the harness makes.*?```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "adding-a-method.md", "exec"), namespace)  # its asserts check the state and magnitudes
    assert len(namespace["magnitudes"]) == 28 and namespace["state"] > 0
