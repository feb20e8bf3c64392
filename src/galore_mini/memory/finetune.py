"""The fine-tuning view of the estimate: what ``galore-mini finetune`` trains, and its optimizer state.

Fine-tuning differs from pretraining in what is trained: a sequence classifier (the pretrained body
plus a freshly drawn classification head of ``num_labels`` outputs, 1 for regression), LoRA adapters
beside frozen target matrices, and, with ``freeze_embeddings``, frozen embeddings for the ranked
methods. :func:`estimate_finetune` builds exactly what a run builds, on the meta device: the
classifier from the model's config (``AutoModelForSequenceClassification.from_config``, fp32, as
``_load_classifier`` loads it), then :func:`galore_mini.train.finetune.method_model` (freezing, LoRA)
and :func:`~galore_mini.train.finetune.method_optimizer` (the run's optimizer), the same two functions
the training loop calls. The state is read from the optimizer's declared layout
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
from galore_mini.memory.estimate import MemoryEstimate, ROLE_GROUPS, _projected_ids, _role_of, _roles, _state_label
from galore_mini.memory.layout import layout_sizes, optimizer_state_layout
from galore_mini.memory.measure import parts, unique_parameters


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
    if isinstance(model, str) and not Path(model).expanduser().exists():
        from galore_mini.models import model_config  # a named size (tiny, llama_60m …) or a JSON config path

        return classifier_config(model_config(model), num_labels, regression)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.is_file():
            from galore_mini.models import model_config

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


def _run_config(method: str, rank: int, freeze_embeddings: bool):
    from galore_mini.train.finetune import FINETUNE_METHODS, FinetuneConfig

    methods.get(method, "--method")
    if method not in FINETUNE_METHODS:
        raise UsageError(f"--method: {method!r} is not a fine-tuning method; use one of {', '.join(FINETUNE_METHODS)}")
    config = FinetuneConfig(model="", methods=(method,), rank=rank, freeze_embeddings=freeze_embeddings)
    config.validate()
    return config


def build_finetune(model: torch.nn.Module, method: str, rank: int = 8, freeze_embeddings: bool = False):
    """(model as `method` trains it, its optimizer): ``finetune``'s own ``method_model`` and ``method_optimizer``."""
    from galore_mini.train.finetune import check_targets, method_model, method_optimizer

    config = _run_config(method, rank, freeze_embeddings)
    targets = [name for name, _ in check_targets(model, config.methods, rank)]
    device = next(model.parameters()).device
    with torch.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = method_model(model, method, config, targets)
    return model, method_optimizer(model, method, config)


def estimate_finetune(model, method: str = "galore_mini", rank: int = 8, *, num_labels: int = 2,
                      regression: bool = False, freeze_embeddings: bool = False) -> MemoryEstimate:
    """Memory of ``galore-mini finetune --methods METHOD`` on `model` with a `num_labels`-way head.

    `rank`, `freeze_embeddings`: as ``finetune``'s ``--rank`` and ``--freeze-embeddings``. The result's
    ``optimizer_bytes`` equals a run's ``optimizer_state_bytes``; weights and gradients are fp32.
    """
    config = classifier_config(model, num_labels, regression)
    base = build_classifier(config)
    roles = _roles(base)
    base_ids = {id(p) for p in base.parameters()}
    built, optimizer = build_finetune(base, method, rank, freeze_embeddings)
    entry = methods.get(method)
    if entry.kind == "adapter":
        projected_params = sum(p.numel() for p in unique_parameters(built) if id(p) not in base_ids)
    else:
        projected = _projected_ids(optimizer)
        projected_params = sum(p.numel() for p in unique_parameters(built) if id(p) in projected)

    layouts = optimizer_state_layout(optimizer)
    per_param = [layout_sizes(layout) for _, layout in layouts]
    names = {id(p): n for n, p in built.named_parameters()}
    by_key: dict[str, int] = {}
    by_role = dict.fromkeys(ROLE_GROUPS, 0)
    for (p, _), sizes in zip(layouts, per_param):
        for key, (_, b) in sizes.items():
            by_key[key] = by_key.get(key, 0) + b
        by_role[_role_of(names.get(id(p), ""), roles)] += sum(b for _, b in sizes.values())
    optimizer_bytes = sum(by_key.values())
    params = unique_parameters(built)
    trainable = [p for p in params if p.requires_grad]
    grad_bytes = [p.numel() * p.element_size() for p in trainable]
    weights = sum(p.numel() * p.element_size() for p in params)
    label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    return MemoryEstimate(
        model=f"{label} ({type(base).__name__}, {num_labels} label{'s' if num_labels > 1 else ''})", method=method,
        rank=rank if entry.ranked else None, dtype="fp32",
        state_dtype=_state_label(entry, "fp32", optimizer, layouts),
        params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
        projected_params=projected_params, weights_bytes=weights, gradient_bytes=sum(grad_bytes),
        all_gradient_bytes=sum(grad_bytes), largest_gradient_bytes=max(grad_bytes, default=0), layerwise=False,
        optimizer_bytes=optimizer_bytes, optimizer_parts=parts(per_param), optimizer_by_key=dict(sorted(by_key.items())),
        optimizer_by_role=by_role, total_bytes=weights + sum(grad_bytes) + optimizer_bytes)


def measure_finetune(model, method: str = "galore_mini", rank: int = 8, *, num_labels: int = 2,
                     regression: bool = False, freeze_embeddings: bool = False, seed: int = 0) -> dict[str, int]:
    """One real training step of a fresh classifier (random weights, random tokens): the state it then holds.

    The model and optimizer are built as :func:`estimate_finetune` builds them, on the CPU; the step is
    finetune's (loss on labels, gradients clipped to norm 1, ``optimizer.step()``). Small models only.
    """
    from galore_mini.memory.measure import gradient_bytes, optimizer_state_bytes, weights_bytes

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


def run_cli(args, names: list[str]) -> int:
    """``galore-mini memory --finetune``: one estimate per method (``--measure``: checked by one real step)."""
    from galore_mini.memory.cli import MEASURE_LIMIT_BYTES
    from galore_mini.memory.estimate import _gib

    unused = [flag for flag, value in (("--layerwise", args.layerwise), ("--batch-size", args.batch_size),
                                       ("--seq-len", args.seq_len), ("--state-dtype", args.state_dtype),
                                       ("--proj-dtype", args.proj_dtype), ("--adapter-dtype", args.adapter_dtype),
                                       ("--vocab-size", args.vocab_size), ("--proj-type", args.proj_type != "std"),
                                       ("--world-size", getattr(args, "world_size", 1) != 1),
                                       ("--dtype", args.dtype not in (None, "fp32", "float32")))
              if value not in (None, False)]
    if unused:
        raise UsageError(f"{', '.join(unused)}: not part of the fine-tuning view (fp32 weights and state, every "
                         "gradient held, one process, no activations); drop them or drop --finetune")
    rank = 8 if args.rank is None else args.rank
    estimates = [estimate_finetune(args.model, m, rank, num_labels=args.num_labels, regression=args.num_labels == 1,
                                   freeze_embeddings=args.freeze_embeddings) for m in names]
    if args.measure:
        for est in estimates:
            if est.weights_bytes + est.all_gradient_bytes + est.optimizer_bytes > MEASURE_LIMIT_BYTES:
                raise UsageError(f"--measure: {args.model} needs about {_gib(est.total_bytes)} GiB; measurement is "
                                 f"for models that fit in {MEASURE_LIMIT_BYTES / 2 ** 30:g} GiB")
            est.measured = measure_finetune(args.model, est.method, rank, num_labels=args.num_labels,
                                            regression=args.num_labels == 1, freeze_embeddings=args.freeze_embeddings)
    from galore_mini.memory.cli import report

    return report(estimates, args)
