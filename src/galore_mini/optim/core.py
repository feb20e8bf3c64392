"""The base optimizer: param groups, validation, state layout, lazy state, the step pipeline and exact
resume. It knows no update rule and no DTensor.

An update rule (one file per algorithm: :mod:`.galore`, :mod:`.adafactor`, :mod:`.adam_mini`,
:mod:`.galore_mini`) is a subclass that states its defaults, its state layout (``_state_layout``) and
its rule (:meth:`ComposedOptimizer.compute_update`, built from :mod:`.primitives`), which every path
calls: the single-tensor reference below, the multi-tensor path (:mod:`.multi_tensor`), the capturable
step (:mod:`.capturable`) and the sharded step (:mod:`.distributed`, a layer above this one that drives
it through the public methods of the "step protocol" section). Projection is a transform around the
rule: :class:`ParamStep` projects and back-projects, and :mod:`.refresh` adopts new projectors.

``ComposedOptimizer`` is an ordinary ``torch.optim.Optimizer``: param groups,
``state_dict()``/``load_state_dict()``, LR schedulers, ``zero_grad``, closures.
Its state is tensors only (the projector is a tensor, the refresh schedule is a
small int64 tensor), so ``torch.load(weights_only=True)`` works and resume is
exact. Moments are fp32 whatever the parameter dtype unless a group sets
``state_dtype``; bf16/fp16 parameters are updated through an fp32 copy.

Non-finite gradients follow the ``nonfinite`` option: ``"skip"`` (default)
leaves that parameter and its state untouched for the step and counts it in
``optimizer.nonfinite_skips``; ``"raise"`` raises ``FloatingPointError``; ``"off"`` checks nothing
(as ``torch.optim`` does: a NaN gradient reaches the weights). The check costs one host sync per step
(per bucket with layer-wise updates); ``"off"`` avoids it, so the host can run ahead of the device.
Parameters that take the multi-tensor path (:mod:`.multi_tensor`) are probed through their per-block
gradient norms, so there a gradient whose block sum of squares overflows fp32 (|g| above ~1e19,
where the reference path's ``v`` would become infinite) is skipped too.

``load_state_dict`` is atomic: it checks the whole checkpoint (optimizer class, param groups, the
options that decide state shapes, every state tensor's key and shape) before it changes anything.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from galore_mini.errors import UsageError, check_number
from galore_mini.optim import quant
from galore_mini.optim.blocks import BlockLayout, default_block, parse_block
from galore_mini.optim.dtypes import dtype_name, resolve_dtype
from galore_mini.optim.primitives import Update, apply_update, bias_corrections, ema_
from galore_mini.optim.projection import (
    LowRankProduct,
    back_factors,
    low_rank_shape,
    project,
    projector_shapes,
    resolve_side,
)
from galore_mini.optim.refresh import (MOMENT_POLICIES, PROJECTION_DEFAULTS, adopt_projector, refresh_due,
                                      validate_projection)

__all__ = ["ComposedOptimizer", "ParamStep", "Update", "WorkItem", "PROJECTION_DEFAULTS", "HOST_STATE",
           "MOMENT_POLICIES", "NONFINITE_POLICIES", "resolve_dtype", "dtype_name"]

NONFINITE_POLICIES = ("skip", "raise", "off")

# Keys torch or its schedulers put in groups, and descriptive keys of ours.
PASSIVE_KEYS = {"params", "name", "param_names", "initial_lr"}
# State that lives on the CPU whatever the parameter's device: read every step, so no device sync.
HOST_STATE = ("step", "refresh", "similarity")
# Group options that decide the shapes or meaning of state tensors.
STRUCTURAL_KEYS = ("rank", "proj_type", "block", "approach", "moment_bits", "state_dtype", "proj_dtype",
                   "adaptive_gap", "gap_window", "min_8bit_size", "beta1")
# Group keys that say how this process steps, not what the optimizer is (compared by nothing); torch
# adds `differentiable` to an unpickled optimizer's defaults
MODE_KEYS = {"capturable", "foreach", "differentiable", "fused", "maximize"}

@dataclass(slots=True)
class WorkItem:
    """One parameter's share of a step, as the step pipeline passes it along.

    `layout` is the parameter's block layout when it takes the multi-tensor path (None: the
    single-tensor reference path), `norms` its gradient's per-block norms where the layout has blocks
    (they feed ``v`` and double as the finiteness probe), and `step` the 1-based step number, set once
    the state's counter has been read.
    """

    param: torch.Tensor
    grad: torch.Tensor
    group: dict
    layout: BlockLayout | None = None
    norms: torch.Tensor | None = None
    step: int | None = None

    @property
    def probe(self) -> torch.Tensor:
        """The tensor whose finiteness decides whether this parameter is updated."""
        return self.norms if self.norms is not None else self.grad


class ParamStep:
    """One parameter's step: what an update rule reads and the parts it composes.

    Attributes: ``grad`` (fp32), ``state``, ``group``, ``t`` (1-based step), ``side`` (``None`` when not
    projected), ``layout`` (the block layout of the full-size parameter), ``row_totals`` (None when
    ``param`` is the whole weight; a sharded step's sums over all of W's rows, named as the rule's
    :meth:`ComposedOptimizer.partial_row_sums` names them, when ``param`` holds some of its rows).
    """

    row_totals: dict[str, torch.Tensor] | None = None

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, t: int,
                 side: str | None, layout: BlockLayout | None):
        self.param, self.grad, self.state, self.group, self.t = param, grad, state, group, t
        self.side, self.layout = side, layout

    @property
    def shape(self) -> torch.Size:
        """The whole parameter's shape (a sharded step's ``param`` is this rank's rows)."""
        return self.param.shape

    @property
    def projected(self) -> bool:
        return self.side is not None

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return project(g, self.state, self.side) if self.projected else g

    def back(self, low: torch.Tensor) -> torch.Tensor | LowRankProduct:
        """``back(low)`` without the scale α (rules multiply :attr:`scale` into their step size), as
        factors for projected weights so the update can be fused into one GEMM."""
        return back_factors(low, self.state, self.side) if self.projected else low

    @property
    def scale(self) -> float:
        """GaLore's α for projected weights, 1 otherwise."""
        return self.group["scale"] if self.projected else 1.0

    def bias_corrections(self, beta1: float, beta2: float) -> tuple[float, float]:
        return bias_corrections(self.group, beta1, beta2, self.t)

    # moments: read as fp32 (dequantised if stored in 8 bits), updated, written back
    def read(self, key: str, shape, signed: bool) -> torch.Tensor:
        """Moment `key` as fp32 of `shape` (dequantised from 8 bits; the state tensor itself when fp32)."""
        buf = self.state[key]
        if buf.dtype == torch.uint8:
            return quant.dequantize(buf, self.state[key + "_absmax"], signed).view(shape)
        return buf if buf.dtype == torch.float32 else buf.float()

    def write(self, key: str, value: torch.Tensor, signed: bool) -> None:
        """Store `value` as moment `key` (quantised for 8 bits; nothing to do when `value` is the state)."""
        buf = self.state[key]
        if buf.dtype == torch.uint8:
            quant.quantize(value, signed, out=(buf, self.state[key + "_absmax"]))
        elif buf is not value:
            buf.copy_(value)

    def ema(self, key: str, x: torch.Tensor, beta: float) -> torch.Tensor:
        """``m ← β m + (1-β) x`` on moment `key` (the first-moment rule); returns ``m``."""
        m = self.read(key, x.shape, signed=True)
        ema_(m, x, beta)
        self.write(key, m, signed=True)
        return m

    def block_ema_sq(self, key: str, x: torch.Tensor, beta: float, layout: BlockLayout) -> torch.Tensor:
        """Per-block ``v_b ← β v_b + (1-β) mean_{i∈b} x_i²``; returns `v`, shape ``(n_blocks,)``."""
        v = self.read(key, (layout.n_blocks,), signed=False)
        ema_(v, layout.block_mean_sq(x), beta)
        self.write(key, v, signed=False)
        return v


class ShardView(Protocol):
    """How a layer that splits parameters across processes shows their state to a projector refresh."""

    def whole(self, state: dict) -> dict:
        """`state` with its projector tensors whole (for rotating moments and comparing subspaces)."""

    def localize(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """The part of a whole new projector tensor that this process stores."""

    def moments(self, state: dict, group: dict, side: str) -> ParamStep:
        """A step view of `state` for reading and writing its moments."""


class ComposedOptimizer(torch.optim.Optimizer):
    """Base class: groups, validation, state layout, lazy state, the step pipeline, exact resume.

    A subclass (an update rule) sets ``defaults`` and implements ``_state_layout(shape, work_shape,
    group)`` and :meth:`compute_update`, which returns an :class:`Update` (the parameter moves by
    ``-step_size · direction [· multiplier]``). It may add a multi-tensor execution of the same rule
    (``_multi_tensor_layout`` and ``_multi_tensor_step``, see :mod:`.multi_tensor`), which tests hold
    to the reference bit for bit.

    The public methods under "step protocol" are what a step pipeline outside this module (the
    sharded layer, the capturable step) drives a step through.
    """

    #: weight decay applied before the update (AdamW/Adam-mini) or after it (galore-torch)
    decay_after_update = False
    #: whether a group may carry `block`
    uses_blocks = False
    #: options added after checkpoints were written, with what a checkpoint without them means
    added_options: dict[str, Any] = {}

    def __init__(self, params, defaults: dict[str, Any], projection_defaults: dict[str, Any] | None = None):
        check_number("lr", defaults.get("lr"), allow_none=True)
        projection_defaults = dict(projection_defaults or {})
        unknown = sorted(set(projection_defaults) - set(PROJECTION_DEFAULTS))
        if unknown:
            raise UsageError(f"{type(self).__name__}: unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"projection options are {', '.join(PROJECTION_DEFAULTS)}")
        # constructor-level projection options (e.g. proj_method="power") apply to every group with a rank
        self._projection_defaults = projection_defaults
        self.nonfinite_skips = 0
        self._param_index: dict[int, int] = {}
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or of dicts (param groups), not a single tensor")
        super().__init__(params, defaults)

    # -- validation --------------------------------------------------------------------------

    def _allowed_keys(self) -> set[str]:
        keys = set(self.defaults) | PASSIVE_KEYS | {"rank"} | set(PROJECTION_DEFAULTS)
        if self.uses_blocks:
            keys.add("block")
        return keys

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        allowed = self._allowed_keys()
        unknown = [key for key in param_group if key not in allowed]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise UsageError(
                f"{type(self).__name__}: unknown param-group option(s) {', '.join(hints)}; "
                f"known options: {', '.join(sorted(allowed - PASSIVE_KEYS))}"
            )
        group = dict(param_group)
        if group.get("rank") is None:
            group.pop("rank", None)
        else:
            group = {**self._projection_defaults, **group}
            for key, value in PROJECTION_DEFAULTS.items():
                group.setdefault(key, value)
        if "proj_dtype" in group:
            group["proj_dtype"] = dtype_name(group["proj_dtype"])
        super().add_param_group(group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._param_index.setdefault(id(p), len(self._param_index))
        self.validate_group(group)

    def sharding_problem(self, group: dict[str, Any]) -> str | None:
        """Why `group` has no sharded (FSDP2) step, or None (an algorithm with such an option says so)."""
        return None

    def validate_group(self, group: dict[str, Any]) -> None:
        """Refuse a param group's bad options (one-line :class:`UsageError` naming the option and the fix)."""
        check_number("lr", group["lr"], allow_none=True)
        if "weight_decay" in group:
            check_number("weight_decay", group["weight_decay"])
        eps = group.get("eps")
        if isinstance(eps, (int, float)):
            check_number("eps", eps)
        betas = group.get("betas")
        if betas is not None:
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise UsageError(f"betas={betas!r} must be a pair (beta1, beta2)")
            for i, beta in enumerate(betas):
                if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                    raise UsageError(f"betas[{i}]={beta!r} must be in [0, 1)")
        if group.get("nonfinite", "skip") not in NONFINITE_POLICIES:
            raise UsageError(f"nonfinite={group['nonfinite']!r}: use 'skip', 'raise' or 'off'")
        if "state_dtype" in group:
            resolve_dtype(group["state_dtype"], "state_dtype")
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (shape {list(p.shape)})")
        if "rank" in group:
            validate_projection(group)
        if self.uses_blocks and "block" in group:
            for p in group["params"]:
                parse_block(group["block"], p.shape)

    # -- state layout ------------------------------------------------------------------------

    def block_layout(self, shape, group) -> BlockLayout:
        """The block layout of a parameter of `shape` in `group` (its ``block``, or the default)."""
        return parse_block(group.get("block") or default_block(shape), shape)

    def v_layout(self, shape, group) -> BlockLayout | None:
        """The blocks the second moment is kept over (None: a rule without blocks)."""
        return self.block_layout(shape, group) if self.uses_blocks else None

    def _projection_layout(self, shape, group) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        side = resolve_side(group["proj_type"], shape)
        proj_dtype = resolve_dtype(group["proj_dtype"], "proj_dtype")
        layout = {key: (dims, proj_dtype) for key, dims in projector_shapes(shape, group["rank"], side).items()}
        layout["refresh"] = ((3,), torch.int64)
        if group["adaptive_gap"]:
            layout["similarity"] = ((group["gap_window"],), torch.float32)
        return layout

    def _moment(self, key: str, shape, group, bits: int = 32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        numel = math.prod(shape)
        if bits == 8 and numel >= group.get("min_8bit_size", 4096):
            return {key: ((numel,), torch.uint8), key + "_absmax": ((quant.n_blocks(numel),), torch.float32)}
        return {key: (tuple(shape), resolve_dtype(group.get("state_dtype"), "state_dtype"))}

    def state_layout(self, shape, group) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every state tensor a parameter of `shape` in `group` holds: ``{key: (shape, dtype)}``."""
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"step": ((), torch.float32)}
        work_shape = tuple(shape)
        if "rank" in group:
            layout.update(self._projection_layout(shape, group))
            work_shape = low_rank_shape(shape, group["rank"], resolve_side(group["proj_type"], shape))
        layout.update(self._state_layout(tuple(shape), work_shape, group))
        return layout

    def _state_layout(self, shape, work_shape, group) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def low_rank_moment_keys(self, group) -> list[str]:
        """State keys of moments that live in the projected space (rotated/reset at a refresh)."""
        return ["exp_avg"]

    def init_state(self, p: torch.Tensor, group, state: dict) -> None:
        """Allocate `p`'s state (zeros; 8-bit moments at their zero code; the refresh schedule due now)."""
        for key, (dims, dtype) in self.state_layout(p.shape, group).items():
            device = "cpu" if key in HOST_STATE else p.device
            if dtype == torch.uint8:
                signed = not key.startswith("exp_avg_sq")
                state[key] = torch.full(dims, quant.zero_code(signed), dtype=dtype, device=device)
            else:
                state[key] = torch.zeros(dims, dtype=dtype, device=device)
        if "refresh" in state:
            state["refresh"].copy_(torch.tensor([1, group["update_proj_gap"], 0]))

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One update of every parameter that has a gradient. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update_params([(p, group) for group in self.param_groups for p in group["params"]
                            if p.grad is not None])
        return loss

    @torch.no_grad()
    def step_params(self, params: list[torch.Tensor]) -> None:
        """Update these parameters now, as one batch (layer-wise updates call it inside backward).

        Each call costs one host synchronisation (the finiteness check) and batches its parameters on
        the multi-tensor path, so a few parameters at a time cost less than one at a time.
        """
        self.update_params([(p, self._group_of(p)) for p in params if p.grad is not None])

    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter now."""
        self.step_params([p])

    def _group_of(self, p: torch.Tensor) -> dict:
        # cached: layer-wise updates ask for every parameter every step; rebuilt when groups change
        cache = getattr(self, "_group_cache", None)
        if cache is None or cache[0] is not self.param_groups or cache[1] != len(self.param_groups) \
                or id(p) not in cache[2]:
            cache = (self.param_groups, len(self.param_groups),
                     {id(q): group for group in self.param_groups for q in group["params"]})
            self._group_cache = cache
        group = cache[2].get(id(p))
        if group is None:
            raise UsageError("this parameter is not managed by the optimizer")
        return group

    def update_params(self, items: list[tuple[torch.Tensor, dict]]) -> None:
        """One update of these ``(param, group)`` pairs: probe, admit, create state, refresh what is due,
        then the multi-tensor path for the parameters that take it and the reference for the rest."""
        work = []
        for p, group in items:
            item = WorkItem(p, self.checked_grad(p), group, self._multi_tensor_layout(p, group))
            if item.layout is not None and item.layout.kind != "elementwise":
                item.norms = item.layout.block_norms(item.grad)
                if item.norms is None:  # blocks that are not a view of the gradient: the reference path
                    item.layout = None
            work.append(item)
        # block norms feeding v are also the finiteness probe, so such a gradient is read once
        checked = [item for item in work if item.group.get("nonfinite", "skip") != "off"]
        finite = {id(item): ok for item, ok in zip(checked, self._finite_flags([item.probe for item in checked]))}
        ready = [item for item in work if self.admit(item.param, item.group, finite.get(id(item), True))]
        steps = self.start_steps([(item.param, item.group) for item in ready])
        for item, t in zip(ready, steps):
            item.step = t
        refresh_due(self, ready)
        fast = []
        for item in ready:
            if item.layout is None:
                self._step_param(item.param, item.grad, item.group, item.step)
            else:
                fast.append(item)
        if fast:
            self._multi_tensor_step(fast, [item.step for item in fast])

    def _multi_tensor_layout(self, p: torch.Tensor, group: dict) -> BlockLayout | None:
        """`p`'s second-moment block layout when it takes this optimizer's multi-tensor path
        (:mod:`.multi_tensor`), None for the single-tensor reference path. Optimizers opt in by
        overriding this and :meth:`_multi_tensor_step`."""
        return None

    def _multi_tensor_step(self, items: list[WorkItem], steps: list[int]) -> None:
        """Update ``items`` (each with a `layout`) at their steps `steps`."""
        raise NotImplementedError

    @staticmethod
    def _finite_flags(probes: list[torch.Tensor]) -> list[bool]:
        """Whether each probe (a gradient, or its block norms) is finite, with one host sync per device.

        An L1 norm is non-finite iff an entry is (or the sum overflows fp32, i.e. |g| ~ 1e38/n, where
        Adam's squares would have overflowed long before); one multi-tensor reduction per device.
        """
        if not probes:
            return []
        by_device: dict[torch.device, list[int]] = {}
        for i, probe in enumerate(probes):
            by_device.setdefault(probe.device, []).append(i)
        flags = [True] * len(probes)
        for indices in by_device.values():
            norms = torch._foreach_norm([probes[i] for i in indices], 1, dtype=torch.float32)
            for i, ok in zip(indices, torch.isfinite(torch.stack(norms)).tolist()):
                flags[i] = ok
        return flags

    # -- step protocol: what a step pipeline (here, the sharded layer, the capturable step) calls --

    def checked_grad(self, p: torch.Tensor) -> torch.Tensor:
        """`p`'s gradient; sparse and complex gradients are refused."""
        grad = p.grad
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients (shape {list(p.shape)}); "
                            "use dense embeddings (sparse=False)")
        if grad.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex gradients (shape {list(p.shape)})")
        return grad

    def admit(self, p: torch.Tensor, group: dict, finite: bool) -> bool:
        """Whether `p` is updated this step: yes if its gradient is finite, else per `nonfinite`."""
        if finite:
            return True
        if group.get("nonfinite", "skip") == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient for a parameter of shape {list(p.shape)}; "
                "set nonfinite='skip' to skip such updates"
            )
        self.nonfinite_skips += 1
        return False

    def start_steps(self, ready: list[tuple[torch.Tensor, dict]]) -> list[int]:
        """Create missing states of these ``(param, group)`` and return each parameter's step number for
        this step (one read)."""
        for p, group in ready:
            state = self.state[p]
            if not state:
                self.init_state(p, group, state)
        if not ready:
            return []
        return [int(t) + 1 for t in torch.stack([self.state[p]["step"] for p, _ in ready]).tolist()]

    def compute_update(self, ps: ParamStep) -> Update:
        """The update rule: advance `ps`'s moments and return the parameter's :class:`Update`."""
        raise NotImplementedError

    def partial_row_sums(self, ps: ParamStep) -> dict[str, torch.Tensor]:
        """When `ps.param` holds some of W's rows (a sharded step): this part's share of each sum over all
        of W's rows that :meth:`compute_update` needs; the caller adds them up across processes and hands
        them to it as ``ps.row_totals``. Must not change state. The default: none."""
        return {}

    def decay_rate(self, group) -> float:
        """How much weight decay removes this step (``lr·λ`` unless a rule scales lr; 0 without decay,
        also where lr is a device tensor)."""
        weight_decay = group.get("weight_decay", 0.0)
        return group["lr"] * weight_decay if weight_decay else 0.0

    def apply_update(self, p: torch.Tensor, group, update: Update, ok: torch.Tensor | None = None) -> None:
        """``p ← p - step_size · direction [· multiplier]`` with this rule's decoupled weight decay;
        `ok` (a device flag, capturable step) False leaves `p` as it was."""
        apply_update(p, update, self.decay_rate(group), decay_after=self.decay_after_update, ok=ok)

    def sketch_generator(self, p: torch.Tensor, t: int) -> torch.Generator:
        """The random generator of `p`'s refresh at step `t`: it depends on (parameter, step) only, so a
        resumed run draws the same sketches."""
        return torch.Generator().manual_seed(1_000_003 * self._param_index.get(id(p), 0) + t)

    def install_projector(self, p, group, state, side: str, t: int, new: dict[str, torch.Tensor],
                          had_projector: bool, view: ShardView | None = None) -> None:
        """Adopt new projector tensors (see :func:`.refresh.adopt_projector`). With `view` (a parameter
        split across processes) `state` holds local parts and `new` whole projectors; whole old
        projectors are asked of the view only where the moments are rotated or the subspaces compared."""
        old = state
        if view is not None and had_projector and (group["moment_policy"] == "project" or group["adaptive_gap"]):
            old = view.whole(state)
        moments = view.moments(old, group, side) if view is not None else \
            ParamStep(None, None, old, group, 0, side, None)
        position = None
        if group["stagger_refresh"]:
            params = group["params"]
            position = (next(i for i, q in enumerate(params) if q is p), len(params))
        adopt_projector(group, state, side, t, new, had_projector, low_rank_keys=self.low_rank_moment_keys(group),
                        moments=moments, old=old, localize=view.localize if view is not None else None,
                        position=position)

    # -- the single-tensor reference path ------------------------------------------------------

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group, t: int) -> None:
        """The single-tensor reference step at step `t` (state created and projector refreshed by the caller)."""
        # fp32 copies of low-precision gradients are made here, one parameter at a time, never all at once
        grad = grad if grad.dtype == torch.float32 else grad.float()
        state = self.state[p]
        state["step"] += 1
        side = resolve_side(group["proj_type"], p.shape) if "rank" in group else None
        layout = self.block_layout(p.shape, group) if self.uses_blocks else None
        self.apply_update(p, group, self.compute_update(ParamStep(p, grad, state, group, t, side, layout)))

    # -- checkpoints -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint, keeping each state tensor's saved dtype (fp32 moments stay fp32 for bf16 params).

        Atomic: the whole checkpoint is checked (optimizer class, groups, the options that decide state
        shapes, every state tensor) before anything changes, so a refused checkpoint leaves the
        optimizer as it was. torch's default casts floating state to the parameter's dtype, which would
        round an fp32 projector into bf16; here tensors only move to the parameter's device
        (bookkeeping stays on the CPU).
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise UsageError("not an optimizer checkpoint: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        self._check_structure(saved_groups)
        if self.added_options:  # a checkpoint older than an option means its default
            saved_groups = [{**self.added_options, **g} for g in saved_groups]
            state_dict = {**state_dict, "param_groups": saved_groups}
        saved_ids = [i for g in saved_groups for i in g["params"]]
        # each parameter with the group it will have once loaded: torch adopts the saved options
        by_id = {i: (p, {**saved, "params": current["params"]})
                 for saved, current in zip(saved_groups, self.param_groups)
                 for i, p in zip(saved["params"], current["params"])}
        if len(by_id) != len(saved_ids):
            raise UsageError("corrupt optimizer checkpoint: a parameter id appears in two param groups")
        restored = {}
        for param_id, values in state_dict["state"].items():
            if param_id not in by_id:
                raise UsageError(f"corrupt optimizer checkpoint: state for unknown parameter id {param_id!r}")
            p, group = by_id[param_id]
            restored[param_id] = self._restored_state(p, group, values)
        super().load_state_dict({**state_dict, "state": {}})
        for param_id, values in restored.items():
            self.state[by_id[param_id][0]] = values

    def _restored_state(self, p: torch.Tensor, group: dict, values) -> dict[str, torch.Tensor]:
        """One parameter's saved state, checked against what `group` needs and placed for this run."""
        if not isinstance(values, dict):
            raise UsageError(f"corrupt optimizer checkpoint: a parameter's state is a {type(values).__name__}")
        expected = self.state_layout(p.shape, group)
        restored = {}
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise UsageError(f"corrupt optimizer checkpoint: state {key!r} is a {type(value).__name__}, "
                                 "expected a tensor (was it saved by another optimizer?)")
            if key not in expected:
                raise UsageError(f"optimizer checkpoint holds state {key!r} that {type(self).__name__} does not "
                                 "use with these options; was it saved with different settings?")
            dims, _ = expected[key]
            if tuple(value.shape) not in self.loadable_shapes(p, group, key, dims):
                raise UsageError(
                    f"optimizer checkpoint state {key!r} has shape {list(value.shape)} but a parameter of shape "
                    f"{list(p.shape)} with these options needs {list(dims)} (different rank or model?)"
                )
            restored[key] = self.restore_state_tensor(p, group, key, value, dims)
        return restored

    def loadable_shapes(self, p: torch.Tensor, group: dict, key: str, dims) -> set[tuple[int, ...]]:
        """Shapes a checkpoint's state `key` may have for `p` (here: the layout's `dims`)."""
        return {tuple(dims)}

    def restore_state_tensor(self, p: torch.Tensor, group: dict, key: str, value: torch.Tensor, dims) -> torch.Tensor:
        """A checked saved state tensor as this run keeps it: a copy on `p`'s device (host state on the CPU)."""
        return value.to("cpu" if key in HOST_STATE else p.device).clone()

    def _check_structure(self, saved_groups) -> None:
        """The checkpoint must come from this optimizer class, with as many groups, and agree on the options
        that decide state shapes; torch would silently adopt the saved ones."""
        if not isinstance(saved_groups, list) or not all(isinstance(g, dict) and "params" in g for g in saved_groups):
            raise UsageError("corrupt optimizer checkpoint: 'param_groups' must be a list of dicts with 'params'")
        name = type(self).__name__
        # the class first: another optimizer's checkpoint often has another number of groups too
        ours = _option_keys(self.defaults.keys())
        for index, saved in enumerate(saved_groups):
            theirs = _option_keys(saved.keys())
            if not (theirs <= ours and ours - theirs <= self.added_options.keys()):
                other = _class_with_options(theirs, type(self))
                raise UsageError(
                    f"optimizer checkpoint was saved by {other}, not {name} (param group {index} has options "
                    f"{', '.join(sorted(theirs - ours)) or '-'} that {name} does not take, and lacks "
                    f"{', '.join(sorted(ours - theirs)) or '-'}); load it into a "
                    f"{other if other[0].isupper() else 'matching optimizer'}, or start this {name} afresh"
                )
        if len(saved_groups) != len(self.param_groups):
            raise UsageError(f"optimizer checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}: was it saved for another model or method?")
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(current["params"]):
                raise UsageError(f"optimizer checkpoint param group {index} has {len(saved['params'])} parameters, "
                                 f"this optimizer {len(current['params'])}: was it saved for another model or method?")
            for key in STRUCTURAL_KEYS:
                if saved.get(key) != current.get(key):
                    raise UsageError(
                        f"optimizer checkpoint param group {index} was saved with {key}={saved.get(key)!r} but this "
                        f"optimizer has {key}={current.get(key)!r} (different rank or model?); build the optimizer "
                        "with the checkpoint's settings"
                    )

    # -- introspection -----------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes held by all state tensors."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))


def _option_keys(keys) -> frozenset[str]:
    """A group's optimizer options: what tells one optimizer class from another (not parameters, names,
    projection or block options, or how this process steps)."""
    return frozenset(keys) - PASSIVE_KEYS - MODE_KEYS - set(PROJECTION_DEFAULTS) - {"rank", "block"}


def _class_with_options(options: frozenset[str], this: type) -> str:
    """The name of the optimizer class (of those built on :class:`ComposedOptimizer`) whose groups carry
    exactly `options`, or a description when none does."""
    for cls in _optimizer_classes(ComposedOptimizer):
        if cls is not this and _defaults_of(cls) == options:
            return cls.__name__
    return "another optimizer"


def _optimizer_classes(base: type) -> list[type]:
    out = []
    for cls in base.__subclasses__():
        out.append(cls)
        out.extend(_optimizer_classes(cls))
    return out


@functools.cache
def _defaults_of(cls: type) -> frozenset[str] | None:
    """The option keys of `cls`'s groups, read from an instance over one scalar parameter (None when
    it cannot be built that way, e.g. an abstract or test class)."""
    try:
        return _option_keys(cls([torch.zeros(1, requires_grad=True)]).defaults)
    except Exception:  # noqa: BLE001 -- any class that cannot be built bare is simply not a candidate
        return None
