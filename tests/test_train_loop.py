"""The training loop: schedule, learning, accumulation, metrics, configs, and exact resume after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from galore_mini.errors import UsageError
from galore_mini.train import loop
from galore_mini.train.loop import TrainConfig, cosine_factor, load_config_file, make_config, read_metrics, train
from pretrain_fixtures import Killed, kill_at, small_config

TESTS = Path(__file__).resolve().parent


def _checkpoint_model(out) -> dict[str, torch.Tensor]:
    return torch.load(Path(out) / loop.CHECKPOINT, weights_only=True)["model"]


def _assert_same_params(a_out, b_out):
    a, b = _checkpoint_model(a_out), _checkpoint_model(b_out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    factors = [cosine_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[:3] == [0.1, 0.2, 0.3] and factors[9] == 1.0
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.55, abs=0.02)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_a_run_learns_logs_and_reports_measured_memory(tmp_path):
    config = small_config(tmp_path, method="full", lr=1e-2, steps=24, eval_every=6)
    result = train(config)
    evals = [r for r in read_metrics(Path(config.out) / loop.METRICS) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12, 18, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert evals[-1]["val_loss"] < math.log(300) - 1.5  # well below a uniform guess over the vocabulary
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["tokens"] == 24 * 4 * 32 and result["tokens_per_s"] > 0
    trains = [r for r in read_metrics(Path(config.out) / loop.METRICS) if r["kind"] == "train"]
    assert [r["step"] for r in trains] == list(range(2, 25, 2))
    assert trains[0]["lr"] == 1e-2 and trains[-1]["lr"] == pytest.approx(1e-3, rel=0.06)  # peak, then 0.1x
    # memory measured on the live objects: AdamW keeps two fp32 moments and a 4-byte step per tensor
    params = result["params"]
    tensors = len(_checkpoint_model(config.out))
    assert result["weights_bytes"] == 4 * params
    assert result["optimizer_bytes"] == 8 * params + 4 * tensors
    assert json.loads((Path(config.out) / loop.FINAL).read_text()) == result


def test_galore_mini_keeps_less_optimizer_state_than_adamw(tmp_path):
    full = train(small_config(tmp_path, method="full", steps=2, out=str(tmp_path / "full")))
    mini = train(small_config(tmp_path, method="galore_mini", steps=2, out=str(tmp_path / "mini")))
    assert mini["weights_bytes"] == full["weights_bytes"]
    assert mini["optimizer_bytes"] < 0.75 * full["optimizer_bytes"]


def test_gradient_accumulation_matches_the_bigger_batch(tmp_path):
    one = train(small_config(tmp_path, method="full", steps=6, batch_size=4, grad_accum=1, out=str(tmp_path / "a")))
    two = train(small_config(tmp_path, method="full", steps=6, batch_size=2, grad_accum=2, out=str(tmp_path / "b")))
    assert one["tokens"] == two["tokens"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    a, b = _checkpoint_model(tmp_path / "a"), _checkpoint_model(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train(small_config(tmp_path, method="galore_mini", steps=8, bf16=True, lr=1e-2))
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / loop.METRICS) if r["kind"] == "eval"]
    assert all(math.isfinite(v) for v in evals) and evals[-1] < evals[0]
    assert result["weights_bytes"] == 4 * result["params"]  # autocast: the weights stay fp32


def test_optimizer_options_reach_the_optimizer(tmp_path):
    config = small_config(tmp_path, method="galore_mini", steps=2, optimizer_options="moment_policy=project, "
                          "adaptive_gap=true,gap_window=3")
    train(config)
    groups = torch.load(Path(config.out) / loop.CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]
    projected = [g for g in groups if g.get("rank")]
    assert projected and all((g["moment_policy"], g["adaptive_gap"], g["gap_window"]) == ("project", True, 3)
                             for g in projected)
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        make_config(optimizer_options="moment_policy")
    with pytest.raises(UsageError, match="not to 'lora'"):
        make_config(method="lora", optimizer_options="moment_policy=project")


@pytest.mark.parametrize("method", ["galore_mini", "galore", "relora", "low_rank"])
def test_resume_after_a_kill_ends_bit_for_bit_where_the_uninterrupted_run_does(tmp_path, method):
    extra = {"relora_every": 5, "lora_dropout": 0.1} if method == "relora" else {}
    reference = train(small_config(tmp_path, method=method, out=str(tmp_path / "ref"), **extra))
    config = small_config(tmp_path, method=method, out=str(tmp_path / "run"), **extra)
    with pytest.raises(Killed):
        train(config, on_step=kill_at(6))  # last checkpoint at step 4; steps 5-6 are lost and redone
    resumed = train(replace(config, resume=True))
    assert resumed["val_loss"] == reference["val_loss"]
    _assert_same_params(tmp_path / "ref", tmp_path / "run")
    assert _without_timing(read_metrics(tmp_path / "run" / loop.METRICS)) == \
        _without_timing(read_metrics(tmp_path / "ref" / loop.METRICS))


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    from pretrain_fixtures import small_config
    from galore_mini.train.loop import train

    real_save, saves = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the step-8 checkpoint: write half of it, then die like a SIGKILL would
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    train(small_config(Path({tmp!r}), method="galore_mini", out={out!r}))
""")


def test_a_kill_in_the_middle_of_a_checkpoint_write_loses_nothing(tmp_path):
    reference = train(small_config(tmp_path, method="galore_mini", out=str(tmp_path / "ref")))
    out = tmp_path / "run"
    script = _KILL_DURING_SAVE.format(tests=str(TESTS), tmp=str(tmp_path), out=str(out))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = loop.stale_temporaries(out)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert torch.load(out / loop.CHECKPOINT, weights_only=True)["step"] == 4  # the previous one, intact
    resumed = train(small_config(tmp_path, method="galore_mini", out=str(out), resume=True))
    assert loop.stale_temporaries(out) == []
    assert resumed["val_loss"] == reference["val_loss"]
    _assert_same_params(tmp_path / "ref", out)


def test_resuming_a_finished_run_trains_nothing_and_reports_the_same(tmp_path):
    config = small_config(tmp_path, method="galore", steps=4)
    first = train(config)
    again = train(replace(config, resume=True), on_step=kill_at(-1))
    assert again["val_loss"] == first["val_loss"]
    assert len([r for r in read_metrics(Path(config.out) / loop.METRICS) if r["kind"] == "eval"]) == 1


def test_resume_refuses_other_settings(tmp_path):
    config = small_config(tmp_path, method="full", steps=4)
    train(config)
    with pytest.raises(UsageError, match=r"other settings \(lr: checkpoint None, now 0.5\)"):
        train(replace(config, resume=True, lr=0.5))


def test_config_files_map_onto_the_dataclass_and_flags_win(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "galore"\nsteps = 50\nupdate-proj-gap = 10\nlr = 1\n')
    yaml = tmp_path / "run.yaml"
    yaml.write_text("method: lora\nrank: 16\nbf16: true\n")
    config = make_config(load_config_file(str(toml)), steps=7)
    assert (config.method, config.steps, config.update_proj_gap, config.lr) == ("galore", 7, 10, 1.0)
    config = make_config(load_config_file(str(yaml)))
    assert (config.method, config.rank, config.bf16) == ("lora", 16, True)
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    with pytest.raises(UsageError, match="unknown setting 'stepz'"):
        load_config_file(str(tmp_path / "bad.toml"))
    with pytest.raises(UsageError, match="must be an integer"):
        make_config({"steps": "many"})
    with pytest.raises(UsageError, match="--steps=0 must be a positive integer"):
        make_config(steps=0)


def test_default_learning_rates_and_ranks_are_documented_per_method():
    import re

    from galore_mini import methods

    assert TrainConfig(method="galore_mini").resolved_lr() == 1e-2
    assert TrainConfig(model="tiny").resolved_rank() == 32
    docs = (TESTS.parent / "docs" / "pretraining.md").read_text()
    table = docs.split("## Methods and their defaults")[1].split("\n\n")[1]
    documented = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for method in re.findall(r"`(\w+)`", cells[0]):
            documented[method] = float(cells[-1])
    assert documented == {name: methods.get(name).default_lr for name in methods.METHODS}
    assert all(TrainConfig(method=name).resolved_lr() == lr for name, lr in documented.items())
