"""The benchmark scripts run end to end on tiny shapes (`--smoke`) and write well-formed results.

These tests read the JSON each script writes — its keys, errors, and numbers that must be finite and
positive, plus structural facts that do not depend on timing (state sizes, device-operation counts) —
never the wording of BENCHMARKS.md or the wall-clock time of the run. Peers that are not installed
are skipped.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_modules():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row.get("label"), key, value)


def _load(directory: Path, kind: str) -> dict:
    result = json.loads((directory / f"{kind}.json").read_text())
    assert result["kind"] == kind
    assert {"machine", "versions", "config", "results"} <= set(result)
    assert result["config"]["smoke"] is True and result["results"]
    return result


def _by_key(results: list[dict]) -> dict[str, dict]:
    return {row["key"]: row for row in results}


def test_run_all_smoke_writes_results(bench_modules, tmp_path):
    run_all = bench_modules("run_all")
    out = tmp_path / "BENCHMARKS.md"
    run_all.main(["--smoke", "--in-process", "--threads", "1", "--results", str(tmp_path), "--out", str(out)])

    step = _load(tmp_path, "step_time")
    rows = _by_key(step["results"])
    for row in rows.values():
        assert row["error"] is None, (row["key"], row["error"])
        _positive(row, "steady_s", "first_s", "state_bytes")
    for key in ("adamw_fused", "adam_mini", "galore", "galore_mini"):
        assert rows[key]["ours"] is (key != "adamw_fused")
    for key in ("galore", "galore_mini"):  # projected: a refresh was timed
        _positive(rows[key], "refresh_s")
    # state sizes are exact counts: GaLore-mini < Adam-mini < AdamW on the same model
    assert rows["galore_mini"]["state_bytes"] < rows["adam_mini"]["state_bytes"] < rows["adamw_fused"]["state_bytes"]

    launches = _by_key(_load(tmp_path, "launches")["results"])
    for row in launches.values():
        assert row["error"] is None, (row["key"], row["error"])
        _positive(row, "device_ops", "all_ops", "host_s")
        assert row["all_ops"] >= row["device_ops"]
    # the multi-tensor path issues fewer device operations than the single-tensor reference
    for key in ("galore", "adam_mini", "galore_mini_power_bf16"):
        assert launches[key]["device_ops"] < launches[f"{key}_single"]["device_ops"], key

    refresh = _load(tmp_path, "refresh")["results"]
    assert {"svd", "randomized", "power"} <= {row["method"] for row in refresh}
    for row in refresh:
        _positive(row, "refresh_s", "step_s")
        assert 0.0 <= row["captured"] <= 1.0 + 1e-3, row

    quality = _load(tmp_path, "quality")["results"]
    assert {row["method"] for row in quality} >= {"galore_mini", "galore", "full"}
    for row in quality:
        _positive(row, "val_loss", "val_ppl", "train_loss")
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-6)

    # the report is rendered from these results: every measured configuration has its row
    text = out.read_text()
    for row in step["results"]:
        assert row["label"] in text, row["label"]


def test_gpu_script_smoke_runs_on_cpu(bench_modules, tmp_path):
    gpu = bench_modules("gpu")
    path = tmp_path / "gpu.json"
    gpu.main(["--smoke", "--device", "cpu", "--memory-dtypes", "bf16", "--profile", "", "--json", str(path)])
    report = json.loads(path.read_text())
    assert {"machine", "versions", "config", "memory", "step"} <= set(report)
    memory = report["memory"]
    assert {(row["method"], row["layerwise"]) for row in memory} >= {("full", False), ("galore_mini", False),
                                                                     ("galore_mini", True)}
    for row in memory:
        assert row["error"] is None, (row["label"], row["error"])
        _positive(row, "params_bytes", "state_bytes", "step_s")
    state = {(row["method"], row["layerwise"]): row["state_bytes"] for row in memory}
    # layer-wise updates change when the state is used, not its size
    assert state[("galore_mini", True)] == state[("galore_mini", False)] < state[("full", False)]
    steps = _by_key(report["step"]["results"])
    assert steps["galore_mini_power_bf16"]["error"] is None
    for row in steps.values():
        assert row["error"] is None, (row["key"], row["error"])
        _positive(row, "steady_s", "state_bytes")


def test_fsdp_world1_smoke_runs_on_cpu(tmp_path):
    """A process group of one (gloo) in its own process: every method measured on both copies."""
    import os
    import subprocess

    pytest.importorskip("transformers")
    path = tmp_path / "world1.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(BENCH / "fsdp_world1.py"), "--smoke", "--device", "cpu", "--json", str(path)],
                   check=True, env=env, capture_output=True, timeout=300)
    report = json.loads(path.read_text())
    assert report["config"]["backend"] == "gloo" and report["config"]["smoke"] is True
    assert set(report["results"]) == {"galore_mini", "galore", "adam_mini", "full"}
    for method, row in report["results"].items():
        _positive({**row, "label": method}, "plain training step", "sharded training step", "plain step",
                  "sharded step", "training step ratio", "step ratio")


def test_scale_check_and_quality_parallel_smoke_on_cpu(tmp_path):
    """The GPU scale check's harness runs (the variants' options through `pretrain --optimizer-options`)
    and the parallel study runner merges its runs into one file; on a small corpus and model."""
    import os
    import subprocess

    from pretrain_fixtures import write_corpus, write_model

    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src"), "OMP_NUM_THREADS": "1"}
    corpus, model = write_corpus(tmp_path / "corpus"), write_model(tmp_path / "model.json")
    scale = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(BENCH / "scale_check.py"), "--model", str(model), "--data", str(corpus),
                    "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--no-bf16",
                    "--out", str(tmp_path / "runs"), "--json", str(scale),
                    "--runs", "galore_mini", "galore_mini_vproj", "galore_mini_io",
                    "--vocab-size", "300", "--val-tokens", "256", "--val-fraction", "0.2", "--rank", "4",
                    "--cache-dir", str(tmp_path / "cache")], check=True, env=env, capture_output=True, timeout=600)
    rows = {row["run"]: row for row in json.loads(scale.read_text())["results"]}
    assert set(rows) == {"galore_mini", "galore_mini_vproj", "galore_mini_io"}
    for row in rows.values():
        assert "error" not in row, row
        _positive({**row, "label": row["run"]}, "val_ppl", "optimizer_bytes")
    # element-wise v on the embedding and output layers is more state; v's source is not
    assert rows["galore_mini_io"]["optimizer_bytes"] > rows["galore_mini"]["optimizer_bytes"]
    assert rows["galore_mini_vproj"]["optimizer_bytes"] == rows["galore_mini"]["optimizer_bytes"]
    merged = tmp_path / "parallel.json"
    subprocess.run([sys.executable, str(BENCH / "quality_parallel.py"), "--jobs", "2", "--json", str(merged),
                    "--runs", "galore_mini:1e-2:0", "galore_mini_vproj:1e-2:0", "--", "--smoke",
                    "--data", str(corpus), "--cache-dir", str(tmp_path / "cache")],
                   check=True, env=env, capture_output=True, timeout=600)
    runs = json.loads(merged.read_text())["runs"]
    assert sorted(r["variant"] for r in runs) == ["galore_mini", "galore_mini_vproj"]
    assert all(math.isfinite(r["val_ppl"]) for r in runs)
