"""The one core every optimizer here is built from.

A step on one parameter is a composition of small parts, each a function of
tensors held in that parameter's state:

* a **projector** (identity, or GaLore's low-rank subspace, refreshed on a
  schedule that may adapt) — :meth:`ParamStep.project` / :meth:`ParamStep.back`;
* a **first-moment rule** (EMA of what it is fed) — :meth:`ParamStep.ema`;
* a **second-moment rule**: elementwise EMA of squares, a per-block mean of
  squares (Adam-mini), or Adafactor's factored rows/columns —
  :meth:`ParamStep.ema_sq`, :meth:`ParamStep.block_ema_sq`;
* and the choice of what `v` is fed from and in which space the division
  happens, which each public optimizer states in its short ``_update``.

`ComposedOptimizer` is an ordinary ``torch.optim.Optimizer``: param groups,
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
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from galore_mini.errors import UsageError
from galore_mini.optim import distributed, quant
from galore_mini.optim.blocks import BlockLayout, default_block, parse_block
from galore_mini.optim.projection import (
    PROJ_METHODS,
    LowRankProduct,
    back_factors,
    PROJ_TYPES,
    basis_change,
    compute_projector,
    low_rank_shape,
    project,
    projector_shapes,
    resolve_side,
    subspace_overlap,
)

MOMENT_POLICIES = ("keep", "project", "reset")
NONFINITE_POLICIES = ("skip", "raise", "off")

# Options a group may carry when it has `rank`; filled in when missing.
PROJECTION_DEFAULTS: dict[str, Any] = dict(
    update_proj_gap=200,
    scale=0.25,
    proj_type="std",
    proj_method="svd",
    moment_policy="keep",
    adaptive_gap=False,
    gap_threshold=0.4,
    gap_growth=2,
    gap_window=5,
    max_gap=None,
    proj_dtype=None,
    stagger_refresh=False,
)
# Keys torch or its schedulers put in groups, and descriptive keys of ours.
PASSIVE_KEYS = {"params", "name", "param_names", "initial_lr"}
# State that lives on the CPU whatever the parameter's device: read every step, so no device sync.
HOST_STATE = ("step", "refresh", "similarity")
# Largest stack of same-shaped gradients refreshed in one batched call.
REFRESH_BATCH_BYTES = 256 * 2 ** 20
BATCH_REFRESH_ON_CPU = False
# Group options that decide the shapes or meaning of state tensors.
STRUCTURAL_KEYS = ("rank", "proj_type", "block", "approach", "moment_bits", "state_dtype", "proj_dtype",
                   "adaptive_gap", "gap_window", "min_8bit_size", "beta1")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(value, name: str) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise UsageError(f"{name}={value!r}: use one of {sorted(set(_DTYPES))}")


def _dtype_name(value) -> str | None:
    """Group values stay plain strings so `state_dict()` holds no torch objects."""
    if value is None or isinstance(value, str):
        return value
    return str(value).replace("torch.", "")


def _fused_low_rank_update(p: torch.Tensor, update: LowRankProduct, keep: float, alpha: float) -> bool:
    """``p ← keep·p + alpha·a@b`` as one GEMM with `p` as accumulator; False where that is not possible.

    fp32 `p` with fp32 factors uses ``addmm_`` on any device. fp32 `p` with bf16 factors needs an fp32
    output from bf16 inputs, which CUDA's ``addmm(out_dtype=…)`` gives; CPUs lack it (there a bf16
    product plus an add is faster than an fp32 GEMM), so the caller multiplies out. bf16 `p` with bf16
    factors is one bf16 ``addmm_`` (fp32 accumulation, one rounding into `p`), where the multiplied-out
    path would pass over the weight five times through an fp32 copy.
    """
    if p.dtype == torch.bfloat16:
        if update.dtype != torch.bfloat16:
            return False
        p.addmm_(*update.factors(), beta=keep, alpha=alpha)
        return True
    if p.dtype != torch.float32:
        return False
    if update.dtype == torch.float32:
        p.addmm_(*update.factors(), beta=keep, alpha=alpha)
        return True
    if p.is_cuda and update.dtype == torch.bfloat16 and _CUDA_OUT_DTYPE_ADDMM[0]:
        try:
            torch.addmm(p, *update.factors(), beta=keep, alpha=alpha, out_dtype=torch.float32, out=p)
            return True
        except (TypeError, RuntimeError):
            _CUDA_OUT_DTYPE_ADDMM[0] = False  # this torch build lacks it: multiply out from now on
    return False


_CUDA_OUT_DTYPE_ADDMM = [True]


def bias_corrections(group: dict, beta1: float, beta2: float, t: int) -> tuple[float, float]:
    """Adam's ``(1-β1ᵗ, 1-β2ᵗ)``, or ``(1, 1)`` where the group sets ``correct_bias=False``."""
    if not group.get("correct_bias", True):
        return 1.0, 1.0
    return 1.0 - beta1 ** t, 1.0 - beta2 ** t


class Update(NamedTuple):
    """What an optimizer's ``_update`` returns: the parameter moves by ``-step_size · direction [· multiplier]``.

    `direction` is full-size, or a :class:`LowRankProduct` for projected weights (fused into one GEMM);
    `multiplier`, when given, is a small tensor broadcast over blocks (Adam-mini's ``1/(√v+ε)``), so no
    full-size quotient is ever formed.
    """

    direction: torch.Tensor | LowRankProduct
    step_size: float
    multiplier: torch.Tensor | None = None


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
    """One parameter's step: the parts an optimizer's ``_update`` composes.

    Attributes: ``grad`` (fp32), ``state``, ``group``, ``t`` (1-based step),
    ``side`` (``None`` when not projected), ``layout`` (the block layout of the
    full-size parameter).
    """

    #: a sharded step's sums across ranks for this parameter, named as the optimizer's ``_shard_sums``
    #: names them ({} when it needs none); None in one process, where ``_update`` sums over the whole tensor
    across: dict[str, torch.Tensor] | None = None

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
        """``back(low)`` without the scale α (optimizers multiply :attr:`scale` into their step size),
        as factors for projected weights so the update can be fused into one GEMM."""
        return back_factors(low, self.state, self.side) if self.projected else low

    @property
    def scale(self) -> float:
        """GaLore's α for projected weights, 1 otherwise."""
        return self.group["scale"] if self.projected else 1.0

    def bias_corrections(self, beta1: float, beta2: float) -> tuple[float, float]:
        return bias_corrections(self.group, beta1, beta2, self.t)

    # moments: read as fp32 (dequantised if stored in 8 bits), updated, written back
    def _read(self, key: str, shape, signed: bool) -> torch.Tensor:
        buf = self.state[key]
        if buf.dtype == torch.uint8:
            return quant.dequantize(buf, self.state[key + "_absmax"], signed).view(shape)
        return buf if buf.dtype == torch.float32 else buf.float()

    def _write(self, key: str, value: torch.Tensor, signed: bool) -> None:
        buf = self.state[key]
        if buf.dtype == torch.uint8:
            quant.quantize(value, signed, out=(buf, self.state[key + "_absmax"]))
        elif buf is not value:
            buf.copy_(value)

    def ema(self, key: str, x: torch.Tensor, beta: float) -> torch.Tensor:
        """``m ← β m + (1-β) x`` (the first-moment rule); returns ``m``."""
        m = self._read(key, x.shape, signed=True)
        m.mul_(beta).add_(x, alpha=1.0 - beta)
        self._write(key, m, signed=True)
        return m

    def ema_sq(self, key: str, x: torch.Tensor, beta: float) -> torch.Tensor:
        """Elementwise ``v ← β v + (1-β) x²``; returns ``v``."""
        v = self._read(key, x.shape, signed=False)
        v.mul_(beta).addcmul_(x, x, value=1.0 - beta)
        self._write(key, v, signed=False)
        return v

    def block_ema_sq(self, key: str, x: torch.Tensor, beta: float, layout: BlockLayout) -> torch.Tensor:
        """Per-block ``v_b ← β v_b + (1-β) mean_{i∈b} x_i²``; returns ``v`` shape ``(n_blocks,)``."""
        v = self._read(key, (layout.n_blocks,), signed=False)
        v.mul_(beta).add_(layout.block_mean_sq(x), alpha=1.0 - beta)
        self._write(key, v, signed=False)
        return v


class ComposedOptimizer(torch.optim.Optimizer):
    """Base class: validation, state allocation, projector refresh, step loop, exact resume.

    Subclasses set ``defaults`` and implement ``_state_layout`` and ``_update(ps)``, which returns an
    :class:`Update`: the parameter moves by ``-step_size · direction [· multiplier]``, the multiplier a
    small tensor broadcast over blocks (so no full-size quotient is ever formed). ``_update`` is the
    single-tensor reference; a subclass
    may add a multi-tensor step of the same arithmetic (``_multi_tensor_layout`` and
    ``_multi_tensor_step``, see :mod:`.multi_tensor`), which tests hold to the reference bit for bit.
    """

    #: weight decay applied before the update (AdamW/Adam-mini) or after it (galore-torch)
    decay_after_update = False
    #: whether a group may carry `block`
    uses_blocks = False

    def __init__(self, params, defaults: dict[str, Any], projection_defaults: dict[str, Any] | None = None):
        self._check_scalar("lr", defaults.get("lr"), allow_none=True)
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

    @staticmethod
    def _check_scalar(name: str, value, *, allow_none: bool = False, low: float = 0.0) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, torch.Tensor):
            value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
            raise UsageError(f"{name}={value!r} is invalid: it must be a finite number >= {low}")

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
            group["proj_dtype"] = _dtype_name(group["proj_dtype"])
        super().add_param_group(group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._param_index.setdefault(id(p), len(self._param_index))
        self._validate_group(group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._check_scalar("lr", group["lr"], allow_none=True)
        if "weight_decay" in group:
            self._check_scalar("weight_decay", group["weight_decay"])
        eps = group.get("eps")
        if isinstance(eps, (int, float)):
            self._check_scalar("eps", eps)
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
            _dtype(group["state_dtype"], "state_dtype")
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (shape {list(p.shape)})")
        if "rank" in group:
            self._validate_projection(group)
        if self.uses_blocks and "block" in group:
            for p in group["params"]:
                parse_block(group["block"], p.shape)
        distributed.check_group(self, group)

    def _validate_projection(self, group: dict[str, Any]) -> None:
        rank = group["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise UsageError(f"rank={rank!r} must be a positive integer")
        gap = group["update_proj_gap"]
        if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
            raise UsageError(f"update_proj_gap={gap!r} must be an integer >= 1")
        self._check_scalar("scale", group["scale"])
        for key, allowed in (("proj_type", PROJ_TYPES), ("proj_method", PROJ_METHODS),
                             ("moment_policy", MOMENT_POLICIES)):
            if group[key] not in allowed:
                raise UsageError(f"{key}={group[key]!r}: use one of {', '.join(allowed)}")
        if group["adaptive_gap"]:
            self._check_scalar("gap_threshold", group["gap_threshold"])
            if not isinstance(group["gap_window"], int) or group["gap_window"] < 1:
                raise UsageError(f"gap_window={group['gap_window']!r} must be an integer >= 1")
            self._check_scalar("gap_growth", group["gap_growth"], low=1.0)
            if group["max_gap"] is not None and (not isinstance(group["max_gap"], int) or group["max_gap"] < gap):
                raise UsageError(f"max_gap={group['max_gap']!r} must be an integer >= update_proj_gap ({gap})")
        _dtype(group["proj_dtype"], "proj_dtype")
        for p in group["params"]:
            if p.dim() != 2:
                raise UsageError(
                    f"a parameter of shape {list(p.shape)} is in a group with rank={rank}, but only 2-D weights can be "
                    "projected; put 1-D parameters (biases, norms) and embeddings in a group without `rank` "
                    "(galore_mini.param_groups does this for you)"
                )
            if rank >= min(p.shape):
                raise UsageError(
                    f"rank={rank} must be below min(rows, cols)={min(p.shape)} for a weight of shape {list(p.shape)}: "
                    "at that rank projection saves nothing; use a smaller rank or leave this weight out of the "
                    "projected group (galore_mini.param_groups does this and logs it)"
                )

    # -- state layout ------------------------------------------------------------------------

    def _block_layout(self, shape, group) -> BlockLayout:
        return parse_block(group.get("block") or default_block(shape), shape)

    def _projection_layout(self, shape, group) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        side = resolve_side(group["proj_type"], shape)
        proj_dtype = _dtype(group["proj_dtype"], "proj_dtype")
        layout = {key: (dims, proj_dtype) for key, dims in projector_shapes(shape, group["rank"], side).items()}
        layout["refresh"] = ((3,), torch.int64)
        if group["adaptive_gap"]:
            layout["similarity"] = ((group["gap_window"],), torch.float32)
        return layout

    def _moment(self, key: str, shape, group, bits: int = 32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        numel = math.prod(shape)
        if bits == 8 and numel >= group.get("min_8bit_size", 4096):
            return {key: ((numel,), torch.uint8), key + "_absmax": ((quant.n_blocks(numel),), torch.float32)}
        return {key: (tuple(shape), _dtype(group.get("state_dtype"), "state_dtype"))}

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

    def _shard_spec(self, p: torch.Tensor) -> distributed.ShardSpec:
        # cached: a parameter's placements do not change while the optimizer holds it
        cache = self.__dict__.setdefault("_shard_specs", {})
        spec = cache.get(id(p))
        if spec is None:
            spec = cache[id(p)] = distributed.shard_spec(p)
        return spec

    def _init_state(self, p: torch.Tensor, group, state: dict) -> None:
        if distributed.is_dtensor(p):
            distributed.init_state(self, p, group, state)
            return
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
        self._step_items([(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None])
        return loss

    @torch.no_grad()
    def step_params(self, params: list[torch.Tensor]) -> None:
        """Update these parameters now, as one batch (layer-wise updates call it inside backward).

        Each call costs one host synchronisation (the finiteness check) and batches its parameters on
        the multi-tensor path, so a few parameters at a time cost less than one at a time.
        """
        self._step_items([(p, self._group_of(p)) for p in params if p.grad is not None])

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

    def _step_items(self, items: list[tuple[torch.Tensor, dict]]) -> None:
        if any(distributed.is_dtensor(p) for p, _ in items):
            # FSDP2 / DTensor parameters: local shards, explicit small collectives (see .distributed)
            distributed.step_sharded(self, [item for item in items if distributed.is_dtensor(item[0])])
            items = [item for item in items if not distributed.is_dtensor(item[0])]
        work = []
        for p, group in items:
            item = WorkItem(p, self._checked_grad(p), group, self._multi_tensor_layout(p, group))
            if item.layout is not None and item.layout.kind != "elementwise":
                item.norms = item.layout.block_norms(item.grad)
                if item.norms is None:  # blocks that are not a view of the gradient: the reference path
                    item.layout = None
            work.append(item)
        # block norms feeding v are also the finiteness probe, so such a gradient is read once
        checked = [item for item in work if item.group.get("nonfinite", "skip") != "off"]
        finite = {id(item): ok for item, ok in zip(checked, self._finite_flags([item.probe for item in checked]))}
        ready = [item for item in work if self._admit(item.param, item.group, finite.get(id(item), True))]
        steps = self._next_steps([(item.param, item.group) for item in ready])
        for item, t in zip(ready, steps):
            item.step = t
        self._refresh_due(ready)
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

    def _admit(self, p: torch.Tensor, group: dict, finite: bool) -> bool:
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

    def _next_steps(self, ready: list[tuple[torch.Tensor, dict]]) -> list[int]:
        """Create missing states of these ``(param, group)`` and return each parameter's step number for
        this step (one read)."""
        for p, group in ready:
            state = self.state[p]
            if not state:
                self._init_state(p, group, state)
        if not ready:
            return []
        return [int(t) + 1 for t in torch.stack([self.state[p]["step"] for p, _ in ready]).tolist()]

    def _refresh_due(self, ready: list[WorkItem]) -> None:
        """Refresh, in batches of same-shaped matrices, every projector whose refresh falls on this step.

        One batched QR/eigen/SVD call per shape replaces a call per matrix (on a GPU, one sequence of
        kernel launches per shape instead of per matrix); stacks are capped at REFRESH_BATCH_BYTES of
        gradient.
        """
        projected = [item for item in ready if "rank" in item.group]
        if not projected:
            return
        due_at = torch.stack([self.state[item.param]["refresh"] for item in projected])[:, 0].tolist()
        buckets: dict[tuple, list[WorkItem]] = {}
        for item, due in zip(projected, due_at):
            if item.step < due:
                continue
            side = resolve_side(item.group["proj_type"], item.param.shape)
            key = (id(item.group), tuple(item.param.shape), side, item.grad.device, item.step > 1)
            buckets.setdefault(key, []).append(item)
        for (_, shape, side, device, had_projector), items in buckets.items():
            # CPU LAPACK's SVD gains nothing from batching (BENCHMARKS.md, "Batched refresh on the CPU"),
            # so on the CPU it stays per matrix
            batched = device.type != "cpu" or BATCH_REFRESH_ON_CPU
            per_chunk = max(1, REFRESH_BATCH_BYTES // (4 * math.prod(shape))) if batched else 1
            for start in range(0, len(items), per_chunk):
                chunk = items[start:start + per_chunk]
                if len(chunk) == 1:  # 2-D products (mm) beat a batch of one (bmm copies its operands)
                    item = chunk[0]
                    self._refresh(item.param, item.grad, item.group, self.state[item.param], side, item.step)
                    continue
                group = chunk[0].group
                states = [self.state[item.param] for item in chunk]
                old = {key: torch.stack([state[key] for state in states]) for key in ("projector", "projector_right")
                       if key in states[0]} if had_projector else {}
                new = compute_projector(torch.stack([item.grad.float() for item in chunk]), group["rank"], side,
                                        group["proj_method"], old,
                                        [self._generator(item.param, item.step) for item in chunk],
                                        _dtype(group["proj_dtype"], "proj_dtype"))
                for i, (item, state) in enumerate(zip(chunk, states)):
                    self._install_projector(item.param, group, state, side, item.step,
                                            {k: v[i] for k, v in new.items()}, had_projector)

    def _checked_grad(self, p: torch.Tensor) -> torch.Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients (shape {list(p.shape)}); "
                            "use dense embeddings (sparse=False)")
        if grad.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex gradients (shape {list(p.shape)})")
        return grad

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group, t: int) -> None:
        """The single-tensor reference step at step `t` (state created and projector refreshed by the caller)."""
        # fp32 copies of low-precision gradients are made here, one parameter at a time, never all at once
        grad = grad if grad.dtype == torch.float32 else grad.float()
        state = self.state[p]
        state["step"] += 1
        side = resolve_side(group["proj_type"], p.shape) if "rank" in group else None
        layout = self._block_layout(p.shape, group) if self.uses_blocks else None
        self._apply(p, group, self._update(ParamStep(p, grad, state, group, t, side, layout)))

    def _update(self, ps: ParamStep) -> Update:
        raise NotImplementedError

    def _shard_sums(self, ps: ParamStep) -> dict[str, torch.Tensor]:
        """This rank's parts of the sums over all of W's rows that ``_update`` needs (a sharded step adds
        them up across ranks in its one all-reduce and hands them to ``_update`` as ``ps.across``); must not
        change state. The default: none (everything is local, or reduced by the step itself)."""
        return {}

    def _decay_rate(self, group) -> float:
        """How much weight decay removes this step (``lr·λ`` unless a subclass scales lr)."""
        return group["lr"] * group.get("weight_decay", 0.0)

    def _apply(self, p: torch.Tensor, group, update: Update) -> None:
        """``p ← p - step_size · direction [· multiplier]`` with decoupled weight decay before or after."""
        direction, step_size, multiplier = update
        decay = self._decay_rate(group)
        # p(1-d) - s·U  or, decaying after the update, (p - s·U)(1-d) = p(1-d) - s(1-d)·U
        keep = 1.0 - decay
        alpha = -step_size * (keep if self.decay_after_update else 1.0)
        if isinstance(direction, LowRankProduct):
            if multiplier is not None:
                direction = direction.scaled(multiplier)
            if _fused_low_rank_update(p, direction, keep, alpha):
                return
            direction = direction.materialize()
            multiplier = None
        if p.dtype != torch.float32 and not decay:
            # one fp32 temporary read from the low-precision weight, rounded once back into it (not an
            # fp32 copy of the weight plus a scaled copy of the direction)
            target = (torch.addcmul(p, direction, multiplier, value=alpha) if multiplier is not None
                      else torch.add(p, direction, alpha=alpha))
            p.copy_(target)
            return
        target = p if p.dtype == torch.float32 else p.float()
        if decay:
            target.mul_(keep)
        if multiplier is not None:
            target.addcmul_(direction, multiplier, value=alpha)
        else:
            target.add_(direction, alpha=alpha)
        if target is not p:
            p.copy_(target)

    # -- projector refresh -------------------------------------------------------------------

    def _generator(self, p: torch.Tensor, t: int) -> torch.Generator:
        # random sketches depend on (parameter, step) only, so a resumed run draws the same ones
        return torch.Generator().manual_seed(1_000_003 * self._param_index.get(id(p), 0) + t)

    def _refresh(self, p, grad, group, state, side: str, t: int) -> None:
        had_projector = t > 1
        new = compute_projector(grad, group["rank"], side, group["proj_method"], state if had_projector else {},
                                self._generator(p, t), _dtype(group["proj_dtype"], "proj_dtype"))
        self._install_projector(p, group, state, side, t, new, had_projector)

    def _install_projector(self, p, group, state, side: str, t: int, new: dict[str, torch.Tensor],
                           had_projector: bool, shard: "distributed.ShardedProjectors | None" = None) -> None:
        """Adopt a new projector: treat the moments per `moment_policy`, adapt the gap, schedule the next refresh.

        With `shard` (a DTensor parameter) `state` holds local shards and `new` whole projectors; sharded
        projectors are gathered only where the moments are rotated or the subspaces compared.
        """
        refresh = state["refresh"]
        if had_projector:
            needs_old = group["moment_policy"] == "project" or group["adaptive_gap"]
            old = shard.whole(state) if shard is not None and needs_old else state
            self._on_subspace_change(group, old, side, new, shard)
            if group["adaptive_gap"]:
                self._adapt_gap(group, old, side, new)
        for key, value in new.items():
            state[key].copy_(value if shard is None else shard.local_of(key, value))
        gap = int(refresh[1])
        if not had_projector and group["stagger_refresh"]:
            # spread the second refreshes over the first window so no single step pays for every SVD
            position = next(i for i, q in enumerate(group["params"]) if q is p)
            gap = max(1, gap - (position * gap) // len(group["params"]))
        refresh[0] = t + gap

    def _on_subspace_change(self, group, state, side: str, new: dict[str, torch.Tensor],
                            shard: "distributed.ShardedProjectors | None" = None) -> None:
        policy = group["moment_policy"]
        if policy == "keep":
            return
        low_rank_keys = self._low_rank_moment_keys(group)
        if policy == "reset":
            for key in low_rank_keys:
                buf = state[key]
                if buf.dtype == torch.uint8:
                    buf.fill_(quant.zero_code(not key.startswith("exp_avg_sq")))
                    state[key + "_absmax"].zero_()
                else:
                    buf.zero_()
            return
        # "project": carry the moments into the new basis
        ps = shard.param_step(state, group, side) if shard is not None else ParamStep(None, None, state, group, 0,
                                                                                        side, None)
        for key in low_rank_keys:
            signed = not key.startswith("exp_avg_sq")
            current = ps._read(key, self._low_rank_shape_of(state, side), signed).clone()
            ps._write(key, self._rotate(current, state, new, side, squared=not signed), signed)

    @staticmethod
    def _low_rank_shape_of(state, side: str) -> tuple[int, int]:
        basis = state["projector"]
        if side == "left":
            return (basis.shape[1], -1)
        if side == "right":
            return (-1, basis.shape[0])
        return (basis.shape[1], state["projector_right"].shape[0])

    @staticmethod
    def _rotate(moment: torch.Tensor, state, new, side: str, squared: bool) -> torch.Tensor:
        """Express a low-rank moment in the new basis; squares use the squared map (approximate)."""
        if side in ("left", "full"):
            change = basis_change(new["projector"], state["projector"], "left")
            moment = (change.pow(2) if squared else change) @ moment
        if side in ("right", "full"):
            key = "projector" if side == "right" else "projector_right"
            change = basis_change(new[key], state[key], "right")
            moment = moment @ (change.pow(2) if squared else change)
        return moment

    def _low_rank_moment_keys(self, group) -> list[str]:
        """State keys of moments that live in the projected space (rotated/reset at refresh)."""
        return ["exp_avg"]

    def _adapt_gap(self, group, state, side: str, new) -> None:
        """Q-GaLore's rule, guarded: grow the gap after `gap_window` similar refreshes, capped."""
        overlap = subspace_overlap(new["projector"], state["projector"], "left" if side == "full" else side)
        refresh, window = state["refresh"], state["similarity"]
        held = int(refresh[2])
        window[held % window.numel()] = overlap
        held += 1
        if held >= window.numel() and float(window.mean()) >= group["gap_threshold"]:
            grown = int(math.ceil(int(refresh[1]) * group["gap_growth"]))
            cap = group["max_gap"] if group["max_gap"] is not None else grown
            refresh[1] = min(grown, cap)
            window.zero_()
            held = 0
        refresh[2] = held

    # -- checkpoints -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint, keeping each state tensor's saved dtype (fp32 moments stay fp32 for bf16 params).

        torch's default casts floating state to the parameter's dtype, which would round an fp32 projector
        into bf16; here tensors only move to the parameter's device (bookkeeping stays on the CPU).
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise UsageError("not an optimizer checkpoint: expected a dict with 'state' and 'param_groups'")
        saved_state = state_dict["state"]
        self._check_structure(state_dict["param_groups"])
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for param_id, values in saved_state.items():
            if param_id not in by_id:
                raise UsageError(f"corrupt optimizer checkpoint: state for unknown parameter id {param_id!r}")
            p = by_id[param_id]
            expected = self.state_layout(p.shape, groups[id(p)])
            restored = {}
            for key, value in values.items():
                if not isinstance(value, torch.Tensor):
                    raise UsageError(f"corrupt optimizer checkpoint: state {key!r} is a {type(value).__name__}, "
                                     "expected a tensor (was it saved by another optimizer?)")
                if key not in expected:
                    raise UsageError(f"optimizer checkpoint holds state {key!r} that {type(self).__name__} does not "
                                     "use with these options; was it saved with different settings?")
                dims, _ = expected[key]
                # a sharded run's 8-bit moments are laid out by rows (see distributed.eight_bit_keys)
                if tuple(value.shape) not in distributed.loadable_shapes(self, p, groups[id(p)], key, dims):
                    raise UsageError(
                        f"optimizer checkpoint state {key!r} has shape {list(value.shape)} but a parameter of shape "
                        f"{list(p.shape)} with these options needs {list(dims)} (different rank or model?)"
                    )
                if distributed.is_dtensor(value) or distributed.is_dtensor(p) or tuple(value.shape) != tuple(dims):
                    restored[key] = distributed.to_state_tensor(self, p, groups[id(p)], key, value)
                else:
                    restored[key] = value.to("cpu" if key in HOST_STATE else p.device).clone()
            self.state[p] = restored

    def _check_structure(self, saved_groups) -> None:
        """Options that decide state shapes must agree; torch would silently adopt the saved ones."""
        if len(saved_groups) != len(self.param_groups):
            raise UsageError(f"optimizer checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}: was it saved for another model or method?")
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            for key in STRUCTURAL_KEYS:
                if saved.get(key) != current.get(key):
                    raise UsageError(
                        f"optimizer checkpoint param group {index} was saved with {key}={saved.get(key)!r} but this "
                        f"optimizer has {key}={current.get(key)!r} (different rank or model?); build the optimizer "
                        "with the checkpoint's settings"
                    )

    # -- introspection -----------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (on this rank: a DTensor counts its local shard)."""
        return sum(distributed.local(v).numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

