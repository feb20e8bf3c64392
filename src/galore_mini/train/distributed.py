"""This process's place in a torchrun job, and the few collectives the training loop needs.

:func:`setup_distributed` joins the process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on
CUDA; a group of one for a one-process ``--fsdp`` run) and returns a :class:`Dist`;
:func:`leave_distributed` leaves it cleanly; :func:`on_main` runs a decision on process 0 and gives
every process its outcome (or its `UsageError`); :func:`gather_rng` collects every process's RNG
state for a checkpoint and :func:`set_rng_state` restores one.

Example (one process: nothing to join)::

    >>> from galore_mini.train.distributed import on_main, setup_distributed
    >>> dist_info = setup_distributed("cpu")
    >>> dist_info.world_size, dist_info.is_main, on_main(dist_info, lambda: 42)
    (1, True, 42)
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as tdist

from galore_mini.errors import UsageError
from galore_mini.train import sharded


@dataclass
class Dist:
    """This process's place in the job (a single process when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def setup_distributed(device: str, fsdp: bool = False) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA).

    `fsdp` in a single process: a process group of one (FSDP2 needs a device mesh).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={device}: no CUDA device is available")
    if world <= 1:
        single = torch.device(device if device.startswith("cuda") else ("cuda" if use_cuda else "cpu"))
        if fsdp:
            if single.index is not None:
                torch.cuda.set_device(single)
            importlib.import_module("torch.distributed.nn.functional")  # see below
            sharded.world_of_one_group("nccl" if single.type == "cuda" else "gloo")
        return Dist(device=single)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        # DistributedDataParallel imports torch.distributed.nn.functional, whose functions take
        # `group=group.WORLD` as a default argument: imported after init_process_group, those defaults
        # hold the world process group for the life of the interpreter, so destroy_process_group cannot
        # free it and gloo's worker and socket threads run on into interpreter shutdown (the intermittent
        # "terminate called without an active exception" at exit). Imported first, they hold None.
        importlib.import_module("torch.distributed.nn.functional")
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def leave_distributed(clean: bool = True) -> None:
    """Leave the process group, so that no communication thread outlives the interpreter.

    `clean` (the run succeeded on this process): first wait at a barrier, so no process tears its
    connections down while a peer may still send. After a failure there is no barrier (a peer may never
    arrive); torchrun stops the other processes. A no-op outside a process group.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    if clean:
        tdist.barrier()
    gc.collect()  # anything in a reference cycle that still holds the group goes while Python is whole
    tdist.destroy_process_group()


def on_main(dist_info: Dist, fn: Callable[[], Any]) -> Any:
    """`fn()` on process 0, its result on every process; a `UsageError` there is raised on every process.

    Decisions about the run folder are made once, so that every process acts on the same one and a
    refusal on process 0 does not leave the others waiting in a collective.
    """
    if not dist_info.enabled:
        return fn()
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if dist_info.is_main:
        try:
            outcome = [("ok", fn())]
        except UsageError as exc:
            outcome = [("error", str(exc))]
        except BaseException as exc:  # the others must not wait forever: tell them, then raise it here
            outcome, failure = [("error", f"process 0 failed: {type(exc).__name__}: {exc}")], exc
    tdist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise UsageError(value)
    return value


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng(dist_info: Dist) -> list[dict[str, torch.Tensor]]:
    mine = rng_state(dist_info.device)
    if not dist_info.enabled:
        return [mine]
    everyone: list[Any] = [None] * dist_info.world_size
    tdist.all_gather_object(everyone, {k: v.cpu() for k, v in mine.items()})
    return everyone
