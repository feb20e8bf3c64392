"""The config module: components, flat names, help from field docstrings, checks before the data is read."""

from __future__ import annotations


import pytest

from galore_mini.cli import build_parser, main
from galore_mini.errors import UsageError
from galore_mini.train import config as C
from galore_mini.train.finetune import FinetuneConfig
from pretrain_fixtures import write_corpus, write_model


def test_flat_names_reach_the_components_both_ways():
    config = C.TrainConfig(method="galore", steps=50, lr=0.01, fsdp_mixed_precision=None)
    assert (config.optimizer.lr, config.training.steps, config.lr) == (0.01, 50, 0.01)
    config.rank = 16
    assert config.projection.rank == 16
    flat = config.flat()
    assert list(flat) == list(C.config_fields()) and len(flat) == 45
    assert C.TrainConfig(**flat) == config  # the checkpoint's flat settings rebuild the same config
    with pytest.raises(TypeError, match="unknown settings: stpes"):
        C.TrainConfig(stpes=3)


def test_fine_tuning_shares_the_components_with_its_own_defaults():
    pre, fine = C.TrainConfig(), FinetuneConfig(model="m")
    assert type(pre.projection) is type(fine.projection) and type(pre.output) is type(fine.output)
    assert type(pre.batch) is type(fine.batch)
    assert (fine.rank, fine.update_proj_gap, fine.scale, fine.out) == (8, 500, None, "runs/finetune")
    assert (pre.rank, pre.update_proj_gap, pre.scale, pre.out) == (None, 200, 0.25, "runs/pretrain")


def test_every_flag_has_the_docstring_of_its_field_as_help():
    parser = build_parser()
    pretrain = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("pretrain"))
    helps = {a.dest: a.help for a in pretrain._actions if a.dest not in ("help", "config")}
    for owner, field, default in C.leaves(C.TrainConfig):
        doc = C.field_help(owner)[field.name]
        assert doc and helps[field.name].startswith(doc.replace("%", "%%")), field.name
    assert helps["warmup_steps"] == "linear warm-up steps (default: 10%% of --steps)"


def test_a_bad_model_config_is_refused_before_the_data_is_read(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    model = write_model(tmp_path / "model.json")
    model.write_text(model.read_text().replace("intermediate_size", "intermediate_sise"))
    code = main(["pretrain", "--model", str(model), "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'intermediate_size'" in err and "tokenizing" not in err
    assert not (tmp_path / "cache").exists()  # nothing was tokenised
    with pytest.raises(UsageError, match="--seq-len=99 exceeds the model's max_position_embeddings=64"):
        C.make_config(model=str(write_model(tmp_path / "ok.json")), seq_len=99)
