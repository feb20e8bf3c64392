"""``galore-mini pretrain`` and ``compare`` through ``galore_mini.cli.main``: results, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from galore_mini.cli import main
from galore_mini.train import data as D
from galore_mini.cli import pretrain as pretrain_cli
from pretrain_fixtures import write_corpus, write_model


@pytest.fixture
def setup(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    model = write_model(tmp_path / "model.json")
    common = ["--model", str(model), "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
              "--val-tokens", "512", "--val-fraction", "0.2", "--rank", "8", "--cache-dir", str(tmp_path / "cache"),
              "--no-progress"]
    return tmp_path, corpus, common


def _one_line_error(capsys, code, *needles):
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.startswith("galore-mini")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_pretrain_runs_and_prints_a_summary(setup, capsys):
    tmp_path, corpus, common = setup
    out = tmp_path / "run"
    code = main(["pretrain", "--method", "galore_mini", "--data", str(corpus), "--steps", "6", "--eval-every", "3",
                 "--out", str(out), *common])
    assert code == 0
    printed = capsys.readouterr().out
    final = json.loads((out / "final.json").read_text())
    assert f"val ppl {final['val_ppl']:.2f}" in printed and final["steps"] == 6 and final["rank"] == 8


def test_pretrain_reads_a_config_file_and_flags_override_it(setup, capsys):
    tmp_path, corpus, common = setup
    config = tmp_path / "run.yaml"
    config.write_text(f"method: low_rank\nsteps: 50\ndata: {corpus}\nlr: 0.002\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--steps", "3", "--out", str(out), *common]) == 0
    final = json.loads((out / "final.json").read_text())
    assert (final["method"], final["steps"], final["lr"]) == ("low_rank", 3, 0.002)


def test_compare_writes_table_json_and_figures_from_live_measurements(setup, capsys):
    tmp_path, corpus, common = setup
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(corpus), "--methods", "full,galore_mini,lora", "--steps", "6",
                 "--eval-every", "3", "--out", str(out), "--seed", "0", "--optimizer-options", "moment_policy=project",
                 *common])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["full", "galore_mini", "lora"]
    for r in results:
        for key in ("val_loss", "val_ppl", "steps", "tokens", "tokens_per_s", "weights_bytes", "optimizer_bytes"):
            assert key in r
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) and r["tokens"] == 6 * 4 * 32
        run = out / r["method"]
        assert json.loads((run / "final.json").read_text())["val_loss"] == r["val_loss"]
    full, mini, lora = results
    assert full["weights_bytes"] == mini["weights_bytes"] < lora["weights_bytes"]  # LoRA adds adapters
    assert mini["optimizer_bytes"] < full["optimizer_bytes"] and lora["optimizer_bytes"] < full["optimizer_bytes"]
    table = (out / "results.md").read_text()
    assert "| GaLore-mini |" in table and f"{mini['val_ppl']:.2f}" in table and "| LoRA |" in table
    assert "| GaLore-mini |" in printed
    for figure in ("loss.png", "memory.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_defaults_are_the_demo():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    pretrain_cli.register(sub)
    args = parser.parse_args(["compare"])
    assert args.methods.split(",") == ["full", "adam_mini", "galore", "galore_mini", "low_rank", "lora", "relora"]
    assert not hasattr(args, "data") and not hasattr(args, "model")  # so the TrainConfig defaults apply
    assert pretrain_cli.compare_defaults()["steps"] == pretrain_cli.DEMO_STEPS


BAD_INPUT = {
    "missing corpus": (["--data", "{tmp}/nowhere"], ["does not exist", "--data"]),
    "empty file": (["--data", "{tmp}/empty.txt"], ["contains no text"]),
    "non-UTF-8 file": (["--data", "{tmp}/latin1.txt"], ["is not UTF-8"]),
    "zero steps": (["--steps", "0"], ["--steps=0 must be a positive integer"]),
    "unknown method": (["--method", "sgd"], ["--method='sgd' is unknown", "galore_mini"]),
    "rank too large": (["--method", "galore", "--rank", "64"], ["--rank=64 is too large", "below 32"]),
    "rank too large for lora": (["--method", "lora", "--rank", "32"], ["--rank=32 is too large"]),
    "bad config file": (["--config", "{tmp}/bad.toml"], ["unknown setting 'stepz'"]),
    "binary data": (["--data", "{tmp}/zeros.txt"], ["is binary, not text", "NUL bytes"]),
    "beta2 of one": (["--beta2", "1.0"], ["--beta2=1.0 must be in [0, 1)"]),
    "negative beta1": (["--beta1", "-0.1"], ["--beta1=-0.1 must be in [0, 1)"]),
    "option with a flag of its own": (["--optimizer-options", "scale=abc"],
                                      ["--optimizer-options: 'scale' has a flag of its own; use --scale"]),
    "option of the wrong type": (["--optimizer-options", "gap_threshold=abc"],
                                 ["--optimizer-options: gap_threshold='abc' must be a number"]),
    "boolean option not a boolean": (["--optimizer-options", "adaptive_gap=maybe"],
                                     ["adaptive_gap='maybe' must be true or false"]),
    "eps not a number": (["--optimizer-options", "eps=abc"], ["eps='abc' must be a number"]),
    "unknown option": (["--optimizer-options", "bogus=1"], ["--optimizer-options='bogus=1'", "bogus"]),
    "option value the optimizer refuses": (["--optimizer-options", "proj_method=bogus"],
                                           ["--optimizer-options='proj_method=bogus'", "proj_method"]),
    "out is a file": (["--out", "{tmp}/afile"], ["is a file, not a folder"]),
    "resume and overwrite": (["--resume", "--overwrite"], ["contradict each other"]),
    "negative max skipped steps": (["--max-skipped-steps", "-1"], ["--max-skipped-steps=-1"]),
    "unknown projection side": (["--proj-type", "diagonal"], ["--proj-type='diagonal'", "reverse_std"]),
}
# refused before any data is read or tokenised (the cache stays empty)
_UP_FRONT = {"zero steps", "unknown method", "beta2 of one", "negative beta1", "option with a flag of its own",
             "option of the wrong type", "boolean option not a boolean", "eps not a number", "unknown option",
             "option value the optimizer refuses", "out is a file", "resume and overwrite",
             "negative max skipped steps", "bad config file", "unknown projection side"}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_pretrain_bad_input_is_one_line_and_exit_2(setup, capsys, case):
    tmp_path, corpus, common = setup
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("na\xefve caf\xe9\n\nsecond paragraph".encode("latin-1"))
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    (tmp_path / "zeros.txt").write_bytes(bytes(300_000))
    (tmp_path / "afile").write_text("not a folder")
    flags, needles = BAD_INPUT[case]
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--data" not in flags:
        flags = ["--data", str(corpus), *flags]
    code = main(["pretrain", *common, "--steps", "2", "--out", str(tmp_path / "run"), *flags])
    _one_line_error(capsys, code, *needles)
    if case in _UP_FRONT:
        assert not (tmp_path / "cache").exists()


def test_missing_default_corpus_and_stdlib_names_the_package_and_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "DEFAULT_CORPUS", str(tmp_path / "python3.11-doc-sources"))
    monkeypatch.setattr(D, "stdlib_sources", lambda: tmp_path / "no-stdlib")
    code = main(["pretrain", "--steps", "1", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    _one_line_error(capsys, code, "not installed", "--data", "python3.11-doc")


def test_without_the_debian_docs_pretrain_trains_on_the_standard_library(setup, capsys, monkeypatch):
    from test_data import _fake_stdlib

    tmp_path, _, common = setup
    monkeypatch.setattr(D, "DEFAULT_CORPUS", str(tmp_path / "python3.11-doc-sources"))
    stdlib = _fake_stdlib(tmp_path / "stdlib", files=12)
    monkeypatch.setattr(D, "stdlib_sources", lambda: stdlib)
    assert main(["pretrain", "--method", "full", "--steps", "2", "--out", str(tmp_path / "run"), *common]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "not installed" in line]
    assert len(said) == 1 and "standard library's own sources" in said[0] and "12 .py files" in said[0]


@pytest.mark.parametrize("flags, needle", [
    (["--methods", "full,adamw"], "unknown method 'adamw'"),
    (["--methods", "full,full"], "named twice"),
    (["--lr", "fast"], "give a number or METHOD=LR"),
    (["--lr", "galore=1e-2"], "'galore' is not among --methods"),
])
def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, needle):
    code = main(["compare", "--out", str(tmp_path / "cmp"), "--methods", "full", *flags]
                if "--methods" not in flags else ["compare", "--out", str(tmp_path / "cmp"), *flags])
    _one_line_error(capsys, code, needle)
    assert not Path(tmp_path / "cmp" / "results.json").exists()


def test_the_harness_reads_method_names_labels_and_learning_rates_from_the_registry():
    """No module of the harness keeps a table of method names of its own (the registry is the one table)."""
    from galore_mini import methods
    from galore_mini.train import loop, plots

    for module in (loop, pretrain_cli, plots):
        for name, value in vars(module).items():
            if isinstance(value, (tuple, list, set, frozenset, dict)) and value is not methods.DEMO_METHODS:
                assert not {"galore_mini", "adam_mini"} & set(value), f"{module.__name__}.{name} lists methods"
    assert pretrain_cli.DEMO_METHODS is methods.DEMO_METHODS
    assert all(plots.label(m) == methods.get(m).label for m in methods.METHODS)
