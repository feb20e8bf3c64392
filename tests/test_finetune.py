"""`galore-mini finetune`: pretrain → export → fine-tune chain, every method learning, resume, bad input, metrics."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from galore_mini.errors import UsageError
from galore_mini.train.finetune import FinetuneConfig, export_pretrained, prepare, run_finetune
from galore_mini.train.loop import train
from galore_mini.train.tasks import (Example, compute_metrics, debian_sections, glue_task, load_task, matthews,
                                     split_examples)
from pretrain_fixtures import WORDS, small_config

LR = {"full": 3e-3, "adam_mini": 3e-3, "galore": 3e-3, "galore_mini": 3e-3, "lora": 1e-2}


def write_task(path: Path, n: int = 240, seed: int = 0, pairs: bool = False) -> Path:
    """Two classes whose texts draw words from two halves of the pretraining vocabulary: learnable in an epoch."""
    rng = random.Random(seed)
    half = len(WORDS) // 2
    rows = []
    for i in range(n):
        label = i % 2
        pool = WORDS[:half] if label == 0 else WORDS[half:]
        row = {"text": " ".join(rng.choice(pool) for _ in range(rng.randint(4, 9))), "label": ["low", "high"][label]}
        if pairs:
            row["text_pair"] = rng.choice(WORDS)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A `galore-mini pretrain` run folder (12 steps on the synthetic corpus) and a task file."""
    tmp = tmp_path_factory.mktemp("pretrain")
    config = small_config(tmp)
    train(config)
    return Path(config.out), write_task(tmp / "task.jsonl")


def config(pretrained, out: Path, **overrides) -> FinetuneConfig:
    run, task = pretrained
    settings = dict(model=str(run), task=str(task), rank=4, epochs=2, out=str(out), progress=False, device="cpu",
                    lr={m: LR[m] for m in overrides.get("methods", ("galore_mini",))}, methods=("galore_mini",))
    settings.update(overrides)
    return FinetuneConfig(**settings)


def test_export_is_hf_loadable_and_equals_the_checkpoint(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from galore_mini.models import model_config
    from transformers import LlamaForCausalLM

    run, _ = pretrained
    export_pretrained(run)
    loaded = AutoModelForCausalLM.from_pretrained(run)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    reference = LlamaForCausalLM(model_config(state["config"]["model"], vocab_size=loaded.config.vocab_size))
    reference.load_state_dict(state["model"])
    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = torch.tensor([tokenizer("the optimizer projects each gradient")["input_ids"]])
    assert torch.equal(loaded(ids).logits, reference.eval()(ids).logits)
    pair = tokenizer("a b", "c")["input_ids"]
    assert tokenizer.pad_token_id in pair  # pairs are joined by the end-of-text token
    mtime = (run / "model.safetensors").stat().st_mtime_ns
    export_pretrained(run)  # same checkpoint: reused, not rewritten
    assert (run / "model.safetensors").stat().st_mtime_ns == mtime


def test_every_method_learns_and_results_schema(pretrained, tmp_path):
    methods = ("full", "lora", "galore", "galore_mini", "adam_mini")
    results = run_finetune(config(pretrained, tmp_path / "ft", methods=methods), log=lambda m: None)
    task = load_task(str(pretrained[1]))
    common = max(task.labels, key=lambda label: sum(e.label == label for e in task.train))
    majority = 100 * sum(e.label == common for e in task.val) / len(task.val)
    on_disk = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert [r["method"] for r in on_disk] == list(methods)
    for r in on_disk:
        for key, kind in (("method", str), ("metric", str), ("score", float), ("accuracy", float),
                          ("trainable_params", int), ("optimizer_state_bytes", int), ("train_seconds", float)):
            assert isinstance(r[key], kind), key
        assert r["peak_memory_bytes"] is None  # CPU: not measured, said so
        assert r["score"] >= 75.0, (r["method"], r["epoch_scores"])  # chance is 50
        assert r["majority_baseline"] == majority
        assert len(r["epoch_scores"]) == 2
    by = {r["method"]: r for r in results}
    # trainable sets: every method trains every parameter but LoRA, which freezes the targets and adds adapters
    total = by["full"]["total_params"]
    for method in ("full", "adam_mini", "galore", "galore_mini"):
        assert by[method]["trainable_params"] == total
    assert by["lora"]["trainable_params"] < total
    # state: AdamW keeps two fp32 moments per trainable parameter (+ step counters)
    assert 8 * by["full"]["trainable_params"] <= by["full"]["optimizer_state_bytes"] < 8 * by["full"]["trainable_params"] + 4096
    assert by["galore_mini"]["optimizer_state_bytes"] < by["galore"]["optimizer_state_bytes"] < by["full"]["optimizer_state_bytes"]
    from galore_mini.memory.finetune import estimate_finetune

    for method in methods:  # the memory estimate's fine-tuning view equals what each run measured
        est = estimate_finetune(str(pretrained[0]), method, rank=4, num_labels=2)
        assert est.optimizer_bytes == by[method]["optimizer_state_bytes"], method
        assert est.trainable_params == by[method]["trainable_params"], method
    table = (tmp_path / "ft" / "results.md").read_text()
    assert f"Majority-class baseline: **{majority:.2f}**" in table and "| GaLore-mini |" in table
    assert (tmp_path / "ft" / "scores.png").stat().st_size > 0
    assert (tmp_path / "ft" / "score_vs_memory.png").stat().st_size > 0


def test_freeze_embeddings_in_the_low_rank_methods(pretrained, tmp_path):
    from galore_mini.memory.finetune import estimate_finetune
    from galore_mini.train.finetune import build_method, state_bytes

    setup = prepare(config(pretrained, tmp_path / "out", freeze_embeddings=True,
                           methods=("full", "lora", "galore", "galore_mini", "adam_mini")))
    for method in ("full", "lora", "galore", "galore_mini", "adam_mini"):
        model, optimizer, _ = build_method(setup, method, seed=0)
        embedding = model.get_input_embeddings().weight
        assert embedding.requires_grad == (method in ("full", "adam_mini")), method
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        head = [p for n, p in model.named_parameters() if "score" in n]
        assert head and all(p.requires_grad and id(p) in trained for p in head), method  # the head: always
        if method == "lora":
            assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("q_proj.base_layer.weight"))
        ids = torch.tensor([setup.train.input_ids[0]])
        model(input_ids=ids, labels=torch.tensor([setup.train.labels[0]])).loss.backward()
        optimizer.step()  # one real step: the state then equals the fine-tuning memory estimate
        assert state_bytes(optimizer) == estimate_finetune(str(pretrained[0]), method, rank=4, num_labels=2,
                                                           freeze_embeddings=True).optimizer_bytes, method
    assert not (tmp_path / "out").exists()


class Stop(Exception):
    pass


@pytest.mark.parametrize("method,layerwise", [("galore_mini", False), ("lora", False), ("galore_mini", True)])
def test_resume_equals_uninterrupted(pretrained, tmp_path, method, layerwise):
    whole = run_finetune(config(pretrained, tmp_path / "a", methods=(method,), layerwise=layerwise),
                         log=lambda m: None)[0]

    def stop(m, seed, epoch):
        raise Stop

    with pytest.raises(Stop):
        run_finetune(config(pretrained, tmp_path / "b", methods=(method,), layerwise=layerwise), on_epoch=stop,
                     log=lambda m: None)
    assert (tmp_path / "b" / "runs" / method / "seed0" / "checkpoint.pt").is_file()
    epochs = []
    resumed = run_finetune(config(pretrained, tmp_path / "b", methods=(method,), layerwise=layerwise),
                           on_epoch=lambda m, s, e: epochs.append(e), log=lambda m: None)[0]
    assert epochs == [2]  # only the second epoch ran again
    for key in ("score", "optimizer_state_bytes", "trainable_params"):
        assert resumed[key] == whole[key]
    strip = [{k: v for k, v in e.items()} for e in whole["runs"][0]["epochs"]]
    assert resumed["runs"][0]["epochs"] == strip  # train loss and scores of both epochs, exactly
    # finished: reused without training
    again = run_finetune(config(pretrained, tmp_path / "b", methods=(method,), layerwise=layerwise),
                         on_epoch=lambda *a: pytest.fail("trained again"), log=lambda m: None)[0]
    assert again["score"] == whole["score"]


def test_changed_settings_are_refused_before_training(pretrained, tmp_path):
    run_finetune(config(pretrained, tmp_path / "ft", epochs=1, methods=("lora",), lr={"lora": 1e-2}),
                 log=lambda m: None)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ft").rglob("*"))
    with pytest.raises(UsageError, match=r"other settings \(rank: 4 there, 2 now"):
        run_finetune(config(pretrained, tmp_path / "ft", epochs=1, rank=2, methods=("full", "lora"),
                            lr={"full": 1e-3, "lora": 1e-2}), log=lambda m: None)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ft").rglob("*")) == before  # full not trained


def test_regression_task_end_to_end(pretrained, tmp_path):
    """STS-B's path: one output, MSE, Pearson/Spearman; the target is the share of upper-half words (0, 2.5, 5)."""
    from datasets import load_dataset as hf_load

    rng = random.Random(1)
    half = len(WORDS) // 2
    for split, n in (("train", 160), ("validation", 40)):
        lines = ["sentence1,sentence2,label,idx"]
        for i in range(n):
            upper = rng.choice((0, 0, 3, 6, 6))  # mostly one half: learnable in a few dozen steps
            words = [rng.choice(WORDS[half:]) for _ in range(upper)] + [rng.choice(WORDS[:half]) for _ in range(6 - upper)]
            rng.shuffle(words)
            lines.append(f"{' '.join(words[:3])},{' '.join(words[3:])},{5 * upper / 6:.3f},{i}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")

    def local(path, name, cache_dir=None):
        return hf_load("csv", data_files={s: str(tmp_path / f"{s}.csv") for s in ("train", "validation")},
                       cache_dir=str(tmp_path / "hf"))

    result = run_finetune(config(pretrained, tmp_path / "ft", task="glue/stsb", methods=("full",),
                                 lr={"full": 3e-3}, epochs=5), load_dataset=local, log=lambda m: None)[0]
    assert result["metric"] == "pearson_spearman" and result["accuracy"] is None
    run = result["runs"][0]
    assert math.isclose(result["score"], (run["pearson"] + run["spearman"]) / 2)
    assert run["pearson"] > 50, run  # learned: a clear positive correlation


# -- bad input: one clear error each, before anything is written -------------------------------------------


def _rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case,pattern", [
    ("no_label", "no 'label' column"),
    ("one_class", "one class only"),
    ("unseen", "never occur in training"),
    ("no_tokenizer", "has no tokenizer"),
    ("rank", r"--rank=64 is too large .*hidden size 32"),
    ("glue", "unknown GLUE task"),
    ("hub", "hub could not provide it"),
    ("max_length", "exceeds the model's 64 positions"),
])
def test_bad_input_fails_before_writing(pretrained, tmp_path, case, pattern):
    run, task = pretrained
    overrides: dict = {}
    if case == "no_label":
        overrides["task"] = str(_rows(tmp_path / "t.jsonl", [{"text": "a b", "class": 1}] * 20))
    elif case == "one_class":
        overrides["task"] = str(_rows(tmp_path / "t.jsonl", [{"text": f"a {i}", "label": "x"} for i in range(20)]))
    elif case == "unseen":
        overrides["val"] = str(_rows(tmp_path / "v.jsonl", [{"text": "a b", "label": "other"}]))
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        bare.mkdir()
        # the run folder holds config.json only once it was exported; do not rely on another test having done it
        (bare / "config.json").write_text((export_pretrained(run) / "config.json").read_text())
        overrides["model"] = str(bare)
    elif case == "rank":
        overrides["rank"] = 64
    elif case == "glue":
        overrides["task"] = "glue/nosuch"
    elif case == "hub":
        overrides["model"] = "galore-mini-test/no-such-model"
    elif case == "max_length":
        overrides["max_length"] = 100
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=pattern):
        run_finetune(config(pretrained, out, **overrides), log=lambda m: None)
    assert not out.exists()


def test_long_texts_are_truncated_and_counted(pretrained, tmp_path):
    rows = [{"text": " ".join(["optimizer"] * 80) if i % 7 == 0 else "the", "label": i % 2} for i in range(40)]
    setup = prepare(config(pretrained, tmp_path / "out", task=str(_rows(tmp_path / "t.jsonl", rows)), max_length=16))
    assert max(len(ids) for ids in setup.train.input_ids + setup.val.input_ids) == 16
    long_train = sum(1 for e in setup.task.train if len(e.text) > 100)
    long_val = sum(1 for e in setup.task.val if len(e.text) > 100)
    assert setup.notes == [f"{long_train} of {len(setup.task.train)} training and {long_val} of "
                           f"{len(setup.task.val)} validation examples are longer than 16 tokens "
                           "(--max-length=16); they are truncated"]
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exit_code_and_nothing_written(pretrained, tmp_path, capsys):
    from galore_mini.cli import main

    run, _ = pretrained
    bad = _rows(tmp_path / "t.jsonl", [{"text": "a b", "class": 1}] * 20)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(run), "--task", str(bad), "--out", str(out)]) == 2
    assert "no 'label' column" in capsys.readouterr().err
    assert not out.exists()
    assert main(["finetune", "--model", str(run), "--task", str(bad), "--methods", "full,relora",
                 "--out", str(out)]) == 2
    assert "not a fine-tuning method" in capsys.readouterr().err


def test_cli_runs_and_pairs(pretrained, tmp_path, capsys):
    from galore_mini.cli import main

    run, _ = pretrained
    task = write_task(tmp_path / "pairs.jsonl", n=60, pairs=True)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(run), "--task", str(task), "--methods", "full,galore_mini", "--epochs",
                 "1", "--rank", "4", "--seed", "0,1", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["seeds"] for r in results] == [[0, 1], [0, 1]]
    for r in results:
        assert math.isclose(r["score"], sum(r["scores"]) / 2)
    assert "| Full (AdamW) |" in capsys.readouterr().out


# -- tasks and metrics --------------------------------------------------------------------------------------


def test_split_is_deterministic_and_order_free():
    examples = [Example(f"text {i}", None, i % 3) for i in range(200)]
    train, val = split_examples(examples)
    assert len(val) == 20 and len(train) == 180
    train2, val2 = split_examples(list(reversed(examples)))
    assert {e.text for e in val} == {e.text for e in val2}


def test_folder_and_csv_tasks(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\nhello there,pos\nawful thing,neg\nnice one,pos\n")
    (folder / "validation.tsv").write_text("text\tlabel\ngood day\tpos\n")
    task = load_task(str(folder))
    assert task.labels == ["neg", "pos"] and len(task.train) == 3 and len(task.val) == 1
    assert task.label_ids(task.val) == [1]


def test_metrics_against_hand_computed_values():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert math.isclose(matthews(pred, gold), mcc)
    out = compute_metrics("f1_accuracy", pred, gold)
    assert math.isclose(out["f1"], 100 * 2 * tp / (2 * tp + fp + fn)) and math.isclose(out["accuracy"], 100 * 4 / 6)
    assert math.isclose(out["score"], (out["f1"] + out["accuracy"]) / 2)
    # Spearman with ties: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    reg = compute_metrics("pearson_spearman", [0.0, 0.0, 1.0, 5.0], [1.0, 2.0, 3.0, 4.0])
    rx, ry = [1.5, 1.5, 3, 4], [1, 2, 3, 4]
    mx, my = sum(rx) / 4, sum(ry) / 4
    rho = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert math.isclose(reg["spearman"], 100 * rho)
    assert math.isclose(compute_metrics("matthews", [0, 0, 0], [0, 1, 0])["matthews"], 0.0)


def test_glue_loading_offline_in_the_glue_format(tmp_path):
    """The GLUE code path on local files with GLUE's columns (the hub is not reached in tests)."""
    from datasets import load_dataset as hf_load

    (tmp_path / "train.csv").write_text("sentence1,sentence2,label,idx\na,b,1,0\nc,d,0,1\ne,f,1,2\n")
    (tmp_path / "validation.csv").write_text("sentence1,sentence2,label,idx\ng,h,1,0\ni,j,0,1\n")
    (tmp_path / "test.csv").write_text("sentence1,sentence2,label,idx\nk,l,-1,0\n")

    def local(path, name, cache_dir=None):
        assert (path, name) == ("nyu-mll/glue", "mrpc")
        return hf_load("csv", data_files={s: str(tmp_path / f"{s}.csv") for s in ("train", "validation", "test")},
                       cache_dir=str(tmp_path / "hf"))

    task = glue_task("mrpc", load_dataset=local)
    assert task.metric == "f1_accuracy" and task.labels == [0, 1]
    assert task.train[0] == Example("a", "b", 1) and len(task.val) == 2
    (tmp_path / "train.csv").write_text("sentence1,sentence2,label,idx\na,b,0.5,0\nc,d,4.2,1\n")
    (tmp_path / "validation.csv").write_text("sentence1,sentence2,label,idx\ng,h,3.0,0\n")

    def local_stsb(path, name, cache_dir=None):
        return hf_load("csv", data_files={s: str(tmp_path / f"{s}.csv") for s in ("train", "validation")},
                       cache_dir=str(tmp_path / "hf2"))

    stsb = glue_task("sts-b", load_dataset=local_stsb)
    assert stsb.regression and stsb.metric == "pearson_spearman" and stsb.train[1].label == 4.2

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    with pytest.raises(UsageError, match="needs the network"):
        glue_task("sst2", load_dataset=offline)


def test_debian_task_from_a_package_list(tmp_path):
    stanzas = []
    for i in range(40):
        section = ("games", "sound")[i % 2]
        stanzas.append(f"Package: pkg{i}\nSource: src{i // 2}\nSection: {section}\n"
                       f"Description: {'a puzzle game' if section == 'games' else 'an audio mixer'} number {i}\n")
    stanzas.append("Package: clash1\nSection: games\nDescription: same text\n")
    stanzas.append("Package: clash2\nSection: sound\nDescription: same text\n")
    lists = tmp_path / "x_Packages"
    lists.write_text("\n".join(stanzas))
    task = debian_sections([str(lists)], sections=("games", "sound"))
    assert task.labels == ["games", "sound"] and len(task.train) + len(task.val) == 40  # the clash dropped
    sources = lambda split: {int(e.text.split()[-1]) // 2 for e in split}  # noqa: E731
    assert not sources(task.train) & sources(task.val)  # a source package never straddles the split


def test_tasks_docstring_example():
    import doctest

    import galore_mini.train.tasks as tasks

    result = doctest.testmod(tasks)
    assert result.attempted > 0 and result.failed == 0
