"""8-bit moments (GaLoreAdamW8bit, GaLoreMini(moment_bits=8)) on FSDP2 (fully_shard, DTensor) with gloo.

The sharded run quantises in one process's global blocks of 256 entries, so its codes and absmax equal
one process's; DCP checkpoints reshard (row form does not depend on the world size) and convert to and
from one process's flat form. One chain: one process writes a DCP checkpoint, 3 ranks (rows 11/11/10:
blocks straddle shards) check the quantiser, parity and checkpoints and write their own, 2 ranks
resume both, one process resumes the sharded ones. Unit tests of the row form need no processes.
"""

from __future__ import annotations

import pytest
import torch

import fsdp_worker
from galore_mini.optim import distributed, quant


def test_absmax_slots_is_the_most_blocks_a_row_touches():
    for cols in [*range(1, 700), 1024, 4096, 11008]:
        # row i starts at entry i·cols; its start within a block repeats after BLOCK rows
        touched = [(i * cols + cols - 1) // quant.BLOCK - (i * cols) // quant.BLOCK + 1 for i in range(quant.BLOCK)]
        assert distributed.absmax_slots(cols) == max(touched), cols


@pytest.mark.parametrize("m, cols", [(32, 4), (33, 1), (7, 300), (24, 48), (101, 48), (5, 512), (3, 1000)])
def test_row_form_round_trips_and_reads_as_one_process(m, cols):
    x = torch.randn(m * cols, generator=torch.Generator().manual_seed(m + cols)) * torch.logspace(-5, 2, m * cols)
    codes, absmax = quant.quantize(x, signed=True)
    table = distributed.flat_to_rows_absmax(absmax, 0, m, cols)
    assert tuple(table.shape) == distributed.row_form_shapes(m * cols, m)[1]
    assert torch.equal(distributed.rows_to_flat_absmax(table, cols), absmax)
    # row i's slot j is the absmax of block (i·cols)//256 + j, zero past the row's last block
    for i in range(m):
        blocks = range((i * cols) // quant.BLOCK, (i * cols + cols - 1) // quant.BLOCK + 1)
        expected = [float(absmax[b]) for b in blocks] + [0.0] * (table.shape[1] - len(blocks))
        assert table[i].tolist() == expected
    for world in (2, 3, 4, 7):
        parts = []
        for r in range(world):
            offset, rows = distributed.shard_rows(m, world, r)
            local = distributed.flat_to_rows_absmax(absmax, offset, rows, cols)
            assert torch.equal(local, table[offset:offset + rows])
            parts.append(distributed.rows_dequantize(codes.view(m, cols)[offset:offset + rows], local, offset, True))
        assert torch.equal(torch.cat(parts).reshape(-1), quant.dequantize(codes, absmax, signed=True))
    # one rank holding every row writes exactly what quant.quantize writes
    spec = distributed.ShardSpec(None, (), None, m, 0, m)
    got, got_table = torch.empty(m, cols, dtype=torch.uint8), torch.empty(table.shape)
    distributed.RowQuantizer().write(spec, got, got_table, x.view(m, cols), signed=True)
    assert torch.equal(got.reshape(-1), codes) and torch.equal(got_table, table)


def test_sharded_layout_puts_8bit_moments_in_row_form():
    import galore_mini as gm

    w = torch.nn.Parameter(torch.randn(40, 24))
    opt = gm.GaLoreAdamW8bit([{"params": [w], "rank": 4}], min_8bit_size=1)
    layout = distributed.sharded_layout(opt, w, opt.param_groups[0])
    assert layout["exp_avg"] == ((40, 4), torch.uint8)  # right projection: the m×r moment by rows
    assert layout["exp_avg_absmax"] == ((40, 1), torch.float32)
    assert opt.state_layout(w.shape, opt.param_groups[0])["exp_avg"] == ((160,), torch.uint8)
    left = torch.nn.Parameter(torch.randn(24, 40))
    opt = gm.GaLoreAdamW8bit([{"params": [left], "rank": 4}], min_8bit_size=1)
    layout = distributed.sharded_layout(opt, left, opt.param_groups[0])
    assert layout["exp_avg"] == ((160,), torch.uint8)  # left: r×n replicated, one process's flat form
    assert distributed.eight_bit_keys(opt, left, opt.param_groups[0]) == {}


def spawn(world: int, checks: list[str], out) -> dict:
    import fsdp8_worker

    return fsdp_worker.spawn(fsdp8_worker.run, world, checks, out)


@pytest.mark.slow
def test_fsdp2_8bit_matches_one_process_resumes_and_reshards(tmp_path):
    import fsdp8_worker

    fsdp8_worker.one_process_checkpoint(tmp_path)
    three = spawn(3, ["quantizer", "exact", "parity", "checkpoints"], tmp_path)
    two = spawn(2, ["checkpoints"], tmp_path)
    assert three["resharded"] == ["ckpt-1->3"]
    assert two["resharded"] == ["ckpt-1->2", "ckpt-3->2"]
    assert fsdp8_worker.one_process_resumes(tmp_path) == ["ckpt-2->1", "ckpt-3->1"]
    for case, (sharded_bytes, one) in three["state_bytes"].items():
        assert sharded_bytes < one, (case, sharded_bytes, one)
