"""FSDP2 (fully_shard, gloo, 3 CPU ranks) for GaLoreAdafactor and GaLore-mini's approach 1 and 2: the
sharded run equals one process, its state is laid out by W's rows where it should be, the bytes each step
sends equal ``communication_bytes`` (for GaLore, GaLoreAdafactor and 8-bit moments too), and DCP resumes it
exactly at 3 ranks and to round-off in one process (see tests/fsdp_more_worker.py)."""

from __future__ import annotations

import pytest

import fsdp_more_worker
import fsdp_worker

pytestmark = pytest.mark.slow


def test_adafactor_and_ablations_on_fsdp2_match_one_process_and_resume(tmp_path):
    # 3 ranks: rows 11/11/10 of 32-row weights (llama heads straddle shards); Qwen2's GQA k_proj rows 0-11
    # (one key head) straddle ranks 0 and 1; vocab 101 and intermediate 100 shard unevenly
    checks = ["parity", "placements", "estimate", "communication", "checkpoints", "bad_input"]
    report = fsdp_worker.spawn(fsdp_more_worker.run, 3, checks, tmp_path)
    assert report["resumed"] == ["adafactor_beta1", "galore_mini_a1", "galore_mini_a2"]
    assert len(report["state_bytes"]) == 8
    assert len(report["bytes_sent"]) == 2 * 5 * 4  # both models, five optimizers, four steps each
    for case, (per_rank, one) in report["state_bytes"].items():
        assert per_rank < one, (case, per_rank, one)
    # resharded 3 -> 1: one process resumes the 3-rank checkpoints
    assert fsdp_more_worker.one_process_resumes(tmp_path, 3) == report["resumed"]
