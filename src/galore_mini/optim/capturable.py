"""The sync-free steady step (``capturable=True``): no host read of a device value, so ``torch.compile``
traces ``opt.step()`` into one graph and a CUDA graph can capture it.

The host-synchronising paths (the ``foreach=False`` reference and :mod:`.multi_tensor`) read step
counters and finiteness flags on the host every step. Here the same arithmetic runs with

* **step counters on the device** (``state["step"]``, fp32 on the parameter's device, as torch.optim's
  ``capturable``): it still counts real updates only, and the bias corrections ``1-βᵗ`` are tensors;
* **the non-finite policy decided on the device**: each parameter's probe (its per-block squared
  norms for Adam-mini / GaLore-mini, its low-rank gradient ``R`` for GaLore-AdamW, whose entries are
  non-finite whenever ``G``'s are) gives a flag ``ok``; the moments advance by
  ``m ← where(ok, β, 1)·m + (1-β)·where(ok, x, 0)`` (exactly ``m`` when skipped), the step counter by
  ``ok``, and the update is multiplied by ``ok`` (so a skipped parameter moves by exactly 0). Skips
  are counted in a device tensor that :attr:`nonfinite_skips` reads only when asked.
  ``nonfinite="raise"`` needs a host read and is refused;
* **the refresh schedule on the host**: each projected parameter keeps a host clock
  (``state["host_step"]``, a CPU int64 counting the ``step()`` calls in which it had a gradient, saved
  in ``state_dict()``); its projector is refreshed when the clock reaches ``state["refresh"][0]``.
  Without non-finite skips the clock equals the step counter, so the schedule is the reference's. A
  refresh whose gradient is not finite is postponed to the next step (a refresh may read the device).

The host work (advance the clocks, refresh what is due) is one opaque operator,
``torch.ops.galore_mini.host_phase``, which compiled code calls like any other operator: dynamo neither
breaks the graph nor guards on the clocks, so steady steps never recompile, and a refresh step runs
the same compiled graph, its SVD/QR executing eagerly inside the operator. Eager ``step()`` calls the
same Python function directly. The operator is tagged ``cudagraph_unsafe``: captured into a CUDA graph
its Python body would not run on replay (see the README's CUDA-graph recipe).

Supported: :class:`~galore_mini.GaLoreMini` (approach 3), :class:`~galore_mini.GaLoreAdamW`,
:class:`~galore_mini.AdamMini`, with fp32 moments, any block layout, fp32/bf16/fp16 parameters,
``nonfinite`` ``"skip"`` or ``"off"``. Refused with a :class:`~galore_mini.errors.UsageError`:
8-bit moments, bf16/fp16 moments (``state_dtype``), approaches 1 and 2, ``foreach=False`` (the
readable reference stays host-side), ``nonfinite="raise"``, layer-wise ``step_params``.
GaLoreAdafactor and GaLoreAdamW8bit have no ``capturable`` option.

Example (the recipe; ``lr`` as a tensor so a scheduler changing it does not recompile)::

    >>> import torch, galore_mini as gm
    >>> w = torch.nn.Parameter(torch.randn(32, 64))
    >>> opt = gm.GaLoreMini([{"params": [w], "rank": 8, "block": "rows"}], lr=torch.tensor(1e-2),
    ...                     capturable=True)
    >>> @torch.compile(fullgraph=True, backend="eager")
    ... def step():
    ...     opt.step()
    >>> for _ in range(3):
    ...     (w ** 2).sum().backward(); step(); opt.zero_grad()
    >>> int(opt.state[w]["step"]), opt.nonfinite_skips
    (3, 0)
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch

from galore_mini.errors import UsageError
from galore_mini.optim.dtypes import resolve_dtype
from galore_mini.optim.projection import compute_projector, project, resolve_side

_OPTIMIZERS: "weakref.WeakValueDictionary[int, CapturableMixin]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)
_FP32_STATE = (None, "fp32", "float32", torch.float32)


@torch.library.custom_op("galore_mini::host_phase", mutates_args=("writes",),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _host_phase_op(key: int, grads: list[torch.Tensor], writes: list[torch.Tensor]) -> None:
    _OPTIMIZERS[key]._host_phase(grads, writes)


@_host_phase_op.register_fake
def _(key, grads, writes):
    return None


class CapturableMixin:
    """The ``capturable`` option of an optimizer built on :class:`~galore_mini.optim.core.ComposedOptimizer`.

    This is the driver: the host phase (clocks, refreshes), the device-side finiteness flags and
    counters (:func:`advance_counters`). The arithmetic is the update rule's own, in its file: a
    subclass implements :meth:`capturable_step` with the rule's primitives given tensor-valued
    coefficients. With every group ``capturable=False`` nothing here changes the optimizer: ``step``
    is the base class's.
    """

    # -- configuration ---------------------------------------------------------------------

    def _capturable_problem(self, group) -> str | None:
        """Why `group` cannot take the sync-free step, or None."""
        if group.get("foreach") is False:
            return "foreach=False is the host-side reference path"
        if group.get("moment_bits", 32) != 32:
            return "8-bit moments (moment_bits=8)"
        if group.get("state_dtype") not in _FP32_STATE:
            return f"state_dtype={group['state_dtype']!r} (only fp32 moments)"
        if "rank" in group and group.get("approach", 3) != 3:
            return f"approach={group['approach']} (only approach 3)"
        if group.get("nonfinite", "skip") == "raise":
            return "nonfinite='raise' (raising needs a host read; use 'skip' or 'off')"
        if any(type(p).__name__ == "DTensor" for p in group["params"]):
            return "FSDP2/DTensor parameters (their sharded step is host-side)"
        return None

    def validate_group(self, group):
        super().validate_group(group)
        if "capturable" not in group:
            return
        if group["capturable"] not in (True, False):
            raise UsageError(f"capturable={group.get('capturable')!r} must be True or False")
        if group["capturable"]:
            problem = self._capturable_problem(group)
            if problem is not None:
                raise UsageError(f"{type(self).__name__}: capturable=True does not support {problem}; "
                                 "pass capturable=False (the host-synchronising step, which torch.compile "
                                 "runs with graph breaks)")

    def _sync_free(self) -> bool:
        """Whether this step takes the sync-free path: every group asks for it and supports it."""
        flags = [bool(g.get("capturable")) for g in self.param_groups]
        if not any(flags):
            return False
        problems = [self._capturable_problem(g) for g in self.param_groups]
        if all(flags) and not any(problems):
            return True
        # torch.compile sets capturable=True on CUDA groups behind the constructor's back; fall back
        if not getattr(self, "_warned_fallback", False):
            self._warned_fallback = True
            reason = next((p for p in problems if p), "a mix of capturable and non-capturable groups")
            warnings.warn(f"{type(self).__name__}: capturable step unavailable ({reason}); using the "
                          "host-synchronising step (torch.compile breaks the graph there)", stacklevel=3)
        for g in self.param_groups:
            g["capturable"] = False
        return False

    # -- skips, read lazily -------------------------------------------------------------------

    @property
    def nonfinite_skips(self) -> int:
        """Updates skipped for non-finite gradients (reads the device counters: a host sync)."""
        counters = getattr(self, "device_skips", {})
        return self._host_skips + sum(int(c.item()) for c in counters.values())

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        self._host_skips = int(value)
        if hasattr(self, "device_skips"):
            for counter in self.device_skips.values():
                counter.zero_()

    # -- state --------------------------------------------------------------------------------

    def state_layout(self, shape, group):
        layout = super().state_layout(shape, group)
        if group.get("capturable") and "rank" in group:
            layout["host_step"] = ((), torch.int64)
        return layout

    def _init_group(self) -> None:
        """Create missing state for every parameter that has a gradient, and each group's plan (block
        layouts, projection sides). Named as torch.optim's hook, so dynamo runs it eagerly while tracing
        instead of tracing it; it covers all groups at once so the trace reads finished containers."""
        if not hasattr(self, "_host_key"):
            self._host_key = next(_KEYS)
            _OPTIMIZERS[self._host_key] = self
            self.device_skips = {}
            self._plans = {}
        for index, group in enumerate(self.param_groups):
            self._init_one(index, group)

    def _init_one(self, index: int, group) -> None:
        # this runs only for a sync-free step; torch.compile traces a step as one while it leaves the
        # group's own flag False (it sets it in its view of the group only, or on CUDA only before the
        # first step): the group becomes capturable for good, so eager steps, state_dict() and
        # load_state_dict() agree with the layout made here
        if "capturable" in group:
            group["capturable"] = True
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                self.init_state(p, group, state)
            # state made by a host-synchronising step (torch.compile switches a group to capturable
            # behind the constructor's back): the counter moves to the device and projected weights
            # get their host clock, equal to the counter (the schedule is the same)
            if state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)
            if "rank" in group and "host_step" not in state:
                state["host_step"] = state["step"].detach().to("cpu", torch.int64).clone()
            if p.device not in self.device_skips:
                self.device_skips[p.device] = torch.zeros((), dtype=torch.int64, device=p.device)
        # block layouts and sides resolved here, outside the trace (parsing is cached with locks dynamo
        # cannot enter); a change of the group's options is caught by the key
        key = (group.get("block"), group.get("proj_type"), tuple(tuple(p.shape) for p in group["params"]))
        plan = self._plans.get(index)
        if plan is None or plan[0] != key:
            entries = []
            for p in group["params"]:
                layout = self.block_layout(p.shape, group) if self.uses_blocks else None
                if layout is not None and layout.kind == "axis":
                    layout.uniform  # noqa: B018 -- fill the cached property before tracing reads it
                side = resolve_side(group["proj_type"], p.shape) if "rank" in group else None
                entries.append((layout, side))
            self._plans[index] = (key, entries)

    def load_state_dict(self, state_dict):
        """As the base class, then the step counters go to the device (capturable groups) or the host,
        and host clocks convert between modes (a capturable checkpoint resumes exactly either way)."""
        # how this process steps is its own choice, not the checkpoint's (torch would adopt the saved flag)
        modes = [g.get("capturable") for g in self.param_groups]
        super().load_state_dict(self._strip_clocks(state_dict))
        for group, mode in zip(self.param_groups, modes):
            if mode is None:
                group.pop("capturable", None)
            else:
                group["capturable"] = mode
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if group.get("capturable"):
                    state["step"] = state["step"].to(p.device)
                    if "rank" in group and "host_step" not in state:
                        state["host_step"] = state["step"].detach().to("cpu", torch.int64).clone()
                clock = self._saved_clocks.get(id(p))
                if clock is not None and group.get("capturable"):
                    state["host_step"] = clock
        self._saved_clocks = {}

    def _strip_clocks(self, state_dict):
        """Take host clocks out of a checkpoint for a non-capturable group (its refresh schedule is kept
        in real-update units: the due step moves back by the updates the clock counted but the step
        did not, i.e. the skips)."""
        self._saved_clocks = {}
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), list)
                and any("host_step" in v for v in state_dict["state"].values() if isinstance(v, dict))):
            return state_dict  # nothing to convert; the base class judges the rest
        groups = self.param_groups
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        self._saved_clocks = {}
        state = {}
        for param_id, values in state_dict["state"].items():
            values = dict(values)
            if "host_step" in values and param_id in by_id:
                p, group = by_id[param_id]
                clock = values["host_step"]
                if group.get("capturable"):
                    self._saved_clocks[id(p)] = clock.detach().to("cpu", torch.int64).clone()
                else:
                    clock = values.pop("host_step")
                    lag = int(clock) - int(values["step"])
                    if lag and "refresh" in values:
                        values["refresh"] = values["refresh"].clone()
                        values["refresh"][0] -= lag
            state[param_id] = values
        return {**state_dict, "state": state}

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient (see :mod:`.capturable` when capturable)."""
        if not self._sync_free():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        self._init_group()
        for index, group in enumerate(self.param_groups):
            plan = self._plans[index][1]
            chosen = [(p, *entry) for p, entry in zip(group["params"], plan) if p.grad is not None]
            if chosen:
                work.append((group, chosen))
        grads, writes = self._host_phase_args(work)
        if grads:
            if torch.compiler.is_compiling():
                torch.ops.galore_mini.host_phase(self._host_key, grads, writes)
            elif not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                self._host_phase(grads, writes)
            # under CUDA-graph capture the host work is the caller's: host_phase() before each replay
        for group, params in work:
            self.capturable_step(group, params)
        return loss

    def capturable_step(self, group: dict, chosen: list[tuple]) -> None:
        """The rule's sync-free update of `chosen`, ``(param, block layout or None, projection side or
        None)`` of one group (state exists, projectors refreshed): see :func:`advance_counters`."""
        raise NotImplementedError

    @torch.no_grad()
    def host_phase(self) -> None:
        """The host half of a capturable step, alone: advance the host clocks and refresh the projectors
        that are due, for the parameters that have gradients. Call it before each replay of a CUDA graph
        that captured ``step()`` (capture records only the device half)."""
        if not self._sync_free():
            raise UsageError("host_phase() belongs to capturable=True optimizers")
        self._init_group()
        work = [(g, [(p,) for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        grads, writes = self._host_phase_args([(g, c) for g, c in work if c])
        if grads:
            self._host_phase(grads, writes)

    def step_params(self, params):
        if self._sync_free():
            raise UsageError("capturable=True does not support layer-wise updates (step_params); "
                             "pass capturable=False with layerwise updates")
        return super().step_params(params)

    def _refresh_keys(self, group) -> list[str]:
        keys = ["projector"] + (["projector_right"] if group["proj_type"] == "full" else [])
        if group["moment_policy"] != "keep":
            keys += self.low_rank_moment_keys(group)
        return keys

    def _host_phase_args(self, work):
        """Gradients of the projected parameters, and the state tensors a refresh may overwrite."""
        grads, writes = [], []
        for group, params in work:
            if "rank" not in group:
                continue
            keys = self._refresh_keys(group)
            for p, *_ in params:
                grads.append(p.grad)
                writes.extend(self.state[p][key] for key in keys)
        return grads, writes

    def _host_phase(self, grads: list[torch.Tensor], writes: list[torch.Tensor]) -> None:
        """Advance each projected parameter's host clock and refresh the projectors that are due.

        Runs on the host with no device read unless a refresh is due (then the gradient's finiteness
        is read, and a non-finite one postpones that refresh). Writes go to `writes`, which compiled
        code may pass as its own buffers, never to the state dict's tensors directly.
        """
        grads_iter, writes_iter = iter(grads), iter(writes)
        for group in self.param_groups:
            if "rank" not in group:
                continue
            keys = self._refresh_keys(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = next(grads_iter)
                state = self.state[p]
                shadow = {**state, **{key: next(writes_iter) for key in keys}}
                clock, refresh = state["host_step"], state["refresh"]
                clock += 1
                t, due = int(clock), int(refresh[0])
                if t < due or not bool(torch.isfinite(grad).all()):
                    continue
                had_projector = due > 1
                side = resolve_side(group["proj_type"], p.shape)
                new = compute_projector(grad, group["rank"], side, group["proj_method"],
                                        shadow if had_projector else {}, self.sketch_generator(p, t),
                                        resolve_dtype(group["proj_dtype"], "proj_dtype"))
                self.install_projector(p, group, shadow, side, t, new, had_projector)


# -- what every capturable rule shares (traced by torch.compile) ------------------------------------


def advance_counters(optimizer, group, states, probes):
    """Finiteness flags from the probes (None when ``nonfinite="off"``), and the step counters advanced
    by them; skips are added to the optimizer's device counters. Returns ``(oks, steps)``."""
    steps = [state["step"] for state in states]
    if group.get("nonfinite", "skip") == "off":
        torch._foreach_add_(steps, 1.0)
        return None, steps
    oks = [torch.isfinite(x).all() for x in probes]
    torch._foreach_add_(steps, [ok.float() for ok in oks])
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for ok in oks:
        by_device.setdefault(ok.device, []).append(ok)
    for device, flags in by_device.items():
        optimizer.device_skips[device].add_((~torch.stack(flags)).sum())
    return oks, steps


def low_rank_gradient(p: torch.Tensor, state: dict, side: str | None) -> torch.Tensor:
    """``R = project(G)`` for a projected weight, the fp32 gradient otherwise."""
    g = p.grad
    return project(g, state, side) if side else (g if g.dtype == torch.float32 else g.float())
