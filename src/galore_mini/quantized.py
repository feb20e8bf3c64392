"""INT8 weights for training: what is stored, how it is recognised, and what it costs.

A quantised linear weight holds ``int8`` values ``q`` (out×in) and one fp32 scale ``s`` per output row;
its value is ``q · s``. The forward dequantises one layer at a time; an optimizer writes each step back
with one in-place ``add_`` or ``copy_``, which rounds stochastically (unbiased: the expected stored value
is the exact one), so there is no high-precision master copy. The weight type is torchao's
quantized-training weight (``torchao.prototype.quantized_training``), an optional dependency: it runs
on CPUs and GPUs, under FSDP2, and overrides exactly ``add_``, ``addcdiv_`` and ``copy_`` (no ``mul_``,
``lerp_``, ``addcmul_`` or ``_foreach_*`` op), which is why the update rules end each weight's step
with one such write.

Example::

    >>> import torch
    >>> from galore_mini.quantized import quantize_weights, is_int8_weight, int8_weight_bytes
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    >>> quantize_weights(model)  # doctest: +SKIP
    ['0']
    >>> int8_weight_bytes((32, 64))
    2176
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from galore_mini.errors import UsageError

#: weight storage formats the harness and the estimator know
WEIGHT_FORMATS = ("bf16", "int8")
#: bytes of one row's scale
SCALE_BYTES = 4


def int8_weight_bytes(shape: tuple[int, ...]) -> int:
    """Stored bytes of one INT8 weight: one byte per value plus an fp32 scale per output row."""
    rows, cols = shape[0], shape[1]
    return rows * cols + rows * SCALE_BYTES


def _weight_class():
    # torchao is optional and slow to import (it probes for CUDA kernels and logs each missing one)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                from torchao.prototype.quantized_training import int8 as ao_int8
            finally:
                logging.disable(previous)
    except ImportError:
        raise UsageError("--weights int8 needs torchao: pip install 'torchao>=0.18' "
                         "(or install galore-mini[train])") from None
    return ao_int8.Int8QuantizedTrainingLinearWeight


def is_int8_weight(t) -> bool:
    """True for an INT8 training weight (or a DTensor whose local shard is one)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return type(local).__name__ == "Int8QuantizedTrainingLinearWeight"


def quantizable_linears(model: nn.Module, *, include_output: bool = False) -> list[tuple[str, nn.Linear]]:
    """The linear layers whose weights go to INT8: every 2-D linear inside the decoder layers
    (attention and MLP), and the output layer when `include_output` and it is not tied to the embedding."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
            continue
        is_output = name.split(".")[-1] in ("lm_head", "output", "score")
        if is_output and not include_output:
            continue
        out.append((name, module))
    return out


def quantize_weights(model: nn.Module, *, include_output: bool = False) -> list[str]:
    """Replace the weights of :func:`quantizable_linears` by INT8 training weights in place; the names
    of the layers changed. The weights' reported dtype (and so their gradients') stays the model's."""
    cls = _weight_class()
    names = []
    for name, module in quantizable_linears(model, include_output=include_output):
        if is_int8_weight(module.weight):
            continue
        module.weight = nn.Parameter(cls.from_float(module.weight.detach()), requires_grad=module.weight.requires_grad)
        names.append(name)
    if not names:
        raise UsageError("--weights int8: the model has no linear layer to quantise; use --weights bf16")
    return names
