"""Run folders written by the code before the harness was restructured resume on today's code, exactly.

The old sources come from git (``git archive`` of the last commit before the restructuring) into a
temporary folder; a subprocess with only them on its path trains and is stopped part-way, then this
process resumes the folder and must end where an uninterrupted run of today's code ends: the same
validation loss, the same weights, the same metrics lines.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from galore_mini.train.finetune import FinetuneConfig, run_finetune
from galore_mini.train.loop import read_metrics, train
from pretrain_fixtures import small_config

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
OLD_COMMIT = "48286ba"  # the last commit whose harness wrote its own checkpoint dicts


def _old_sources(dest: Path) -> Path:
    """``src/`` of `OLD_COMMIT` under `dest`, or a skip saying why it cannot be had."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the old sources cannot be extracted")
    proc = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "src"], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this checkout's history (a shallow clone?): "
                    f"{proc.stderr.decode(errors='replace').strip()[:200]}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as archive:
        archive.extractall(dest, filter="data")
    return dest / "src"


def _run_old(src: Path, script: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{TESTS}", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=src.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OLD {src}" in proc.stdout, proc.stdout  # the old code, not this checkout's, did the work


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def old_src(tmp_path_factory):
    return _old_sources(tmp_path_factory.mktemp("old"))


@pytest.mark.parametrize("method", ["galore_mini", "relora"])
def test_a_pretraining_run_of_the_old_code_resumes_exactly_on_the_new(old_src, tmp_path, method):
    # the old code: 12 steps planned, stopped after the step-8 checkpoint
    _run_old(old_src, f"""
        from pathlib import Path
        import galore_mini
        from galore_mini.train.loop import train
        from pretrain_fixtures import Killed, kill_at, small_config
        print("OLD", Path(galore_mini.__file__).parents[1])
        try:
            train(small_config(Path({str(tmp_path)!r}), method={method!r}, out={str(tmp_path / "old")!r}),
                  on_step=kill_at(8))
        except Killed:
            pass
    """)
    assert torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)["step"] == 8
    reference = train(small_config(tmp_path, method=method, out=str(tmp_path / "new")))
    resumed = train(small_config(tmp_path, method=method, out=str(tmp_path / "old"), resume=True))
    assert resumed["val_loss"] == reference["val_loss"] and resumed["steps"] == 12
    a, b = _weights(tmp_path / "new"), _weights(tmp_path / "old")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(out / "metrics.jsonl")]
                for out in (tmp_path / "new", tmp_path / "old")]
    assert timeless[0] == timeless[1]


def test_a_finetuning_run_folder_of_the_old_code_resumes_exactly_on_the_new(old_src, tmp_path):
    task = tmp_path / "task.jsonl"
    _run_old(old_src, f"""
        import json, random
        from pathlib import Path
        import galore_mini
        from galore_mini.train.loop import train
        from galore_mini.train.finetune import FinetuneConfig, run_finetune
        from pretrain_fixtures import WORDS, small_config
        print("OLD", Path(galore_mini.__file__).parents[1])
        tmp = Path({str(tmp_path)!r})
        train(small_config(tmp, out=str(tmp / "pretrain")))
        rng = random.Random(0)
        rows = [{{"text": " ".join(rng.choice(WORDS[:10] if i % 2 else WORDS[10:]) for _ in range(6)),
                 "label": ["low", "high"][i % 2]}} for i in range(96)]
        Path({str(task)!r}).write_text("".join(json.dumps(r) + "\\n" for r in rows))

        class Stop(Exception):
            pass

        def stop(method, seed, epoch):
            raise Stop

        try:
            run_finetune(FinetuneConfig(model=str(tmp / "pretrain"), task={str(task)!r}, methods=("galore_mini",),
                                        rank=4, epochs=2, lr={{"galore_mini": 3e-3}}, out=str(tmp / "old"),
                                        progress=False, device="cpu"), on_epoch=stop, log=lambda m: None)
        except Stop:
            pass
    """)
    folder = tmp_path / "old" / "runs" / "galore_mini" / "seed0"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1  # written by the old code

    def finetune(out: str, on_epoch=None):
        config = FinetuneConfig(model=str(tmp_path / "pretrain"), task=str(task), methods=("galore_mini",), rank=4,
                                epochs=2, lr={"galore_mini": 3e-3}, out=str(tmp_path / out), progress=False,
                                device="cpu")
        return run_finetune(config, on_epoch=on_epoch, log=lambda m: None)[0]

    epochs = []
    resumed = finetune("old", on_epoch=lambda m, s, e: epochs.append(e))
    whole = finetune("new")
    assert epochs == [2]  # the old folder's first epoch was kept, only the second ran
    assert resumed["runs"][0]["epochs"] == whole["runs"][0]["epochs"]  # losses and scores, exactly
    assert resumed["score"] == whole["score"]
    assert json.loads((folder / "result.json").read_text())["score"] == whole["score"]
