"""Behaviour a review of the restructure asked for: files the harness writes get an ordinary file's mode, a
comparison in which every method diverged is no success, and `embedding_block` is never silently ignored."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import galore_mini as gm
from galore_mini.cli import main
from galore_mini.errors import UsageError
from galore_mini.train import runs
from pretrain_fixtures import write_corpus, write_model


def _args(tmp_path, *flags):
    corpus, model = write_corpus(tmp_path / "corpus"), write_model(tmp_path / "model.json")
    return ["--model", str(model), "--data", str(corpus), "--vocab-size", "300", "--seq-len", "32", "--batch-size",
            "4", "--val-tokens", "512", "--val-fraction", "0.2", "--rank", "8", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", *flags]


def test_checkpoints_and_a_resumed_metrics_log_have_an_ordinary_files_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["pretrain", *_args(tmp_path, "--method", "full", "--steps", "4", "--save-every", "2",
                                       "--out", str(out))]) == 0
        assert main(["pretrain", *_args(tmp_path, "--method", "full", "--steps", "4", "--save-every", "2",
                                       "--out", str(out), "--resume")]) == 0
    finally:
        os.umask(umask)
    for name in (runs.CHECKPOINT, runs.PREVIOUS, runs.METRICS, runs.FINAL):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name  # mkstemp's own mode is 0600


def test_compare_in_which_every_method_diverged_exits_2(tmp_path, capsys):
    args = ["compare", "--methods", "full,galore_mini", *_args(tmp_path, "--steps", "30", "--lr", "1e4",
                                                                  "--out", str(tmp_path / "cmp"))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "every method diverged (full, galore_mini)" in err and "Traceback" not in err
    assert all(row["diverged"] for row in json.loads((tmp_path / "cmp" / "results.json").read_text()))


def test_embedding_block_is_checked_and_never_silently_ignored(llama):
    with pytest.raises(UsageError, match="embedding_block='bogus'"):
        gm.create_optimizer(llama, "adam_mini", embedding_block="bogus")
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(UsageError, match="no embedding or output layer"):
        gm.create_optimizer(plain, "adam_mini", embedding_block="elementwise")
    opt = gm.create_optimizer(llama, "adam_mini", embedding_block="rows")  # one v per token, as by default
    default = gm.create_optimizer(llama, "adam_mini")
    assert [g["block"] for g in opt.param_groups] == [g["block"] for g in default.param_groups]


def test_an_adapter_method_given_to_create_optimizer_points_to_its_registry_entry(llama):
    with pytest.raises(UsageError, match=r"galore_mini.methods.get\('lora'\).build_model"):
        gm.create_optimizer(llama, "lora")
