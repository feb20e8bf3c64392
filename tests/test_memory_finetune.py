"""The fine-tuning view of the memory estimate equals what one real fine-tuning step allocates, to the byte."""

from __future__ import annotations

import json

import pytest

from galore_mini.errors import UsageError
from galore_mini.memory.finetune import estimate_finetune, measure_finetune

METHODS = ("full", "lora", "galore", "galore_mini", "adam_mini")


def llama():
    from transformers import LlamaConfig

    # grouped-query attention (k, v narrower than q) and an MLP wider than the hidden size: every side differs
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


def roberta():
    from transformers import RobertaConfig

    # biases everywhere, LayerNorms with biases, position/type embeddings and a two-layer head
    return RobertaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)


@pytest.mark.parametrize("make", [llama, roberta])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("freeze", [False, True])
def test_estimate_equals_one_measured_step(make, method, freeze):
    kwargs = dict(rank=4, num_labels=3, freeze_embeddings=freeze)
    est = estimate_finetune(make(), method, **kwargs)
    est.measured = measure_finetune(make(), method, **kwargs)
    assert est.measured["measured_optimizer_bytes"] > 0
    assert est.matches_measurement(), (est.optimizer_bytes, est.measured)
    assert sum(est.optimizer_parts.values()) == est.optimizer_bytes == sum(est.optimizer_by_role.values())


def test_lora_by_hand():
    cfg = llama()
    h, i, kv, layers, labels, r = 32, 64, 2 * (32 // 4), 2, 3, 4
    # (out, in) of every target matrix of one block: q, k, v, o, gate, up, down
    targets = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    adapters = layers * sum(r * n + m * r for m, n in targets)  # A: r×in, B: out×r
    embedding, head, norms = cfg.vocab_size * h, labels * h, (2 * layers + 1) * h
    tensors = layers * 2 * len(targets) + 1 + 1 + (2 * layers + 1)  # one step counter per trained tensor
    for freeze, trained in ((False, adapters + embedding + head + norms), (True, adapters + head + norms)):
        est = estimate_finetune(cfg, "lora", rank=r, num_labels=labels, freeze_embeddings=freeze)
        assert est.trainable_params == trained
        assert est.projected_params == adapters
        assert est.optimizer_bytes == trained * 2 * 4 + (tensors - freeze) * 4
        assert est.all_gradient_bytes == 4 * trained
        frozen = layers * sum(m * n for m, n in targets) + (embedding if freeze else 0)
        assert est.params == trained + frozen


def test_regression_head_and_full_by_hand():
    est = estimate_finetune(llama(), "full", rank=4, num_labels=1, regression=True)
    base = estimate_finetune(llama(), "full", rank=4, num_labels=3)
    assert base.params - est.params == 2 * 32  # the head is labels × hidden, without bias
    assert est.optimizer_bytes == 8 * est.params + est.optimizer_by_key["step"]
    assert est.optimizer_by_key["step"] == 4 * (2 * 9 + 3)  # 9 tensors per block, embedding, final norm, head


def test_bad_input(tmp_path):
    with pytest.raises(UsageError, match="num_labels"):
        estimate_finetune(llama(), "full", num_labels=0)
    with pytest.raises(UsageError, match="regression"):
        estimate_finetune(llama(), "full", num_labels=2, regression=True)
    with pytest.raises(UsageError, match="rank=16 is too large"):
        estimate_finetune(llama(), "lora", rank=16)
    with pytest.raises(UsageError, match="not a fine-tuning method"):
        estimate_finetune(llama(), "relora")
    with pytest.raises(UsageError, match="no config.json"):
        estimate_finetune(str(tmp_path), "full")


def test_model_folder_and_cli(tmp_path, capsys):
    from galore_mini.cli import main

    llama().save_pretrained(tmp_path)  # config.json only: the estimate needs no weights
    assert estimate_finetune(str(tmp_path), "galore_mini", rank=4).optimizer_bytes == \
        estimate_finetune(llama(), "galore_mini", rank=4).optimizer_bytes
    assert main(["memory", "--finetune", "--model", str(tmp_path), "--methods", "lora,galore_mini", "--rank", "4",
                 "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["estimates"]
    assert [e["method"] for e in out] == ["lora", "galore_mini"]
    assert all(e["measured_optimizer_bytes"] == e["optimizer_bytes"] for e in out)
    assert main(["memory", "--finetune", "--model", str(tmp_path), "--layerwise"]) == 2
    assert "--layerwise" in capsys.readouterr().err
    assert main(["memory", "--finetune", "--model", str(tmp_path), "--world-size", "2"]) == 2
    assert "--world-size" in capsys.readouterr().err
    assert main(["memory", "--finetune", "--model", str(tmp_path), "--dtype", "bf16"]) == 2
    assert "--dtype" in capsys.readouterr().err


def test_docstring_example():
    import doctest

    import galore_mini.memory.finetune as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
