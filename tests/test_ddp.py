"""DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo) trains what one process trains, and resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from galore_mini.train import loop
from galore_mini.train.loop import train
from pretrain_fixtures import small_config

TESTS = Path(__file__).resolve().parent

_WORKER = textwrap.dedent("""
    import json, os, sys
    from dataclasses import replace
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from pretrain_fixtures import small_config
    from galore_mini.train.loop import train

    tmp = Path({tmp!r})
    base = small_config(tmp, method="galore_mini", batch_size=2, steps=8)
    reference = train(replace(base, out=str(tmp / "ddp-ref")))

    class Killed(RuntimeError):
        pass

    def kill_at_6(done):
        if done == 6:
            raise Killed()

    try:
        train(replace(base, out=str(tmp / "ddp-run")), on_step=kill_at_6)
    except Killed:
        pass
    resumed = train(replace(base, out=str(tmp / "ddp-run"), resume=True))
    rank = dist.get_rank()
    if rank == 0:
        (tmp / "ddp.json").write_text(json.dumps({{"reference": reference, "resumed": resumed,
                                                   "backend": dist.get_backend()}}))
    dist.destroy_process_group()
    # what would still run while the interpreter shuts down
    tasks = Path("/proc/self/task")
    names = sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.exists() else None
    (tmp / f"threads{{rank}}.json").write_text(json.dumps(names))
""")


def test_two_process_gloo_run_matches_one_process_and_resumes_exactly(tmp_path):
    import json

    # one process with the global batch (2 processes × 2 rows) is what DDP must reproduce
    single = train(small_config(tmp_path, method="galore_mini", batch_size=4, steps=8, out=str(tmp_path / "single")))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(TESTS), tmp=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    # destroy_process_group really ends gloo: no worker or socket thread is left to outlive the interpreter
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert threads is None or not [t for t in threads if "gloo" in t], threads
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["backend"] == "gloo"
    ref, resumed = report["reference"], report["resumed"]
    assert ref["world_size"] == 2 and ref["tokens"] == single["tokens"] == 8 * 4 * 32
    # resumed under DDP: bit for bit the uninterrupted DDP run
    assert resumed["val_loss"] == ref["val_loss"]
    a = torch.load(tmp_path / "ddp-ref" / loop.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "ddp-run" / loop.CHECKPOINT, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["rng"]) == 2
    # and the same model as one process with the whole batch, up to all-reduce round-off
    assert ref["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    one = torch.load(tmp_path / "single" / loop.CHECKPOINT, weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(a["model"][key], one[key], rtol=1e-3, atol=1e-4)
