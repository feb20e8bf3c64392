"""Param groups from a model: which weights are projected, which blocks Adam-mini uses.

:func:`param_groups` reads the model once — its module structure, module types and the head
counts it can find — and returns ordinary param-group dicts with the keys galore-torch uses
(``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) plus ``block`` for Adam-mini and
GaLore-mini. The reading is explicit and printable (``print(groups)``); nothing is guessed inside
``step()``. :func:`create_optimizer` builds the groups and the optimizer in one call and logs one
INFO line (logger ``"galore_mini"``) saying what was projected.

**What is projected** (``target_modules="all-linear"``, the default): every 2-D weight of an
``nn.Linear``, a GPT-2 ``Conv1D`` or an ``nn.MultiheadAttention`` (its ``in_proj_weight``) that
lies inside the network's *repeated blocks*, and nothing else: never an embedding, the output
layer (``get_output_embeddings()``), a weight tied to an input embedding (same tensor, or the same
storage), nor anything 1-D. Repeated blocks are found from structure alone, not from module names:

* the members of an ``nn.ModuleList`` whose members that hold such weights are modules with
  children of their own, not bare layers (``model.layers``, ``transformer.h``, an encoder and a
  decoder stack, a hybrid model's alternating layer types; a one-layer model counts too), and the
  same for an ``nn.Sequential`` whose such members are also all of one class; and
* two or more sibling modules, not bare layers, of the same class holding the same weights
  (names and shapes) — blocks kept as attributes (``self.block1``, ``self.block2``).

The search starts at the root and stops at the first blocks it finds on each path (blocks nested
in blocks, such as experts, belong to their outer block). Hugging Face's
``_no_split_modules`` is not needed. A model with no such blocks (a plain MLP, a single
attention layer) has nothing to project by this rule; a projected method then raises a
:class:`~galore_mini.errors.UsageError` naming the weights it could project with
``target_modules``. Unlike Hugging Face's ``"all-linear"``, the output layer is never included.

**Target spec** (``target_modules``), with the semantics of Hugging Face's
``optim_target_modules``, matched against *module* names (``model.layers.0.self_attn.q_proj``):
a string is a regular expression that must match the whole name; a list holds exact names,
substrings of names or whole-name regular expressions. The matched ``nn.Linear`` / ``Conv1D`` /
``MultiheadAttention`` weights are projected (the output layer only if you name it). A spec, or
one entry of a list, that matches no such module is an error, and so is one that matches a
weight tied to the input embedding.

**Adam-mini blocks**, read from module names within a block and head counts found on the
modules (``head_dim``, ``num_heads``, ``num_key_value_heads`` … on the attention module, the block
or the model's ``config``): one per head for query and key weights (grouped-query key weights
have fewer heads), q/k per head and v per neuron for fused ``qkv`` weights, one per output neuron
for value, attention-output, MLP and unrecognised weights, one per token for embedding and output
layers, plain Adam for biases, one per tensor for norms and other 1-D parameters. Where a
weight's role or head size cannot be told, it gets one block per output neuron and the summary
(and a log line) says so.

**Options.** Groups carry an option only where the caller gave it or where it must hold:
``weight_decay`` is 0 for norms and biases, ``param_groups(weight_decay=…)`` for the others, and
absent otherwise, so the optimizer's constructor keywords (``weight_decay=0.1``,
``update_proj_gap=50`` …) apply to every group that does not set them. ``rank`` marks projected
groups. Overrides: ``overrides={regex: options}`` (or a list of pairs), matched with
``re.search`` against parameter names, first match wins; options are group keys (``rank``,
``block``, ``weight_decay`` …) or ``project=True/False``. A rule that matches no parameter is an
error.

Limits: only 2-D weights are projected, so experts stored as one 3-D tensor (recent
Hugging Face mixture-of-experts models) keep full-size state (the summary's share shows it); a
fused ``qkv`` weight is read as q, k and v stacked, which GPT-NeoX's per-head interleaving is not
(there per-head blocks land partly on v rows and per-row blocks on q and k rows; set a ``block``
in ``overrides`` for such models).

Example::

    >>> import torch, galore_mini as gm
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 32), Block(), Block(), torch.nn.Linear(32, 100))
    >>> groups = gm.param_groups(model, "galore_mini", rank=8)
    >>> sorted(i.name for i in groups.infos if "rank" in i.options)
    ['1.fc1.weight', '1.fc2.weight', '2.fc1.weight', '2.fc2.weight']
    >>> opt = gm.GaLoreMini(groups, lr=1e-2, weight_decay=0.1)  # decays every weight but norms and biases
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from galore_mini.methods import registry
from galore_mini.errors import UsageError
from galore_mini.optim.blocks import parse_block
from galore_mini.optim.core import PROJECTION_DEFAULTS, ComposedOptimizer
from galore_mini.optim.projection import resolve_side

log = logging.getLogger("galore_mini")

ALL_LINEAR = "all-linear"
DEFAULT_RANK = 128

# Roles come from a weight's own module name, so a block that holds q_proj … down_proj directly reads
# like one with separate attention and MLP modules; the parents only tell attention output from MLP.
_ATTENTION_TOKENS = {"attn", "attention", "self_attn", "self_attention", "cross_attn", "selfattention"}
_MLP_TOKENS = {"mlp", "feed_forward", "ffn", "feedforward", "ff", "intermediate", "densereludense"}
_QUERY = {"q_proj", "query", "wq", "q", "q_lin", "to_q", "query_proj"}
_KEY = {"k_proj", "key", "wk", "k", "k_lin", "to_k", "key_proj"}
_VALUE = {"v_proj", "value", "wv", "v", "v_lin", "to_v", "value_proj"}
_FUSED_QKV = {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj", "to_qkv"}
_ATTN_OUT = {"o_proj", "out_proj", "o", "out_lin", "to_out", "attn_out"}
# "wo" is an attention output under an attention parent (checked first), an MLP output elsewhere (T5)
_MLP = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "wi", "wo", "wi_0",
        "wi_1", "fc_in", "fc_out", "lin1", "lin2", "linear1", "linear2", "dense_h_to_4h", "dense_4h_to_h"}
# nn.MultiheadAttention keeps its input projections as parameters of its own
_MHA_ROLES = {"in_proj_weight": "qkv", "q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}

_HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size", "d_head", "dim_head")
_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "nhead", "n_heads_q")
_KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "n_head_kv")
_HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model", "embed_dim")


@dataclass
class ParamInfo:
    """How one parameter is treated."""

    name: str
    param: torch.Tensor = field(repr=False)
    role: str  # embedding, output, query, key, value, qkv, attn_out, mlp, linear, norm, bias, other
    block: str
    projectable: bool
    decay: bool
    options: dict[str, Any] = field(default_factory=dict)
    module: str = ""  # the name of the module that owns it
    note: str = ""  # why its block layout is a fall-back, or why it is not projected

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
        decay = self.options.get("weight_decay")
        parts.append("optimizer's decay" if decay is None else f"decay {decay:g}" if decay else "no decay")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


@dataclass
class Reading:
    """What :func:`read_model` found: every parameter, the repeated blocks and the target rule used."""

    infos: list[ParamInfo]
    blocks: list[tuple[str, int, str]]  # (where, how many, class) for each stack of repeated blocks
    target: str  # "all-linear" or the spec as given
    unprojectable_2d: list[str] = field(default_factory=list)  # 2-D weights in blocks no rule can project

    def describe_blocks(self) -> str:
        if not self.blocks:
            return "no repeated blocks"
        return ", ".join(f"{where or '<root>'} ({count} × {cls})" for where, count, cls in self.blocks)


class ParamGroups(list):
    """A list of param-group dicts that also knows each parameter's treatment; ``print()`` it."""

    def __init__(self, groups: Iterable[dict], infos: list[ParamInfo], method: str, reading: Reading | None = None):
        super().__init__(groups)
        self.infos = infos
        self.method = method
        self.reading = reading

    def projected(self) -> list[ParamInfo]:
        return [info for info in self.infos if "rank" in info.options]

    def summary(self) -> str:
        """One line: how many weights and parameters are projected, at which rank, in which blocks."""
        total = sum(info.param.numel() for info in self.infos)
        projected = self.projected()
        label = registry.label(self.method)
        if not registry.get(self.method).projected:
            return f"{self.method}: {label} projects nothing (not a projected method); {total:,} trainable parameters"
        count = sum(info.param.numel() for info in projected)
        ranks = sorted({info.options["rank"] for info in projected})
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        where = f"; target {self.reading.target}: {self.reading.describe_blocks()}" if self.reading else ""
        return (f"{self.method}: {label} projects {len(projected)} weights, {count:,} of {total:,} parameters "
                f"({count / max(total, 1):.1%}) at {rank}{where}")

    def describe(self) -> str:
        header = ("parameter", "shape", "role", "treatment")
        rows = [(info.name, "×".join(map(str, info.shape)), info.role, info.treatment()) for info in self.infos]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        lines = [f"param groups for method={self.method!r}: {len(self)} groups, {len(self.infos)} parameters",
                 "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    __str__ = describe


# -- reading the model ---------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight in×out; detected by name to keep transformers optional
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _matrix_weights(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own 2-D weights that projection can take: nn.Linear, Conv1D, MultiheadAttention."""
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        weight = getattr(module, "weight", None)
        return [("weight", weight)] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else []
    if isinstance(module, nn.MultiheadAttention):
        return [(leaf, p) for leaf, p in module.named_parameters(recurse=False) if leaf in _MHA_ROLES]
    return []


def _is_bare_layer(module: nn.Module) -> bool:
    return next(module.children(), None) is None


class _Structure:
    """Structural signatures (class and matrix-weight shapes of a subtree), memoised per module."""

    def __init__(self):
        self._memo: dict[int, tuple] = {}

    def signature(self, module: nn.Module) -> tuple:
        key = id(module)
        if key not in self._memo:
            own = tuple((leaf, tuple(p.shape)) for leaf, p in _matrix_weights(module))
            children = tuple((name, sig) for name, child in module.named_children()
                             for sig in [self.signature(child)] if sig[1] or sig[2])
            self._memo[key] = (type(module).__name__, own, children)
        return self._memo[key]

    def has_matrices(self, module: nn.Module) -> bool:
        sig = self.signature(module)
        return bool(sig[1] or sig[2])


def repeated_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(parent name, member names)`` of each outermost stack of repeated blocks (module docstring)."""
    structure = _Structure()
    stacks: list[tuple[str, list[str]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = [(name, child) for name, child in module.named_children()]
        holding = [(name, child) for name, child in children if structure.has_matrices(child)]
        members: list[str] = []
        composite = holding and not any(_is_bare_layer(child) for _, child in holding)
        # a ModuleList of composite modules is a list of layers whatever their classes (hybrid models
        # alternate layer types); a Sequential also chains embeddings and heads, so it needs one class
        if composite and (isinstance(module, nn.ModuleList) or (
                isinstance(module, nn.Sequential) and len({type(child) for _, child in holding}) == 1)):
            members = [name for name, _ in holding]
        else:
            by_signature: dict[tuple, list[str]] = {}
            for name, child in holding:
                if not _is_bare_layer(child):
                    by_signature.setdefault(structure.signature(child), []).append(name)
            members = [name for names in by_signature.values() if len(names) >= 2 for name in names]
        if members:
            full = [f"{prefix}.{name}" if prefix else name for name in members]
            stacks.append((prefix, full))
        for name, child in children:
            if name not in members:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return stacks


def _storage(param: torch.Tensor) -> tuple | None:
    """Where a tensor's data starts; None where that says nothing (meta tensors, empty or sharded ones)."""
    if param.device.type == "meta" or param.numel() == 0:
        return None
    # a wrapper subclass (DTensor) reports no storage of its own (every one says 0): look at its local shard
    if is_traceable_wrapper_subclass(param):
        if not hasattr(param, "to_local"):
            return None
        param = param.to_local()
        if param.numel() == 0:
            return None
    try:
        return (param.device, param.data_ptr())
    except (RuntimeError, TypeError, NotImplementedError):  # tensor subclasses without plain storage
        return None


def _parent(module_name: str) -> str:
    return module_name.rsplit(".", 1)[0] if "." in module_name else ""


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class _Context:
    """What the classification of one parameter needs to know about the whole model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.output = _model_layer(model, "get_output_embeddings")
        self.output_params = {id(p) for p in self.output.parameters()} if self.output is not None else set()
        embeddings = [m for m in self.modules.values() if isinstance(m, nn.Embedding)]
        input_layer = _model_layer(model, "get_input_embeddings")
        if input_layer is not None:
            embeddings.append(input_layer)
        self.embedding_params = {id(p) for m in embeddings for p in m.parameters()}
        # weights tied by sharing storage rather than the Parameter object
        self.embedding_storage = {key for m in embeddings for p in m.parameters() for key in [_storage(p)] if key}
        self.stacks = repeated_blocks(model)
        members = {member for _, names in self.stacks for member in names}
        self.block_of: dict[str, str] = {}
        for name in self.modules:
            parts = name.split(".") if name else []
            member = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in members),
                          None)
            if member is not None:
                self.block_of[name] = member
        self._heads: dict[str, tuple] = {}

    def tied_to_embedding(self, param: torch.Tensor) -> bool:
        return id(param) in self.embedding_params or _storage(param) in self.embedding_storage

    def ancestors(self, module_name: str) -> list[tuple[str, nn.Module]]:
        """Nearest first, root last."""
        parts = module_name.split(".") if module_name else []
        return [(".".join(parts[:i]), self.modules[".".join(parts[:i])]) for i in range(len(parts), -1, -1)
                if ".".join(parts[:i]) in self.modules]

    def _lookup(self, owners, attrs) -> int | None:
        for owner in owners:
            for attr in attrs:
                value = _positive_int(getattr(owner, attr, None))
                if value is not None:
                    return value
        return None

    def heads(self, scope: str) -> tuple[int | None, int | None, int | None]:
        """(head_dim, query heads, key/value heads) for the attention whose weights live under `scope`."""
        if scope not in self._heads:
            owners = []
            for _, module in self.ancestors(scope):
                owners.append(module)
                config = getattr(module, "config", None)
                if config is not None and not isinstance(config, (int, float, str)):
                    owners.append(config)
            head_dim = self._lookup(owners, _HEAD_DIM_ATTRS)
            heads = self._lookup(owners, _HEADS_ATTRS)
            kv_heads = self._lookup(owners, _KV_HEADS_ATTRS) or heads
            if head_dim is None and heads:
                query = next((m for name, m in self.modules.items() if name and _parent(name) == scope
                              and name.rsplit(".", 1)[-1].lower() in _QUERY and _matrix_weights(m)), None)
                if query is not None:
                    rows = _out_features(query, _matrix_weights(query)[0][1])
                    head_dim = rows // heads if rows % heads == 0 else None
                else:
                    hidden = self._lookup(owners, _HIDDEN_ATTRS)
                    head_dim = hidden // heads if hidden and hidden % heads == 0 else None
            self._heads[scope] = (head_dim, heads, kv_heads)
        return self._heads[scope]


def _model_layer(model: nn.Module, getter: str) -> nn.Module | None:
    if not hasattr(model, getter):
        return None
    try:
        layer = getattr(model, getter)()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return layer if isinstance(layer, nn.Module) else None


def _out_features(module: nn.Module, weight: torch.Tensor) -> int:
    return weight.shape[1] if _is_conv1d(module) else weight.shape[0]


def _role(ctx: _Context, module_name: str, module: nn.Module, leaf: str) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return _MHA_ROLES[leaf]
    short = module_name.rsplit(".", 1)[-1].lower() if module_name else ""
    for names, role in ((_QUERY, "query"), (_KEY, "key"), (_VALUE, "value"), (_FUSED_QKV, "qkv")):
        if short in names:
            return role
    # parents above the model root's own class: a model named "…Attention…" says nothing about its layers
    parents = [(name, m) for name, m in ctx.ancestors(module_name)[1:] if name]
    tokens = {name.rsplit(".", 1)[-1].lower() for name, _ in parents}
    classes = [type(m).__name__ for _, m in parents]
    if tokens & _ATTENTION_TOKENS or any("Attention" in c for c in classes):
        return "attn_out"
    if tokens & _MLP_TOKENS or any("MLP" in c or "FeedForward" in c for c in classes):
        return "mlp"
    if short in _ATTN_OUT:
        return "attn_out"
    if short in _MLP:
        return "mlp"
    return "linear"


def _matrix_block(ctx: _Context, module_name: str, module: nn.Module, param: torch.Tensor,
                  role: str) -> tuple[str, str]:
    """The Adam-mini layout of a matrix weight, and a note when it is a fall-back."""
    conv = _is_conv1d(module)
    along = "cols" if conv else "rows"
    if role not in ("query", "key", "qkv"):
        return along, ("role unknown: one v block per output neuron" if role == "linear" else "")
    scope = module_name if isinstance(module, nn.MultiheadAttention) else _parent(module_name)
    head_dim, heads, kv_heads = ctx.heads(scope)
    width = _out_features(module, param)
    if role == "qkv":
        if head_dim and heads and heads * head_dim + 2 * kv_heads * head_dim == width:
            kv = kv_heads * head_dim
            return f"{along}:{heads}x{head_dim},{kv_heads}x{head_dim},{kv}x1", ""
        return along, "q/k/v split unknown: one v block per output neuron"
    if head_dim and width % head_dim == 0:
        return f"{'col_heads' if conv else 'heads'}:{head_dim}", ""
    return along, f"{role} head size unknown: one v block per output neuron"


def _target_matcher(spec) -> list | None:
    """``(entry, match)`` pairs with Hugging Face's `optim_target_modules` semantics; None for all-linear."""
    if spec is None or (isinstance(spec, str) and spec.replace("_", "-").lower() == ALL_LINEAR):
        return None
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise UsageError(f"target_modules={spec!r} is not a valid regular expression ({exc}); "
                             "pass a list for exact names or substrings") from None
        return [(spec, lambda name: pattern.fullmatch(name) is not None)]
    if isinstance(spec, (list, tuple, set, frozenset)) and spec and all(isinstance(s, str) and s for s in spec):
        entries = []
        for entry in spec:
            try:
                pattern = re.compile(entry)
            except re.error:
                pattern = None

            def match(name, entry=entry, pattern=pattern):
                return entry in name or (pattern is not None and pattern.fullmatch(name) is not None)

            entries.append((entry, match))
        return entries
    raise UsageError(f"target_modules={spec!r}: use 'all-linear', a list of module names or substrings "
                     "(e.g. ['q_proj', 'v_proj']), or a regular expression matching whole module names")


def _select_targets(ctx: _Context, spec) -> set[int] | None:
    """id() of every weight the explicit target spec selects; None for the structural rule."""
    entries = _target_matcher(spec)
    if entries is None:
        return None
    selected: set[int] = set()
    linear_names = [name for name, m in ctx.modules.items() if name and _matrix_weights(m)]
    for entry, match in entries:
        hits = [name for name in linear_names if match(name)]
        if not hits:
            others = [name for name in ctx.modules if name and match(name)]
            seen = f" (it matches {len(others)} other module(s), e.g. {others[0]!r} " \
                   f"({type(ctx.modules[others[0]]).__name__}))" if others else ""
            close = difflib.get_close_matches(entry, [n.rsplit(".", 1)[-1] for n in linear_names], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            examples = ", ".join(repr(n) for n in linear_names[:3]) or "none"
            raise UsageError(f"target_modules: {entry!r} matches no nn.Linear / Conv1D / MultiheadAttention module"
                             f"{seen}{hint}; such modules here: {examples}")
        for name in hits:
            for leaf, weight in _matrix_weights(ctx.modules[name]):
                if ctx.tied_to_embedding(weight):
                    raise UsageError(f"target_modules: {entry!r} selects {name}.{leaf}, which is tied to the input "
                                     "embedding; embeddings are not projected. Narrow the target or untie the weights")
                selected.add(id(weight))
    return selected


def _classify(ctx: _Context, module_name: str, module: nn.Module, leaf: str, param: torch.Tensor,
              targets: set[int] | None) -> ParamInfo:
    name = f"{module_name}.{leaf}" if module_name else leaf
    short = module_name.rsplit(".", 1)[-1].lower() if module_name else ""
    if param.dim() < 2 or "Norm" in type(module).__name__:
        if "bias" in leaf and param.dim() == 1:
            return ParamInfo(name, param, "bias", "elementwise", False, False, module=module_name)
        role = "norm" if "norm" in (type(module).__name__ + short).lower() else "other"
        return ParamInfo(name, param, role, "tensor", False, False, module=module_name)
    if isinstance(module, nn.Embedding) or id(param) in ctx.embedding_params:
        return ParamInfo(name, param, "embedding", "rows", False, True, module=module_name)
    along = "cols" if _is_conv1d(module) else "rows"
    if id(param) in ctx.output_params:
        projectable = targets is not None and id(param) in targets
        return ParamInfo(name, param, "output", along, projectable, True, module=module_name)
    if ctx.tied_to_embedding(param):
        return ParamInfo(name, param, "output", along, False, True, module=module_name,
                         note="tied to the input embedding")
    if any(p is param for _, p in _matrix_weights(module)):
        role = _role(ctx, module_name, module, leaf)
        block, note = _matrix_block(ctx, module_name, module, param, role)
        if role == "linear" and module_name not in ctx.block_of:
            note = ""  # outside the blocks (a head, a projection): one block per output neuron, as for outputs
        projectable = module_name in ctx.block_of if targets is None else id(param) in targets
        return ParamInfo(name, param, role, block, projectable, True, module=module_name, note=note)
    return ParamInfo(name, param, "other", "rows" if param.dim() == 2 else "tensor", False, True, module=module_name)


def read(model: nn.Module, target_modules=None) -> Reading:
    """Every trainable parameter with its role, block layout and projection choice, and the blocks found."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ctx = _Context(model)
    targets = _select_targets(ctx, target_modules)
    infos: list[ParamInfo] = []
    seen: set[int] = set()
    for module_name, module in ctx.modules.items():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            infos.append(_classify(ctx, module_name, module, leaf, param, targets))
    blocks = [(parent, len(members), "/".join(dict.fromkeys(type(ctx.modules[m]).__name__ for m in members)))
              for parent, members in ctx.stacks]
    unprojectable = [i.name for i in infos if i.param.dim() == 2 and i.role == "other" and i.module in ctx.block_of]
    target = ALL_LINEAR if targets is None else repr(target_modules)
    return Reading(infos, blocks, target, unprojectable)


def read_model(model: nn.Module, target_modules=None) -> list[ParamInfo]:
    """Every trainable parameter with its role, default block layout and projection choice (see module docstring)."""
    return read(model, target_modules).infos


# -- building groups ------------------------------------------------------------------------------


def _normalise_overrides(overrides) -> list[tuple[re.Pattern, dict]]:
    if overrides is None:
        return []
    pairs = list(overrides.items()) if isinstance(overrides, dict) else list(overrides)
    compiled = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], dict)):
            raise UsageError(f"overrides: {pair!r} must be a (regex, options dict) pair")
        pattern, options = pair
        try:
            compiled.append((re.compile(pattern), dict(options)))
        except (re.error, TypeError) as exc:
            raise UsageError(f"overrides: {pattern!r} is not a valid regular expression ({exc})") from None
    return compiled


def _nothing_projected(reading: Reading, rank: int, too_small: list[ParamInfo], switched_off: bool) -> UsageError:
    selected = [i for i in reading.infos if i.projectable]
    if too_small and len(too_small) == len(selected):
        smallest = min(too_small, key=lambda i: min(i.shape))
        why = (f"rank={rank} is not below the smaller side of any selected weight (the smallest is "
               f"{smallest.name} {list(smallest.shape)}); use a smaller rank")
    elif selected and switched_off:
        why = "the overrides set project=False on every selected weight"
    elif reading.target != ALL_LINEAR:
        why = f"target_modules={reading.target} selects no weight that can be projected"
    elif not reading.blocks:
        linears = [i.name for i in reading.infos if i.param.dim() == 2 and i.role not in ("embedding", "output")
                   and i.role != "other"]
        found = f" (weights it could project: {', '.join(linears[:4])}{' …' if len(linears) > 4 else ''})" \
            if linears else ""
        why = ("the model has no repeated blocks (an nn.ModuleList / nn.Sequential of layers of one class, or two "
               f"or more identical sibling modules), so the default target 'all-linear' selects nothing{found}; "
               "pass target_modules=[module names or substrings] or a regex")
    else:
        extra = f" (2-D parameters that are not such weights: {', '.join(reading.unprojectable_2d[:3])})" \
            if reading.unprojectable_2d else ""
        why = (f"the repeated blocks ({reading.describe_blocks()}) hold no nn.Linear / Conv1D weight that may be "
               f"projected{extra}; pass target_modules=… or overrides={{regex: {{'project': True}}}}")
    return UsageError(f"a projected method would project nothing: {why}")


def _method(method: str):
    spec = registry.get(method)
    if spec.kind != "optimizer":
        raise UsageError(f"method={method!r} is an adapter method (it changes the model, not the optimizer); "
                         f"use one of {', '.join(registry.OPTIMIZER_METHODS)}; an adapter method's model and "
                         f"optimizer come from its registry entry (galore_mini.methods.get({method!r}).build_model "
                         "and .build_optimizer)")
    return spec


def param_groups(model: nn.Module, method: str = "galore_mini", rank: int | None = None, *, target_modules=None,
                 overrides=None, weight_decay: float | None = None, update_proj_gap: int | None = None,
                 scale: float | None = None, proj_type: str | None = None, embedding_block: str | None = None,
                 **projection_options) -> ParamGroups:
    """Param groups for `method` (see module docstring); print the result to see each parameter's treatment.

    `rank` (default 128) marks the projected groups; `target_modules` selects what is projected
    (default ``"all-linear"``: the matrices of the repeated blocks). `weight_decay`, `update_proj_gap`,
    `scale`, `proj_type` and `projection_options` (``proj_method``, ``moment_policy`` …) are written
    into the groups only when given, so the optimizer's own keywords apply otherwise; options
    that cannot apply (projection options for a method that does not project) are an error.
    Weights whose smaller side is not above `rank` are left unprojected (logged once); a projected
    method left with nothing to project is an error that says why. `embedding_block` (methods with
    block second moments) sets the block of the embedding and output layers, found from the model's
    structure: default one ``v`` per token row (Adam-mini's), ``"elementwise"`` gives them Adam's ``v``.
    """
    spec = _method(method)
    if embedding_block is not None and not spec.blocked:
        raise UsageError(f"embedding_block={embedding_block!r} only applies to methods with block second moments "
                         f"({', '.join(m for m in registry.OPTIMIZER_METHODS if registry.get(m).blocked)}); "
                         f"method={method!r} has none")
    unknown = sorted(set(projection_options) - set(PROJECTION_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"projection options are {', '.join(PROJECTION_DEFAULTS)}")
    projection = {k: v for k, v in (("update_proj_gap", update_proj_gap), ("scale", scale),
                                    ("proj_type", proj_type)) if v is not None}
    projection.update(projection_options)
    if not spec.projected:
        given = [k for k, v in (("rank", rank), ("target_modules", target_modules)) if v is not None]
        given += list(projection)
        if given:
            projected = ", ".join(m for m in registry.OPTIMIZER_METHODS if registry.get(m).projected)
            raise UsageError(f"{', '.join(given)} only apply to methods that project ({projected}); "
                             f"method={method!r} does not project")
    rank = DEFAULT_RANK if rank is None else rank
    if spec.projected and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise UsageError(f"rank={rank!r} must be a positive integer")
    if weight_decay is not None and (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
                                     or not weight_decay >= 0):
        raise UsageError(f"weight_decay={weight_decay!r} must be a number >= 0")
    rules = _normalise_overrides(overrides)
    if not spec.projected:
        for pattern, opts in rules:
            wrong = sorted(set(opts) & ({"project", "rank"} | set(PROJECTION_DEFAULTS)))
            if wrong:
                raise UsageError(f"overrides: the rule {pattern.pattern!r} sets {', '.join(wrong)}, but "
                                 f"method={method!r} does not project")
    used = [False] * len(rules)
    ranked = [False] * len(rules)  # a rule that gives a rank must reach a projected weight
    reading = read(model, target_modules)
    too_small: list[ParamInfo] = []
    switched_off = False
    embedding_blocks = 0
    for info in reading.infos:
        options: dict[str, Any] = {}
        if not info.decay:
            options["weight_decay"] = 0.0
        elif weight_decay is not None:
            options["weight_decay"] = weight_decay
        rule_options: dict[str, Any] = {}
        rule = None
        for i, (pattern, opts) in enumerate(rules):
            if pattern.search(info.name):
                used[i], rule = True, i
                rule_options = dict(opts)
                break
        project = rule_options.pop("project", info.projectable)
        if rule is not None and project:
            ranked[rule] = True
        switched_off |= info.projectable and not project
        param_rank = rule_options.pop("rank", rank)
        if spec.blocked:
            options["block"] = info.block
            if embedding_block is not None and info.role in ("embedding", "output"):
                parse_block(embedding_block, info.shape, name="embedding_block")  # a clear error for a bad spec
                options["block"] = embedding_block
                embedding_blocks += 1
        if spec.projected and project and param_rank is not None:
            if info.param.dim() != 2:
                raise UsageError(f"overrides: {info.name} has shape {list(info.shape)}; only 2-D weights can be "
                                 "projected")
            if param_rank >= min(info.shape):
                too_small.append(info)
            else:
                options.update(rank=param_rank, **projection)
        options.update(rule_options)
        info.options = options
    if embedding_block is not None and not embedding_blocks:
        raise UsageError(f"embedding_block={embedding_block!r}: the model has no embedding or output layer (as read "
                         "from its structure) for it to apply to; check with print(gm.param_groups(model))")
    for (pattern, opts), hit, reached in zip(rules, used, ranked):
        if not hit:
            raise UsageError(f"overrides: the rule {pattern.pattern!r} matches no parameter of the model; "
                             "check the names with print(gm.param_groups(model))")
        if "rank" in opts and not reached:
            raise UsageError(f"overrides: the rule {pattern.pattern!r} gives rank={opts['rank']!r} but matches no "
                             "projected weight; add 'project': True to project what it matches")
    groups = ParamGroups(_group_by_options(reading.infos), reading.infos, method, reading)
    if spec.projected and not groups.projected():
        raise _nothing_projected(reading, rank, too_small, switched_off)
    if too_small:
        log.warning("rank=%s is not below the smaller side of %d weight(s) (e.g. %s %s); they are left unprojected",
                    rank, len(too_small), too_small[0].name, list(too_small[0].shape))
    if spec.blocked:
        _log_fallbacks(reading.infos)
    return groups


def _log_fallbacks(infos: list[ParamInfo]) -> None:
    noted = [i for i in infos if i.note and "block" in i.note]
    heads = [i for i in noted if i.role in ("query", "key", "qkv")]
    if heads:
        log.warning("Adam-mini blocks: the head size of %d query/key weight(s) could not be read from the model "
                    "(e.g. %s); they get one v block per output neuron instead of one per head. Set "
                    "overrides={regex: {'block': 'heads:HEAD_DIM'}} or give the attention module a head_dim",
                    len(heads), heads[0].name)
    unknown = [i for i in noted if i.role == "linear"]
    if unknown:
        log.info("Adam-mini blocks: %d weight(s) have no recognised role (e.g. %s); they get one v block per "
                 "output neuron", len(unknown), unknown[0].name)


def _group_by_options(infos: list[ParamInfo]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for info in infos:
        key = tuple(sorted((k, repr(v)) for k, v in info.options.items()))
        if key not in groups:
            groups[key] = {"params": [], **info.options}
        groups[key]["params"].append(info.param)
    return list(groups.values())


def _optimizer_class(spec) -> type:
    if spec.optimizer == "AdamW":
        return torch.optim.AdamW
    return getattr(importlib.import_module("galore_mini.optim"), spec.optimizer)


def _constructor_options(cls: type) -> set[str]:
    """Keyword options `cls` takes, following ``**kwargs`` up to the optimizer base classes."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if klass in (ComposedOptimizer, torch.optim.Optimizer, object) or "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        accepted |= {p.name for p in parameters if p.name not in ("self", "params")
                     and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return accepted


def create_optimizer(model: nn.Module, method: str = "galore_mini", lr: float | None = None, rank: int = DEFAULT_RANK,
                     update_proj_gap: int = 200, scale: float = 0.25, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None, overrides=None,
                     proj_type: str = "std", target_modules=None, embedding_block: str | None = None,
                     **options) -> torch.optim.Optimizer:
    """Param groups and optimizer in one call; what other trainers plug in.

    ``method`` is a name of :data:`galore_mini.methods.OPTIMIZER_METHODS` (``full`` is torch's AdamW).
    Its registry entry gives the optimizer class, the default `lr` and `eps` and fixed options
    (the ablations' ``approach``, 8-bit moments). `rank`, `update_proj_gap`, `scale`, `proj_type`
    and `target_modules` concern projected methods (the others ignore the first four, so one
    call serves every method); other keyword options are projection options (``proj_method``,
    ``adaptive_gap`` …) or the optimizer's own (``nonfinite``, ``state_dtype``, ``foreach`` …);
    `embedding_block` as in :func:`param_groups`. Logs one INFO line (logger ``"galore_mini"``) with what was projected.

    Example::

        opt = gm.create_optimizer(model, "galore_mini", lr=1e-2, rank=128)
        trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, None))
    """
    spec = _method(method)
    cls = _optimizer_class(spec)
    accepted = _constructor_options(cls)
    projection = {k: options.pop(k) for k in list(options) if k in PROJECTION_DEFAULTS}
    unknown = [k for k in options if k not in accepted]
    if unknown:
        # this function's own keywords (rank, update_proj_gap, …) are options too, for hints and the list
        known = accepted | _OWN_OPTIONS
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known | set(PROJECTION_DEFAULTS)), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"create_optimizer: unknown option(s) {', '.join(hints)} for method={method!r} "
                         f"({cls.__name__}); its options are {', '.join(sorted(known))}"
                         + (f"; projection options are {', '.join(PROJECTION_DEFAULTS)}" if spec.projected else ""))
    groups = param_groups(model, method, rank=rank if spec.projected else None,
                          target_modules=target_modules, overrides=overrides, embedding_block=embedding_block)
    kwargs: dict[str, Any] = {**spec.options, **options}
    kwargs["lr"] = spec.default_lr if lr is None else lr
    kwargs["weight_decay"] = weight_decay
    if "betas" in accepted:
        kwargs["betas"] = betas
    if "eps" in accepted and (eps is not None or spec.eps is not None):
        kwargs["eps"] = spec.eps if eps is None else eps
    if spec.projected:
        kwargs.update(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **projection)
    elif projection:
        log.info("%s does not project: option(s) %s are not used", method, ", ".join(sorted(projection)))
    optimizer = cls(groups, **kwargs)
    log.info("%s", groups.summary())
    return optimizer


# create_optimizer's keyword options (not the model, the method or the ones it forwards)
_OWN_OPTIONS = frozenset(name for name, parameter in inspect.signature(create_optimizer).parameters.items()
                         if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name not in ("model", "method"))
