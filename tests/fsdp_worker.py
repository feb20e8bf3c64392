"""Worker processes for tests/test_fsdp.py: FSDP2 (fully_shard) on CPU with gloo.

Every rank also trains an unsharded copy of the same model on the whole global batch with the same
optimizer (the one-process run), so each check compares the sharded run against one process in the
same worker. Checks raise AssertionError (which ``torch.multiprocessing.spawn`` re-raises in the test).
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import importlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import galore_mini as gm

VOCAB = {"llama": 128, "qwen2": 101}
# fp32 round-off of the reductions (FSDP2's reduce-scatter, our all-reduces) after a few Adam steps: Adam
# divides by √v + ε, so an entry whose gradient is near ε carries that round-off into a sizeable part of its
# step; the tolerance is a fraction of one step (lr) — a wrong update (a wrong block, a rank's stale rows)
# is a whole step off
RTOL, STEP_FRACTION = 1e-4, 2e-3


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":  # 32 query rows of 4 heads × 8: at 3 ranks rows 11/11/10, so heads straddle shards
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB[kind], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                             tie_word_embeddings=False)
        return LlamaForCausalLM(config)
    # GQA: 4 query heads and 2 key/value heads of 12; k_proj is 24×48 (left-projected), its first head's
    # rows 0-11 straddle ranks 0 and 1 at 3 ranks; vocab 101 and intermediate 100 shard unevenly
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB[kind], hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, use_sliding_window=False)
    return Qwen2ForCausalLM(config)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def batches(kind: str, steps: int, batch: int = 12, seq: int = 12, seed: int = 1):
    # 12 examples: an equal share for every rank at 2, 3 and 4 ranks
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB[kind], (batch, seq), generator=gen) for _ in range(steps)]


def local_batch(x: torch.Tensor) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    per = x.shape[0] // world
    assert per * world == x.shape[0], f"a global batch of {x.shape[0]} does not split over {world} ranks"
    return x[rank * per:(rank + 1) * per]


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


OPTIMIZERS = {
    "galore_svd": dict(method="galore", lr=1e-2, rank=4, update_proj_gap=2, proj_method="svd"),
    "galore_power": dict(method="galore", lr=1e-2, rank=4, update_proj_gap=2, proj_method="power"),
    "galore_mini": dict(method="galore_mini", lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1),
    "galore_mini_right": dict(method="galore_mini", lr=1e-2, rank=4, update_proj_gap=2, proj_type="right"),
    "galore_mini_project": dict(method="galore_mini", lr=1e-2, rank=4, update_proj_gap=2, moment_policy="project",
                                adaptive_gap=True, gap_window=1, gap_threshold=0.0, proj_method="randomized"),
    "galore_full": dict(method="galore", lr=1e-2, rank=4, update_proj_gap=2, proj_type="full", proj_method="power"),
    "adam_mini": dict(method="adam_mini", lr=1e-3, weight_decay=0.1),
}


def make_optimizer(model, name: str, **extra):
    options = dict(OPTIMIZERS[name])
    return gm.create_optimizer(model, options.pop("method"), **options, **extra)


def assert_same_params(sharded, reference, what: str, lr: float = 1e-2, exact: bool = False) -> None:
    ref = dict(reference.named_parameters())
    for name, p in sharded.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        if exact:
            assert torch.equal(full, ref[name].detach()), f"{what}: {name} differs"
        else:
            torch.testing.assert_close(full, ref[name].detach(), rtol=RTOL, atol=STEP_FRACTION * lr,
                                       msg=lambda m: f"{what}: {name}: {m}")


def assert_same_updates(sharded, reference, initial, what: str, rel: float) -> None:
    """Each tensor's total change ``W_T - W_0`` agrees with one process to `rel` in Frobenius norm.

    For a two-sided projection an elementwise bound is the wrong yardstick: Adam's normalisation turns
    the round-off of both bases (near-equal singular values rotate within their span) into relative
    differences of individual entries whose gradient is tiny, while the update as a whole agrees."""
    ref, start = dict(reference.named_parameters()), dict(initial.named_parameters())
    for name, p in sharded.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        change_ref = ref[name].detach() - start[name].detach()
        error = (full.detach() - ref[name].detach()).norm()
        scale = change_ref.norm()
        assert error <= rel * scale, f"{what}: {name}: |ΔW - ΔW_ref| = {float(error):.3g} > {rel} · |ΔW_ref| = {float(rel * scale):.3g}"


def train_pair(kind: str, name: str, steps: int, *, nan_at=None, clip=None, layerwise=False, extra=None, make=None):
    """The sharded model and the one-process model after `steps` steps of optimizer `name` (or of what
    `make(model)` builds)."""
    extra = extra or {}
    make = make or (lambda model: make_optimizer(model, name, **extra))
    reference = tiny_model(kind)
    model = shard(copy.deepcopy(reference))
    ref_opt = make(reference)
    opt = make(model)
    handle = gm.layerwise(model, opt, max_grad_norm=clip) if layerwise else None
    for step, x in enumerate(batches(kind, steps)):
        loss_of(reference, x).backward()
        loss_of(model, local_batch(x)).backward()
        if nan_at == step:
            # a NaN on rank 1's rows only: one process sees it in the whole gradient
            name_bad = "model.layers.0.mlp.up_proj.weight"
            bad = dict(model.named_parameters())[name_bad]
            if dist.get_rank() == 1:
                bad.grad.to_local()[0, 0] = float("nan")
            rank1_offset = -(-bad.shape[0] // dist.get_world_size())
            dict(reference.named_parameters())[name_bad].grad[rank1_offset, 0] = float("nan")
        if clip is not None:
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
            if not layerwise:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        ref_opt.step()
        ref_opt.zero_grad()
        if handle is None:
            opt.step()
            opt.zero_grad()
    return model, opt, reference, ref_opt


def check_parity(report: dict, cases=None) -> None:
    """Each optimizer on each model: the sharded run equals one process; replicated state is identical
    on every rank; sharded state adds up to the one-process state exactly."""
    cases = cases or [(kind, name) for kind in ("llama", "qwen2") for name in OPTIMIZERS
                      if not (kind == "qwen2" and name in ("galore_mini_right", "galore_mini_project", "galore_full"))]
    for kind, name in cases:
        initial = tiny_model(kind) if name == "galore_full" else None
        model, opt, reference, ref_opt = train_pair(kind, name, steps=4)
        # two-sided projection at rank 4: the r×r low-rank space carries the round-off of both bases (near-equal
        # singular values rotate within their span), measured 10-50× the one-sided runs' differences per entry;
        # so it is held to its whole update instead: relative error at most 1.6e-3 measured (v_proj), bound 5e-3
        # (a wrong reduction across ranks errs by O(1))
        if name == "galore_full":
            assert_same_updates(model, reference, initial, f"{kind}/{name}", rel=5e-3)
        else:
            assert_same_params(model, reference, f"{kind}/{name}", OPTIMIZERS[name]["lr"])
        check_projectors_identical(opt, f"{kind}/{name}")
        report.setdefault("state_bytes", {})[f"{kind}/{name}"] = [opt.state_bytes(), ref_opt.state_bytes()]
        report.setdefault("digests", {})[f"{kind}/{name}"] = digest(model)
        check_state_layout(opt, ref_opt, f"{kind}/{name}")


def digest(model) -> str:
    """A hash of the whole weights: repeated runs must give the same bits (determinism)."""
    import hashlib

    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().tobytes())
    return h.hexdigest()[:16]


def check_projectors_identical(opt, what: str) -> None:
    """Replicated state is bit-identical on every rank (same seeds, same reductions)."""
    for state in opt.state.values():
        for key, value in state.items():
            whole = value.full_tensor() if hasattr(value, "full_tensor") else value
            gathered = [torch.empty_like(whole) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, whole.contiguous())
            assert all(torch.equal(g, gathered[0]) for g in gathered), f"{what}: state {key} differs across ranks"


def check_state_layout(opt, ref_opt, what: str) -> None:
    """Sharded state keys: this rank's rows; all of them together: exactly the one-process bytes."""
    from torch.distributed.tensor import Replicate

    sharded_bytes = torch.zeros(1, dtype=torch.float64)
    one_process_sharded = 0
    by_shape = {}
    ref_states = [ref_opt.state[p] for g in ref_opt.param_groups for p in g["params"]]
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert len(ref_states) == len(states)
    for ref_state, state in zip(ref_states, states):
        assert set(ref_state) == set(state), what
        for key, value in state.items():
            assert tuple(value.shape) == tuple(ref_state[key].shape), f"{what}: {key}"
            if hasattr(value, "placements") and not all(isinstance(x, Replicate) for x in value.placements):
                sharded_bytes += value.to_local().numel() * value.element_size()
                one_process_sharded += ref_state[key].numel() * ref_state[key].element_size()
    dist.all_reduce(sharded_bytes)
    assert int(sharded_bytes) == one_process_sharded, f"{what}: sharded state bytes {int(sharded_bytes)} != " \
                                                      f"{one_process_sharded}"
    assert opt.state_bytes() < ref_opt.state_bytes(), what


def check_nan_and_clip(report: dict) -> None:
    model, opt, reference, ref_opt = train_pair("llama", "galore_mini", steps=3, nan_at=1)
    assert_same_params(model, reference, "nan")
    assert opt.nonfinite_skips == ref_opt.nonfinite_skips == 1, (opt.nonfinite_skips, ref_opt.nonfinite_skips)
    # clip_grad_norm_ on DTensor gradients (torch reduces the norm across shards), then our step
    model, opt, reference, ref_opt = train_pair("llama", "galore_power", steps=3, clip=0.05)
    assert_same_params(model, reference, "clip")
    model, opt, reference, ref_opt = train_pair("qwen2", "adam_mini", steps=3, nan_at=2)
    assert_same_params(model, reference, "nan adam_mini", OPTIMIZERS["adam_mini"]["lr"])
    assert opt.nonfinite_skips == 1


def check_layerwise(report: dict) -> None:
    """FSDP2 calls post-accumulate-grad hooks on each sharded parameter after its reduce-scatter:
    layer-wise updates there see the reduced gradient rows and equal ordinary steps."""
    model, opt, reference, _ = train_pair("qwen2", "galore_mini", steps=3, layerwise=True)
    assert_same_params(model, reference, "layerwise fsdp2")

    # layer-wise clipping reduces each sharded gradient's norm across ranks. Its coefficients depend on
    # the order in which gradients become final, which differs between FSDP2 (reduce-scatter order) and
    # one process (autograd order), so where it clips the runs differ by design; the global norm it
    # reports does not depend on the order, and where it does not clip the runs are equal.
    for max_norm, steps in ((100.0, 3), (0.05, 1)):
        reference = tiny_model("llama")
        model = shard(copy.deepcopy(reference))
        ref_opt, opt = make_optimizer(reference, "galore_power"), make_optimizer(model, "galore_power")
        ref_handle = gm.layerwise(reference, ref_opt, max_grad_norm=max_norm, independent_ranks=True)
        handle = gm.layerwise(model, opt, max_grad_norm=max_norm)
        for x in batches("llama", steps):
            loss_of(reference, x).backward()
            loss_of(model, local_batch(x)).backward()
            assert handle.stepped and ref_handle.stepped
            torch.testing.assert_close(handle.last_grad_norm, ref_handle.last_grad_norm, rtol=1e-5, atol=0)
        if max_norm > 1:
            assert_same_params(model, reference, "layerwise fsdp2 with clipping")

    # accumulation: FSDP2 reduces (and calls the hooks) only in the micro-batch with gradient sync on
    reference = tiny_model("qwen2")
    model = shard(copy.deepcopy(reference))
    ref_opt, opt = make_optimizer(reference, "galore_mini"), make_optimizer(model, "galore_mini")
    handle = gm.layerwise(model, opt)
    xs = batches("qwen2", 4)
    for first, second in (xs[:2], xs[2:]):
        for micro, x in enumerate((first, second)):
            (loss_of(reference, x) / 2).backward()
            model.set_requires_gradient_sync(micro == 1)
            (loss_of(model, local_batch(x)) / 2).backward()
            assert handle.stepped == (micro == 1)
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_params(model, reference, "layerwise fsdp2 accumulated")
    try:
        gm.layerwise(model, make_optimizer(model, "galore_mini"), accumulation_steps=2)
    except gm.UsageError as err:
        assert "set_requires_gradient_sync" in str(err), err
    else:
        raise AssertionError("accumulation_steps=2 under FSDP2 was not refused")


def dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def dcp_load(model, opt, path) -> None:
    """DCP resume: the optimizer state template comes from get_state_dict (which initialises it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from galore_mini.optim import distributed

    # fit_to_checkpoint: 8-bit moments saved in the other form (one process's flat / a sharded row form)
    state = distributed.fit_to_checkpoint(dcp_state(model, opt), path)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_steps(model, opt, xs, sharded: bool) -> None:
    for x in xs:
        loss_of(model, local_batch(x) if sharded else x).backward()
        opt.step()
        opt.zero_grad()


def chain_checkpoints(report: dict, out: Path, make, prefix: str = "ckpt", reshard: bool = True, probe=None,
                      close=None) -> None:
    """Save at step 2 (DCP, to ``out/{prefix}-{world}``), go on to step 4; resume from the checkpoint:
    bit-exact at this world size. With `reshard`, every other ``{prefix}-*`` checkpoint in `out` (other
    world sizes, or one process's, written by the test) resumes here to round-off, or as
    ``close(model, expected weights, what)`` judges (8-bit moments: code flips). `make(model)` builds
    the optimizer; `probe(opt)`, if given, checks its state after the first steps."""
    import torch.distributed.checkpoint as dcp

    world = dist.get_world_size()
    final_path = lambda world: out / f"final{prefix[len('ckpt'):]}-{world}.pt"  # noqa: E731
    xs = batches("qwen2", 4, seed=5)
    model = shard(tiny_model("qwen2"))
    opt = make(model)
    run_steps(model, opt, xs[:2], True)
    if probe is not None:
        probe(opt)
    dcp.save(dcp_state(model, opt), checkpoint_id=str(out / f"{prefix}-{world}"))
    run_steps(model, opt, xs[2:], True)
    final = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(final, final_path(world))

    resumed = shard(tiny_model("qwen2", seed=7))  # other weights: the checkpoint must overwrite them
    resumed_opt = make(resumed)
    dcp_load(resumed, resumed_opt, out / f"{prefix}-{world}")
    run_steps(resumed, resumed_opt, xs[2:], True)
    for k, v in resumed.named_parameters():
        assert torch.equal(v.full_tensor(), final[k]), f"{prefix}: DCP resume at {world} ranks not exact: {k}"
    if not reshard:
        return
    for other in sorted(out.glob(f"{prefix}-*")):
        saved_world = other.name.rsplit("-", 1)[1]
        if saved_world == str(world):
            continue
        # resharded: saved at another world size (or by one process), resumed here
        moved = shard(tiny_model("qwen2", seed=7))
        moved_opt = make(moved)
        dcp_load(moved, moved_opt, other)
        run_steps(moved, moved_opt, xs[2:], True)
        expected = torch.load(final_path(saved_world), weights_only=True)
        if close is not None:
            close(moved, expected, f"{other.name} -> {world} ranks")
            report.setdefault("resharded", []).append(f"{other.name}->{world}")
            continue
        for k, v in moved.named_parameters():
            torch.testing.assert_close(v.full_tensor(), expected[k], rtol=RTOL, atol=STEP_FRACTION * 1e-2,
                                       msg=lambda m: f"{other.name} -> {world} ranks: {k}: {m}")
        report.setdefault("resharded", []).append(f"{other.name}->{world}")


def check_checkpoints(report: dict, out: Path, name: str = "galore_mini") -> None:
    chain_checkpoints(report, out, lambda model: make_optimizer(model, name))


def check_ddp_layerwise_refused(report: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(tiny_model("llama"))
    opt = gm.create_optimizer(model.module, "galore_mini", lr=1e-2, rank=4)
    for target in (model, model.module):
        try:
            gm.layerwise(target, opt)
        except gm.UsageError as err:
            assert "DistributedDataParallel" in str(err), err
        else:
            raise AssertionError("layerwise under DDP was not refused")


def check_hsdp(report: dict) -> None:
    """A 2-D mesh (HSDP: replicate × shard) at its cheapest: 1 × world. Rows shard on the second mesh
    dimension; the optimizer reduces over that dimension's group only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
    reference = tiny_model("qwen2")
    model = copy.deepcopy(reference)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert len(model.model.embed_tokens.weight.placements) == 2
    ref_opt, opt = make_optimizer(reference, "galore_mini"), make_optimizer(model, "galore_mini")
    for x in batches("qwen2", 3):
        loss_of(reference, x).backward()
        loss_of(model, local_batch(x)).backward()
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    assert_same_params(model, reference, "hsdp")


def expect_usage_error(fn, *needles) -> None:
    try:
        fn()
    except gm.UsageError as err:
        for needle in needles:
            assert needle in str(err), (needle, str(err))
    else:
        raise AssertionError(f"no UsageError (expected one naming {needles})")


def check_bad_input(report: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    by_cols = torch.nn.Parameter(distribute_tensor(torch.randn(12, 16), mesh, [Shard(1)]))
    by_rows = torch.nn.Parameter(distribute_tensor(torch.randn(12, 16), mesh, [Shard(0)]))
    plain = torch.nn.Parameter(torch.randn(12, 16))
    expect_usage_error(lambda: gm.GaLoreAdamW([{"params": [by_cols], "rank": 2, "param_names": ["tp.weight"]}]),
                       "'tp.weight'", "Shard(dim=1)", "Shard(0)")
    expect_usage_error(lambda: gm.AdamMini([by_cols]), "Shard(dim=1)")
    expect_usage_error(lambda: gm.GaLoreMini([{"params": [by_rows, plain], "rank": 2}]), "mixes DTensor", "[12, 16]")
    # plain and sharded parameters in separate groups are fine; a gradient replaced by hand is not
    opt = gm.GaLoreMini([{"params": [by_rows], "rank": 2}, {"params": [plain]}])
    by_rows.grad = distribute_tensor(torch.ones(12, 16), mesh, [Replicate()])
    expect_usage_error(opt.step, "the gradient of", "Replicate()")


def check_parity_lite(report: dict) -> None:
    check_parity(report, [("llama", "galore_mini"), ("llama", "galore_full"), ("qwen2", "galore_power"), ("qwen2", "adam_mini")])
    # a one-process optimizer checkpoint (plain tensors, torch.save style) into a sharded optimizer:
    # each rank takes its rows of the sharded keys, and the whole state is the saved one exactly
    model, _, reference, ref_opt = train_pair("qwen2", "galore_mini", steps=2)
    opt = make_optimizer(model, "galore_mini")
    opt.load_state_dict(ref_opt.state_dict())
    ref_states = [ref_opt.state[p] for g in ref_opt.param_groups for p in g["params"]]
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    for ref_state, state in zip(ref_states, states):
        assert set(ref_state) == set(state)
        for key, value in state.items():
            whole = value.full_tensor() if hasattr(value, "full_tensor") else value
            assert hasattr(value, "full_tensor") == (key not in ("step", "refresh", "similarity")), key
            assert torch.equal(whole, ref_state[key]), key


CHECKS = {"parity_lite": check_parity_lite, "hsdp": check_hsdp, "bad_input": check_bad_input, "parity": check_parity, "nan_clip": check_nan_and_clip, "layerwise": check_layerwise,
          "checkpoints": check_checkpoints, "ddp_layerwise": check_ddp_layerwise_refused}


@contextlib.contextmanager
def joined_group(rank: int, world: int, init_file: str):
    """This process in a gloo group of `world` for the block, left cleanly (see ``leave_distributed``)."""
    from galore_mini.train.loop import leave_distributed

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # should a rank die of a signal (SIGABRT, SIGSEGV), its threads' Python stacks reach the test's stderr
    faulthandler.enable(all_threads=True)
    # imported before the group exists, so its `group=group.WORLD` defaults do not pin the world group
    # past destroy_process_group (gloo's threads would then outlive the interpreter: "terminate called
    # without an active exception", SIGABRT; see "DDP" in docs/pretraining.md)
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    clean = False
    try:
        yield
        clean = True
    finally:
        leave_distributed(clean)  # a barrier when all went well, gc, destroy_process_group


def run_checks(table: dict, rank: int, world: int, init_file: str, checks: list[str], out: str) -> None:
    """Run `checks` (names in `table`; "checkpoints" also takes the output folder) on every rank; rank 0
    writes ``report-{world}.json``."""
    with joined_group(rank, world, init_file):
        report: dict = {}
        for check in checks:
            if check == "checkpoints":
                table[check](report, Path(out))
            else:
                table[check](report)
            dist.barrier()
        if rank == 0:
            Path(out, f"report-{world}.json").write_text(json.dumps(report))


def run(rank: int, world: int, init_file: str, checks: list[str], out: str) -> None:
    run_checks(CHECKS, rank, world, init_file, checks, out)


def spawn(run_fn, world: int, checks: list[str], out: Path) -> dict:
    """`run_fn` (a worker module's ``run``) on `world` processes; the report rank 0 wrote."""
    import torch.multiprocessing as mp

    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in env_keys if k in os.environ}
    try:
        mp.spawn(run_fn, args=(world, str(out / f"pg-{world}"), checks, str(out)), nprocs=world)
    finally:
        os.environ.update(saved)
    return json.loads((out / f"report-{world}.json").read_text())


def one_process_checkpoint(out: Path, name: str = "galore_mini", make=None) -> None:
    """Written by the test process (no process group): the one-process run's checkpoint and final weights."""
    import torch.distributed.checkpoint as dcp

    make = make or (lambda model: make_optimizer(model, name))
    xs = batches("qwen2", 4, seed=5)
    model = tiny_model("qwen2")
    opt = make(model)
    run_steps(model, opt, xs[:2], False)
    dcp.save(dcp_state(model, opt), checkpoint_id=str(out / "ckpt-1"))
    run_steps(model, opt, xs[2:], False)
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, out / "final-1.pt")


def one_process_resumes(out: Path, name: str = "galore_mini", make=None, probe=None, close=None) -> list[str]:
    """Every sharded checkpoint in `out`, resumed by one process (no process group): equal to the run
    that wrote it, to round-off or as `close` judges (see :func:`chain_checkpoints`). `probe(opt)`, if
    given, checks the loaded state."""
    make = make or (lambda model: make_optimizer(model, name))
    done = []
    xs = batches("qwen2", 4, seed=5)
    for path in sorted(out.glob("ckpt-*")):
        world = path.name.split("-")[1]
        if world == "1":
            continue
        model = tiny_model("qwen2", seed=7)
        opt = make(model)
        dcp_load(model, opt, path)
        if probe is not None:
            probe(opt)
        run_steps(model, opt, xs[2:], False)
        expected = torch.load(out / f"final-{world}.pt", weights_only=True)
        if close is not None:
            close(model, expected, f"{path.name} -> 1 process")
        else:
            for k, v in model.named_parameters():
                torch.testing.assert_close(v.detach(), expected[k], rtol=RTOL, atol=STEP_FRACTION * 1e-2,
                                           msg=lambda m: f"{path.name} -> 1 process: {k}: {m}")
        done.append(f"{path.name}->1")
    return done
