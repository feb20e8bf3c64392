"""Worker processes for tests/test_fsdp_8bit.py: 8-bit moments on FSDP2 (fully_shard) with gloo.

As in tests/fsdp_worker.py, every rank trains the sharded model and, beside it, an unsharded copy on the
whole global batch (the one-process run). ``min_8bit_size=1`` makes every moment 8-bit (the tiny models'
moments are far below the default 4096 entries); each check asserts that the sharded state really holds
uint8 codes in the row form (see ``galore_mini.optim.distributed``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

import fsdp_worker
import galore_mini as gm
from galore_mini.optim import distributed, quant
from fsdp_worker import RTOL, STEP_FRACTION, assert_same_params, batches, loss_of, shard, tiny_model

OPTIMIZERS = {
    # qwen2's k_proj/v_proj (24×48) and down_proj (48×100) are left-projected: replicated flat 8-bit moments;
    # the rest right-projected (m×r moments sharded in row form) or unprojected (full-size, row form)
    "galore_8bit": dict(method="galore_8bit", lr=1e-2, rank=4, update_proj_gap=2, proj_method="power",
                        min_8bit_size=1),
    # rotates the sharded 8-bit moments at each refresh (read, rotate, write: a flush before the update)
    "galore_8bit_project": dict(method="galore_8bit", lr=1e-2, rank=4, update_proj_gap=2, proj_method="power",
                                moment_policy="project", min_8bit_size=1),
    "galore_8bit_svd": dict(method="galore_8bit", lr=1e-2, rank=4, update_proj_gap=2, proj_method="svd",
                            proj_type="right", min_8bit_size=1),
    "galore_mini_8bit_svd": dict(method="galore_mini_8bit", lr=1e-2, rank=4, update_proj_gap=2, proj_method="svd",
                                 proj_type="right", min_8bit_size=1),
    "galore_mini_8bit": dict(method="galore_mini_8bit", lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1,
                             min_8bit_size=1),
}
CHAIN = "galore_8bit"  # the optimizer of the checkpoint chain


def make_optimizer(model, name: str):
    options = dict(OPTIMIZERS[name])
    return gm.create_optimizer(model, options.pop("method"), **options)


def ordered_states(opt) -> list[dict]:
    return [opt.state[p] for g in opt.param_groups for p in g["params"]]


def whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if distributed.is_dtensor(value) else value


def as_flat(value: torch.Tensor, ref: torch.Tensor, cols: int, is_absmax: bool) -> torch.Tensor:
    """A gathered sharded 8-bit tensor (row form) in one process's flat form."""
    if value.dim() == ref.dim():
        return value
    return distributed.rows_to_flat_absmax(value, cols) if is_absmax else value.reshape(-1)


def assert_same_codes(opt, ref_opt, what: str) -> dict:
    """Every 8-bit moment: the sharded run's codes and absmax, gathered, equal one process's exactly.
    Returns counts of the 8-bit keys seen (row form / flat replicated) so the caller can insist on both."""
    seen = {"rows": 0, "flat": 0}
    for state, ref_state in zip(ordered_states(opt), ordered_states(ref_opt)):
        for key, value in state.items():
            if value.dtype != torch.uint8:
                continue
            local = distributed.local(value)
            kind = "rows" if local.dim() == 2 else "flat"
            seen[kind] += 1
            ref_codes, ref_absmax = ref_state[key], ref_state[key + "_absmax"]
            cols = ref_codes.numel() // value.shape[0] if kind == "rows" else 0
            if kind == "rows":
                # codes sharded by rows like W: this rank holds its rows only
                assert tuple(value.shape) == (ref_codes.numel() // cols, cols), (what, key, value.shape)
                assert local.shape[0] < value.shape[0] or dist.get_world_size() == 1, (what, key)
            codes = as_flat(whole(value), ref_codes, cols, False)
            absmax = as_flat(whole(state[key + "_absmax"]), ref_absmax, cols, True)
            assert torch.equal(codes, ref_codes), \
                f"{what}: {key}: {int((codes != ref_codes).sum())} of {codes.numel()} codes differ"
            assert torch.equal(absmax, ref_absmax), f"{what}: {key}_absmax differs"
    return seen


def train_pair(kind: str, name: str, steps: int):
    return fsdp_worker.train_pair(kind, name, steps, make=lambda model: make_optimizer(model, name))


def check_quantizer(report: dict) -> None:
    """The sharded write alone: each rank quantises its rows of one tensor; gathered, the codes and absmax
    are one process's exactly. Shapes with blocks straddling every boundary, several boundaries in one
    block (tiny shards), a rank without rows, 1-D moments (cols 1) and rows longer than a block."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    for m, cols in ((32, 4), (33, 1), (2, 5), (7, 300), (24, 48), (101, 48), (5, 512)):
        for signed in (True, False):
            full = torch.randn(m, cols, generator=gen) * torch.logspace(-4, 1, m * cols).view(m, cols)
            full = full if signed else full.abs()
            codes, absmax = quant.quantize(full, signed)
            param = distribute_tensor(torch.zeros(m, cols), mesh, [Shard(0)])
            spec = distributed.shard_spec(param)
            shape, table_shape = distributed.row_form_shapes(m * cols, m)
            local_codes = torch.zeros(spec.rows, cols, dtype=torch.uint8)
            table = torch.zeros(spec.rows, table_shape[1])
            writer = distributed.RowQuantizer()
            writer.write(spec, local_codes, table, spec.local_rows(full), signed)
            writer.flush()
            got = spec.sharded(local_codes, shape).full_tensor()
            got_table = spec.sharded(table, table_shape).full_tensor()
            assert torch.equal(got.reshape(-1), codes), (m, cols, signed)
            assert torch.equal(distributed.rows_to_flat_absmax(got_table, cols), absmax), (m, cols, signed)
            # and read back: the same values as one process's dequantisation
            values = distributed.rows_dequantize(local_codes, table, spec.offset, signed)
            back = spec.sharded(values.contiguous(), (m, cols)).full_tensor()
            assert torch.equal(back.reshape(-1), quant.dequantize(codes, absmax, signed)), (m, cols, signed)


def check_exact(report: dict) -> None:
    """Bit-identical gradients in (each rank gets its rows of the one-process gradient): with the exact
    SVD refresh (identical projectors) and right projections only (no reduction in the step), the
    sharded 8-bit step quantises exactly as one process: codes and absmax equal bit for bit, after 4
    steps, and GaLoreAdamW8bit's weights too."""
    from torch.distributed.tensor import DTensor

    for kind, name in (("llama", "galore_8bit_svd"), ("qwen2", "galore_mini_8bit_svd")):
        reference = tiny_model(kind)
        model = shard(copy.deepcopy(reference))
        ref_opt, opt = make_optimizer(reference, name), make_optimizer(model, name)
        ref_params = dict(reference.named_parameters())
        for x in batches(kind, 4):
            loss_of(reference, x).backward()
            for n, p in model.named_parameters():
                spec = distributed.shard_spec(p)
                g = spec.local_rows(ref_params[n].grad).clone()
                p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride())
            for o in (ref_opt, opt):
                o.step()
                o.zero_grad()
        seen = assert_same_codes(opt, ref_opt, f"exact {kind}/{name}")
        assert seen["rows"] > 0
        # GaLore-mini's per-head v sums squares across ranks (round-off); GaLoreAdamW's step reduces nothing
        assert_same_params(model, reference, f"exact {kind}/{name}", exact=name == "galore_8bit_svd")


def assert_close_but_for_code_flips(sharded, reference, what: str, lr: float) -> None:
    # `reference`: a model, or its weights by name
    """FSDP2's reduce-scatter sums the gradient in another order than one process, so a moment entry
    within round-off of a code boundary can take the neighbouring code. Every weight is within a
    fraction of a step of one process's; the weights beyond test_fsdp's fp32 tolerance are counted in
    the lines a flipped code reaches: a flipped entry of a low-rank moment moves one whole row (right
    projection) or column (left projection) of the back-projected update, an entry of a full-size
    moment one weight. At most 1 such line in 2000 weights (seen: 1-5 per run, on two CPU models); a
    wrong block or boundary would move whole blocks of 256."""
    ref = reference if isinstance(reference, dict) else dict(reference.named_parameters())
    total = lines = 0
    for name, p in sharded.named_parameters():
        full, r = whole(p).detach(), ref[name].detach()
        diff = (full - r).abs()
        beyond = (diff > RTOL * r.abs() + STEP_FRACTION * lr).nonzero()
        if beyond.shape[1] == 2:  # the fewest rows or columns that cover every weight beyond round-off
            lines += min(len(beyond[:, 0].unique()), len(beyond[:, 1].unique()))
        else:
            lines += beyond.shape[0]
        total += r.numel()
        assert float(diff.max()) <= 0.25 * lr, f"{what}: {name} differs by {float(diff.max()):.3g}"
    assert lines <= total // 2000, f"{what}: weights beyond fp32 round-off in {lines} rows/columns of {total} weights"


def close_for_chain(model, expected: dict, what: str) -> None:
    """A resharded resume of the checkpoint chain against the run that wrote it: equal but for code flips."""
    assert_close_but_for_code_flips(model, expected, what, OPTIMIZERS[CHAIN]["lr"])


def assert_codes_near(opt, ref_opt, what: str) -> None:
    """Codes agree but for isolated flips at code boundaries (see above; 13 of 21824 seen with
    moment_policy="project", whose rotations carry a flip into other entries) and for the low-rank
    coordinates of a basis vector whose sign came out the other way (64 entries, one column of a
    64×4 moment, seen with the global batch of 12); absmax to round-off.
    A flip is judged by the values the codes stand for, not by how many codes apart they are: the
    codebook is logarithmic, so an entry far below its block's absmax can move several codes while
    its value moves by little at the block's scale; a flip at a boundary between large values moves
    one code, about 12% of the value. A low-rank coordinate also moves when the power iteration's
    basis turns a little within a nearly degenerate subspace, which the round-off of another
    summation order can do (seen on an Intel Xeon: 4 codes, 4.4% of its block's absmax); the update
    it makes is the same, and the weights are checked above.
    The exact agreement of the quantisation itself is check_exact's and check_quantizer's."""
    total = differ = worst = sign_flipped = 0
    for state, ref_state in zip(ordered_states(opt), ordered_states(ref_opt)):
        for key, value in state.items():
            if value.dtype != torch.uint8:
                continue
            ref_codes, ref_absmax = ref_state[key], ref_state[key + "_absmax"]
            cols = ref_codes.numel() // value.shape[0] if value.dim() == 2 else 0
            codes = as_flat(whole(value), ref_codes, cols, False)
            absmax = as_flat(whole(state[key + "_absmax"]), ref_absmax, cols, True)
            flips = (codes != ref_codes).reshape(-1)
            if not key.startswith("exp_avg_sq"):
                # a basis vector whose sign came out the other way (round-off at a refresh can decide it; the
                # update is the same, the params are checked) negates its low-rank coordinate: the signed
                # codebook is symmetric, so -x has code 2·127 - c exactly
                negated = (codes.int() + ref_codes.int() == 2 * quant.SIGNED_ZERO_CODE).reshape(-1)
                sign_flipped += int((flips & negated).sum())
                flips &= ~negated
            total += codes.numel()
            differ += int(flips.sum())
            # a flip moves a value to a neighbouring code (12% of it; two codes apart across the signed zero code),
            # or by at most 5% of its block's absmax (a small entry, or a turned basis vector; see above)
            signed = not key.startswith("exp_avg_sq")
            values = quant.dequantize(codes, absmax, signed).reshape(-1)[flips]
            ref_values = quant.dequantize(ref_codes, ref_absmax, signed).reshape(-1)[flips]
            scale = torch.repeat_interleave(ref_absmax.reshape(-1), quant.BLOCK)[:ref_codes.numel()][flips]
            allowed = 0.25 * torch.maximum(values.abs(), ref_values.abs()) + 0.05 * scale
            excess = ((values - ref_values).abs() / allowed).max() if flips.any() else torch.zeros(())
            worst = max(worst, float(excess))
            torch.testing.assert_close(absmax, ref_absmax, rtol=1e-3, atol=0, msg=lambda m: f"{what}: {key}: {m}")
    assert differ <= total // 500 and worst <= 1, \
        f"{what}: {differ} of {total} codes differ, a value by up to {worst:.3g}× a boundary flip's"
    assert sign_flipped <= total // 50, f"{what}: {sign_flipped} of {total} codes negated"


def check_parity(report: dict) -> None:
    cases = [("llama", "galore_8bit"), ("qwen2", "galore_8bit"), ("llama", "galore_8bit_project"),
             ("qwen2", "galore_mini_8bit")]
    for kind, name in cases:
        model, opt, reference, ref_opt = train_pair(kind, name, steps=4)
        what = f"{kind}/{name}"
        assert_close_but_for_code_flips(model, reference, what, OPTIMIZERS[name]["lr"])
        assert_codes_near(opt, ref_opt, what)
        seen = {"rows": 0, "flat": 0}
        for state in opt.state.values():
            for value in state.values():
                if value.dtype == torch.uint8:
                    seen["rows" if distributed.local(value).dim() == 2 else "flat"] += 1
        assert seen["rows"] > 0, (what, seen)
        if kind == "qwen2" and name == "galore_8bit":
            assert seen["flat"] > 0, (what, seen)  # left projections' replicated moments
        assert opt.state_bytes() < ref_opt.state_bytes(), what
        report.setdefault("state_bytes", {})[what] = [opt.state_bytes(), ref_opt.state_bytes()]
    check_state_dict_both_ways(report)


def check_state_dict_both_ways(report: dict) -> None:
    """``load_state_dict`` across forms: one process's state (flat) into the sharded optimizer, and the
    sharded optimizer's (row form DTensors) into a plain one; both exact."""
    model, opt, reference, ref_opt = train_pair("qwen2", "galore_mini_8bit", steps=2)
    into_sharded = make_optimizer(model, "galore_mini_8bit")
    into_sharded.load_state_dict(ref_opt.state_dict())
    assert_same_codes(into_sharded, ref_opt, "one process -> sharded")
    for state, ref_state in zip(ordered_states(into_sharded), ordered_states(ref_opt)):
        for key, value in state.items():
            if value.dtype != torch.uint8 and not key.endswith("_absmax"):
                assert torch.equal(whole(value), ref_state[key]), key
    into_plain = make_optimizer(copy.deepcopy(reference), "galore_mini_8bit")
    into_plain.load_state_dict(opt.state_dict())
    for state, ref_state in zip(ordered_states(into_plain), ordered_states(ref_opt)):
        for key, value in state.items():
            assert not distributed.is_dtensor(value) and value.shape == ref_state[key].shape, key
    assert_same_codes(opt, into_plain, "sharded -> one process")


def check_checkpoints(report: dict, out: Path) -> None:
    """The DCP chain of fsdp_worker with 8-bit moments (which must really be in the sharded row form)."""
    def probe(opt):
        assert any(distributed.local(v).dim() == 2 and v.dtype == torch.uint8 for s in opt.state.values()
                   for v in s.values()), "no sharded 8-bit state"

    fsdp_worker.chain_checkpoints(report, out, lambda model: make_optimizer(model, CHAIN), probe=probe,
                                  close=close_for_chain)


CHECKS = {"checkpoints": check_checkpoints, "quantizer": check_quantizer, "exact": check_exact, "parity": check_parity}


def run(rank: int, world: int, init_file: str, checks: list[str], out: str) -> None:
    fsdp_worker.run_checks(CHECKS, rank, world, init_file, checks, out)


def one_process_checkpoint(out: Path) -> None:
    fsdp_worker.one_process_checkpoint(out, make=lambda model: make_optimizer(model, CHAIN))


def one_process_resumes(out: Path) -> list[str]:
    """Every sharded checkpoint in `out` resumed by one process (loaded into one process's flat 8-bit form)."""
    def probe(opt):
        assert all(v.dim() == 1 for s in opt.state.values() for v in s.values() if v.dtype == torch.uint8)

    return fsdp_worker.one_process_resumes(out, make=lambda model: make_optimizer(model, CHAIN), probe=probe,
                                           close=close_for_chain)
