"""Layer-wise updates: each parameter is updated inside ``backward()`` as soon as its gradient is final.

With ``galore_mini.layerwise(model, optimizer)`` every trainable parameter gets a
``register_post_accumulate_grad_hook``. When a parameter's gradient is final for
the current optimizer step (the last micro-batch of the accumulation window),
the hook queues it; once the queued gradients reach ``bucket_bytes`` (64 MiB by
default) they are updated together (``optimizer.step_params(bucket)``) and freed
(``p.grad = None``), so at most one bucket of gradients exists at any moment
instead of the whole model's. ``bucket_bytes=0`` updates each parameter alone,
as soon as its gradient is final. Optimizer state, checkpoints and
hyperparameters stay those of the ordinary optimizer: the result after N
optimizer steps equals the ordinary ``backward(); step(); zero_grad()`` loop's
(tests check it to fp32 round-off for GaLoreMini, GaLoreAdamW and AdamMini).

Training loop (do **not** call ``optimizer.step()`` — the updates happen inside
``backward()``; step the LR scheduler once per optimizer step)::

    import galore_mini as gm

    opt = gm.create_optimizer(model, "galore_mini", lr=1e-2, rank=128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 1000))
    lw = gm.layerwise(model, opt, accumulation_steps=4, max_grad_norm=1.0)
    for batch in loader:
        loss = model(**batch).loss / 4
        loss.backward()          # on every 4th backward, the parameters are updated here
        if lw.stepped:           # this backward completed an optimizer step
            sched.step()         # once per optimizer step, never per micro-batch
    torch.save(lw.state_dict(), "opt.pt")   # = opt.state_dict() + the clip bookkeeping
    lw.remove()                  # back to ordinary optimizer.step() training

**Gradient accumulation.** One ``backward()`` is one micro-batch (sum several
losses before calling it). The handle counts backward passes, not hook calls:
the end of each backward is detected with an autograd engine callback, so every
counter — the optimizer's step, the projector's refresh schedule, the clip
bookkeeping, ``step_count`` — advances once per optimizer step. (galore-torch's
layer-wise mode fires on every micro-batch.) A parameter whose gradient came
only from earlier micro-batches of the window is updated at the end of the
window's last backward. :meth:`LayerwiseUpdates.flush` closes a partial window
(end of data).

**Global-norm clipping** (``max_grad_norm``). Exact clipping needs the norm of
the whole gradient before the first parameter is updated, but here the first
parameters are updated (and their gradients freed) before the last gradients
exist. Holding the gradients back would cost the memory this mode saves, and
a second backward pass (LOMO's answer) a third more compute. We clip each
parameter's gradient, when it is final, by

    ``c_k = min(1, max_norm / (max(N_prev, sqrt(S_k)) + 1e-6))``

where ``N_prev`` is the previous optimizer step's true global norm and ``S_k``
the sum of squares of this step's gradients seen so far, this one included
(device tensors: no host synchronisation). Guarantees (tested), with ``N`` this
step's true global norm and ``ĝ`` the clipped gradient the optimizer sees:

1. ``ĝ = c·g`` with ``0 < c ≤ 1`` per tensor (directions kept, never amplified);
2. every tensor's ``‖ĝ_k‖ ≤ max_norm``, so a spike is clipped in the step it
   happens, at least for the tensor that has it and every tensor after it;
3. ``‖ĝ‖ ≤ max_norm · max(1, N / N_prev)``: exactly torch's bound when the norm
   does not grow from one step to the next (the usual case, norms drift slowly);
4. if both ``N`` and ``N_prev`` are at most ``max_norm``, nothing is clipped
   (as with exact clipping).

The price is mild over-clipping when the norm falls (by ``N / N_prev``), which
Adam-type optimizers largely normalise away. Non-finite gradients do not enter
the norm (the optimizer's ``nonfinite`` policy handles that tensor), so one bad
tensor does not poison the others or the next step. ``last_grad_norm`` is the
true, unclipped global norm of the last optimizer step (for logging).

**Buckets.** Each bucket costs one host synchronisation (the optimizer's
finiteness check) and is one batch on the multi-tensor path. One parameter at a
time would stall a GPU's pipeline once per parameter, hundreds of times a step.
The bucket size changes neither the arithmetic nor the result; this is tested
bit for bit for sizes 0, 5 kB and the whole model.

**Optimizers.** Our optimizers (``ComposedOptimizer`` subclasses) update a
bucket with ``step_params``. Other ``torch.optim`` optimizers whose state is
per parameter (AdamW, Adam, SGD …, fused/foreach included) are driven through
one single-parameter instance per parameter that shares the wrapped optimizer's
``state`` and reads its group's hyperparameters (so schedulers and
``state_dict()`` work); optimizers with group-level state are not supported.

**Data parallelism.** Under ``DistributedDataParallel`` the hooks fire *before* DDP averages the
gradients across ranks, so each replica would update from its own gradient and the replicas would
drift apart: :func:`layerwise` refuses a DDP model, and plain parameters while a process group of more
than one rank is initialised (pass ``independent_ranks=True`` when each rank really trains its own
model). Under **FSDP2** (``fully_shard``: DTensor parameters) it works: FSDP2 calls each sharded
parameter's post-accumulate-grad hooks after its reduce-scatter, so every rank updates its rows from
the reduced gradient, layer by layer inside backward (tested equal to ordinary steps). To accumulate
under FSDP2, call ``model.set_requires_gradient_sync(False)`` before all but the last micro-batch and
keep ``accumulation_steps=1``: FSDP2 calls the hooks only in the backward where it reduces (so
``accumulation_steps > 1`` is refused there). Clipping reduces each sharded gradient's norm across
ranks (one small all-reduce per parameter).

**Limits.** AMP with ``GradScaler`` (fp16) is not supported (gradients would be
used before unscaling); bf16 autocast needs no scaler and works. Activation
checkpointing works (non-reentrant, and reentrant as long as no weight is used
by two checkpointed segments, which is named as an error). A backward that
reaches no registered parameter does not count as a micro-batch. After an
exception inside ``backward()``, call :meth:`LayerwiseUpdates.flush` or build a
new handle.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from galore_mini.errors import UsageError
from galore_mini.optim.distributed import is_dtensor

__all__ = ["LayerwiseUpdates", "layerwise"]



_CLIP_EPS = 1e-6
# Gradient bytes stepped together: each bucket is one host sync and one multi-tensor batch, and its
# gradients live until it is stepped (a few per-layer weights of a 1B model; noise beside activations).
DEFAULT_BUCKET_BYTES = 64 * 2 ** 20


def _engine_queue_callback(fn) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def _current_autograd_node():
    getter = getattr(torch._C, "_current_autograd_node", None)
    return getter() if getter is not None else None


class _PerParamDriver:
    """Steps one parameter of a plain ``torch.optim`` optimizer through a single-parameter instance."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._subs: dict[int, tuple[torch.optim.Optimizer, dict]] = {}
        cls = type(optimizer)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
        self._kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def __call__(self, p: torch.Tensor) -> None:
        entry = self._subs.get(id(p))
        if entry is None:
            group = self._group_of[id(p)]
            sub = type(self.optimizer)([{**{k: v for k, v in group.items() if k != "params"}, "params": [p]}],
                                       **self._kwargs)
            entry = self._subs[id(p)] = (sub, group)
        sub, group = entry
        sub_group = sub.param_groups[0]
        for key, value in group.items():  # the scheduler changes the wrapped optimizer's groups
            if key != "params":
                sub_group[key] = value
        sub.state = self.optimizer.state  # shared (re-bound: load_state_dict replaces the dict)
        sub.step()

    def step_all(self, params: list[torch.Tensor]) -> None:
        for p in params:
            self(p)

    def refresh_groups(self) -> None:
        self._group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        self._subs = {key: (sub, self._group_of[key]) for key, (sub, _) in self._subs.items()}


class LayerwiseUpdates:
    """The handle :func:`layerwise` returns (see the module docstring).

    Attributes: ``optimizer``, ``accumulation_steps``, ``max_grad_norm``,
    ``micro_step`` (backward passes done in the current window), ``step_count``
    (optimizer steps done through this handle), ``stepped`` (the last backward
    completed an optimizer step), ``last_grad_norm`` (true global norm of the
    last step's gradient, a 0-d tensor, when clipping).
    """

    def __init__(self, model_or_params: nn.Module | Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, independent_ranks: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise UsageError(f"accumulation_steps={accumulation_steps!r} must be an integer >= 1")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or \
                    not max_grad_norm > 0 or max_grad_norm == float("inf"):
                raise UsageError(f"max_grad_norm={max_grad_norm!r} must be a finite number > 0 "
                                 "(or None for no clipping)")
            max_grad_norm = float(max_grad_norm)
        if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 0:
            raise UsageError(f"bucket_bytes={bucket_bytes!r} must be an integer >= 0 (0: one parameter at a time)")
        if isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "_layerwise_handle", None) is not None:
            raise UsageError("this optimizer already has layer-wise updates; call .remove() on that handle first")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_step = 0
        self.step_count = 0
        self.stepped = False
        self.last_grad_norm: torch.Tensor | None = None

        params = self._collect(model_or_params)
        self._check_parallelism(model_or_params, params, accumulation_steps, independent_ranks)
        managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
        foreign = [p for p in params if id(p) not in managed]
        if foreign:
            shapes = ", ".join(str(list(p.shape)) for p in foreign[:3])
            raise UsageError(f"{len(foreign)} trainable parameter(s) (shapes {shapes}…) are not in the optimizer: "
                             "they would never be updated; build the optimizer from the same model, or freeze them")
        given = {id(p) for p in params}
        left_out = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) not in given]
        if left_out:
            raise UsageError(f"{len(left_out)} parameter(s) of the optimizer are not among those given to layerwise(): "
                             "with layer-wise updates optimizer.step() is not called, so they would never be updated")
        self._params = params
        self._done: set[int] = set()
        self._in_backward = False
        self._sq_sum: torch.Tensor | None = None
        self._prev_norm: torch.Tensor | None = None

        step_params = getattr(optimizer, "step_params", None)
        self._driver = None
        if callable(step_params):
            self._step_many = step_params
            self.bucket_bytes = bucket_bytes
        else:
            self._driver = _PerParamDriver(optimizer)
            self._step_many = self._driver.step_all
            self.bucket_bytes = 0  # plain torch optimizers: one single-parameter instance at a time
        self._bucket: list[torch.Tensor] = []
        self._bucket_size = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self._guard = optimizer.register_step_pre_hook(self._guard_step)
        self._forward_hook = None
        if isinstance(model_or_params, nn.Module) and any(is_dtensor(p) for p in params):
            # FSDP2 calls no hook in a backward without gradient sync: clear `stepped` when the next
            # micro-batch starts instead
            self._forward_hook = model_or_params.register_forward_pre_hook(self._on_forward)
        optimizer._layerwise_handle = self

    @staticmethod
    def _collect(model_or_params) -> list[torch.Tensor]:
        if isinstance(model_or_params, nn.Module):
            candidates = list(model_or_params.parameters())
        elif isinstance(model_or_params, torch.Tensor):
            raise TypeError("pass a model or an iterable of parameters, not a single tensor")
        else:
            candidates = []
            for item in model_or_params:
                if isinstance(item, dict):  # param groups
                    candidates.extend(item["params"])
                else:
                    candidates.append(item)
        seen: set[int] = set()
        params = []
        for p in candidates:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"layerwise(): expected parameters, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if not params:
            raise UsageError("layerwise(): no trainable parameters given")
        return params

    @staticmethod
    def _check_parallelism(model_or_params, params, accumulation_steps: int, independent_ranks: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model_or_params, DistributedDataParallel):
            raise UsageError(
                "layerwise() was given a DistributedDataParallel model: its hooks fire before DDP averages the "
                "gradients across ranks, so each replica would update from its own gradient and drift apart. Use "
                "ordinary optimizer.step() under DDP, or shard the model with FSDP2 (fully_shard), where "
                "layer-wise updates see the reduced gradient"
            )
        sharded = [is_dtensor(p) for p in params]
        if any(sharded):
            if not all(sharded):
                raise UsageError("layerwise(): some parameters are DTensors (FSDP2) and some plain tensors; shard the "
                                 "whole model with fully_shard (each decoder layer and the root)")
            if accumulation_steps != 1:
                raise UsageError(
                    f"accumulation_steps={accumulation_steps} with FSDP2 (DTensor) parameters: FSDP2 calls the "
                    "hooks only in a backward where it reduces gradients, so micro-batches cannot be counted here. "
                    "Call model.set_requires_gradient_sync(False) before all but the last micro-batch (True before "
                    "the last) and pass accumulation_steps=1"
                )
            return
        if independent_ranks or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() > 1:
            raise UsageError(
                f"layerwise() with plain (unsharded) parameters while a process group of "
                f"{torch.distributed.get_world_size()} ranks is initialised: under DistributedDataParallel the hooks "
                "fire before the gradients are averaged across ranks, so the replicas would drift apart. Use "
                "ordinary optimizer.step() under DDP, shard the model with FSDP2 (fully_shard), or pass "
                "independent_ranks=True if each rank trains its own model"
            )

    # -- hooks -------------------------------------------------------------------------------

    def _on_forward(self, *_args) -> None:
        if not self._in_backward:
            self.stepped = False

    def _final_micro_batch(self) -> bool:
        return self.micro_step + 1 >= self.accumulation_steps

    def _hook(self, p: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            self.stepped = False
            _engine_queue_callback(self._end_of_backward)
        if not self._final_micro_batch():
            return  # keep accumulating
        if id(p) in self._done:
            raise RuntimeError(
                "layerwise: a parameter received gradients twice in one backward after it was updated (a weight "
                f"of shape {list(p.shape)} used by two reentrant checkpointed segments?); use "
                "torch.utils.checkpoint with use_reentrant=False"
            )
        self._update(p)

    def _end_of_backward(self) -> None:
        node = _current_autograd_node()
        if node is not None:
            # the end of a nested backward (reentrant checkpointing) inside the real one: wait for the outer pass
            node.register_hook(self._requeue)
            return
        if not self._in_backward:
            return  # a second callback for a pass already closed
        self._in_backward = False
        if self._final_micro_batch():
            self._finish_window()
        else:
            self.micro_step += 1

    def _requeue(self, *_args) -> None:
        _engine_queue_callback(self._end_of_backward)

    def _update(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        if self.max_grad_norm is not None:
            self._clip(grad)
        self._done.add(id(p))
        self._bucket.append(p)
        self._bucket_size += grad.numel() * grad.element_size()
        if self._bucket_size >= self.bucket_bytes:
            self._step_bucket()

    def _step_bucket(self) -> None:
        if not self._bucket:
            return
        with torch.no_grad():
            self._step_many(self._bucket)
        for p in self._bucket:
            p.grad = None
        self._bucket, self._bucket_size = [], 0

    @torch.no_grad()
    def _clip(self, grad: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32)
        if is_dtensor(sq):  # a sharded gradient's norm, reduced across its ranks
            sq = sq.full_tensor()
            grad = grad.to_local()
        sq = sq.square()
        if self._sq_sum is None:
            self._sq_sum = torch.zeros((), dtype=torch.float32, device=grad.device)
        sq = sq.to(self._sq_sum.device)
        self._sq_sum.add_(torch.where(torch.isfinite(sq), sq, torch.zeros_like(sq)))
        reference = self._sq_sum.sqrt()
        if self._prev_norm is not None:
            reference = torch.maximum(reference, self._prev_norm.to(reference.device))
        coef = (self.max_grad_norm / (reference + _CLIP_EPS)).clamp_(max=1.0)
        grad.mul_(coef.to(device=grad.device, dtype=grad.dtype))

    def _finish_window(self) -> None:
        for p in self._params:  # gradients from earlier micro-batches only
            if p.grad is not None and id(p) not in self._done:
                self._update(p)
        self._step_bucket()
        if self.max_grad_norm is not None and self._sq_sum is not None:
            norm = self._sq_sum.sqrt()
            self.last_grad_norm = norm
            if self._prev_norm is None:
                self._prev_norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
            else:
                self._prev_norm = torch.where(torch.isfinite(norm), norm, self._prev_norm.to(norm.device))
            self._sq_sum = None
        self._done.clear()
        self.micro_step = 0
        self.step_count += 1
        self.stepped = True
        # our updates are optimizer steps: tell LR schedulers (they warn when step() was never called)
        self.optimizer._opt_called = True

    def _guard_step(self, optimizer, args, kwargs) -> None:
        if any(p.grad is not None for p in self._params):
            raise RuntimeError(
                "optimizer.step() was called while layer-wise updates are on and gradients of an unfinished "
                "accumulation window are present: the updates happen inside backward(); do not call "
                "optimizer.step() (or call handle.remove() first)"
            )

    # -- public --------------------------------------------------------------------------------

    def flush(self) -> bool:
        """Update every parameter that holds a gradient now and close the window (e.g. a partial last window).

        Returns whether an optimizer step was taken.
        """
        self._in_backward = False
        pending = any(p.grad is not None for p in self._params)
        if pending:
            self._finish_window()
        else:
            self._done.clear()
            self.micro_step = 0
            self._sq_sum = None
        return pending

    def remove(self) -> None:
        """Remove the hooks: training goes back to ordinary ``optimizer.step()`` calls."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._guard.remove()
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        if getattr(self.optimizer, "_layerwise_handle", None) is self:
            self.optimizer._layerwise_handle = None

    def __enter__(self) -> "LayerwiseUpdates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict()`` plus a ``"layerwise"`` entry (plain numbers)."""
        state = self.optimizer.state_dict()
        state["layerwise"] = {
            "step_count": self.step_count,
            "micro_step": self.micro_step,
            "accumulation_steps": self.accumulation_steps,
            "prev_grad_norm": None if self._prev_norm is None else float(self._prev_norm),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer (a plain optimizer checkpoint works too)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("layerwise", None)
        self.optimizer.load_state_dict(state_dict)
        if self._driver is not None:
            self._driver.refresh_groups()
        if extra is not None:
            self.step_count = int(extra.get("step_count", 0))
            self.micro_step = 0  # gradients of a partial window are not in a checkpoint
            prev = extra.get("prev_grad_norm")
            device = self._params[0].device
            self._prev_norm = None if prev is None else torch.tensor(float(prev), dtype=torch.float32, device=device)
        self._done.clear()
        self._sq_sum = None

    def __repr__(self) -> str:
        clip = f", max_grad_norm={self.max_grad_norm}" if self.max_grad_norm is not None else ""
        return (f"LayerwiseUpdates({type(self.optimizer).__name__}, {len(self._params)} parameters, "
                f"accumulation_steps={self.accumulation_steps}{clip}, step_count={self.step_count})")


def layerwise(model_or_params: nn.Module | Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, *,
              accumulation_steps: int = 1, max_grad_norm: float | None = None,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES, independent_ranks: bool = False) -> LayerwiseUpdates:
    """Update each parameter inside ``backward()`` as soon as its gradient is final; frees it at once.

    Returns a :class:`LayerwiseUpdates` handle (``.remove()``, ``.stepped``, ``.state_dict()`` …).
    See the module :mod:`galore_mini.optim.layerwise` for the loop, accumulation and the clipping rule.
    """
    return LayerwiseUpdates(model_or_params, optimizer, accumulation_steps=accumulation_steps,
                            max_grad_norm=max_grad_norm, bucket_bytes=bucket_bytes,
                            independent_ranks=independent_ranks)
