"""``galore-mini pretrain --fsdp``: FSDP2 under ``torchrun --nproc_per_node 2`` (gloo, CPU) trains what one
process trains, and resumes bit-for-bit through its DCP checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from galore_mini.errors import UsageError
from galore_mini.train import loop
from galore_mini.train.loop import train
from galore_mini.train.runs import DCP_CHECKPOINT, DCP_PREVIOUS
from pretrain_fixtures import small_config

TESTS = Path(__file__).resolve().parent

# one row per rank per micro-batch and two micro-batches a step: the global batch is one process's 4 rows,
# and the gradient reduce-scatter is held back for the first micro-batch (set_requires_gradient_sync)
_WORKER = textwrap.dedent("""
    import json, sys
    from dataclasses import replace
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from pretrain_fixtures import small_config
    from galore_mini.train.loop import leave_distributed, train

    tmp = Path({tmp!r})
    base = small_config(tmp, method="galore_mini", batch_size=1, grad_accum=2, steps=6, save_every=2,
                        eval_every=3, fsdp=True)
    reference = train(replace(base, out=str(tmp / "fsdp-ref")))

    class Killed(RuntimeError):
        pass

    def kill_at_5(done):
        if done == 5:
            raise Killed()

    try:
        train(replace(base, out=str(tmp / "fsdp-run")), on_step=kill_at_5)
    except Killed:
        pass
    resumed = train(replace(base, out=str(tmp / "fsdp-run"), resume=True))
    # a one-process sharded checkpoint (step 4), resharded onto 2 processes
    from_one = train(replace(base, out=str(tmp / "one-to-two"), resume=True))
    if dist.get_rank() == 0:
        (tmp / "fsdp.json").write_text(json.dumps({{"reference": reference, "resumed": resumed,
                                                   "from_one": from_one}}))
    leave_distributed()
""")


def _dcp(folder: Path) -> dict:
    """A DCP checkpoint folder as one state dict (read without a process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=False)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flat(value, f"{prefix}{i}.")
    else:
        yield prefix, tree


def _at_step_4(run: Path, copy: Path) -> Path:
    """A copy of the run folder `run` whose newest checkpoint is gone, so a resume starts from step 4."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / DCP_CHECKPOINT)
    (copy / "final.json").unlink()
    return copy


@pytest.mark.slow
def test_two_process_fsdp_run_matches_one_process_and_resumes_exactly(tmp_path):
    settings = dict(method="galore_mini", steps=6, save_every=2, eval_every=3)
    single = train(small_config(tmp_path, batch_size=4, out=str(tmp_path / "single"), **settings))
    try:  # the same global micro-batches sharded in one process (a process group of one)
        one_run = train(small_config(tmp_path, batch_size=2, grad_accum=2, fsdp=True, out=str(tmp_path / "fsdp-one"),
                                 **settings))
    finally:
        loop.leave_distributed()
    _at_step_4(tmp_path / "fsdp-one", tmp_path / "one-to-two")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(TESTS), tmp=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    report = json.loads((tmp_path / "fsdp.json").read_text())
    ref, resumed = report["reference"], report["resumed"]
    assert set(ref) == set(single) and ref["world_size"] == 2 and ref["tokens"] == single["tokens"]
    assert ref["params"] == single["params"]
    # per-rank bytes: each process holds part of the weights and of the state
    assert ref["weights_bytes"] < single["weights_bytes"] and ref["optimizer_bytes"] < single["optimizer_bytes"]
    for run in ("fsdp-ref", "fsdp-run"):
        assert (tmp_path / run / DCP_CHECKPOINT / "meta.pt").is_file()
        assert torch.load(tmp_path / run / DCP_PREVIOUS / "meta.pt", weights_only=True)["step"] == 4
        assert not (tmp_path / run / loop.CHECKPOINT).exists()
    a, b = _dcp(tmp_path / "fsdp-ref" / DCP_CHECKPOINT), _dcp(tmp_path / "fsdp-run" / DCP_CHECKPOINT)
    # killed after step 5, resumed from the step-4 checkpoint: bit for bit the uninterrupted run, state included
    assert resumed["val_loss"] == ref["val_loss"]
    flat_a, flat_b = dict(_flat(a)), dict(_flat(b))
    assert flat_a.keys() == flat_b.keys() and any(k.startswith("optimizer.state.") for k in flat_a)
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_b[key]), key
        else:
            assert value == flat_b[key], key
    # the same model as one process with the whole batch, to the round-off of the reductions
    assert ref["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert one_run["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert report["from_one"]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    two_to_one = _at_step_4(tmp_path / "fsdp-ref", tmp_path / "two-to-one")
    try:
        with pytest.raises(UsageError, match="use --batch-size 2"):  # the same global batch, or refused
            train(small_config(tmp_path, batch_size=1, grad_accum=2, fsdp=True, out=str(two_to_one), resume=True,
                               **settings))
        back = train(small_config(tmp_path, batch_size=2, grad_accum=2, fsdp=True, out=str(two_to_one), resume=True,
                                  **settings))
    finally:
        loop.leave_distributed()
    assert back["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    resharded = {"two-to-one": _dcp(two_to_one / DCP_CHECKPOINT)["model"],
                 "one-to-two": _dcp(tmp_path / "one-to-two" / DCP_CHECKPOINT)["model"]}
    one = torch.load(tmp_path / "single" / loop.CHECKPOINT, weights_only=True)["model"]
    assert a["model"].keys() == one.keys()
    for key in one:
        torch.testing.assert_close(a["model"][key], one[key], rtol=1e-4, atol=1e-5)
        for what, model in resharded.items():
            torch.testing.assert_close(model[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    metrics = loop.read_metrics(tmp_path / "fsdp-run" / loop.METRICS)
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [2, 4, 6]  # no line twice after the resume
    # the sharded checkpoint is not silently ignored by an unsharded resume
    with pytest.raises(UsageError, match="--fsdp"):
        train(small_config(tmp_path, method="galore_mini", batch_size=1, grad_accum=2, steps=6, save_every=2,
                           eval_every=3, out=str(tmp_path / "fsdp-ref"), resume=True))


def test_fsdp_one_process_bf16_policy_and_refusals(tmp_path):
    """World size 1 is legal (a process group of one); bf16 mixed precision trains with fp32 master weights."""
    base = small_config(tmp_path, method="galore_mini", steps=2, save_every=0, eval_every=0, fsdp=True)
    try:
        plain = train(replace(base, out=str(tmp_path / "fp32"), save_every=1))
        mixed = train(replace(base, out=str(tmp_path / "bf16"), fsdp_mixed_precision="bf16"))
        # a damaged newest checkpoint and a half-written one: resume deletes the temporary, moves the damaged
        # one aside and continues from the previous (step 1), ending where the run ended
        (tmp_path / "fp32" / DCP_CHECKPOINT / ".metadata").unlink()
        (tmp_path / "fp32" / f"{DCP_CHECKPOINT}.tmp-7").mkdir()
        again = train(replace(base, out=str(tmp_path / "fp32"), save_every=1, resume=True))
        assert again["val_loss"] == plain["val_loss"]
        assert (tmp_path / "fp32" / f"{DCP_CHECKPOINT}.corrupt").is_dir()
        assert not (tmp_path / "fp32" / f"{DCP_CHECKPOINT}.tmp-7").exists()
        assert plain["world_size"] == mixed["world_size"] == 1
        # bf16 compute moves the loss by bf16 round-off, not more
        assert mixed["val_loss"] != plain["val_loss"]
        assert mixed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-2)
        saved = _dcp(tmp_path / "bf16" / DCP_CHECKPOINT)["model"]
        assert all(v.dtype == torch.float32 for v in saved.values())
        # a one-process checkpoint is not resumed by a sharded run (nor silently ignored)
        train(replace(base, fsdp=False, out=str(tmp_path / "unsharded")))
        with pytest.raises(UsageError, match="without --fsdp"):
            train(replace(base, out=str(tmp_path / "unsharded"), resume=True))
    finally:
        loop.leave_distributed()


@pytest.mark.parametrize("method", ["relora"])
def test_fsdp_refuses_methods_without_a_dtensor_path(tmp_path, method):
    with pytest.raises(UsageError, match=f"--fsdp with --method={method}"):
        loop.make_config(method=method, fsdp=True)


def test_fsdp_mixed_precision_needs_fsdp_and_a_known_policy():
    with pytest.raises(UsageError, match="add --fsdp"):
        loop.make_config(fsdp_mixed_precision="bf16")
    with pytest.raises(UsageError, match="use bf16"):
        loop.make_config(fsdp=True, fsdp_mixed_precision="fp16")
