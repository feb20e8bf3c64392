"""The fine-tuning view of the estimate: what ``galore-mini finetune`` trains, and its optimizer state.

Fine-tuning differs from pretraining in what is trained: a sequence classifier (the pretrained body
plus a freshly drawn classification head of ``num_labels`` outputs, 1 for regression), LoRA adapters
beside frozen target matrices, and, with ``freeze_embeddings``, frozen embeddings for the ranked
methods. :func:`estimate_finetune` builds exactly what a run builds, on the meta device: the
classifier from the model's config (``AutoModelForSequenceClassification.from_config``, fp32, as
``_load_classifier`` loads it), then the method's own :meth:`~galore_mini.methods.Method.finetune_model`
(freezing, LoRA) and :meth:`~galore_mini.methods.Method.build_optimizer` with the fine-tuning recipe's
settings, the same calls the training loop makes. The state is read from the optimizer's declared layout
(:mod:`galore_mini.memory.layout`), so the estimate equals the ``optimizer_state_bytes`` a finetune
run records, to the byte (``tests/test_memory.py``).

What that gives, per trainable parameter ``p`` (``N(p)`` entries, fp32):

* ``full``: AdamW on every parameter: ``2·N(p)·4`` B + a 4 B ``step``;
* ``lora``: AdamW on the adapters (``A`` r×n and ``B`` m×r per target matrix m×n), the head,
  the embeddings (unless frozen), norms and biases; the target matrices are frozen and cost nothing;
* ``galore`` / ``galore_mini`` / ``adam_mini``: as in pretraining (:mod:`galore_mini.memory`), on the
  classifier: the head (m = ``num_labels``) is never projected.

Limits: fp32 weights and state (what finetune trains in); no activations; ``--layerwise`` does not
change the optimizer state, but the gradients held at once are not modelled here (``gradient_bytes``
is every trainable gradient). `model` is a Hugging Face model folder (``config.json``), a
``PretrainedConfig``, a named size or JSON config (:func:`galore_mini.models.model_config`), or a
pretrain run folder already exported by ``galore-mini finetune``.

Example::

    >>> from transformers import LlamaConfig
    >>> from galore_mini.memory.finetune import estimate_finetune
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=4)
    >>> e = estimate_finetune(cfg, "lora", rank=4, num_labels=2)
    >>> e.trainable_params < e.params
    True
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch

from galore_mini import methods
from galore_mini.errors import UsageError
from galore_mini.memory.estimate import MemoryEstimate, parameter_roles, projected_ids, rank_figures, state_label
from galore_mini.memory.layout import optimizer_state_layout
from galore_mini.memory.measure import (
    gradient_bytes, optimizer_state_bytes, parts, unique_parameters, weights_bytes)
from galore_mini.models import model_config


def classifier_config(model, num_labels: int, regression: bool = False):
    """The config ``galore-mini finetune`` loads `model`'s classifier with (labels and problem type set)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise UsageError(f"num_labels={num_labels!r} must be a positive integer (1 for regression)")
    if regression and num_labels != 1:
        raise UsageError(f"num_labels={num_labels}: a regression head has one output; pass num_labels=1")
    problem = "regression" if regression else "single_label_classification"
    if isinstance(model, PretrainedConfig):
        config = copy.deepcopy(model)
        config.num_labels = num_labels
        config.problem_type = problem
        return config
    if isinstance(model, str) and not Path(model).expanduser().exists():  # a named size (tiny, llama_60m …)
        return classifier_config(model_config(model), num_labels, regression)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.is_file():  # a JSON config
            return classifier_config(model_config(str(path)), num_labels, regression)
        if not (path / "config.json").is_file():
            hint = (" (a pretrain run: run `galore-mini finetune --model` on it once, which exports it)"
                    if (path / "checkpoint.pt").is_file() else "")
            raise UsageError(f"--model {model}: no config.json in that folder{hint}; pass a Hugging Face model folder")
        return AutoConfig.from_pretrained(path, num_labels=num_labels, problem_type=problem)
    raise UsageError(f"--model: cannot read a classifier from {type(model).__name__}; pass a Hugging Face model "
                     "folder, a named size or a PretrainedConfig")


def build_classifier(config, device: str | torch.device = "meta", seed: int | None = None) -> torch.nn.Module:
    """An fp32 ``AutoModelForSequenceClassification`` of `config` (meta: nothing allocated)."""
    from transformers import AutoModelForSequenceClassification

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config)
    return model.float()


def _check_method(method: str, rank: int) -> methods.Method:
    entry = methods.get(method, "--method")
    if method not in methods.FINETUNE_METHODS:
        raise UsageError(f"--method: {method!r} is not a fine-tuning method; use one of "
                         f"{', '.join(methods.FINETUNE_METHODS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank={rank!r} must be a positive integer")
    return entry


def build_finetune(model: torch.nn.Module, method: str, rank: int = 8, freeze_embeddings: bool = False):
    """(model as `method` trains it, its optimizer), built as ``galore-mini finetune`` builds them: the
    targets checked (:func:`galore_mini.methods.check_targets`), the recipe's settings, the method's
    ``finetune_model`` and ``build_optimizer``."""
    entry = _check_method(method, rank)
    targets = [name for name, _ in methods.check_targets(model, [method], rank)]
    settings = entry.finetune_settings(rank, targets=targets, freeze_embeddings=freeze_embeddings)
    device = next(model.parameters()).device
    with torch.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = entry.finetune_model(model, settings)
    return model, entry.build_optimizer(model, settings)


def estimate_finetune(model, method: str = "galore_mini", rank: int = 8, *, num_labels: int = 2,
                      regression: bool = False, freeze_embeddings: bool = False) -> MemoryEstimate:
    """Memory of ``galore-mini finetune --methods METHOD`` on `model` with a `num_labels`-way head.

    `rank`, `freeze_embeddings`: as ``finetune``'s ``--rank`` and ``--freeze-embeddings``. The result's
    ``optimizer_bytes`` equals a run's ``optimizer_state_bytes``; weights and gradients are fp32.
    """
    config = classifier_config(model, num_labels, regression)
    base = build_classifier(config)
    roles = parameter_roles(base)
    base_ids = {id(p) for p in base.parameters()}
    built, optimizer = build_finetune(base, method, rank, freeze_embeddings)
    entry = methods.get(method)
    projected = projected_ids(optimizer)
    # adapter methods: the adapters; optimizer methods: the weights they project
    projected_params = sum(p.numel() for p in unique_parameters(built) if id(p) not in base_ids or id(p) in projected)
    layouts = optimizer_state_layout(optimizer)
    names = {id(p): n for n, p in built.named_parameters()}
    params = unique_parameters(built)
    trainable = [p for p in params if p.requires_grad]
    figures = rank_figures(optimizer, layouts, params, trainable, names, roles, 1, 0)
    label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    return MemoryEstimate(
        model=f"{label} ({type(base).__name__}, {num_labels} label{'s' if num_labels > 1 else ''})", method=method,
        rank=rank if entry.ranked else None, dtype="fp32",
        state_dtype=state_label(entry, "fp32", optimizer, layouts),
        params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
        projected_params=projected_params, weights_bytes=figures["weights"], gradient_bytes=figures["all_grads"],
        all_gradient_bytes=figures["all_grads"], largest_gradient_bytes=max(figures["grad_bytes"], default=0),
        layerwise=False, optimizer_bytes=figures["optimizer"], optimizer_parts=parts(figures["per_param"]),
        optimizer_by_key=dict(sorted(figures["by_key"].items())), optimizer_by_role=figures["by_role"],
        total_bytes=figures["total"])


def measure_finetune(model, method: str = "galore_mini", rank: int = 8, *, num_labels: int = 2,
                     regression: bool = False, freeze_embeddings: bool = False, seed: int = 0) -> dict[str, int]:
    """One real training step of a fresh classifier (random weights, random tokens): the state it then holds.

    The model and optimizer are built as :func:`estimate_finetune` builds them, on the CPU; the step is
    finetune's (loss on labels, gradients clipped to norm 1, ``optimizer.step()``). Small models only.
    """
    config = classifier_config(model, num_labels, regression)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # batches of two need one; it changes no shape
    built, optimizer = build_finetune(build_classifier(config, device="cpu", seed=seed), method, rank,
                                      freeze_embeddings)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=g)
    labels = torch.randn(2, generator=g) if regression else torch.randint(0, num_labels, (2,), generator=g)
    built.train()
    built(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in built.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return {"measured_optimizer_bytes": optimizer_state_bytes(optimizer),
            "measured_weights_bytes": weights_bytes(built), "measured_gradient_bytes": gradient_bytes(built)}


__all__ = ["build_classifier", "build_finetune", "classifier_config", "estimate_finetune", "measure_finetune"]

