"""``galore-mini memory``: the estimate (pretraining or ``--finetune``), optionally measured and plotted."""

from __future__ import annotations

import json
from typing import Any

from galore_mini import methods
from galore_mini.errors import UsageError
from galore_mini.memory.estimate import MemoryEstimate, TORCH_DTYPES, canonical_dtype, estimate, gib, positive_int
from galore_mini.memory.figure import check_path, plot
from galore_mini.memory.finetune import estimate_finetune, measure_finetune
from galore_mini.memory.measure import measure
from galore_mini.models import build_model, model_config

MEASURE_LIMIT_BYTES = 4 * 2 ** 30


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
    p.add_argument("--method", default="galore_mini",
                   help=f"one of {', '.join(methods.METHODS)} (default: galore_mini)")
    p.add_argument("--methods", default=None, help="comma-separated methods, or 'all' (the paper's comparison)")
    p.add_argument("--rank", type=int, default=None, help="rank (default: the paper's for the size, e.g. 1024 at 7B)")
    p.add_argument("--dtype", default=None, help="weights' dtype: fp32, bf16, fp16 (default: bf16; with --finetune "
                   "only fp32)")
    p.add_argument("--state-dtype", default=None, help="optimizer-state dtype for the optimizers that take one "
                   "(default: fp32)")
    p.add_argument("--proj-dtype", default=None, help="projector dtype for the GaLore family (default: fp32)")
    p.add_argument("--adapter-dtype", default=None, help="LoRA/ReLoRA adapter dtype (default: fp32, as peft keeps them)")
    p.add_argument("--proj-type", default="std", help="GaLore projection side: std, reverse_std, left, right, full")
    p.add_argument("--layerwise", action="store_true",
                   help="layer-wise updates: count the gradients held at once (default 64 MiB buckets)")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="FSDP2 (fully_shard) over N ranks: report bytes per rank (rank 0, which holds the most); "
                        "sharded state counts the rows a rank holds, replicated state counts in full (default: 1)")
    p.add_argument("--batch-size", type=int, default=None, help="add activations for this batch size …")
    p.add_argument("--seq-len", type=int, default=None, help="… and sequence length")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true", help="build the model, run one real optimizer step and "
                   "report the measured state bytes (small models only)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw stacked bars per method to this file")
    p.add_argument("--finetune", action="store_true", help="the fine-tuning view: --model as `galore-mini finetune` "
                   "trains it (a classifier, LoRA on frozen matrices; fp32; --rank default 8; --dtype other than fp32 is refused)")
    p.add_argument("--num-labels", type=int, default=2, help="with --finetune: classes of the head (1: regression)")
    p.add_argument("--freeze-embeddings", action="store_true", help="with --finetune: as finetune's flag")
    p.set_defaults(func=run)


def _parse_methods(args) -> list[str]:
    if args.methods is None:
        names = [args.method]
    elif args.methods.strip() == "all":
        names = list(methods.FIGURE_METHODS)
    else:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in methods.REGISTRY]
    if unknown or not names:
        raise UsageError(f"--method: unknown method {unknown[0] if unknown else ''!r}; use one of "
                         f"{', '.join(methods.METHODS)} (or --methods all)")
    return names


def _measure_cli(args, est: MemoryEstimate, dtype: str, models: dict) -> None:
    """Attach one real step's measurements to `est` (the model is built once and shared by the methods)."""
    if est.weights_bytes + est.all_gradient_bytes + est.optimizer_bytes > MEASURE_LIMIT_BYTES:
        raise UsageError(f"--measure: {args.model} needs about {gib(est.total_bytes)} GiB; measurement is for "
                         f"models that fit in {MEASURE_LIMIT_BYTES / 2 ** 30:g} GiB (tiny, llama_20m, llama_60m)")
    entry = methods.get(est.method)
    adapter = entry.kind == "adapter"
    if adapter or "model" not in models:
        model = build_model(model_config(args.model, args.vocab_size), dtype=TORCH_DTYPES[dtype])
        if adapter:  # each baseline converts its own fresh model
            est.measured = measure(model, est.method, rank=est.rank)
            return
        models["model"] = model
    options: dict[str, Any] = {}
    if entry.projected:
        options["proj_type"] = args.proj_type
        if args.proj_dtype is not None:
            options["proj_dtype"] = args.proj_dtype
    # the first call runs forward and backward; later methods step on the same gradients
    est.measured = measure(models["model"], est.method, rank=est.rank or 1, state_dtype=args.state_dtype, **options)


def run(args) -> int:
    names = _parse_methods(args)
    if args.plot:  # before anything is computed or measured
        check_path(args.plot, "--plot")
    if getattr(args, "finetune", False):
        return run_finetune(args, names)
    if args.vocab_size is not None:
        positive_int(args.vocab_size, "--vocab-size")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--rank", args.rank)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag}={value} must be a positive integer")
    if args.world_size <= 0:
        raise UsageError(f"--world-size={args.world_size} must be a positive integer")
    if args.measure and args.world_size > 1:
        raise UsageError("--measure takes one step in one process; the per-rank FSDP2 figures (--world-size) are "
                         "checked against a real FSDP2 run in tests/test_memory.py: drop one of the two")
    dtype = canonical_dtype(args.dtype or "bf16")
    estimates = []
    for method in names:
        est = estimate(args.model, method, rank=args.rank, dtype=dtype, state_dtype=args.state_dtype,
                       proj_dtype=args.proj_dtype, proj_type=args.proj_type, layerwise=args.layerwise,
                       batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                       adapter_dtype=args.adapter_dtype, world_size=args.world_size)
        estimates.append(est)
    if args.measure:
        built: dict = {}
        for est in estimates:
            _measure_cli(args, est, dtype, built)
    return report(estimates, args)


def report(estimates: list[MemoryEstimate], args) -> int:
    """Plot, print (JSON or text) and return the exit code: 1 where a measured figure differs from
    its estimate, which is a bug somewhere."""
    if args.plot:
        plot(estimates, args.plot)
    if args.json:
        payload = estimates[0].to_dict() if len(estimates) == 1 else {"estimates": [e.to_dict() for e in estimates]}
        print(json.dumps(payload))
    else:
        print("\n\n".join(e.format() for e in estimates))
        if args.plot:
            print(f"\nfigure written to {args.plot}")
    return 1 if any(e.measured and not e.matches_measurement() for e in estimates) else 0


def run_finetune(args, names: list[str]) -> int:
    """``galore-mini memory --finetune``: one estimate per method (``--measure``: checked by one real step)."""
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
                raise UsageError(f"--measure: {args.model} needs about {gib(est.total_bytes)} GiB; measurement is "
                                 f"for models that fit in {MEASURE_LIMIT_BYTES / 2 ** 30:g} GiB")
            est.measured = measure_finetune(args.model, est.method, rank, num_labels=args.num_labels,
                                            regression=args.num_labels == 1, freeze_embeddings=args.freeze_embeddings)
    return report(estimates, args)
