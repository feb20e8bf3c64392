"""Worker processes for tests/test_fsdp_more.py: GaLoreAdafactor and GaLore-mini's ablations (approach 1
and 2) on FSDP2 (fully_shard) with gloo, each rank beside a one-process copy of the same run.

Uses the models, batches and checks of tests/fsdp_worker.py; only the optimizers differ (GaLoreAdafactor's
relative step needs ``lr=None``, which ``create_optimizer`` does not pass, so they are built here).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

import fsdp_worker
import galore_mini as gm
from fsdp_worker import (assert_same_params, batches, check_projectors_identical, check_state_layout,
                         dcp_state, digest, local_batch, loss_of, run_steps, shard, tiny_model)

# name: (how to build the optimizer, the step size the parameter tolerance is a fraction of). Adafactor's
# steps scale with RMS(W) (scale_parameter): about 1e-2·0.02 for the weights here, 1e-2 for the norms; so its
# tolerance is held to 1e-3 (atol 2e-6, 1/100 of a weight's step; measured differences 1/10 of that)
OPTIMIZERS = {
    # relative_step and scale_parameter by default; power refresh every 2 steps (so one inside the run)
    "adafactor_relative": (lambda model: gm.GaLoreAdafactor(
        gm.param_groups(model, "galore_adafactor", rank=4), update_proj_gap=2, proj_method="power"), 1e-3),
    # a fixed lr with a first moment, scale_parameter on, weight decay, the exact SVD refresh
    "adafactor_beta1": (lambda model: gm.GaLoreAdafactor(
        gm.param_groups(model, "galore_adafactor", rank=4), lr=1e-2, relative_step=False, scale_parameter=True,
        beta1=0.9, weight_decay=0.1, update_proj_gap=2, proj_method="svd"), 1e-3),
    "galore_mini_a1": (lambda model: gm.create_optimizer(model, "galore_mini_a1", lr=1e-2, rank=4, update_proj_gap=2,
                                                         weight_decay=0.1), 1e-2),
    "galore_mini_a2": (lambda model: gm.create_optimizer(model, "galore_mini_a2", lr=1e-2, rank=4, update_proj_gap=2),
                       1e-2),
}


def make(model, name: str):
    return OPTIMIZERS[name][0](model)


def train_pair(kind: str, name: str, steps: int):
    return fsdp_worker.train_pair(kind, name, steps, make=lambda model: make(model, name))


def check_parity(report: dict) -> None:
    """Params after 4 steps (two refreshes) equal one process; replicated state identical on every
    rank; sharded state adds up to one process's exactly; per-rank state below one process's."""
    for kind in ("llama", "qwen2"):
        for name in OPTIMIZERS:
            model, opt, reference, ref_opt = train_pair(kind, name, steps=4)
            assert_same_params(model, reference, f"{kind}/{name}", OPTIMIZERS[name][1])
            check_projectors_identical(opt, f"{kind}/{name}")
            check_state_layout(opt, ref_opt, f"{kind}/{name}")
            report.setdefault("state_bytes", {})[f"{kind}/{name}"] = [opt.state_bytes(), ref_opt.state_bytes()]
            report.setdefault("digests", {})[f"{kind}/{name}"] = digest(model)


def check_state_placements(report: dict) -> None:
    """Adafactor's row EMA shards with W's rows where R's rows are W's rows, its column EMA never;
    approach 1's v per row shards for a right projection, not for a left one (r low-rank rows)."""
    from torch.distributed.tensor import Replicate

    def sharded(value) -> bool:
        return not all(isinstance(x, Replicate) for x in value.placements)

    for name in ("adafactor_beta1", "galore_mini_a1"):
        model = shard(tiny_model("qwen2"))
        opt = make(model, name)
        run_steps(model, opt, batches("qwen2", 1), True)
        params = dict(model.named_parameters())
        right = opt.state[params["model.layers.0.self_attn.q_proj.weight"]]  # 48×48: right
        left = opt.state[params["model.layers.0.mlp.down_proj.weight"]]  # 48×100: left
        embed = opt.state[params["model.embed_tokens.weight"]]  # unprojected
        if name == "adafactor_beta1":
            assert sharded(right["exp_avg_sq_row"]) and not sharded(right["exp_avg_sq_col"])
            assert not sharded(left["exp_avg_sq_row"]) and not sharded(left["exp_avg_sq_col"])
            assert sharded(embed["exp_avg_sq_row"]) and not sharded(embed["exp_avg_sq_col"])
            norm = opt.state[params["model.norm.weight"]]
            assert sharded(norm["exp_avg_sq"]) and sharded(right["exp_avg"]) and not sharded(left["exp_avg"])
        else:
            gate = opt.state[params["model.layers.0.mlp.gate_proj.weight"]]  # 100×48: right, v per row
            assert sharded(gate["exp_avg_sq"]) and gate["exp_avg_sq"].shape == (100,)
            assert not sharded(left["exp_avg_sq"]) and left["exp_avg_sq"].shape == (4,)  # rows of R: r blocks
            assert not sharded(right["exp_avg_sq"])  # per head


def check_checkpoints(report: dict, out: Path) -> None:
    """DCP save at step 2 and go on to step 4; resume at this world size: bit-exact; the final weights
    and checkpoints are left for the test process to resume (resharded to one process)."""
    for name in ("adafactor_beta1", "galore_mini_a1", "galore_mini_a2"):
        fsdp_worker.chain_checkpoints(report, out, lambda model: make(model, name), prefix=f"ckpt-{name}",
                                      reshard=False)
        report.setdefault("resumed", []).append(name)


def check_bad_input(report: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fsdp_worker import expect_usage_error

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cube = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4, 5), mesh, [Shard(0)]))
    expect_usage_error(lambda: gm.GaLoreAdafactor([cube]), "GaLoreAdafactor", "[6, 4, 5]", "2 dimensions")


def check_estimate(report: dict) -> None:
    """`galore-mini memory --world-size 3` counts what each rank holds after a step of the registry's methods."""
    from galore_mini.memory import estimate

    for method in ("galore_adafactor", "galore_mini_a1", "galore_mini_a2"):
        model = shard(tiny_model("qwen2"))
        opt = gm.create_optimizer(model, method, rank=4)
        run_steps(model, opt, batches("qwen2", 1), True)
        est = estimate(tiny_model("qwen2"), method, rank=4, world_size=dist.get_world_size())
        held = est.rank_bytes[dist.get_rank()]["optimizer_bytes"]
        assert opt.state_bytes() == held, (method, opt.state_bytes(), held)


@contextlib.contextmanager
def counted_collectives():
    """Values our optimizers put on the wire inside the block: all-reduced (sum or max) and all-gathered
    (every rank's part, padding included). FSDP2's own collectives are other functions."""
    counts = {"reduce": 0, "gather": 0}
    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def counting_reduce(tensor, *args, **kwargs):
        counts["reduce"] += tensor.numel()
        return all_reduce(tensor, *args, **kwargs)

    def counting_gather(outputs, tensor, *args, **kwargs):
        counts["gather"] += sum(t.numel() for t in outputs)
        return all_gather(outputs, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = counting_reduce, counting_gather
    try:
        yield counts
    finally:
        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def predicted_bytes(opt, world: int, phase: str) -> float:
    """What ``distributed.communication_bytes`` says one rank sends in this step of `opt` (`phase`: plain,
    first refresh or a later refresh), plus the finiteness flags it leaves out (one value per parameter)."""
    from torch.distributed.tensor import Replicate

    from galore_mini.optim.distributed import communication_bytes
    from galore_mini.optim.projection import resolve_side

    total, flags = 0.0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            flags += group.get("nonfinite", "skip") != "off"
            side = resolve_side(group["proj_type"], p.shape) if "rank" in group else None
            moments_8bit = sum(1 for v in opt.state[p].values() if v.dtype == torch.uint8
                               and not all(isinstance(x, Replicate) for x in v.placements))
            padded_rows = -(-p.shape[0] // world) * world  # gathers send ⌈m/W⌉ rows from every rank
            sent = communication_bytes((padded_rows, *p.shape[1:]), group.get("rank", 0), side, world,
                                       method=group.get("proj_method", "power"), first=phase == "first",
                                       adafactor=isinstance(opt, gm.GaLoreAdafactor),
                                       scale_parameter=group.get("scale_parameter", False),
                                       moments_8bit=moments_8bit)
            total += sent["step"] + (sent["refresh"] if phase != "plain" else 0.0)
    return total + 2 * (world - 1) / world * 4 * flags


def check_communication(report: dict) -> None:
    """The bytes each step sends — the plain steps, the first refresh (randomized range finder) and a
    warm power (or svd) refresh — equal ``communication_bytes``'s count, the formulas of
    docs/distributed.md, for GaLore (left and right projections), GaLoreAdafactor and 8-bit moments."""
    import fsdp8_worker

    world = dist.get_world_size()
    cases = {"galore_power": lambda model: fsdp_worker.make_optimizer(model, "galore_power"),
             "galore_svd": lambda model: fsdp_worker.make_optimizer(model, "galore_svd"),
             "adafactor_relative": lambda model: make(model, "adafactor_relative"),
             "adafactor_beta1": lambda model: make(model, "adafactor_beta1"),
             "galore_8bit": lambda model: fsdp8_worker.make_optimizer(model, "galore_8bit")}
    for kind in ("llama", "qwen2"):
        for name, build in cases.items():
            model = shard(tiny_model(kind))
            opt = build(model)
            # update_proj_gap=2: the projectors are made at step 1 and refreshed at step 3
            for t, (x, phase) in enumerate(zip(batches(kind, 4), ("first", "plain", "refresh", "plain")), 1):
                loss_of(model, local_batch(x)).backward()
                with counted_collectives() as counts:
                    opt.step()
                opt.zero_grad()
                sent = 2 * (world - 1) / world * 4 * counts["reduce"] + (world - 1) / world * 4 * counts["gather"]
                predicted = predicted_bytes(opt, world, phase)
                assert abs(sent - predicted) <= 1e-9 * predicted, (kind, name, t, phase, counts, sent, predicted)
                report.setdefault("bytes_sent", {})[f"{kind}/{name}/{t}"] = sent


CHECKS = {"checkpoints": check_checkpoints, "parity": check_parity, "placements": check_state_placements,
          "bad_input": check_bad_input, "estimate": check_estimate, "communication": check_communication}


def run(rank: int, world: int, init_file: str, checks: list[str], out: str) -> None:
    fsdp_worker.run_checks(CHECKS, rank, world, init_file, checks, out)


def one_process_resumes(out: Path, world: int) -> list[str]:
    """The `world`-rank checkpoints resumed by one process (no process group): equal to the sharded run
    that wrote them, to round-off (a reshard: every sharded state key is gathered)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fsdp_worker import RTOL, STEP_FRACTION

    done = []
    xs = batches("qwen2", 4, seed=5)
    for name in ("adafactor_beta1", "galore_mini_a1", "galore_mini_a2"):
        model = tiny_model("qwen2", seed=7)
        opt = make(model, name)
        state = dcp_state(model, opt)
        dcp.load(state, checkpoint_id=str(out / f"ckpt-{name}-{world}"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        run_steps(model, opt, xs[2:], False)
        expected = torch.load(out / f"final-{name}-{world}.pt", weights_only=True)
        for k, v in model.named_parameters():
            torch.testing.assert_close(v.detach(), expected[k], rtol=RTOL, atol=STEP_FRACTION * OPTIMIZERS[name][1],
                                       msg=lambda m: f"{name}: {world} ranks -> 1 process: {k}: {m}")
        done.append(name)
    return done
