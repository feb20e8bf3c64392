"""The benchmark scripts run end to end on tiny shapes (`--smoke`); peers that are not installed are skipped."""

import importlib
import sys
import time
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


def test_run_all_smoke_writes_benchmarks_md(bench_modules, tmp_path):
    run_all = bench_modules("run_all")
    start = time.perf_counter()
    out = tmp_path / "BENCHMARKS.md"
    run_all.main(["--smoke", "--in-process", "--threads", "1", "--results", str(tmp_path), "--out", str(out)])
    elapsed = time.perf_counter() - start
    text = out.read_text()
    assert "SMOKE RUN" in text
    for needle in ("torch AdamW (fused)", "ours GaLoreMini (power)", "× fused AdamW", "Subspace refresh",
                   "perplexity vs exact-SVD fp32", "## Goals", "device ops / step", "single-tensor path"):
        assert needle in text, needle
    step = (tmp_path / "step_time.json").read_text()
    assert '"error": null' in step and "Traceback" not in text
    assert elapsed < 20, f"smoke benchmarks took {elapsed:.1f} s"


def test_gpu_script_smoke_runs_on_cpu(bench_modules, tmp_path):
    gpu = bench_modules("gpu")
    report = gpu.main(["--smoke", "--device", "cpu", "--memory-dtypes", "bf16", "--profile", "",
                       "--json", str(tmp_path / "gpu.json")])
    labels = [row["label"] for row in report["memory"]]
    assert "GaLore-mini, layer-wise" in labels and all(row["error"] is None for row in report["memory"])
    assert any(r["key"] == "galore_mini_power_bf16" and r["error"] is None for r in report["step"]["results"])
    assert "Peak memory" in gpu.render(report)
