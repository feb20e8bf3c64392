"""``galore-mini pretrain --fsdp``: the model sharded with FSDP2, checkpoints through DCP.

Sharding (:func:`shard_model`). ``torch.distributed.fsdp.fully_shard`` is applied to every decoder
layer (each module of the model's ``...layers`` ``ModuleList``) and then to the root, so each layer's
weights are all-gathered just before its forward and backward and freed after, and the embeddings,
final norm and output layer form the root's group. Every parameter becomes a DTensor holding this
rank's rows (``Shard(0)``); FSDP2's reduce-scatter leaves each rank the gradient rows of its shard,
and the optimizer (built *after* sharding, so it sees the DTensors) updates those rows
(:mod:`galore_mini.optim.distributed`). ``mixed_precision="bf16"`` sets
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: the all-gathered weights and
the forward/backward run in bf16, gradients are reduced in fp32 and the sharded master weights and
optimizer state stay fp32.

A world of one process is allowed (a process group of one is created when the run was not started by
``torchrun``): nothing is split, but the run takes the FSDP2 code path (the GPU check of this mode).

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`). A sharded run's checkpoint is a DCP
folder, ``OUT/checkpoint-dcp/``, the one before it kept as ``OUT/checkpoint-dcp.prev/``. Every rank
writes its shards of the model and optimizer state (``get_state_dict``, so the optimizer state is keyed
by parameter name and DTensor-placed) with ``torch.distributed.checkpoint.save`` into
``checkpoint-dcp.tmp-STEP/``; process 0 then adds ``meta.pt`` (step, config, progress, scheduler, data
position, every rank's RNG state), fsyncs, and rotates by renames (see
:meth:`galore_mini.train.runs.RunFolder.publish_dcp`). Resume picks the newest folder whose
``meta.pt`` and DCP metadata are readable, falling back to the previous one, and is bit-for-bit at the
same world size. At another world size DCP reshards the model and optimizer state; the run goes on
over the same batches when the global micro-batch (``--batch-size`` × processes) is unchanged, which
``_check_resumable`` demands (naming the ``--batch-size`` to use). The result then equals the
uninterrupted run to the round-off of the reductions; process k takes the RNG state of saved process
k mod (saved world size), so dropout draws other masks (said in a message).

Example (two processes on CPU)::

    torchrun --standalone --nproc_per_node 2 -m galore_mini pretrain --fsdp --model tiny \\
        --method galore_mini --steps 200 --out runs/fsdp
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.memory.measure import unique_parameters

MIXED_PRECISION = ("bf16",)


def check_method(method: str) -> None:
    """A `UsageError` for a method that cannot run sharded (``Method.no_fsdp``; unknown methods are refused
    elsewhere). Its optimizer would refuse DTensor parameters too; this refuses before any data is read."""
    why = registry.get(method, "--method").no_fsdp
    if why:
        usable = ", ".join(name for name in registry.METHODS if not registry.get(name).no_fsdp)
        raise UsageError(f"--fsdp with --method={method}: {why}; use one of {usable}, or drop --fsdp "
                         "(DDP replicates the model and state)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the entries of every ``ModuleList`` whose name ends in ``layers``."""
    found = [layer for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" for layer in module]
    if not found:
        raise UsageError("--fsdp: the model has no `layers` ModuleList of decoder layers to shard one by one")
    return found


def shard_model(model: nn.Module, mixed_precision: str | None = None) -> nn.Module:
    """`fully_shard` each decoder layer, then the root (in place; the model is returned)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        part = t.to_local() if hasattr(t, "to_local") else t
        total += part.numel() * part.element_size()
    return total


def memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(weights, optimizer state) bytes held by this process."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return local_bytes(unique_parameters(model)), local_bytes(state)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_checkpoint(folder, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                    is_main: bool, barrier) -> None:
    """Every process: write its shards to a temporary DCP folder; process 0 adds `meta` and publishes it."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.dcp_temporary(int(meta["step"]))
    if is_main:
        folder.clear(tmp)
    barrier()
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
    barrier()
    if is_main:
        folder.publish_dcp(tmp, meta)
    barrier()


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process: load the model and optimizer shards of the DCP folder `path` (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def world_of_one_group(backend: str) -> None:
    """A process group of this process alone (FSDP2 needs one), when no torchrun set one up."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
