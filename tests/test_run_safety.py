"""The harness never loses work and never calls a stall a success: the run folder, its lock, checkpoint
fallback, skipped updates and divergence, through ``galore_mini.cli.main`` and ``train``."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from galore_mini.cli import main
from galore_mini.errors import UsageError
from galore_mini.train import loop, runs
from galore_mini.train.loop import TrainingDiverged, read_metrics, train
from pretrain_fixtures import Killed, kill_at, small_config, write_corpus, write_model


@pytest.fixture
def cli(tmp_path):
    """`galore-mini pretrain` over the small corpus; returns (run(*flags) -> exit code, out folder)."""
    corpus = write_corpus(tmp_path / "corpus")
    model = write_model(tmp_path / "model.json")
    out = tmp_path / "run"
    common = ["pretrain", "--model", str(model), "--data", str(corpus), "--vocab-size", "300", "--seq-len", "32",
              "--batch-size", "4", "--val-tokens", "512", "--val-fraction", "0.2", "--rank", "8", "--cache-dir",
              str(tmp_path / "cache"), "--no-progress", "--method", "galore_mini", "--steps", "2"]

    def run(*flags: str) -> int:
        return main([*common, *flags] if "--out" in flags else [*common, "--out", str(out), *flags])

    return run, out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("galore-mini")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- an --out that holds a run -------------------------------------------------------------------------------


def test_a_rerun_on_a_finished_run_is_refused_and_leaves_it_untouched(cli, capsys):
    run, out = cli
    assert run() == 0
    before = _snapshot(out)
    assert {"checkpoint.pt", "metrics.jsonl", "final.json"} <= set(before)
    assert run("--lr", "0.5") == 2
    line = _error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before


def test_overwrite_starts_again_and_says_what_it_deleted(cli, capsys):
    run, out = cli
    assert run() == 0
    first = json.loads((out / "final.json").read_text())
    capsys.readouterr()
    assert run("--overwrite", "--steps", "3") == 0
    err = capsys.readouterr().err
    assert "--overwrite: deleted the previous run's checkpoint.pt, final.json, metrics.jsonl" in err
    final = json.loads((out / "final.json").read_text())
    assert (first["steps"], final["steps"]) == (2, 3)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"] == [3]
    assert not (out / ".lock").exists()


def test_out_naming_a_file_is_one_line(cli, capsys, tmp_path):
    run, _ = cli
    (tmp_path / "notes.txt").write_text("keep me")
    assert run("--out", str(tmp_path / "notes.txt")) == 2
    assert "is a file, not a folder" in _error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_compare_refuses_a_used_out_before_training_and_resume_rescores_it(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    model = write_model(tmp_path / "model.json")
    args = ["compare", "--methods", "full", "--model", str(model), "--data", str(corpus), "--vocab-size", "300",
            "--seq-len", "32", "--batch-size", "4", "--val-tokens", "512", "--val-fraction", "0.2", "--rank", "8",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--steps", "2", "--out", str(tmp_path / "cmp")]
    assert main(args) == 0
    first = json.loads((tmp_path / "cmp" / "results.json").read_text())
    before = _snapshot(tmp_path / "cmp" / "full")
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds runs of full" in _error_line(capsys)
    assert _snapshot(tmp_path / "cmp" / "full") == before
    assert main([*args, "--resume"]) == 0  # what `make demo` does on a rerun: finished runs are scored again
    again = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert again[0]["val_loss"] == first[0]["val_loss"] and again[0]["steps"] == 2
    assert (tmp_path / "cmp" / "full" / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]


# -- the lock ---------------------------------------------------------------------------------------------


def _lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / runs.LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "start": runs._process_start(pid), "since": "earlier"}))


def test_a_second_run_on_a_locked_out_is_refused_and_a_stale_lock_is_taken_over(cli, capsys, tmp_path):
    run, out = cli
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock(out, other.pid)
        assert run() == 2
        line = _error_line(capsys)
        assert f"is in use by another run (process {other.pid} on {socket.gethostname()}" in line
        assert not (out / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    # the same lock, its process gone: taken over with a message, and released at the end
    assert run() == 0
    err = capsys.readouterr().err
    assert f"taking over the lock on {out} left by process {other.pid}" in err and "no longer running" in err
    assert not (out / runs.LOCK).exists()
    # a lock from another machine cannot be checked from here: refused, with the way out
    _lock(out, 1, host="some-other-host")
    assert run("--resume") == 2
    line = _error_line(capsys)
    assert "process 1 on some-other-host" in line and f"delete {out / runs.LOCK}" in line


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    import os

    folder = runs.RunFolder(tmp_path / "run")
    _lock(folder.path, os.getppid())  # a live process, but the lock says it started at another time
    record = json.loads(folder.lock_path.read_text())
    record["start"] = "1"
    folder.lock_path.write_text(json.dumps(record))
    said = []
    folder.claim(resume=False, overwrite=False, log=said.append)
    assert folder.locked and "the pid now belongs to another process" in said[0]
    assert json.loads(folder.lock_path.read_text())["pid"] == os.getpid()
    with pytest.raises(UsageError, match="is in use by another run"):  # held now, by a live process: us
        runs.RunFolder(tmp_path / "run").claim(resume=True, overwrite=False, log=said.append)
    folder.release()
    assert not folder.lock_path.exists()


# -- checkpoints: keep the previous one, fall back to it ---------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_and_resume_is_still_exact(
        tmp_path, capsys, damage):
    reference = train(small_config(tmp_path, method="galore_mini", out=str(tmp_path / "ref")))
    config = small_config(tmp_path, method="galore_mini", out=str(tmp_path / "run"))
    with pytest.raises(Killed):
        train(config, on_step=kill_at(10))  # checkpoints at 4 (now checkpoint.prev.pt) and 8
    out = Path(config.out)
    newest = out / runs.CHECKPOINT
    assert torch.load(out / runs.PREVIOUS, weights_only=True)["step"] == 4
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"\x00\x01junk" * 50}[damage])
    capsys.readouterr()
    resumed = train(replace(config, resume=True))
    err = capsys.readouterr().err
    assert "falling back to checkpoint.prev.pt (step 4)" in err and "resumed from" in err
    assert (out / "checkpoint.pt.corrupt").exists()
    assert resumed["val_loss"] == reference["val_loss"]
    a = torch.load(tmp_path / "ref" / runs.CHECKPOINT, weights_only=True)["model"]
    b = torch.load(newest, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saving_keeps_the_previous_checkpoint_whole(tmp_path):
    config = small_config(tmp_path, method="full", steps=8, save_every=2, eval_every=0)
    steps_seen = []

    def look(done):
        if done % 2 == 0:
            steps_seen.append((torch.load(Path(config.out) / runs.CHECKPOINT, weights_only=True)["step"],
                               torch.load(Path(config.out) / runs.PREVIOUS, weights_only=True)["step"]
                               if done > 2 else None))

    train(config, on_step=look)
    assert steps_seen == [(2, None), (4, 2), (6, 4), (8, 6)]
    assert loop.stale_temporaries(Path(config.out)) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x80\x04K\x01."])
def test_an_unreadable_checkpoint_with_no_fallback_is_one_line(cli, capsys, content):
    run, out = cli
    assert run() == 0
    (out / runs.CHECKPOINT).write_bytes(content)
    capsys.readouterr()
    assert run("--resume") == 2
    line = _error_line(capsys)
    assert "checkpoint.pt is" in line and "no readable checkpoint to fall back on" in line and "--overwrite" in line


# -- stalls are not success ---------------------------------------------------------------------------------


def test_a_run_whose_every_update_is_skipped_stops_as_diverged(cli, capsys, monkeypatch):
    run, out = cli
    monkeypatch.setattr(loop, "build_training", _poison(set(range(1, 31))))  # every gradient NaN, every step
    assert run("--steps", "30", "--max-skipped-steps", "5", "--log-every", "1") == 2
    line = _error_line(capsys)
    assert "diverged: every update of the last 5 steps" in line and "--lr" in line
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["kind"] == "diverged" and records[-1]["skipped_steps"] == 5
    train_lines = [r for r in records if r["kind"] == "train"]
    assert train_lines and all("skipped_steps" in r and "skipped_updates" in r for r in train_lines)
    final = json.loads((out / "final.json").read_text())
    assert final["diverged"] is True and final["step"] == 5 and "every update" in final["reason"]
    assert not (out / runs.LOCK).exists()


def test_divergence_that_leaves_every_number_finite_stops_the_run(cli, capsys):
    run, out = cli
    # a huge LR blows the small model's weights up until every activation and gradient is exactly 0: the loss
    # jumps far above its start (then sits at ln(vocab) with zero gradients) and nothing is ever non-finite
    assert run("--lr", "1e4", "--steps", "30", "--log-every", "1") == 2
    line = _error_line(capsys)
    assert "diverged: the training loss rose to" in line and "--divergence-factor=0" in line
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["kind"] == "diverged" and math.isfinite(records[-1]["loss"])
    final = json.loads((out / "final.json").read_text())
    assert final["diverged"] is True and final["step"] == records[-1]["step"] < 30
    # with that check off, the model that stopped learning is caught by the zero-gradient rule
    assert run("--lr", "1e4", "--steps", "30", "--divergence-factor", "0", "--overwrite") == 2
    line = _error_line(capsys)
    assert "with every gradient exactly zero" in line and "--max-dead-steps=0" in line
    # and with both off the run goes on to the end, as before these checks existed
    assert run("--lr", "1e4", "--steps", "12", "--divergence-factor", "0", "--max-dead-steps", "0",
               "--max-skipped-steps", "0", "--overwrite") == 0


def _poison(steps: set[int]):
    """A `build_training` that makes the token embedding's gradient NaN in the given (1-based) steps."""
    real = loop.build_training
    calls = {"backward": 0}

    def build(config, *args, **kwargs):
        model, optimizer, relora = real(config, *args, **kwargs)
        embedding = model.get_input_embeddings().weight

        def hook(grad):
            calls["backward"] += 1
            return torch.full_like(grad, math.nan) if calls["backward"] in steps else grad

        embedding.register_hook(hook)
        return model, optimizer, relora

    return build


@pytest.mark.parametrize("method", ["full", "galore_mini", "lora"])
def test_skipped_updates_are_counted_in_metrics_and_final_and_nan_never_reaches_the_weights(
        tmp_path, monkeypatch, capsys, method):
    monkeypatch.setattr(loop, "build_training", _poison({3, 4}))
    config = small_config(tmp_path, method=method, steps=6, log_every=2, eval_every=0, save_every=2)
    snapshots = {}
    result = train(config, on_step=lambda done: snapshots.__setitem__(
        done, torch.load(Path(config.out) / runs.CHECKPOINT, weights_only=True)["model"]) if done % 2 == 0 else None)
    # the global norm is NaN, so clipping spreads it to every gradient: steps 3 and 4 update nothing
    assert result["skipped_steps"] == 2 and result["skipped_updates"] > 0
    assert all(torch.equal(snapshots[2][k], snapshots[4][k]) for k in snapshots[2])
    assert all(torch.isfinite(v).all() for v in snapshots[6].values() if v.is_floating_point())
    trains = [r for r in read_metrics(Path(config.out) / "metrics.jsonl") if r["kind"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in trains] == [(2, 0), (4, 2), (6, 2)]
    assert json.loads((Path(config.out) / "final.json").read_text())["skipped_steps"] == 2
    assert "2 of 6 steps made no update" in capsys.readouterr().err


def test_the_skip_count_survives_a_resume_and_the_limit_counts_consecutive_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_training", _poison({2, 3, 5, 6}))
    config = small_config(tmp_path, method="galore_mini", steps=8, max_skipped_steps=3, save_every=2)
    result = train(config)  # never three in a row: no stop
    assert result["skipped_steps"] == 4
    monkeypatch.setattr(loop, "build_training", _poison({2, 3, 4}))
    with pytest.raises(TrainingDiverged, match="last 3 steps \\(to step 4\\)"):
        train(replace(config, out=str(tmp_path / "stalled")))
