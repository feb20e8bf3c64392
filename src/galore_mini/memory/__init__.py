"""Memory per training method, counted from what training would allocate, and checked against measurement.

For a model (a named size such as ``llama_7b``, a Hugging Face config object,
a JSON config path, a dict of config fields, or a live ``nn.Module``), a method,
a rank and a weight dtype, :func:`estimate` returns a :class:`MemoryEstimate`:
parameter count, weight bytes, gradient bytes, optimizer-state bytes split into
its parts, optionally activation bytes, and the total. Nothing is allocated
(``llama_7b`` takes well under a second per optimizer method; the ``peft``-wrapped
LoRA baselines a second or two).

**How.** The estimate builds what training builds, on the meta device: the model
(:func:`galore_mini.models.build_model`, or a meta copy of a live module), the harness's adapter
baseline for ``low_rank`` / ``lora`` / ``relora``, and the optimizer
(:func:`galore_mini.create_optimizer`, so the param groups are exactly the ones training gets). Each
parameter's state is then read from the optimizer's own declaration of what its first step allocates
(``ComposedOptimizer.state_layout``; torch AdamW: ``exp_avg``, ``exp_avg_sq`` like the parameter and a
scalar ``step``). The formulas below describe what that yields; ``tests/test_memory.py`` checks them
written out by hand and checks every method against a measured step.

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
  ``dora``              as ``lora``, plus a trained fp32 magnitude vector of m entries per adapted W
  ====================  ==========================================================================

  ``adaptive_gap=True`` adds ``similarity`` (``gap_window``·4 B) per projected weight.
  Which weights are projected and their block layouts are what
  :func:`galore_mini.param_groups` decides for the model, so the estimate equals what
  ``create_optimizer`` allocates, to the byte;
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
``bookkeeping`` (``step``, ``host_step``, ``refresh``, ``similarity``).

**FSDP2** (``world_size=N``, ``galore-mini memory --world-size N``): the bytes one rank holds with
``fully_shard`` — rank 0, which holds the most (⌈m/N⌉ rows of every weight). Weights and gradients
are FSDP2's padded shards (⌈m/N⌉ rows on every rank); each state key laid out by W's rows
(:func:`galore_mini.optim.distributed.sharded_keys`) counts the rows that rank holds, the others
(right projectors, left-projection moments, per-head/tensor ``v``, step counters) count whole on
every rank. See ``docs/memory.md``.

Limits: named sizes, JSON paths, dicts and config objects are built with ``transformers``
(Llama by default, any ``model_type`` it knows); a live module is copied to the meta device (its
parameters untouched). Activations are counted for Llama-layout models only. ``state_dtype``
applies to the optimizers that take it (``Method.state_dtype_option`` in
:mod:`galore_mini.methods`: ``adam_mini``, ``galore``, ``galore_mini*`` and ``galore_8bit``'s
un-quantised small moments); torch AdamW (``full``, ``low_rank``, ``lora``, ``relora``) keeps state
in its parameters' dtype; ``galore_adafactor`` stays fp32.
"""

from galore_mini.memory.estimate import (
    DTYPE_BYTES,
    ROLE_GROUPS,
    TORCH_DTYPES,
    MemoryEstimate,
    activation_bytes,
    backward_order,
    estimate,
    layerwise_held_bytes,
)
from galore_mini.memory.figure import plot
from galore_mini.memory.layout import optimizer_state_layout
from galore_mini.memory.measure import (
    STATE_PARTS,
    gradient_bytes,
    measure,
    optimizer_state_breakdown,
    optimizer_state_bytes,
    optimizer_state_parts,
    weights_bytes,
)
from galore_mini.methods import ADAPTER_METHODS, FIGURE_METHODS, METHODS, OPTIMIZER_METHODS
from galore_mini.models import DEFAULT_RANKS, default_rank

__all__ = [
    "ADAPTER_METHODS", "DEFAULT_RANKS", "DTYPE_BYTES", "FIGURE_METHODS", "METHODS", "OPTIMIZER_METHODS",
    "ROLE_GROUPS", "STATE_PARTS", "TORCH_DTYPES", "MemoryEstimate", "activation_bytes", "backward_order",
    "default_rank", "estimate", "gradient_bytes", "layerwise_held_bytes", "measure", "optimizer_state_breakdown",
    "optimizer_state_bytes", "optimizer_state_layout", "optimizer_state_parts", "plot", "weights_bytes",
]

