"""Param groups from a model: which weights are projected, which blocks Adam-mini uses.

:func:`param_groups` reads the model once — module types and config (heads,
kv-heads, head_dim) — and returns ordinary param-group dicts with the same keys
galore-torch uses (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``)
plus ``block`` for Adam-mini / GaLore-mini. The reading is explicit and
printable (``print(groups)``); nothing is guessed inside ``step()``.

Defaults: ``nn.Linear`` (and GPT-2 ``Conv1D``) weights inside attention and
MLP modules are projected; embeddings, the output layer, norms and biases are
not. Norms and biases get no weight decay. Blocks: one per head for query and
key weights, one per output neuron for value, attention-output and MLP weights,
one per token for embedding and output layers, plain Adam for biases, one per
tensor for norms and anything unmatched. Supports Hugging Face Llama, Mistral
and Qwen2 (grouped-query attention), GPT-2 (``Conv1D`` stored in×out with fused
q/k/v) and plain ``nn.Linear`` models.

Overrides: ``overrides={regex: options}`` (or a list of pairs), matched with
``re.search`` against parameter names, first match wins; options are group
keys (``rank``, ``block``, ``weight_decay`` …) or ``project=True/False``. A
rule that matches no parameter is an error.

Example::

    >>> import torch, galore_mini as gm
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    >>> groups = gm.param_groups(model, "galore_mini", rank=16, overrides={r"^0\\.weight$": {"project": True}})
    >>> opt = gm.GaLoreMini(groups, lr=1e-3)
    >>> [g.get("rank") for g in groups]
    [16, None, None, None]
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from galore_mini.errors import UsageError
from galore_mini.optim.blocks import parse_block
from galore_mini.optim.core import PROJECTION_DEFAULTS
from galore_mini.optim.projection import resolve_side

log = logging.getLogger("galore_mini")

METHODS = ("full", "adam_mini", "galore", "galore_mini", "galore_mini_a1", "galore_mini_a2",
           "galore_adafactor", "galore_8bit", "galore_mini_8bit")
_BLOCK_METHODS = {"adam_mini", "galore_mini", "galore_mini_a1", "galore_mini_a2", "galore_mini_8bit"}
_PROJECTED_METHODS = {"galore", "galore_mini", "galore_mini_a1", "galore_mini_a2", "galore_adafactor",
                      "galore_8bit", "galore_mini_8bit"}
DEFAULT_LR = {"full": 1e-3, "adam_mini": 1e-3}  # GaLore-family default: 1e-2 (the paper's)

_ATTENTION_TOKENS = {"attn", "attention", "self_attn", "self_attention", "cross_attn"}
_MLP_TOKENS = {"mlp", "feed_forward", "ffn", "feedforward"}
_QUERY = {"q_proj", "query", "wq", "q", "q_lin"}
_KEY = {"k_proj", "key", "wk", "k", "k_lin"}
_VALUE = {"v_proj", "value", "wv", "v", "v_lin"}
_FUSED_QKV = {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj"}


@dataclass
class ParamInfo:
    """How one parameter is treated."""

    name: str
    param: torch.Tensor = field(repr=False)
    role: str  # embedding, output, query, key, value, attn_out, mlp, qkv, norm, bias, other
    block: str
    projectable: bool
    decay: bool
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    def treatment(self) -> str:
        parts = []
        rank = self.options.get("rank")
        if rank is not None:
            side = resolve_side(self.options.get("proj_type", "std"), self.shape)
            parts.append(f"GaLore r={rank} ({side})")
        if "block" in self.options:
            layout = parse_block(self.options["block"], self.shape)
            parts.append(f"v: {self.options['block']} ({layout.n_blocks} blocks)")
        elif rank is None:
            parts.append("plain")
        parts.append("decay" if self.options.get("weight_decay", 0.0) else "no decay")
        return ", ".join(parts)


class ParamGroups(list):
    """A list of param-group dicts that also knows each parameter's treatment; ``print()`` it."""

    def __init__(self, groups: Iterable[dict], infos: list[ParamInfo], method: str):
        super().__init__(groups)
        self.infos = infos
        self.method = method

    def describe(self) -> str:
        rows = [(info.name, "×".join(map(str, info.shape)), info.role, info.treatment()) for info in self.infos]
        widths = [max(len(r[i]) for r in rows + [("parameter", "shape", "role", "treatment")]) for i in range(4)]
        header = ("parameter", "shape", "role", "treatment")
        lines = [f"param groups for method={self.method!r}: {len(self)} groups, {len(self.infos)} parameters",
                 "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        projected = sum(info.param.numel() for info in self.infos if "rank" in info.options)
        total = sum(info.param.numel() for info in self.infos)
        lines.append(f"projected: {projected:,} of {total:,} parameters")
        return "\n".join(lines)

    __str__ = describe


# -- reading the model ---------------------------------------------------------------------------


def _config_value(model: nn.Module, *names: str):
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def _head_dim(model: nn.Module, attention: nn.Module | None) -> int | None:
    for owner in (attention, getattr(attention, "config", None)):
        value = getattr(owner, "head_dim", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    value = _config_value(model, "head_dim")
    if isinstance(value, int) and value > 0:
        return value
    hidden = _config_value(model, "hidden_size", "n_embd", "d_model")
    heads = _config_value(model, "num_attention_heads", "n_head", "num_heads")
    if hidden and heads:
        return hidden // heads
    return None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight in×out; detected by name to keep transformers optional
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def read_model(model: nn.Module) -> list[ParamInfo]:
    """Every trainable parameter with its role, default block layout and default projection choice."""
    modules = dict(model.named_modules())
    output_layer = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_layer = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_layer = None
    heads_q = _config_value(model, "num_attention_heads", "n_head", "num_heads")
    heads_kv = _config_value(model, "num_key_value_heads") or heads_q
    infos: list[ParamInfo] = []
    seen: set[int] = set()
    for module_name, module in modules.items():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{leaf}" if module_name else leaf
            infos.append(_classify(model, modules, module_name, module, leaf, param, output_layer, heads_q, heads_kv,
                                   name))
    return infos


def _ancestors(modules: dict[str, nn.Module], module_name: str) -> list[tuple[str, nn.Module]]:
    parts = module_name.split(".") if module_name else []
    return [(".".join(parts[:i]), modules.get(".".join(parts[:i]))) for i in range(len(parts) - 1, -1, -1)]


def _classify(model, modules, module_name, module, leaf, param, output_layer, heads_q, heads_kv, name) -> ParamInfo:
    ancestors = _ancestors(modules, module_name)
    tokens = {t.lower() for t in module_name.split(".")}
    class_names = [type(m).__name__ for _, m in ancestors if m is not None]
    in_attention = bool(tokens & _ATTENTION_TOKENS) or any("Attention" in c for c in class_names)
    in_mlp = bool(tokens & _MLP_TOKENS) or any(("MLP" in c or "FeedForward" in c) for c in class_names)
    attention = next((m for _, m in ancestors if m is not None and "Attention" in type(m).__name__), None)
    short = module_name.split(".")[-1].lower() if module_name else ""
    conv = _is_conv1d(module)
    along = "cols" if conv else "rows"

    if leaf == "bias" or (param.dim() == 1 and "bias" in leaf):
        return ParamInfo(name, param, "bias", "elementwise", False, False)
    if "Norm" in type(module).__name__ or "norm" in short or param.dim() < 2:
        return ParamInfo(name, param, "norm" if "norm" in (type(module).__name__ + short).lower() else "other",
                         "tensor", False, False)
    if isinstance(module, nn.Embedding):
        return ParamInfo(name, param, "embedding", "rows", False, True)
    if output_layer is not None and module is output_layer:
        return ParamInfo(name, param, "output", "rows", False, True)
    linear = isinstance(module, nn.Linear) or conv
    if linear and in_attention:
        head_dim = _head_dim(model, attention)
        heads = "heads" if not conv else "col_heads"
        if short in _QUERY or short in _KEY:
            role = "query" if short in _QUERY else "key"
            block = f"{heads}:{head_dim}" if head_dim and param.shape[0 if not conv else 1] % head_dim == 0 else along
            return ParamInfo(name, param, role, block, True, True)
        if short in _FUSED_QKV:
            return ParamInfo(name, param, "qkv", _fused_block(param, conv, head_dim, heads_q, heads_kv), True, True)
        role = "value" if short in _VALUE else "attn_out"
        return ParamInfo(name, param, role, along, True, True)
    if linear and in_mlp:
        return ParamInfo(name, param, "mlp", along, True, True)
    if linear:
        return ParamInfo(name, param, "linear", along, False, True)
    return ParamInfo(name, param, "other", along if param.dim() == 2 else "tensor", False, True)


def _fused_block(param, conv: bool, head_dim, heads_q, heads_kv) -> str:
    """q, k, v stacked along the output axis: per-head blocks for q and k, per neuron for v."""
    axis = 1 if conv else 0
    width = param.shape[axis]
    if not (head_dim and heads_q):
        return "cols" if conv else "rows"
    q, kv = heads_q * head_dim, heads_kv * head_dim
    if q + 2 * kv != width:
        return "cols" if conv else "rows"
    return f"{'cols' if conv else 'rows'}:{heads_q}x{head_dim},{heads_kv}x{head_dim},{kv}x1"


# -- building groups ------------------------------------------------------------------------------


def _normalise_overrides(overrides) -> list[tuple[re.Pattern, dict]]:
    if overrides is None:
        return []
    pairs = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    compiled = []
    for pattern, options in pairs:
        try:
            compiled.append((re.compile(pattern), dict(options)))
        except re.error as exc:
            raise UsageError(f"overrides: {pattern!r} is not a valid regular expression ({exc})") from None
    return compiled


def param_groups(model: nn.Module, method: str = "galore_mini", rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", weight_decay: float = 0.0, overrides=None,
                 **projection_options) -> ParamGroups:
    """Param groups for `method` (see module docstring); print the result to see each parameter's treatment.

    `projection_options` (``proj_method``, ``moment_policy``, ``adaptive_gap`` …) go into projected groups.
    Weights whose smaller side is not above `rank` are left unprojected (logged once).
    """
    if method not in METHODS:
        raise UsageError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
    unknown = sorted(set(projection_options) - set(PROJECTION_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"projection options are {', '.join(PROJECTION_DEFAULTS)}")
    projecting = method in _PROJECTED_METHODS
    if projecting and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise UsageError(f"rank={rank!r} must be a positive integer")
    rules = _normalise_overrides(overrides)
    used = [False] * len(rules)
    infos = read_model(model)
    too_small = []
    for info in infos:
        options: dict[str, Any] = {"weight_decay": weight_decay if info.decay else 0.0}
        rule_options: dict[str, Any] = {}
        for i, (pattern, opts) in enumerate(rules):
            if pattern.search(info.name):
                used[i] = True
                rule_options = dict(opts)
                break
        project = rule_options.pop("project", info.projectable)
        param_rank = rule_options.pop("rank", rank)
        if method in _BLOCK_METHODS:
            options["block"] = info.block
        if projecting and project and param_rank is not None:
            if info.param.dim() != 2:
                raise UsageError(f"overrides: {info.name} has shape {list(info.shape)}; only 2-D weights can be projected")
            if param_rank >= min(info.shape):
                too_small.append(info.name)
            else:
                options.update(rank=param_rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                               **projection_options)
        options.update(rule_options)
        info.options = options
    for (pattern, _), hit in zip(rules, used):
        if not hit:
            raise UsageError(f"overrides: the rule {pattern.pattern!r} matches no parameter of the model; "
                             "check the names with print(gm.param_groups(model))")
    if too_small:
        log.warning("rank=%s is not below the smaller side of %d weight(s) (e.g. %s); they are left unprojected",
                    rank, len(too_small), too_small[0])
    return ParamGroups(_group_by_options(infos), infos, method)


def _group_by_options(infos: list[ParamInfo]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for info in infos:
        key = tuple(sorted((k, repr(v)) for k, v in info.options.items()))
        if key not in groups:
            groups[key] = {"params": [], **info.options}
        groups[key]["params"].append(info.param)
    return list(groups.values())


_CONSTRUCTOR_OPTIONS = {"nonfinite", "state_dtype", "moment_bits", "min_8bit_size", "correct_bias", "foreach", "fused", "capturable",
                        "clip_threshold", "decay_rate", "beta1", "relative_step", "scale_parameter", "warmup_init"}


def create_optimizer(model: nn.Module, method: str = "galore_mini", lr: float | None = None, rank: int = 128,
                     update_proj_gap: int = 200, scale: float = 0.25, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None, overrides=None,
                     proj_type: str = "std", **options) -> torch.optim.Optimizer:
    """Param groups and optimizer in one call; what other trainers plug in.

    ``method``: ``full`` (torch AdamW), ``adam_mini``, ``galore`` (GaLoreAdamW), ``galore_adafactor``,
    ``galore_8bit``, ``galore_mini`` (approach 3), ``galore_mini_a1`` / ``_a2`` (ablations),
    ``galore_mini_8bit``. `lr` defaults to 1e-3 for full/adam_mini and 1e-2 for the GaLore family.
    Other keyword options go to the projected groups (``proj_method``, ``adaptive_gap`` …) or to the
    optimizer (``nonfinite``, ``state_dtype``, ``foreach`` …).

    Example::

        opt = gm.create_optimizer(model, "galore_mini", lr=1e-2, rank=128)
        trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, None))
    """
    from galore_mini.optim import AdamMini, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, GaLoreMini

    constructor = {k: options.pop(k) for k in list(options) if k in _CONSTRUCTOR_OPTIONS}
    groups = param_groups(model, method, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                          proj_type=proj_type, weight_decay=weight_decay, overrides=overrides, **options)
    lr = DEFAULT_LR.get(method, 1e-2) if lr is None else lr
    if method == "full":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps, **constructor)
    if method == "adam_mini":
        return AdamMini(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps, **constructor)
    if method == "galore":
        return GaLoreAdamW(groups, lr=lr, betas=betas, eps=1e-6 if eps is None else eps, **constructor)
    if method == "galore_8bit":
        return GaLoreAdamW8bit(groups, lr=lr, betas=betas, eps=1e-6 if eps is None else eps, **constructor)
    if method == "galore_adafactor":
        constructor.setdefault("relative_step", False)
        constructor.setdefault("scale_parameter", False)
        return GaLoreAdafactor(groups, lr=lr, **constructor)
    approach = {"galore_mini_a1": 1, "galore_mini_a2": 2}.get(method, 3)
    if method == "galore_mini_8bit":
        constructor.setdefault("moment_bits", 8)
    return GaLoreMini(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps, approach=approach, **constructor)
