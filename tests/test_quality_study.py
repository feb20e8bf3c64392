"""bench/quality_study.py: the sweep resumes, extends past an edge, the AdamW control gets GaLore's two rates."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def study():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("quality_study")
    finally:
        sys.path.remove(str(BENCH))


def _corpus(tmp_path):
    words = ("the optimizer keeps a low rank moment while the block second moment is one scalar per row "
             "and every refresh finds a new subspace from the gradient of that step").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(120)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(lines))
    return path


def test_ladder_steps_on_1_3_10(study):
    assert [study.ladder(x, up=True) for x in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 1e-1]
    assert [study.ladder(x, up=False) for x in (1e-3, 3e-3, 1e-2)] == [3e-4, 1e-3, 3e-3]


def test_split_adamw_gives_projected_matrices_lr_times_scale(study):
    from galore_mini.models import build_model

    model = build_model(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64, max_position_embeddings=32), seed=0)
    opt = study.build_optimizer(model, "full_split", 0.02, rank=4)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        projected = ("self_attn" in name or "mlp" in name) and p.dim() == 2
        assert lr_of[id(p)] == pytest.approx(0.02 * study.SCALE if projected else 0.02), name
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for g in opt.param_groups for p in g["params"])


def test_json_without_width_is_a_usage_error(study, tmp_path):
    from galore_mini.errors import UsageError

    path = tmp_path / "nowidth.json"
    path.write_text(json.dumps(dict(num_hidden_layers=2, vocab_size=256)))
    with pytest.raises(UsageError, match="hidden_size"):
        study.read_size(str(path))


def test_sweep_resumes_extends_and_reports(study, tmp_path):
    results = tmp_path / "r.json"
    common = ["--smoke", "--data", str(_corpus(tmp_path)), "--json", str(results), "--threads", "1",
              "--cache-dir", str(tmp_path / "cache")]
    study.main(["sweep", *common, "--methods", "galore_mini", "--lrs", "1e-4", "3e-4", "--extend", "1"])
    runs = json.loads(results.read_text())["runs"]
    # 3 steps from the same init: the larger rate is lower, so the best sits on the top edge and one rung is added
    assert [r["lr"] for r in runs] == [1e-4, 3e-4, 1e-3]
    assert runs[1]["val_loss"] < runs[0]["val_loss"]
    study.main(["sweep", *common, "--methods", "galore_mini", "--lrs", "1e-4", "3e-4", "--extend", "1"])
    assert len(json.loads(results.read_text())["runs"]) == 3  # nothing re-run
    study.main(["seeds", *common, "--methods", "galore_mini", "--lrs", "1e-4", "3e-4", "--extend", "1",
                "--seeds", "1"])
    runs = json.loads(results.read_text())["runs"]
    best = min(runs[:3], key=lambda r: r["val_loss"])["lr"]
    assert (runs[-1]["seed"], runs[-1]["lr"]) == (1, best)
    assert runs[0]["optimizer_bytes"] > 0 and runs[0]["update_rms"]
    text = study.report(json.loads(results.read_text()), str(tmp_path / "sweep.png"))
    assert "| galore_mini |" in text and (tmp_path / "sweep.png").stat().st_size > 0
