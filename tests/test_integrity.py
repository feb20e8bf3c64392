"""Checkpoints prove their integrity before use, in pretraining, fine-tuning and the export for fine-tuning;
fine-tuning skips and counts updates with non-finite gradients as pretraining does."""

from __future__ import annotations

import errno
import json
import math
import random
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from galore_mini.cli import main
from galore_mini.errors import UsageError
from galore_mini.train import finetune, loop, runs
from galore_mini.train.data import read_documents, train_bpe
from galore_mini.train.finetune import FinetuneConfig, export_pretrained, run_finetune
from galore_mini.train.loop import train
from pretrain_fixtures import WORDS, Killed, kill_at, small_config, write_corpus, write_model


def _flip_middle(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of `path`: the file still opens, its content is wrong."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _weights_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest record of a torch zip checkpoint: the bytes of a weight tensor."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:  # the local header's name and extra lengths (torch pads the extra to align data)
        f.seek(info.header_offset + 26)
        name, extra = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name + extra, info.file_size


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 4, 8, 12) and its result."""
    tmp = tmp_path_factory.mktemp("ref")
    config = small_config(tmp)
    return tmp, config, train(config)


def test_a_damaged_checkpoint_that_still_opens_is_moved_aside_and_the_previous_one_used(reference, tmp_path, capsys):
    tmp, config, result = reference
    run = small_config(tmp_path)
    train(run)  # finished: checkpoint.pt at step 12, checkpoint.prev.pt at step 8
    _flip_middle(Path(run.out) / "checkpoint.pt")
    capsys.readouterr()
    resumed = train(small_config(tmp_path, resume=True))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "SHA-256" in line]
    assert len(lines) == 1 and "moved it to checkpoint.pt.corrupt" in lines[0] and "(step 8)" in lines[0], err
    assert (Path(run.out) / "checkpoint.pt.corrupt").is_file()
    assert resumed["val_loss"] == result["val_loss"]  # steps 9-12 again, exactly as the uninterrupted run


def test_every_saved_file_carries_its_digest_and_a_flipped_byte_anywhere_is_caught(tmp_path):
    path = tmp_path / "c.pt"
    runs.atomic_save({"format": 1, "step": 3, "x": torch.arange(1000.0)}, path)
    assert path.read_bytes()[-runs._TRAILER:].startswith(runs.DIGEST_MARK)
    state, why = runs.read_checkpoint(path, keys=("format", "step"))
    assert why == "" and torch.equal(state["x"], torch.arange(1000.0))
    for position in (10, len(path.read_bytes()) // 2, len(path.read_bytes()) - runs._TRAILER - 5):
        damaged = tmp_path / f"d{position}.pt"
        data = bytearray(path.read_bytes())
        data[position] ^= 0x01
        damaged.write_bytes(bytes(data))
        state, why = runs.read_checkpoint(damaged, keys=("format", "step"))
        assert state is None and why.startswith(("damaged", "unreadable")), (position, why)


def test_a_checkpoint_written_before_digests_is_checked_by_its_zip_crcs(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "step": 3, "x": torch.arange(1000.0)}, path)  # no trailer, as older versions wrote
    assert runs.read_checkpoint(path, keys=("format", "step"))[1] == ""
    offset, size = _weights_record(path)
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["x"][500] != 500  # torch.load alone would trust it
    state, why = runs.read_checkpoint(path, keys=("format", "step"))
    assert state is None and "CRC-32" in why


def test_export_falls_back_from_a_truncated_newest_checkpoint_in_one_line(reference, tmp_path):
    tmp, config, _ = reference
    run = small_config(tmp_path)
    train(run)
    out = Path(run.out)
    newest = out / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated
    said = []
    export_pretrained(out, log=said.append)
    assert any("falling back to checkpoint.prev.pt (step 8)" in line for line in said), said
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / finetune.EXPORT_MARKER).read_text())["step"] == 8


def _task(path: Path, n: int = 96) -> Path:
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS[:10] if i % 2 else WORDS[10:]) for _ in range(6)),
             "label": ["low", "high"][i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pretrained(reference):
    tmp, config, _ = reference
    return Path(config.out), _task(tmp / "task.jsonl")


def _finetune_config(pretrained, out: Path, method: str = "galore_mini", **overrides) -> FinetuneConfig:
    model, task = pretrained
    settings = dict(model=str(model), task=str(task), methods=(method,), rank=4, epochs=3, lr={method: 3e-3},
                    out=str(out), progress=False, device="cpu")
    return FinetuneConfig(**{**settings, **overrides})


class Stop(Exception):
    pass


def test_a_damaged_finetuning_checkpoint_falls_back_to_the_previous_epoch_and_ends_exactly(pretrained, tmp_path):
    whole = run_finetune(_finetune_config(pretrained, tmp_path / "a"), log=lambda m: None)[0]

    def stop_after_two(method, seed, epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        run_finetune(_finetune_config(pretrained, tmp_path / "b"), on_epoch=stop_after_two, log=lambda m: None)
    folder = tmp_path / "b" / "runs" / "galore_mini" / "seed0"
    _flip_middle(folder / "checkpoint.pt")
    said, epochs = [], []
    resumed = run_finetune(_finetune_config(pretrained, tmp_path / "b"), on_epoch=lambda m, s, e: epochs.append(e),
                           log=said.append)[0]
    assert epochs == [2, 3]  # epoch 2's checkpoint was damaged: epoch 1's was used
    assert any("SHA-256" in line and "falling back to checkpoint.prev.pt (step" in line for line in said), said
    assert resumed["runs"][0]["epochs"] == whole["runs"][0]["epochs"] and resumed["score"] == whole["score"]
    assert not (folder / "checkpoint.pt").exists() and not (folder / "checkpoint.prev.pt").exists()


def _poisoned(steps: set[int]):
    """A `build_method` whose model's token-embedding gradient is NaN in the given (1-based) steps."""
    real = finetune.build_method
    calls = {"backward": 0}

    def build(setup, method, seed):
        model, optimizer, handle = real(setup, method, seed)

        def hook(grad):
            calls["backward"] += 1
            return torch.full_like(grad, math.nan) if calls["backward"] in steps else grad

        model.get_input_embeddings().weight.register_hook(hook)
        return model, optimizer, handle

    return build


@pytest.mark.parametrize("method,clip", [("full", 1.0), ("galore_mini", 1.0), ("galore_mini", 0.0)])
def test_finetuning_skips_and_counts_updates_with_non_finite_gradients(pretrained, tmp_path, monkeypatch, method,
                                                                       clip):
    monkeypatch.setattr(finetune, "build_method", _poisoned({3}))
    config = _finetune_config(pretrained, tmp_path / "ft", method, epochs=1, grad_clip=clip)
    result = run_finetune(config, log=lambda m: None)[0]
    run = result["runs"][0]
    if clip:  # clipping by a NaN norm makes every gradient NaN: the whole update of that step is skipped
        assert run["skipped_steps"] == 1 and run["skipped_updates"] > 1
    else:  # ours skip only the parameter whose gradient is NaN
        assert run["skipped_steps"] == 0 and run["skipped_updates"] == 1
    assert math.isfinite(result["score"]) and all(math.isfinite(e["train_loss"]) for e in run["epochs"])


# -- resume checks the inputs by content ------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path):
    """`galore-mini pretrain` over a small corpus and JSON model; returns (run(*flags) -> exit code, tmp)."""
    corpus = write_corpus(tmp_path / "corpus")
    model = write_model(tmp_path / "model.json")
    common = ["pretrain", "--model", str(model), "--data", str(corpus), "--vocab-size", "300", "--seq-len", "32",
              "--batch-size", "4", "--val-tokens", "512", "--val-fraction", "0.2", "--rank", "8", "--cache-dir",
              str(tmp_path / "cache"), "--no-progress", "--method", "galore_mini", "--steps", "4",
              "--out", str(tmp_path / "run")]
    return (lambda *flags: main([*common, *flags])), tmp_path


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("galore-mini")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_resume_after_the_model_config_content_changed_is_refused_naming_the_field(cli, capsys):
    run, tmp = cli
    assert run("--steps", "4") == 0
    write_model(tmp / "model.json", intermediate=96)  # same path, other content
    assert run("--resume") == 2
    _one_line(capsys, "--resume: the model config", "intermediate_size: 64 then, 96 now", "--overwrite")
    assert run("--overwrite") == 0  # the way out it names works


def test_resume_after_a_document_was_added_to_the_data_is_refused(cli, capsys):
    run, tmp = cli
    assert run() == 0
    (tmp / "corpus" / "extra.txt").write_text("Another document that was not there before.\n" * 20)
    assert run("--resume") == 2
    _one_line(capsys, "--resume: the data", "40 documents then, 41 now", "restore it", "--overwrite")
    (tmp / "corpus" / "extra.txt").unlink()  # restored: the run resumes (finished: scored again)
    assert run("--resume") == 0


def test_a_checkpoint_without_fingerprints_of_a_changed_model_is_one_line_not_a_traceback(cli, capsys):
    run, tmp = cli
    assert run() == 0
    checkpoint = tmp / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["fingerprints"]  # as versions before fingerprints wrote it
    runs.atomic_save(state, checkpoint)
    write_model(tmp / "model.json", intermediate=96)
    assert run("--resume") == 2
    _one_line(capsys, "--resume: the checkpoint's weights do not fit the model", "--overwrite")


def test_an_out_on_a_read_only_file_system_is_one_line(cli, capsys, monkeypatch):
    run, tmp = cli
    (tmp / "run").mkdir()  # exists, as on a read-only mount

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runs.tempfile, "mkstemp", read_only)
    assert run() == 2
    _one_line(capsys, "cannot write there (Read-only file system)", "writable folder")


def test_compare_checks_every_method_before_training_the_first(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    model = write_model(tmp_path / "model.json")  # hidden 32: rank 48 fits no matrix of it
    code = main(["compare", "--model", str(model), "--data", str(corpus), "--methods", "full,galore_mini,lora",
                 "--rank", "48", "--steps", "3", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
                 "--val-tokens", "512", "--val-fraction", "0.2", "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress", "--out", str(tmp_path / "cmp")])
    assert code == 2
    _one_line(capsys, "--rank=48 is too large")
    assert not (tmp_path / "cmp" / "full" / "metrics.jsonl").exists()  # full never started
    assert not (tmp_path / "cache").exists()  # nor was any data read


def test_a_damaged_data_file_of_a_sharded_checkpoint_is_caught_by_its_digest(tmp_path, capsys):
    base = small_config(tmp_path, method="galore_mini", steps=2, save_every=1, eval_every=0, fsdp=True)
    try:
        plain = train(replace(base, out=str(tmp_path / "run")))
        newest = tmp_path / "run" / runs.DCP_CHECKPOINT
        data_file = max((p for p in newest.iterdir() if p.name.endswith(".distcp")), key=lambda p: p.stat().st_size)
        _flip_middle(data_file)
        capsys.readouterr()
        again = train(replace(base, out=str(tmp_path / "run"), resume=True))
        err = capsys.readouterr().err
        assert f"{data_file.name} does not match its SHA-256 digest" in err and "(step 1)" in err, err
        assert again["val_loss"] == plain["val_loss"]
        assert (tmp_path / "run" / f"{runs.DCP_CHECKPOINT}.corrupt").is_dir()
    finally:
        loop.leave_distributed()


def test_resume_after_the_tokenizer_file_changed_is_refused(cli, capsys):
    run, tmp = cli
    assert run() == 0
    cached = next((tmp / "cache").rglob("tokenizer.json"))
    tokenizer = tmp / "tokenizer.json"
    tokenizer.write_text(cached.read_text())
    assert run("--tokenizer", str(tokenizer), "--overwrite") == 0
    definition = json.loads(tokenizer.read_text())
    vocab = definition["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300 - 2:300]  # swap the ids of the last two tokens
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer.write_text(json.dumps(definition))  # same path, other ids
    assert run("--tokenizer", str(tokenizer), "--resume") == 2
    _one_line(capsys, "--resume:", "other ids", "--overwrite")


def test_allow_new_data_goes_on_over_added_documents_with_a_fixed_tokenizer(tmp_path, capsys):
    first = small_config(tmp_path)  # writes the corpus and the model
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(train_bpe([d.text for d in read_documents(first.data)], 300).to_str())
    config = small_config(tmp_path, tokenizer=str(tokenizer))
    with pytest.raises(Killed):
        train(config, on_step=kill_at(4))
    (Path(config.data) / "added.txt").write_text("More text about the optimizer and its moments.\n" * 30)
    with pytest.raises(UsageError, match="40 documents then, 41 now.*--allow-new-data"):
        train(replace(config, resume=True))
    capsys.readouterr()
    result = train(replace(config, resume=True, allow_new_data=True))
    err = capsys.readouterr().err
    assert "--allow-new-data: the data" in err and "resumed from" in err and "at step 4" in err
    assert result["steps"] == 12 and math.isfinite(result["val_loss"])
