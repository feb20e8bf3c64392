"""The estimate: build what training would build, on the meta device, and count it.

:func:`estimate` builds the model (a named size, JSON path, dict or config through
:func:`galore_mini.models.build_model`, or a meta-device copy of a live module), converts it
with the harness's baseline for adapter methods, builds the optimizer with
:func:`galore_mini.create_optimizer` and reads the state each parameter will get from the
optimizer's own layout (:mod:`.layout`). Nothing is allocated. The activation formula and the
layer-wise gradient simulation are here too.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from galore_mini import methods, models
from galore_mini.errors import UsageError
from galore_mini.memory.layout import (
    layout_sizes, optimizer_state_layout, rank_layout, sharded_layout, sharded_state_keys)
from galore_mini.memory.measure import STATE_PARTS, parts, unique_parameters
from galore_mini.methods import Settings
from galore_mini.models import default_rank
from galore_mini.optim.distributed import shard_rows, unsupported_reason
from galore_mini.optim.groups import param_groups, read_model
from galore_mini.optim.layerwise import DEFAULT_BUCKET_BYTES
from galore_mini.optim.projection import PROJ_TYPES

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                  "fp16": "fp16", "float16": "fp16", "half": "fp16"}

ROLE_GROUPS = ("attention", "mlp", "embedding", "output", "norm", "other")
_ROLE_GROUP = {"query": "attention", "key": "attention", "value": "attention", "attn_out": "attention",
               "qkv": "attention", "mlp": "mlp", "embedding": "embedding", "output": "output", "norm": "norm"}
# peft wraps the model: its parameter names gain this prefix
_PEFT_PREFIX = "base_model.model."


# -- activations ----------------------------------------------------------------------------------


def _field(config, name: str, default=None):
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return default if value is None else value


def activation_bytes(config, batch_size: int, seq_len: int, dtype: str = "bf16") -> int:
    """Bytes autograd saves for backward in one forward of a Llama causal LM with its loss.

    Counted for Hugging Face ``LlamaForCausalLM`` with ``sdpa`` attention, no activation
    checkpointing, no dropout; with b = `batch_size`, S = `seq_len`, T = b·S tokens, d the weight
    dtype's bytes, h hidden, i intermediate, a heads, k kv-heads, D head_dim, V vocab, L layers::

        per token and layer:  2·(4h + 4 + 2·d·h)      two RMSNorms (fp32 input and rsqrt, normed and
                                                      weighted outputs in d)
                            + d·(2·a·D + 2·k·D) + 4a  q and out (a·D), k and v (k·D), fp32 logsumexp
                            + 4·d·i                   gate, up, SiLU(gate), product
        per token:            4h + 4 + 2·d·h          final norm
                            + 4V + 16                 fp32 log-softmax output; input ids, labels (int64)
        per sequence pos.:    2·D·d                   rotary cos and sin (shared by the batch and layers)
        once:                 4                       the loss

    total = T·(L·per_layer + per_token) + 2·S·D·d + 4. It equals the bytes of the distinct tensors
    that ``torch.autograd.graph.saved_tensors_hooks`` sees (tested on transformers 5 with the CPU
    flash-attention kernel). Not counted: the returned logits (b·S·V·d, alive while the output
    object is), temporaries, and kernel-specific extras (GPU flash/efficient attention pad the
    logsumexp; ``eager`` attention stores the a·S² probabilities: add 2·a·S·d per token and layer).
    """
    b, s = positive_int(batch_size, "batch_size"), positive_int(seq_len, "seq_len")
    d = DTYPE_BYTES[canonical_dtype(dtype)]
    h = int(_field(config, "hidden_size"))
    i = int(_field(config, "intermediate_size"))
    layers = int(_field(config, "num_hidden_layers"))
    a = int(_field(config, "num_attention_heads"))
    k = int(_field(config, "num_key_value_heads", a))
    head_dim = int(_field(config, "head_dim", h // a))
    vocab = int(_field(config, "vocab_size"))
    norm = 4 * h + 4 + 2 * d * h
    per_layer = 2 * norm + d * (2 * a * head_dim + 2 * k * head_dim) + 4 * a + 4 * d * i
    per_token = norm + 4 * vocab + 16
    return b * s * (layers * per_layer + per_token) + 2 * s * head_dim * d + 4


# -- the estimate -----------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Memory of training one model with one method (bytes; see :mod:`galore_mini.memory` for the formulas).

    ``projected_params``: entries of the weights GaLore projects, or of the adapters / factors
    (``low_rank``, ``lora``, ``relora``). ``gradient_bytes`` is what the chosen mode holds: all
    gradients, or with ``layerwise`` the most held at once (:func:`layerwise_held_bytes`); ``all_gradient_bytes`` and
    ``largest_gradient_bytes`` give both. ``optimizer_parts`` splits ``optimizer_bytes`` by part,
    ``optimizer_by_key`` by state key (the keys :func:`optimizer_state_breakdown` reports),
    ``optimizer_by_role`` by where the parameter sits (``attention``, ``mlp``, ``embedding``,
    ``output``, ``norm``, ``other``). ``measured`` holds measurements when taken.

    With ``world_size`` N > 1 (FSDP2) every byte figure is **per rank**, for ``reported_rank``, the rank
    that holds the most (rank 0: it holds ⌈m/N⌉ rows of every weight); ``rank_bytes`` lists each rank's
    weights, gradients and optimizer state. ``params`` and ``trainable_params`` stay whole-model counts.
    """

    model: str
    method: str
    rank: int | None
    dtype: str
    state_dtype: str
    params: int
    trainable_params: int
    projected_params: int
    weights_bytes: int
    gradient_bytes: int
    all_gradient_bytes: int
    largest_gradient_bytes: int
    layerwise: bool
    optimizer_bytes: int
    optimizer_parts: dict[str, int]
    optimizer_by_key: dict[str, int]
    optimizer_by_role: dict[str, int]
    batch_size: int | None = None
    seq_len: int | None = None
    activation_bytes: int | None = None
    total_bytes: int = 0
    world_size: int = 1
    reported_rank: int = 0
    rank_bytes: list[dict[str, int]] | None = None
    measured: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        measured = out.pop("measured")
        if measured:
            out.update(measured)
        return out

    def matches_measurement(self) -> bool:
        """Whether the measured state, weights and (all) gradients equal the estimate to the byte."""
        m = self.measured or {}
        return (m.get("measured_optimizer_bytes") == self.optimizer_bytes
                and m.get("measured_weights_bytes") == self.weights_bytes
                and m.get("measured_gradient_bytes") == self.all_gradient_bytes)

    def format(self) -> str:
        """A readable breakdown (GiB = 2³⁰ bytes)."""
        rank = f", rank {self.rank}" if self.rank is not None else ""
        adapter = methods.get(self.method).kind == "adapter"
        lines = [f"{self.model}: {self.method}{rank}, {self.dtype} weights, optimizer state {self.state_dtype}"
                 + (f"\n  FSDP2 at {self.world_size} ranks: bytes per rank, rank {self.reported_rank} (the rank that "
                    "holds the most; ⌈m/N⌉ rows of each weight)" if self.world_size > 1 else ""),
                 f"  parameters        {self.params:>16,}   trainable {self.trainable_params:,}"
                 + (f", {'in adapters' if adapter else 'projected'} "
                    f"{self.projected_params:,}" if self.projected_params else "")]

        def row(label: str, value: int, note: str = "") -> str:
            return f"  {label:<17} {gib(value):>10} GiB {value:>17,} B{note}"

        lines.append(row("weights", self.weights_bytes))
        note = "  (layer-wise: the most held at once, in buckets)" if self.layerwise else ""
        lines.append(row("gradients", self.gradient_bytes, note))
        lines.append(row("optimizer state", self.optimizer_bytes))
        for part in STATE_PARTS:
            if self.optimizer_parts.get(part):
                lines.append(row("  " + part.replace("_", " "), self.optimizer_parts[part]))
        if self.activation_bytes is not None:
            shape = f"  (batch {self.batch_size} × seq {self.seq_len})"
            lines.append(row("activations", self.activation_bytes, shape))
        lines.append(row("total", self.total_bytes))
        if self.measured:
            m = self.measured
            for label, key, expected in (("measured state", "measured_optimizer_bytes", self.optimizer_bytes),
                                         ("measured weights", "measured_weights_bytes", self.weights_bytes),
                                         ("measured grads", "measured_gradient_bytes", self.all_gradient_bytes)):
                verdict = "= estimate" if m[key] == expected else f"DIFFERS from the estimate {expected:,} B"
                lines.append(row(label, m[key], f"  ({verdict})"))
        return "\n".join(lines)

    __str__ = format


def gib(n: int) -> str:
    """`n` bytes in GiB, three decimals (as reports print them)."""
    return f"{n / 2 ** 30:.3f}"


def positive_int(value, name: str) -> int:
    """`value` when it is a positive integer, else a `UsageError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name}={value!r} must be a positive integer")
    return value


def canonical_dtype(dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a name or alias (``bfloat16``, ``half`` …) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    name = _DTYPE_ALIASES.get(str(dtype).lower()) if dtype is not None else None
    if name is None:
        raise UsageError(f"dtype={dtype!r} is unknown; use fp32, bf16 or fp16")
    return name


# -- layer-wise updates: the most gradient bytes held at once ------------------------------------------

_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
# the order a Llama block uses its parameters in the forward pass
_LAYER_FORWARD = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _forward_slot(path: str) -> int | None:
    # an adapter's factors (q_proj.down, q_proj.lora_A.default …) sit where the linear they replace does
    for slot, module in enumerate(_LAYER_FORWARD):
        if path == module or path.startswith(module + "."):
            return slot
    return None


def backward_order(names: list[str]) -> list[int]:
    """Indices of `names` in the order autograd finishes their gradients: the reverse of their use in
    the forward pass (Llama layout: output layer, final norm, then each block from the last, down, up,
    gate, post-attention norm, o, v, k, q, input norm, and the embedding last; within one linear, the
    reverse of registration, so an adapter's second factor before its first). Names outside that
    layout fall back to the reverse of registration order for all."""
    keys = []
    for index, name in enumerate(names):
        layer = _LAYER_PARAM.search(name)
        slot = _forward_slot(layer.group(2)) if layer else None
        if "embed_tokens" in name:
            keys.append((0, 0, 0, index))
        elif slot is not None:
            keys.append((1, int(layer.group(1)), slot, index))
        elif name.endswith("norm.weight") and not layer:
            keys.append((2, 0, 0, index))
        elif "lm_head" in name:
            keys.append((3, 0, 0, index))
        else:
            return list(range(len(names)))[::-1]
    return sorted(range(len(names)), key=lambda i: keys[i], reverse=True)


def layerwise_held_bytes(grad_bytes: list[int], names: list[str], bucket_bytes: int) -> int:
    """The most gradient bytes held at once under layer-wise updates: gradients arrive in
    :func:`backward_order`, and a bucket is stepped and freed once it holds ``bucket_bytes`` or more
    (``0``: each gradient alone, so the largest single gradient)."""
    peak = held = 0
    for index in backward_order(names):
        held += grad_bytes[index]
        peak = max(peak, held)
        if held >= bucket_bytes:
            held = 0
    return peak


# -- building what training builds, on the meta device --------------------------------------------------


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors (nothing allocated, `model` untouched)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # a module that cannot be deep-copied: say what to do instead
        raise UsageError(f"cannot copy {type(model).__name__} to the meta device ({exc}); build it there yourself "
                         "(with torch.device('meta'): model = ...) and pass that") from None


def _resolve_model(model_or_config, vocab_size: int | None, dtype: torch.dtype | None):
    """(label, meta-device model, config or None) for a name, path, dict, config object or module."""
    if isinstance(model_or_config, nn.Module):
        if vocab_size is not None:
            raise UsageError("vocab_size applies to a named size or config, not to a built module")
        model = _meta_copy(model_or_config)
        label = type(model_or_config).__name__
    elif isinstance(model_or_config, (str, dict)) or _is_hf_config(model_or_config):
        if isinstance(model_or_config, (str, dict)):
            config = models.model_config(model_or_config, vocab_size)
        else:
            if vocab_size is not None:
                raise UsageError("vocab_size applies to a named size, JSON path or dict, not to a config object")
            config = model_or_config
        model = models.build_model(config, device="meta")
        label = model_or_config if isinstance(model_or_config, str) else type(config).__name__
    else:
        raise UsageError(f"cannot read a model from {type(model_or_config).__name__}; pass a model name "
                         "(llama_7b …), a JSON config path, a dict of config fields, a config object or an nn.Module")
    if dtype is not None:
        model = model.to(dtype)
    return label, model, getattr(model, "config", None)


def _is_hf_config(obj) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(obj, PretrainedConfig)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """{parameter name: role group} of every trainable parameter, as param_groups reads the model."""
    return {info.name: _ROLE_GROUP.get(info.role, "other") for info in read_model(model)}


def role_of(name: str, roles: dict[str, str]) -> str:
    """The role group of parameter `name` in `roles` (:func:`parameter_roles`); adapters take their weight's."""
    name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    if name in roles:
        return roles[name]
    # an adapter's factor (q_proj.lora_A.default.weight, q_proj.down.weight) takes the role of the weight it adapts
    path = name
    while path:
        path = path.rpartition(".")[0]
        if path + ".weight" in roles:
            return roles[path + ".weight"]
    return "other"


def projected_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id()`` of every parameter `optimizer` projects (its groups with a rank)."""
    return {id(p) for group in optimizer.param_groups if group.get("rank") is not None for p in group["params"]}


def _optimizer_options(entry, state_dtype, proj_dtype, adaptive_gap, gap_window, min_8bit_size) -> dict[str, Any]:
    """create_optimizer's further keywords for `entry` (beyond rank and side): only those its optimizer takes."""
    options: dict[str, Any] = {}
    if state_dtype is not None and entry.state_dtype_option:
        options["state_dtype"] = state_dtype
    if entry.projected:
        if proj_dtype is not None:
            options["proj_dtype"] = proj_dtype
        if adaptive_gap:
            options.update(adaptive_gap=True, gap_window=gap_window)
    if min_8bit_size is not None:
        options["min_8bit_size"] = min_8bit_size
    return options


def _check_rank(model: nn.Module, method: str, rank: int, label: str, allow_unprojected: bool) -> None:
    """The weights `method` would project at any rank (param_groups asked at rank 1) must all take `rank`."""
    groups = param_groups(model, method, rank=1)
    names = {id(p): n for n, p in model.named_parameters()}
    projectable = [p for g in groups if g.get("rank") is not None for p in g["params"]]
    if not projectable:
        raise UsageError(f"method={method!r} projects weights, but param_groups finds none to project in {label}")
    too_small = [p for p in projectable if rank >= min(p.shape)]
    if too_small and not allow_unprojected:
        limit = min(min(p.shape) for p in projectable)
        first = too_small[0]
        raise UsageError(f"rank={rank} is too large for {label}: it must be below {limit}, the smaller side of "
                         f"{names.get(id(first), 'a weight')} {list(first.shape)} (a rank that large saves nothing)")


def state_label(entry, state_name: str, optimizer, layouts) -> str:
    """How a report names the optimizer state's dtype: torch AdamW's, 8-bit moments, or `state_name`."""
    if entry.optimizer == "AdamW":
        return "torch AdamW, in its parameters' dtype"
    eight_bit = {key for _, layout in layouts for key, (_, dtype) in layout.items() if dtype == torch.uint8}
    threshold = next((g.get("min_8bit_size") for g in optimizer.param_groups if "min_8bit_size" in g), None)
    if {"exp_avg", "exp_avg_sq"} <= eight_bit:
        return f"8-bit moments ({state_name} below {threshold} entries)"
    if "exp_avg" in eight_bit:
        return f"8-bit first moment, {state_name} second"
    return state_name


def estimate(model_or_config, method: str = "galore_mini", rank: int | None = None, dtype=None, *,
             state_dtype=None, proj_dtype=None, proj_type: str = "std", layerwise: bool = False,
             batch_size: int | None = None, seq_len: int | None = None, min_8bit_size: int | None = None,
             adaptive_gap: bool = False, gap_window: int = 5, vocab_size: int | None = None,
             adapter_dtype=None, allow_unprojected: bool = False, bucket_bytes: int | None = None,
             world_size: int = 1) -> MemoryEstimate:
    """Memory of training `model_or_config` with `method` (see :mod:`galore_mini.memory` for what is counted).

    `rank` defaults to the paper's rank for a named size (``DEFAULT_RANKS``), else 128; it must be below
    the smaller side of every weight that would be projected (or adapted), unless
    ``allow_unprojected=True``, which mirrors :func:`galore_mini.param_groups` (such weights are left
    unprojected; adapter baselines always refuse, as the harness does). `dtype` is the weights' dtype:
    fp32, bf16 (default for configs) or fp16; for a live module None means each parameter's own dtype.
    `adapter_dtype`: dtype of LoRA/ReLoRA adapters; None means what the harness's ``peft`` does by
    default (``autocast_adapter_dtype``): fp32 whatever the weights' dtype; ``low_rank`` factors take
    the weights' dtype. `state_dtype` and `proj_dtype`, `proj_type`, `adaptive_gap`, `gap_window` apply
    to the methods whose optimizer takes them (state dtype: ``Method.state_dtype_option``; projection:
    projected methods) and are ignored for the others, so one call pattern serves every method;
    `min_8bit_size` (None: the optimizer's default) goes to the optimizer as given. `batch_size` and
    `seq_len` together add activations. `bucket_bytes` (with `layerwise`): the layer-wise bucket size;
    None means :func:`galore_mini.layerwise`'s default for this method. `world_size` N > 1: the bytes one
    rank holds under FSDP2 (``fully_shard``), for rank 0, which holds the most (⌈m/N⌉ rows of every
    weight); state laid out by W's rows (:func:`galore_mini.optim.distributed.sharded_keys`) counts
    that rank's rows, the rest counts whole; ``rank_bytes`` lists every rank. Methods the sharded step
    refuses (GaLoreAdafactor on parameters of more than 2 dimensions), the adapter baselines and
    ``layerwise`` raise. Bad input
    raises :class:`~galore_mini.errors.UsageError`.

    Example::

        >>> e = estimate("llama_7b", "galore_mini", rank=1024, dtype="bf16", world_size=8)
        >>> e.reported_rank, e.optimizer_bytes
        (0, 5492121488)
    """
    entry = methods.get(method)
    if rank is None:
        rank = default_rank(model_or_config)
    rank = positive_int(rank, "rank")
    live = isinstance(model_or_config, nn.Module)
    dtype_name = None if (dtype is None and live) else canonical_dtype("bf16" if dtype is None else dtype)
    if proj_type not in PROJ_TYPES:
        raise UsageError(f"proj_type={proj_type!r}: use {', '.join(PROJ_TYPES[:-1])} or {PROJ_TYPES[-1]}")
    if min_8bit_size is not None:
        positive_int(min_8bit_size, "min_8bit_size")
    gap_window = positive_int(gap_window, "gap_window")
    world_size = positive_int(world_size, "world_size")
    if world_size > 1:
        _check_fsdp(method, entry, layerwise)
    if (batch_size is None) != (seq_len is None):
        raise UsageError("activations need both batch_size and seq_len (or neither)")
    if batch_size is not None:
        positive_int(batch_size, "batch_size")
        positive_int(seq_len, "seq_len")
    if bucket_bytes is not None and (isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int)
                                     or bucket_bytes < 0):
        raise UsageError(f"bucket_bytes={bucket_bytes!r} must be a non-negative integer")
    state_name = canonical_dtype(state_dtype) if state_dtype is not None and entry.state_dtype_option else "fp32"
    adapter_torch_dtype = TORCH_DTYPES[canonical_dtype(adapter_dtype)] if adapter_dtype is not None else None

    label, model, config = _resolve_model(model_or_config, vocab_size, TORCH_DTYPES[dtype_name] if dtype_name else None)
    if dtype_name is None:
        sizes = {p.element_size() for p in unique_parameters(model)}
        dtype_name = next((n for n, b in DTYPE_BYTES.items() if {b} == sizes), "mixed")
    roles = parameter_roles(model)
    if entry.projected:
        _check_rank(model, method, rank, label, allow_unprojected)
    settings = Settings(rank=rank, proj_type=proj_type, optimizer_options=_optimizer_options(
        entry, state_dtype, proj_dtype, adaptive_gap, gap_window, min_8bit_size))
    base_ids = {id(p) for p in model.parameters()}
    with torch.device("meta"), warnings.catch_warnings():
        # peft calls a transformers property that transformers 5 deprecates; not the user's concern here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = entry.transform(model, settings)  # what training trains: the adapters' model, or the model as it is
    adapters = [p for p in unique_parameters(model) if id(p) not in base_ids]
    # adapter_dtype is about adapters beside frozen weights (LoRA); factors that replace W take its dtype
    if adapter_torch_dtype is not None and any(not p.requires_grad for p in model.parameters()):
        for p in adapters:
            p.data = p.data.to(adapter_torch_dtype)
    optimizer = entry.build_optimizer(model, settings)
    projected = projected_ids(optimizer)
    # adapter methods: the adapters or factors; optimizer methods: the weights they project
    projected_params = sum(p.numel() for p in adapters) + sum(
        p.numel() for p in unique_parameters(model) if id(p) in projected)

    layouts = optimizer_state_layout(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    params = unique_parameters(model)
    trainable = [p for p in params if p.requires_grad]
    if world_size > 1:
        _check_fsdp_optimizer(method, optimizer)
    # each rank's figures; rank 0 holds the most (⌈m/N⌉ rows of every weight), and is the one reported
    ranks = [rank_figures(optimizer, layouts, params, trainable, names, roles, world_size, r)
             for r in range(world_size)]
    top = max(range(world_size), key=lambda r: (ranks[r]["total"], -r))
    figures = ranks[top]

    if layerwise:
        if bucket_bytes is None:  # what galore_mini.layerwise does: torch's optimizers go one parameter at a time
            bucket_bytes = 0 if entry.optimizer == "AdamW" else DEFAULT_BUCKET_BYTES
        held = layerwise_held_bytes(figures["grad_bytes"], [names.get(id(p), "") for p in trainable], bucket_bytes)
    else:
        held = figures["all_grads"]
    activations = None
    if batch_size is not None:
        if config is None or _field(config, "intermediate_size") is None:
            raise UsageError("activations are computed for Llama-layout models only (a config with "
                             "hidden_size, intermediate_size …)")
        act_dtype = dtype_name if dtype_name in DTYPE_BYTES else "fp32"
        activations = activation_bytes(config, batch_size, seq_len, act_dtype)
    optimizer_bytes = figures["optimizer"]
    weights_total = figures["weights"]
    return MemoryEstimate(
        model=label, method=method, rank=rank if entry.ranked else None, dtype=dtype_name,
        state_dtype=state_label(entry, state_name, optimizer, layouts),
        params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
        projected_params=projected_params, weights_bytes=weights_total, gradient_bytes=held,
        all_gradient_bytes=figures["all_grads"], largest_gradient_bytes=max(figures["grad_bytes"], default=0),
        layerwise=bool(layerwise), optimizer_bytes=optimizer_bytes, optimizer_parts=parts(figures["per_param"]),
        optimizer_by_key=dict(sorted(figures["by_key"].items())), optimizer_by_role=figures["by_role"],
        batch_size=batch_size, seq_len=seq_len, activation_bytes=activations,
        total_bytes=weights_total + held + optimizer_bytes + (activations or 0),
        world_size=world_size, reported_rank=top,
        rank_bytes=[{"weights_bytes": f["weights"], "gradient_bytes": f["all_grads"], "optimizer_bytes": f["optimizer"]}
                    for f in ranks] if world_size > 1 else None,
    )


def _check_fsdp(method: str, entry, layerwise: bool) -> None:
    """What the FSDP2 estimate cannot count: refuse it, naming the method and what to do."""
    if entry.kind == "adapter":
        raise UsageError(f"world_size > 1 with method={method!r}: the adapter baselines "
                         f"({', '.join(methods.ADAPTER_METHODS)}) have no per-rank FSDP2 estimate (the estimator "
                         "does not shard their adapters); estimate them with world_size=1, or pick an optimizer "
                         "method")
    if layerwise:
        raise UsageError("world_size > 1 with layerwise=True: under FSDP2 the gradients held at once depend on "
                         "FSDP2's unsharded gradient buffers before each reduce-scatter, which the estimator does "
                         "not model; drop layerwise (or use world_size=1)")


def _check_fsdp_optimizer(method: str, optimizer) -> None:
    """The sharded step's own refusals (read from its optimizer and groups, not from a list of methods)."""
    for group in optimizer.param_groups:
        why = unsupported_reason(optimizer, group)
        if why:
            raise UsageError(f"world_size > 1 with method={method!r}: {why}, so this method cannot run under FSDP2; "
                             "use another method, or world_size=1")


def rank_figures(optimizer, layouts, params, trainable, names, roles, world: int, rank: int) -> dict[str, Any]:
    """Bytes rank `rank` of `world` holds under FSDP2 (``world == 1``: one process, everything whole).

    Weights and gradients: FSDP2 pads every rank's shard to rank 0's ⌈m/N⌉ rows (its sharded
    parameter and reduce-scatter output are allocated at that size), so they are the same on every
    rank. Optimizer state: the keys laid out like the weight's rows, cut to the rows this rank holds
    (unpadded: the state DTensors are allocated at the local shape); the others whole.
    """

    def padded_rows(p) -> int:
        return shard_rows(p.shape[0], world, 0)[1]

    def local_bytes(p) -> int:
        if world == 1 or not p.dim():
            return p.numel() * p.element_size()
        return padded_rows(p) * (p.numel() // p.shape[0]) * p.element_size()

    groups = [group for group in optimizer.param_groups for _ in group["params"]]
    per_param, by_key, by_role = [], {}, dict.fromkeys(ROLE_GROUPS, 0)
    for (p, layout), group in zip(layouts, groups):
        if world > 1:
            layout = sharded_layout(optimizer, p, group, layout)
            sharded = sharded_state_keys(optimizer, p, group)
            wrong = [key for key in sharded if layout[key][0][:1] != tuple(p.shape[:1])]
            if wrong:  # a sharded key must be laid out like the rows of W
                raise RuntimeError(f"state {wrong} of a {list(p.shape)} parameter is not laid out by its rows")
            layout = rank_layout(layout, sharded, shard_rows(p.shape[0], world, rank)[1])
        sizes = layout_sizes(layout)
        per_param.append(sizes)
        for key, (_, b) in sizes.items():
            by_key[key] = by_key.get(key, 0) + b
        by_role[role_of(names.get(id(p), ""), roles)] += sum(b for _, b in sizes.values())
    grad_bytes = [local_bytes(p) for p in trainable]
    weights = sum(local_bytes(p) for p in params)
    optimizer_bytes = sum(by_key.values())
    return {"per_param": per_param, "by_key": by_key, "by_role": by_role, "optimizer": optimizer_bytes,
            "grad_bytes": grad_bytes, "all_grads": sum(grad_bytes), "weights": weights,
            "total": weights + sum(grad_bytes) + optimizer_bytes}
