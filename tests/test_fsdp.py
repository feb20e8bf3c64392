"""FSDP2 (fully_shard, DTensor parameters) on CPU with gloo: the optimizers match one process.

Each spawned rank trains a sharded model and, beside it, an unsharded copy on the whole global batch
(the one-process run); see tests/fsdp_worker.py for the checks. One chain of runs covers checkpoints:
one process writes a DCP checkpoint; 4 ranks resume it and write their own; 3 ranks resume both and write
theirs; 2 ranks resume all three; one process resumes the sharded ones (so 1→4, 4→3, 4→2, 4→1 and
every other pair downwards).
"""

from __future__ import annotations

import pytest

import fsdp_worker

pytestmark = pytest.mark.slow


def spawn(world: int, checks: list[str], out) -> dict:
    return fsdp_worker.spawn(fsdp_worker.run, world, checks, out)


def test_fsdp2_matches_one_process_resumes_and_reshards(tmp_path):
    fsdp_worker.one_process_checkpoint(tmp_path)
    # 4 ranks: 8 rows each of 32-row weights, qwen2's 24-row GQA k_proj 6 each and its vocabulary 101 as 26/26/26/23
    four = spawn(4, ["parity_lite", "checkpoints"], tmp_path)
    # 3 ranks: rows 11/11/10 of 32-row weights, so attention heads and GQA key heads straddle shards
    three = spawn(3, ["parity", "nan_clip", "layerwise", "checkpoints"], tmp_path)
    two = spawn(2, ["parity_lite", "hsdp", "checkpoints", "ddp_layerwise", "bad_input"], tmp_path)
    assert four["resharded"] == ["ckpt-1->4"]
    assert three["resharded"] == ["ckpt-1->3", "ckpt-4->3"]
    assert two["resharded"] == ["ckpt-1->2", "ckpt-3->2", "ckpt-4->2"]
    assert fsdp_worker.one_process_resumes(tmp_path) == ["ckpt-2->1", "ckpt-3->1", "ckpt-4->1"]
    # per-rank state shrinks with the world size (one process's bytes are the last entry)
    for case, (bytes_2, one) in two["state_bytes"].items():
        bytes_3, bytes_4 = three["state_bytes"][case][0], four["state_bytes"][case][0]
        assert bytes_4 < bytes_3 < bytes_2 < one, (case, bytes_4, bytes_3, bytes_2, one)
