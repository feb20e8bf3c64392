"""Memory per training method, computed from a model's shapes and checked against measurement.

For a model (a named size such as ``llama_7b``, a Hugging Face Llama/Mistral
config, a JSON config path, or a live ``nn.Module``), a method, a rank and a
weight dtype, :func:`estimate` returns a :class:`MemoryEstimate`: parameter
count, weight bytes, gradient bytes, optimizer-state bytes split into its parts,
optionally activation bytes, and the total. Nothing is allocated, so
``llama_7b`` is instant.

Example::

    >>> from galore_mini.memory import estimate
    >>> e = estimate("llama_7b", "galore_mini", rank=1024, dtype="bf16")
    >>> e.params, e.optimizer_bytes
    (6738415616, 11288404624)

**Formulas** (``N(p)`` = entries of parameter ``p``, ``d`` = bytes per weight
entry: 4 fp32, 2 bf16/fp16; ``s`` = bytes per optimizer-state entry: 4 unless
``state_dtype`` says otherwise; a projected weight is m×n with rank r, its
low-rank shape ``L`` is r×n (left side), m×r (right) or r×r (``full``)):

* weights ``Σ N(p)·d`` over every parameter (frozen ones too; buffers such as
  rotary tables are not parameters and are not counted);
* gradients ``Σ N(p)·d`` over trainable parameters (torch keeps gradients in
  the parameter dtype); with ``layerwise=True`` (``galore_mini.layerwise``:
  gradients are consumed and freed inside ``backward()`` in buckets of
  ``bucket_bytes``) the figure is the most gradient bytes held at once, with
  gradients arriving in backward order (:func:`layerwise_held_bytes`). At 7B
  scale with the default 64 MiB buckets that is the largest single gradient
  ``max N(p)·d`` (the embedding's) plus the 8 KiB norm gradient that shares its
  bucket; with ``bucket_bytes=0`` it is the largest gradient alone. It is a lower
  bound, since autograd may briefly hold a gradient that is not yet accumulated;
* optimizer state, per trainable parameter, exactly the tensors of
  ``docs/optimizer-state.md``:

  ====================  ==========================================================================
  ``full``              torch AdamW: ``exp_avg``, ``exp_avg_sq`` ``N(p)·d`` each, ``step`` 4 B
  ``adam_mini``         ``exp_avg`` ``N(p)·s``; ``exp_avg_sq`` one per block ``n_blocks(p)·s``; step
  ``galore``            projected: projector (``m·r`` left, ``r·n`` right, both for ``full``) ·4,
                        ``exp_avg`` and ``exp_avg_sq`` ``N(L)·s`` each, ``refresh`` 3·8 B, step;
                        others: AdamW moments ``N(p)·s`` each, step
  ``galore_8bit``       as ``galore`` but every moment with ``n ≥ 4096`` entries is ``n`` uint8
                        + ``⌈n/256⌉·4`` B of absmax scales (smaller ones stay fp32)
  ``galore_mini``       projected: projector, ``exp_avg`` ``N(L)·s``, ``exp_avg_sq``
                        ``n_blocks(p)·s`` (per head for q/k, per output neuron otherwise),
                        refresh, step; others: as ``adam_mini``
  ``galore_mini_8bit``  as ``galore_mini`` with ``exp_avg`` in 8 bits (same rule as ``galore_8bit``)
  ``galore_mini_a1``    approach 1: ``exp_avg_sq`` blocks counted on ``L`` (``r`` blocks when the
                        block axis is the projected one); ``galore_mini_a2`` = ``galore_mini``
  ``galore_adafactor``  no first moment (β1 = None); factored ``exp_avg_sq_row/col`` of ``L``
                        (or of ``p``) in fp32; 1-D: elementwise fp32
  ``low_rank``          every projected W replaced by B (m×r) and A (r×n), all trained by AdamW
  ``lora``, ``relora``  W frozen, adapters B (m×r), A (r×n) beside it, in fp32 (``peft`` upcasts
                        bf16/fp16 adapters; ``adapter_dtype`` overrides); AdamW on the adapters and
                        the non-projected parameters (embeddings, norms, output layer). ReLoRA's
                        merges and restarts do not change any size.
  ====================  ==========================================================================

  ``adaptive_gap=True`` adds ``similarity`` (``gap_window``·4 B) per projected weight.
  Which weights are projected and their block layouts follow
  :func:`galore_mini.param_groups` (``nn.Linear`` weights in attention and MLP;
  for a live module the helper's own reading of the model is used, so the
  estimate equals what ``create_optimizer`` allocates, to the byte);
* activations (optional, ``batch_size`` b and ``seq_len`` S, Llama
  architecture only) — see :func:`activation_bytes`;
* total = weights + gradients held (all, or the largest with ``layerwise``) +
  optimizer state + activations. It is the sum of what is resident when the
  last gradient is produced; allocator fragmentation, temporaries of the step
  (GaLore-mini's full-size ``back(M)``, the fp32 copy of a bf16 weight being
  updated) and the CUDA context are not included.

Optimizer-state parts: ``projectors`` (``projector``, ``projector_right``),
``first_moments`` (``exp_avg``), ``second_moments`` (element-wise or factored
``exp_avg_sq*``), ``block_scalars`` (``exp_avg_sq`` with fewer entries than the
first moment: Adam-mini's one-per-block ``v``), ``quant_scales`` (``*_absmax``),
``bookkeeping`` (``step``, ``refresh``, ``similarity``).

Limits: the analytic path knows the Llama layout (Llama, Mistral and other
configs with the same fields); for other architectures pass a module built on
the meta device (``with torch.device("meta"): model = AutoModelForCausalLM.from_config(cfg)``),
which allocates nothing. ``state_dtype`` applies to the optimizers that take it
(``adam_mini``, ``galore``, ``galore_mini*``, and ``galore_8bit``'s un-quantised
small moments); torch AdamW (``full``, ``low_rank``, ``lora``, ``relora``) keeps
state in its parameters' dtype; ``galore_adafactor`` stays fp32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from galore_mini.errors import UsageError
from galore_mini.optim.layerwise import DEFAULT_BUCKET_BYTES
from galore_mini.train.model import MODEL_CONFIGS

OPTIMIZER_METHODS = ("full", "adam_mini", "galore", "galore_mini", "galore_mini_a1", "galore_mini_a2",
                     "galore_adafactor", "galore_8bit", "galore_mini_8bit")
ADAPTER_METHODS = ("low_rank", "lora", "relora")
METHODS = OPTIMIZER_METHODS + ADAPTER_METHODS
# the methods of the issue and of the paper's comparison (``--methods all``)
FIGURE_METHODS = ("full", "adam_mini", "galore", "galore_mini", "galore_8bit", "galore_mini_8bit",
                  "low_rank", "lora", "relora")
STATE_PARTS = ("projectors", "first_moments", "second_moments", "block_scalars", "quant_scales", "bookkeeping")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                  "fp16": "fp16", "float16": "fp16", "half": "fp16"}
# the GaLore paper's rank per size (128 at 60M … 1024 at 7B); the two small test sizes get a rank below their width
DEFAULT_RANKS = {"tiny": 32, "llama_20m": 64, "llama_60m": 128, "llama_130m": 256, "llama_350m": 256,
                 "llama_1b": 512, "llama_7b": 1024}
FALLBACK_RANK = 128
QUANT_BLOCK = 256  # entries per absmax scale of the 8-bit moments
MIN_8BIT_SIZE = 4096
MEASURE_LIMIT_BYTES = 4 * 2 ** 30
_PROJECTED = {"galore", "galore_mini", "galore_mini_a1", "galore_mini_a2", "galore_adafactor", "galore_8bit",
              "galore_mini_8bit"}
_STATE_DTYPE_METHODS = {"adam_mini", "galore", "galore_8bit", "galore_mini", "galore_mini_a1", "galore_mini_a2",
                        "galore_mini_8bit"}
_TORCH_ADAMW = {"full"} | set(ADAPTER_METHODS)

__all__ = [
    "ADAPTER_METHODS", "DEFAULT_RANKS", "FIGURE_METHODS", "METHODS", "OPTIMIZER_METHODS", "ROLE_GROUPS", "STATE_PARTS",
    "MemoryEstimate", "ParamSpec", "activation_bytes", "config_params", "default_rank", "estimate", "gradient_bytes",
    "measure", "module_params", "optimizer_state_breakdown", "optimizer_state_bytes", "optimizer_state_parts",
    "plot", "register", "weights_bytes",
]


# -- measuring live objects -----------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    # numel × element size, not the storage size: a view must not count its whole base
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, projectors, scales, step counters)."""
    return sum(optimizer_state_breakdown(optimizer).values())


def optimizer_state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of ``optimizer.state`` by state key (``exp_avg``, ``exp_avg_sq``, ``projector``, ``step`` …)."""
    out: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[key] = out.get(key, 0) + _nbytes(value)
    return dict(sorted(out.items()))


def optimizer_state_parts(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of ``optimizer.state`` by part (see the module docstring's list of parts)."""
    per_param = [{key: (v.numel(), _nbytes(v)) for key, v in state.items() if isinstance(v, torch.Tensor)}
                 for state in optimizer.state.values()]
    return _parts(per_param)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each shared parameter once; buffers not counted)."""
    return sum(_nbytes(p) for p in _unique_parameters(model))


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the model's parameters hold now."""
    return sum(_nbytes(p.grad) for p in _unique_parameters(model) if p.grad is not None)


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _part_of(key: str, numel: int, state_numels: dict[str, int]) -> str:
    """The part a state tensor belongs to; the same rule for estimates and measurements."""
    if key in ("step", "refresh", "similarity", "host_step"):
        return "bookkeeping"
    if key.startswith("projector"):
        return "projectors"
    if key.endswith("_absmax"):
        return "quant_scales"
    if key == "exp_avg":
        return "first_moments"
    if key == "exp_avg_sq" and "exp_avg" in state_numels and numel < state_numels["exp_avg"]:
        # fewer second-moment entries than first-moment entries: one v shared per block (Adam-mini)
        return "block_scalars"
    return "second_moments"


ROLE_GROUPS = ("attention", "mlp", "embedding", "output", "norm", "other")
_ROLE_GROUP = {"query": "attention", "key": "attention", "value": "attention", "attn_out": "attention",
               "qkv": "attention", "mlp": "mlp", "embedding": "embedding", "output": "output", "norm": "norm"}


def _role_group(role: str) -> str:
    return _ROLE_GROUP.get(role, "other")


def _parts(per_param: Iterable[dict[str, tuple[int, int]]]) -> dict[str, int]:
    out = dict.fromkeys(STATE_PARTS, 0)
    for state in per_param:
        numels = {key: numel for key, (numel, _) in state.items()}
        for key, (numel, nbytes) in state.items():
            out[_part_of(key, numel, numels)] += nbytes
    return out


# -- the model's parameters, from a config or a module ---------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the optimizers see it.

    ``role`` and ``block`` are those of :func:`galore_mini.optim.groups.read_model` (``block`` is the
    Adam-mini layout); ``projectable``: GaLore would project it (an ``nn.Linear`` weight in attention
    or MLP); ``element_size``: bytes per entry for a live module's parameter (None: use the
    estimate's ``dtype``).
    """

    name: str
    shape: tuple[int, ...]
    role: str
    block: str
    projectable: bool
    trainable: bool = True
    element_size: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _field(config, name: str, default=None):
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return default if value is None else value


_ANALYTIC_TYPES = ("llama", "mistral", "qwen2")


def config_params(config) -> list[ParamSpec]:
    """Every parameter of a Llama-layout causal LM described by `config` (a ``LlamaConfig`` or dict).

    Names, shapes, roles and Adam-mini blocks are those ``LlamaForCausalLM`` and
    :func:`galore_mini.param_groups` give (a test checks it against live models): embedding
    (vocab × hidden), per layer q (heads·head_dim × hidden), k and v (kv_heads·head_dim × hidden),
    o (hidden × heads·head_dim), gate and up (intermediate × hidden), down (hidden × intermediate),
    two RMSNorm weights, then the final norm and the output layer unless embeddings are tied;
    ``attention_bias`` / ``mlp_bias`` add the biases (Qwen2: q, k, v biases). Llama, Mistral and
    Qwen2 configs (and plain dicts, read as Llama); other architectures raise ``UsageError``.
    """
    try:
        hidden = int(_field(config, "hidden_size"))
        inter = int(_field(config, "intermediate_size"))
        layers = int(_field(config, "num_hidden_layers"))
        heads = int(_field(config, "num_attention_heads"))
        vocab = int(_field(config, "vocab_size"))
    except (TypeError, ValueError):
        raise UsageError("the model config needs hidden_size, intermediate_size, num_hidden_layers, "
                         "num_attention_heads and vocab_size (a Llama-layout config); for other architectures "
                         "pass a module built on the meta device") from None
    kv_heads = int(_field(config, "num_key_value_heads", heads))
    head_dim = int(_field(config, "head_dim", hidden // heads))
    for label, value in (("hidden_size", hidden), ("intermediate_size", inter), ("num_hidden_layers", layers),
                         ("num_attention_heads", heads), ("vocab_size", vocab), ("num_key_value_heads", kv_heads),
                         ("head_dim", head_dim)):
        if value <= 0:
            raise UsageError(f"the model config has {label}={value}; it must be positive")
    model_type = _field(config, "model_type", "llama")
    if model_type not in _ANALYTIC_TYPES:
        raise UsageError(f"the analytic layout covers {', '.join(_ANALYTIC_TYPES)} configs, not {model_type!r}; "
                         "pass a module built on the meta device instead (no memory is allocated)")
    attn_bias = bool(_field(config, "attention_bias", False))
    mlp_bias = bool(_field(config, "mlp_bias", False))
    # Qwen2 has biases on q, k and v (not on o) and no attention_bias field
    qkv_bias = attn_bias or model_type == "qwen2"
    tied = bool(_field(config, "tie_word_embeddings", False))
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim

    def heads_block(rows: int) -> str:
        return f"heads:{head_dim}" if rows % head_dim == 0 else "rows"

    specs = [ParamSpec("model.embed_tokens.weight", (vocab, hidden), "embedding", "rows", False)]
    for i in range(layers):
        pre = f"model.layers.{i}"
        attn = [("q_proj", (q_rows, hidden), "query", heads_block(q_rows)),
                ("k_proj", (kv_rows, hidden), "key", heads_block(kv_rows)),
                ("v_proj", (kv_rows, hidden), "value", "rows"),
                ("o_proj", (hidden, q_rows), "attn_out", "rows")]
        for name, shape, role, block in attn:
            specs.append(ParamSpec(f"{pre}.self_attn.{name}.weight", shape, role, block, True))
            if attn_bias or (qkv_bias and name != "o_proj"):
                specs.append(ParamSpec(f"{pre}.self_attn.{name}.bias", shape[:1], "bias", "elementwise", False))
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            specs.append(ParamSpec(f"{pre}.mlp.{name}.weight", shape, "mlp", "rows", True))
            if mlp_bias:
                specs.append(ParamSpec(f"{pre}.mlp.{name}.bias", shape[:1], "bias", "elementwise", False))
        specs.append(ParamSpec(f"{pre}.input_layernorm.weight", (hidden,), "norm", "tensor", False))
        specs.append(ParamSpec(f"{pre}.post_attention_layernorm.weight", (hidden,), "norm", "tensor", False))
    specs.append(ParamSpec("model.norm.weight", (hidden,), "norm", "tensor", False))
    if not tied:
        specs.append(ParamSpec("lm_head.weight", (vocab, hidden), "output", "rows", False))
    return specs


def module_params(model: nn.Module) -> list[ParamSpec]:
    """Every parameter of a live (or meta-device) module, read with the optimizers' own helper.

    Trainable parameters carry the role, block and projectable flag that
    :func:`galore_mini.optim.groups.read_model` gives them (what ``param_groups`` uses); frozen
    parameters count for weights only.
    """
    from galore_mini.optim.groups import read_model

    infos = read_model(model)
    specs = [ParamSpec(i.name, tuple(i.param.shape), i.role, i.block, i.projectable, True, i.param.element_size())
             for i in infos]
    seen = {id(i.param) for i in infos}
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            specs.append(ParamSpec(name, tuple(p.shape), "frozen", "tensor", False, False, p.element_size()))
    return specs


# -- per-parameter optimizer state ------------------------------------------------------------------


def _n_blocks(block: str, shape: tuple[int, ...]) -> int:
    from galore_mini.optim.blocks import parse_block

    return parse_block(block, shape).n_blocks


def _side(proj_type: str, shape: tuple[int, ...]) -> str:
    rows, cols = shape
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    return proj_type


def _low_rank(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    return {"left": (rank, shape[1]), "right": (shape[0], rank), "full": (rank, rank)}[side]


def _a1_blocks(block: str, shape: tuple[int, int], rank: int, side: str) -> int:
    """Approach 1 counts blocks on the low-rank matrix: kept along a surviving axis, else one per direction."""
    from galore_mini.optim.blocks import parse_block

    layout = parse_block(block, shape)
    if layout.kind == "tensor":
        return 1
    surviving = {"right": 0, "left": 1}.get(side)
    if layout.axis == surviving:
        return layout.n_blocks
    return _low_rank(shape, rank, side)[layout.axis]


@dataclass
class _Options:
    method: str
    rank: int | None
    weight_bytes: int
    state_bytes: int
    proj_bytes: int
    proj_type: str
    min_8bit_size: int
    adaptive_gap: bool
    gap_window: int


def _moment(key: str, numel: int, nbytes_each: int, bits: int, opts: _Options) -> dict[str, tuple[int, int]]:
    """One moment: fp/bf entries, or (8-bit, big enough) uint8 codes + fp32 absmax per 256 entries."""
    if bits == 8 and numel >= opts.min_8bit_size:
        scales = math.ceil(numel / QUANT_BLOCK)
        return {key: (numel, numel), key + "_absmax": (scales, 4 * scales)}
    return {key: (numel, numel * nbytes_each)}


def _param_state(spec: ParamSpec, opts: _Options, projected: bool) -> dict[str, tuple[int, int]]:
    """``{state key: (entries, bytes)}`` for one trainable parameter under an optimizer method."""
    method, shape, n = opts.method, spec.shape, spec.numel
    if method == "full":
        wb = spec.element_size or opts.weight_bytes
        return {"step": (1, 4), "exp_avg": (n, n * wb), "exp_avg_sq": (n, n * wb)}
    state: dict[str, tuple[int, int]] = {"step": (1, 4)}
    work_numel = n
    side = None
    if projected:
        side = _side(opts.proj_type, shape)
        rows, cols = shape
        r = opts.rank
        if side == "left":
            state["projector"] = (rows * r, rows * r * opts.proj_bytes)
        elif side == "right":
            state["projector"] = (r * cols, r * cols * opts.proj_bytes)
        else:
            state["projector"] = (rows * r, rows * r * opts.proj_bytes)
            state["projector_right"] = (r * cols, r * cols * opts.proj_bytes)
        state["refresh"] = (3, 24)
        if opts.adaptive_gap:
            state["similarity"] = (opts.gap_window, 4 * opts.gap_window)
        work_numel = math.prod(_low_rank(shape, r, side))
    sb = opts.state_bytes
    if method in ("galore", "galore_8bit"):
        bits = 8 if method == "galore_8bit" else 32
        state.update(_moment("exp_avg", work_numel, sb, bits, opts))
        state.update(_moment("exp_avg_sq", work_numel, sb, bits, opts))
    elif method == "galore_adafactor":
        work = _low_rank(shape, opts.rank, side) if projected else shape
        if len(work) >= 2:
            state["exp_avg_sq_row"] = (math.prod(work[:-1]), 4 * math.prod(work[:-1]))
            state["exp_avg_sq_col"] = (math.prod(work[:-2]) * work[-1], 4 * math.prod(work[:-2]) * work[-1])
        else:
            state["exp_avg_sq"] = (n, 4 * n)
    else:  # adam_mini and the GaLore-mini family
        bits = 8 if method == "galore_mini_8bit" else 32
        state.update(_moment("exp_avg", work_numel, sb, bits, opts))
        if spec.block == "elementwise":
            v = n
        elif projected and method == "galore_mini_a1":
            v = _a1_blocks(spec.block, shape, opts.rank, side)
        else:
            v = _n_blocks(spec.block, shape)
        state.update(_moment("exp_avg_sq", v, sb, 32, opts))
    return state


def _adamw_state(numel: int, element_size: int) -> dict[str, tuple[int, int]]:
    return {"step": (1, 4), "exp_avg": (numel, numel * element_size), "exp_avg_sq": (numel, numel * element_size)}


# -- activations ----------------------------------------------------------------------------------


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
    b, s = _positive_int(batch_size, "batch_size"), _positive_int(seq_len, "seq_len")
    d = DTYPE_BYTES[_dtype_name(dtype)]
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
    """Memory of training one model with one method (bytes; see the module docstring for the formulas).

    ``projected_params``: entries of the weights GaLore projects, or of the adapters / factors
    (``low_rank``, ``lora``, ``relora``). ``gradient_bytes`` is what the chosen mode holds: all
    gradients, or with ``layerwise`` the most held at once (:func:`layerwise_held_bytes`); ``all_gradient_bytes`` and
    ``largest_gradient_bytes`` give both. ``optimizer_parts`` splits ``optimizer_bytes`` by part,
    ``optimizer_by_key`` by state key (the keys :func:`optimizer_state_breakdown` reports),
    ``optimizer_by_role`` by where the parameter sits (``attention``, ``mlp``, ``embedding``,
    ``output``, ``norm``, ``other``). ``measured`` holds measurements when taken.
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
        lines = [f"{self.model}: {self.method}{rank}, {self.dtype} weights, optimizer state {self.state_dtype}",
                 f"  parameters        {self.params:>16,}   trainable {self.trainable_params:,}"
                 + (f", {'in adapters' if self.method in ADAPTER_METHODS else 'projected'} "
                    f"{self.projected_params:,}" if self.projected_params else "")]

        def row(label: str, value: int, note: str = "") -> str:
            return f"  {label:<17} {_gib(value):>10} GiB {value:>17,} B{note}"

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


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.3f}"


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name}={value!r} must be a positive integer")
    return value


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    name = _DTYPE_ALIASES.get(str(dtype).lower()) if dtype is not None else None
    if name is None:
        raise UsageError(f"dtype={dtype!r} is unknown; use fp32, bf16 or fp16")
    return name


def _resolve_model(model_or_config, vocab_size: int | None) -> tuple[str, list[ParamSpec], Any]:
    """(label, parameter specs, config or None) for a name, path, dict, config object or module."""
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        return type(model_or_config).__name__, module_params(model_or_config), config
    if isinstance(model_or_config, str) and model_or_config in MODEL_CONFIGS:
        # the named sizes' fields directly: no transformers import, so the estimate is instant
        config = {**MODEL_CONFIGS[model_or_config], "tie_word_embeddings": False}
        if vocab_size is not None:
            config["vocab_size"] = _positive_int(vocab_size, "vocab_size")
        return model_or_config, config_params(config), config
    if isinstance(model_or_config, (str, dict)):
        from galore_mini.train.model import model_config

        config = model_config(model_or_config, vocab_size)
        label = model_or_config if isinstance(model_or_config, str) else "config"
        return label, config_params(config), config
    if hasattr(model_or_config, "hidden_size"):
        return type(model_or_config).__name__, config_params(model_or_config), model_or_config
    raise UsageError(f"cannot read a model from {type(model_or_config).__name__}; pass a model name "
                     "(llama_7b …), a JSON config path, a dict of config fields, a config object or an nn.Module")


def default_rank(model) -> int:
    """The paper's rank for a named size (GaLore: 128 at 60M … 1024 at 7B), else 128."""
    return DEFAULT_RANKS.get(model, FALLBACK_RANK) if isinstance(model, str) else FALLBACK_RANK


_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
# the order a Llama block uses its parameters in the forward pass
_LAYER_FORWARD = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def backward_order(names: list[str]) -> list[int]:
    """Indices of `names` in the order autograd finishes their gradients: the reverse of their use in
    the forward pass (Llama layout: output layer, final norm, then each block from the last, down, up,
    gate, post-attention norm, o, v, k, q, input norm, and the embedding last). Names outside that
    layout fall back to the reverse of registration order for all."""
    keys = []
    for index, name in enumerate(names):
        layer = _LAYER_PARAM.search(name)
        if "embed_tokens" in name:
            keys.append((0, 0, 0, index))
        elif layer and layer.group(2) in _LAYER_FORWARD:
            keys.append((1, int(layer.group(1)), _LAYER_FORWARD.index(layer.group(2)), index))
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


def estimate(model_or_config, method: str = "galore_mini", rank: int | None = None, dtype=None, *,
             state_dtype=None, proj_dtype=None, proj_type: str = "std", layerwise: bool = False,
             batch_size: int | None = None, seq_len: int | None = None, min_8bit_size: int = MIN_8BIT_SIZE,
             adaptive_gap: bool = False, gap_window: int = 5, vocab_size: int | None = None,
             adapter_dtype=None, allow_unprojected: bool = False, bucket_bytes: int | None = None) -> MemoryEstimate:
    """Memory of training `model_or_config` with `method` (see the module docstring for every formula).

    `rank` defaults to the paper's rank for a named size (``DEFAULT_RANKS``), else 128; it must be below
    the smaller side of every weight that would be projected (or adapted), unless
    ``allow_unprojected=True``, which mirrors :func:`galore_mini.param_groups` (such weights are left
    unprojected). `dtype` is the weights' dtype: fp32, bf16 (default for configs) or fp16; for a live
    module None means each parameter's own dtype. `adapter_dtype`: dtype of LoRA/ReLoRA adapters; None
    means what the harness's ``peft`` does by default (``autocast_adapter_dtype``): fp32 whatever the
    weights' dtype; ``low_rank`` factors always take the weights' dtype. `batch_size` and `seq_len`
    together add activations. `bucket_bytes` (with `layerwise`): the layer-wise bucket size; None means
    :func:`galore_mini.layerwise`'s default for this method.
    Bad input raises :class:`~galore_mini.errors.UsageError`.
    """
    if method not in METHODS:
        raise UsageError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
    label, specs, config = _resolve_model(model_or_config, vocab_size)
    live = isinstance(model_or_config, nn.Module)
    if rank is None:
        rank = default_rank(model_or_config)
    rank = _positive_int(rank, "rank")
    dtype_name = None if (dtype is None and live) else _dtype_name("bf16" if dtype is None else dtype)
    weight_bytes = DTYPE_BYTES[dtype_name] if dtype_name else 0
    if dtype_name:
        specs = [ParamSpec(s.name, s.shape, s.role, s.block, s.projectable, s.trainable, None) for s in specs]
    else:
        sizes = {s.element_size for s in specs}
        dtype_name = next((n for n, b in DTYPE_BYTES.items() if {b} == sizes), "mixed")
    if proj_type not in ("std", "reverse_std", "left", "right", "full"):
        raise UsageError(f"proj_type={proj_type!r}: use std, reverse_std, left, right or full")
    min_8bit_size = _positive_int(min_8bit_size, "min_8bit_size")
    gap_window = _positive_int(gap_window, "gap_window")
    if (batch_size is None) != (seq_len is None):
        raise UsageError("activations need both batch_size and seq_len (or neither)")
    if batch_size is not None:
        _positive_int(batch_size, "batch_size")
        _positive_int(seq_len, "seq_len")
    uses_rank = method in _PROJECTED or method in ADAPTER_METHODS
    if state_dtype is not None and method not in _STATE_DTYPE_METHODS:
        # torch AdamW keeps state in the parameter dtype; GaLoreAdafactor takes no state_dtype (fp32 always)
        state_dtype = None
    state_name = _dtype_name(state_dtype) if state_dtype is not None else "fp32"
    if method in _TORCH_ADAMW:
        state_label = "torch AdamW, in its parameters' dtype"
    elif method == "galore_8bit":
        state_label = f"8-bit moments ({state_name} below {min_8bit_size} entries)"
    elif method == "galore_mini_8bit":
        state_label = f"8-bit first moment, {state_name} second"
    else:
        state_label = state_name
    opts = _Options(method, rank if uses_rank else None, weight_bytes, DTYPE_BYTES[state_name],
                    DTYPE_BYTES[_dtype_name(proj_dtype or "fp32")], proj_type, min_8bit_size, adaptive_gap, gap_window)

    too_small = [s for s in specs if uses_rank and s.trainable and s.projectable and rank >= min(s.shape)]
    if too_small and not allow_unprojected:
        limit = min(min(s.shape) for s in specs if s.trainable and s.projectable)
        raise UsageError(f"rank={rank} is too large for {label}: it must be below {limit}, the smaller side of "
                         f"{too_small[0].name} {list(too_small[0].shape)} (a rank that large saves nothing)")
    projectable = [s for s in specs if uses_rank and s.trainable and s.projectable and rank < min(s.shape)]
    if uses_rank and not projectable:
        raise UsageError(f"method={method!r} needs weights to project or adapt, but {label} has no attention "
                         "or MLP nn.Linear weights")
    projected_ids = {id(s) for s in projectable}

    def nbytes(spec_or_size, numel: int) -> int:
        size = spec_or_size.element_size if isinstance(spec_or_size, ParamSpec) else spec_or_size
        return numel * (size or weight_bytes)

    # (numel, bytes) of every tensor that exists and of every trainable one
    weights: list[tuple[int, int]] = []
    trainable: list[tuple[int, int]] = []
    trainable_names: list[str] = []
    per_param_state: list[dict[str, tuple[int, int]]] = []
    roles: list[str] = []  # the role group of each entry of per_param_state
    projected_params = 0
    # peft upcasts bf16/fp16 LoRA adapters to fp32 by default (autocast_adapter_dtype=True)
    lora_bytes = DTYPE_BYTES[_dtype_name(adapter_dtype or "fp32")]
    for spec in specs:
        size = spec.element_size or weight_bytes
        if method in ADAPTER_METHODS and id(spec) in projected_ids:
            rows, cols = spec.shape
            factors = [(rows * rank), (rank * cols)]  # B (m×r), A (r×n)
            projected_params += sum(factors)
            factor_size = size
            if method == "lora" or method == "relora":
                weights.append((spec.numel, spec.numel * size))  # the frozen W
                factor_size = lora_bytes
            for numel in factors:
                weights.append((numel, numel * factor_size))
                trainable.append((numel, numel * factor_size))
                trainable_names.append(spec.name)
                per_param_state.append(_adamw_state(numel, factor_size))
                roles.append(_role_group(spec.role))
            continue
        weights.append((spec.numel, nbytes(spec, spec.numel)))
        if not spec.trainable:
            continue
        trainable.append((spec.numel, nbytes(spec, spec.numel)))
        trainable_names.append(spec.name)
        roles.append(_role_group(spec.role))
        if method in ADAPTER_METHODS:
            per_param_state.append(_adamw_state(spec.numel, size))
        else:
            projected = id(spec) in projected_ids
            if projected:
                projected_params += spec.numel
            per_param_state.append(_param_state(spec, opts, projected))

    by_key: dict[str, int] = {}
    for state in per_param_state:
        for key, (_, b) in state.items():
            by_key[key] = by_key.get(key, 0) + b
    parts = _parts(per_param_state)
    by_role = dict.fromkeys(ROLE_GROUPS, 0)
    for role, state in zip(roles, per_param_state):
        by_role[role] += sum(b for _, b in state.values())
    optimizer_bytes = sum(by_key.values())
    all_grads = sum(b for _, b in trainable)
    largest = max((b for _, b in trainable), default=0)
    if layerwise:
        if bucket_bytes is None:  # what galore_mini.layerwise does: plain torch optimizers go one at a time
            bucket_bytes = 0 if method in _TORCH_ADAMW else DEFAULT_BUCKET_BYTES
        held = layerwise_held_bytes([b for _, b in trainable], trainable_names, bucket_bytes)
    else:
        held = all_grads
    activations = None
    if batch_size is not None:
        if config is None or _field(config, "intermediate_size") is None:
            raise UsageError("activations are computed for Llama-layout models only (a config with "
                             "hidden_size, intermediate_size …)")
        act_dtype = dtype_name if dtype_name in DTYPE_BYTES else "fp32"
        activations = activation_bytes(config, batch_size, seq_len, act_dtype)
    weights_total = sum(b for _, b in weights)
    return MemoryEstimate(
        model=label, method=method, rank=rank if uses_rank else None, dtype=dtype_name, state_dtype=state_label,
        params=sum(n for n, _ in weights), trainable_params=sum(n for n, _ in trainable),
        projected_params=projected_params, weights_bytes=weights_total, gradient_bytes=held,
        all_gradient_bytes=all_grads, largest_gradient_bytes=largest, layerwise=bool(layerwise),
        optimizer_bytes=optimizer_bytes, optimizer_parts=parts, optimizer_by_key=dict(sorted(by_key.items())),
        optimizer_by_role=by_role,
        batch_size=batch_size, seq_len=seq_len, activation_bytes=activations,
        total_bytes=weights_total + held + optimizer_bytes + (activations or 0),
    )


# -- measurement ----------------------------------------------------------------------------------


def measure(model: nn.Module, method: str, rank: int = 128, *, state_dtype=None, input_ids: torch.Tensor | None = None,
            **optimizer_options) -> dict[str, Any]:
    """One real optimizer step on `model` with `method`; what the state, weights and gradients then hold.

    Optimizer methods: the optimizer is ``galore_mini.create_optimizer(model, method, rank=rank,
    **optimizer_options)``; gradients already present are used as they are (so several methods can be
    measured on one backward), else one forward and backward pass of the model's own language-model
    loss (``model(input_ids=ids, labels=ids).loss``, Hugging Face style) on `input_ids` (random tokens,
    2 × 16, when None) produces them. ``low_rank``, ``lora``, ``relora``: `model` is converted by
    :func:`galore_mini.train.baselines.build_baseline` (in place for ``low_rank``; LoRA wraps it),
    gradients are recomputed and the harness's optimizer (torch AdamW over the trainable parameters,
    ``create_optimizer(model, "full")``) takes the step. Returns ``measured_optimizer_bytes``,
    ``measured_optimizer_parts``, ``measured_optimizer_by_key``, ``measured_weights_bytes``,
    ``measured_gradient_bytes``, ``measured_params``.
    """
    import galore_mini as gm

    if method not in METHODS:
        raise UsageError(f"measure: method={method!r} is unknown; use one of {', '.join(METHODS)}")
    if input_ids is None:
        vocab = int(_field(getattr(model, "config", None) or {}, "vocab_size", 0)) or None
        if vocab is None:
            raise UsageError("measure: pass input_ids (the model has no config.vocab_size)")
        input_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    if method in ADAPTER_METHODS:
        from galore_mini.train.baselines import build_baseline

        for p in model.parameters():
            p.grad = None  # the adapted model's gradients differ from the base model's
        model = build_baseline(method, model, rank)
        method, optimizer_options = "full", {}
    if all(p.grad is None for p in model.parameters() if p.requires_grad):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    if state_dtype is not None and method in _STATE_DTYPE_METHODS:
        optimizer_options["state_dtype"] = state_dtype
    optimizer = gm.create_optimizer(model, method, rank=rank, **optimizer_options)
    optimizer.step()
    return {
        "measured_optimizer_bytes": optimizer_state_bytes(optimizer),
        "measured_optimizer_parts": optimizer_state_parts(optimizer),
        "measured_optimizer_by_key": optimizer_state_breakdown(optimizer),
        "measured_weights_bytes": weights_bytes(model),
        "measured_gradient_bytes": gradient_bytes(model),
        "measured_params": sum(p.numel() for p in _unique_parameters(model)),
    }


# -- the figure -----------------------------------------------------------------------------------

_LABELS = {"full": "AdamW", "adam_mini": "Adam-mini", "galore": "GaLore", "galore_mini": "GaLore-mini",
           "galore_mini_a1": "GaLore-mini a1", "galore_mini_a2": "GaLore-mini a2",
           "galore_adafactor": "GaLore-Adafactor", "galore_8bit": "8-bit GaLore",
           "galore_mini_8bit": "8-bit GaLore-mini", "low_rank": "Low-rank", "lora": "LoRA", "relora": "ReLoRA"}


def plot(estimates: list[MemoryEstimate], path: str, title: str | None = None,
         budget_gib: float | None = 24.0) -> str:
    """The paper's Figure 1: stacked bars of weights, gradients, optimizer state (and activations) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not estimates:
        raise UsageError("plot: no estimates to draw")
    labels = [_LABELS.get(e.method, e.method) for e in estimates]
    series = [("weights", [e.weights_bytes for e in estimates], "#4C72B0"),
              ("gradients", [e.gradient_bytes for e in estimates], "#DD8452"),
              ("optimizer state", [e.optimizer_bytes for e in estimates], "#55A868")]
    if any(e.activation_bytes for e in estimates):
        series.append(("activations", [e.activation_bytes or 0 for e in estimates], "#8172B3"))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.05 * len(estimates) + 2), 4.8))
    bottom = [0.0] * len(estimates)
    for name, values, color in series:
        gib = [v / 2 ** 30 for v in values]
        ax.bar(labels, gib, bottom=bottom, label=name, color=color, width=0.65)
        bottom = [b + g for b, g in zip(bottom, gib)]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
    if budget_gib:
        ax.axhline(budget_gib, color="0.3", linestyle="--", linewidth=1, label=f"{budget_gib:g} GiB (RTX 4090)")
    first = estimates[0]
    rank = next((e.rank for e in estimates if e.rank is not None), None)
    extras = [f"{first.dtype} weights"] + ([f"rank {rank}"] if rank else [])
    if any(e.layerwise for e in estimates):
        extras.append("layer-wise updates")
    if any(e.activation_bytes for e in estimates):
        extras.append(f"batch {first.batch_size} × seq {first.seq_len}")
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title or f"{first.model}: training memory by method ({', '.join(extras)})", fontsize=10)
    ours = sorted({e.state_dtype for e in estimates if e.state_dtype in DTYPE_BYTES}) or ["fp32"]
    fig.text(0.01, 0.01, f"as allocated: torch AdamW's state (AdamW, Low-rank, LoRA, ReLoRA) in its parameters' "
             f"dtype ({first.dtype}; peft's LoRA adapters fp32); the other optimizers' state {'/'.join(ours)}, "
             "8-bit moments where named", fontsize=7, color="0.35")
    ax.set_ylim(0, max(bottom + [budget_gib or 0]) * 1.2)  # headroom for the legend row
    ax.legend(loc="upper center", fontsize=8, ncol=len(series) + (1 if budget_gib else 0), frameon=False)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# -- command line ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the ``memory`` subcommand."""
    p = subparsers.add_parser(
        "memory", help="memory of training a model with a method (analytic, optionally measured)",
        description="Weights, gradients, optimizer state (by part) and total memory of training a model with a "
                    "method, computed from the model's shapes; --measure checks it against one real step.",
    )
    p.add_argument("--model", default="llama_7b", help="named size (tiny, llama_20m, llama_60m … llama_7b) or a "
                   "JSON config path (default: llama_7b)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the config's vocabulary size")
    p.add_argument("--method", default="galore_mini", help=f"one of {', '.join(METHODS)} (default: galore_mini)")
    p.add_argument("--methods", default=None, help="comma-separated methods, or 'all' (the paper's comparison)")
    p.add_argument("--rank", type=int, default=None, help="rank (default: the paper's for the size, e.g. 1024 at 7B)")
    p.add_argument("--dtype", default="bf16", help="weights' dtype: fp32, bf16, fp16 (default: bf16)")
    p.add_argument("--state-dtype", default=None, help="optimizer-state dtype for the optimizers that take one "
                   "(default: fp32)")
    p.add_argument("--proj-dtype", default=None, help="projector dtype for the GaLore family (default: fp32)")
    p.add_argument("--adapter-dtype", default=None, help="LoRA/ReLoRA adapter dtype (default: fp32, as peft keeps them)")
    p.add_argument("--proj-type", default="std", help="GaLore projection side: std, reverse_std, left, right, full")
    p.add_argument("--layerwise", action="store_true", help="layer-wise updates: count the gradients held at once (default 64 MiB buckets)")
    p.add_argument("--batch-size", type=int, default=None, help="add activations for this batch size …")
    p.add_argument("--seq-len", type=int, default=None, help="… and sequence length")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true", help="build the model, run one real optimizer step and "
                   "report the measured state bytes (small models only)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw stacked bars per method to this file")
    p.set_defaults(func=run)


def _parse_methods(args) -> list[str]:
    if args.methods is None:
        names = [args.method]
    elif args.methods.strip() == "all":
        names = list(FIGURE_METHODS)
    else:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UsageError(f"--method: unknown method {unknown[0] if unknown else ''!r}; use one of "
                         f"{', '.join(METHODS)} (or --methods all)")
    return names


def _measure_cli(args, est: MemoryEstimate, dtype: str, models: dict) -> None:
    """Attach one real step's measurements to `est` (the model is built once and shared by the methods)."""
    from galore_mini.train.model import build_model, model_config

    if est.weights_bytes + est.all_gradient_bytes + est.optimizer_bytes > MEASURE_LIMIT_BYTES:
        raise UsageError(f"--measure: {args.model} needs about {_gib(est.total_bytes)} GiB; measurement is for "
                         f"models that fit in {MEASURE_LIMIT_BYTES / 2 ** 30:g} GiB (tiny, llama_20m, llama_60m)")
    adapter = est.method in ADAPTER_METHODS
    if adapter or "model" not in models:
        model = build_model(model_config(args.model, args.vocab_size), dtype=TORCH_DTYPES[dtype])
        if adapter:  # each baseline converts its own fresh model
            est.measured = measure(model, est.method, rank=est.rank)
            return
        models["model"] = model
    options: dict[str, Any] = {}
    if est.method in _PROJECTED:
        options["proj_type"] = args.proj_type
        if args.proj_dtype is not None:
            options["proj_dtype"] = args.proj_dtype
    # the first call runs forward and backward; later methods step on the same gradients
    est.measured = measure(models["model"], est.method, rank=est.rank or 1, state_dtype=args.state_dtype, **options)


def run(args) -> int:
    methods = _parse_methods(args)
    if args.vocab_size is not None:
        _positive_int(args.vocab_size, "--vocab-size")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--rank", args.rank)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag}={value} must be a positive integer")
    dtype = _dtype_name(args.dtype)
    estimates = []
    for method in methods:
        est = estimate(args.model, method, rank=args.rank, dtype=dtype, state_dtype=args.state_dtype,
                       proj_dtype=args.proj_dtype, proj_type=args.proj_type, layerwise=args.layerwise,
                       batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                       adapter_dtype=args.adapter_dtype)
        estimates.append(est)
    if args.measure:
        models: dict = {}
        for est in estimates:
            _measure_cli(args, est, dtype, models)
    if args.plot:
        plot(estimates, args.plot)
    if args.json:
        payload = estimates[0].to_dict() if len(estimates) == 1 else {"estimates": [e.to_dict() for e in estimates]}
        print(json.dumps(payload))
    else:
        print("\n\n".join(e.format() for e in estimates))
        if args.plot:
            print(f"\nfigure written to {args.plot}")
    # a measured figure that differs from the estimate is a bug somewhere: say so in the exit code
    mismatched = [e for e in estimates if e.measured and not e.matches_measurement()]
    return 1 if mismatched else 0
