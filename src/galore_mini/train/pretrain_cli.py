"""``galore-mini pretrain`` and ``galore-mini compare``.

``pretrain`` trains one method: every field of :class:`~galore_mini.train.config.TrainConfig`
(and its components) is a flag, its help the field's docstring (``--batch-size``, ``--update-proj-gap`` …); ``--config FILE``
(TOML or YAML, same names) supplies values that explicit flags override.

``compare`` trains several methods one after another on the same data,
tokenizer, initial weights and token budget, then writes ``DIR/results.json``,
``DIR/results.md`` (the paper's Table 2 layout), ``DIR/loss.png`` and
``DIR/memory.png`` and prints the table. Run with no arguments it is the demo:
the default corpus, ``tiny``, the paper's six methods plus Adam-mini.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from galore_mini import methods as registry
from galore_mini.errors import UsageError
from galore_mini.methods import DEMO_METHODS
from galore_mini.train.config import (TrainConfig, config_fields, field_help, flag, leaves, load_config_file,
                                      make_config, value_type)
from galore_mini.train.data import prepare_data
from galore_mini.train.loop import TrainingDiverged, check_buildable, leave_distributed, read_metrics, train
from galore_mini.train.plots import label, plot_losses, plot_memory
from galore_mini.train.runs import RunFolder

DEMO_STEPS = 300

def _add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset(),
                      shown_defaults: dict[str, Any] | None = None) -> None:
    """One flag per TrainConfig field, its help the field's docstring, defaulting to 'not given' so that
    files and defaults show through."""
    for owner, field, default in leaves(TrainConfig):
        name = field.name
        if name in skip:
            continue
        help_text = field_help(owner).get(name, "").replace("%", "%%")
        shown = (shown_defaults or {}).get(name, default)
        kind = value_type(owner, name)
        if kind is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        parser.add_argument(flag(name), type=kind or str, default=argparse.SUPPRESS, metavar=name.upper(),
                            help=f"{help_text} (default: {shown})" if shown not in (None, "") else help_text)


def register(subparsers) -> None:
    """Add ``pretrain`` and ``compare`` to the ``galore-mini`` command line."""
    pretrain = subparsers.add_parser("pretrain", help="pretrain a LLaMA model with one method",
                                     description="Pretrain a LLaMA model with one optimizer or baseline.")
    pretrain.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (flags override it)")
    _add_config_flags(pretrain)
    pretrain.set_defaults(func=run_pretrain)

    compare = subparsers.add_parser(
        "compare", help="pretrain several methods on the same data and tabulate perplexity and memory",
        description="Train several methods one after another on the same data and token budget; write "
                    "results.json, results.md, loss.png and memory.png. With no arguments: the demo.")
    compare.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings shared by all methods")
    compare.add_argument("--methods", default=",".join(DEMO_METHODS),
                         help=f"comma-separated methods (default: {','.join(DEMO_METHODS)})")
    compare.add_argument("--lr", metavar="LR|METHOD=LR,...", default=None,
                         help="one peak LR for all methods, or per method (default: each method's own)")
    _add_config_flags(compare, skip={"method", "lr", "out"}, shown_defaults=compare_defaults())
    compare.add_argument("--out", default="runs/compare", help="results folder (default: runs/compare)")
    compare.set_defaults(func=run_compare)


def _given(args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in config_fields() if name not in skip and hasattr(args, name)}


def run_pretrain(args: argparse.Namespace) -> int:
    file_values = load_config_file(args.config) if args.config else {}
    config = make_config(file_values, **_given(args, set()))
    clean = False
    try:
        result = train(config)
        clean = True
    finally:
        leave_distributed(clean)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{config.method}: val loss {result['val_loss']:.4f}, val ppl {result['val_ppl']:.2f}, "
              f"{result['tokens']:,} tokens at {result['tokens_per_s']:,.0f} tokens/s; "
              f"weights {result['weights_bytes'] / 2**20:.2f} MiB, optimizer state "
              f"{result['optimizer_bytes'] / 2**20:.2f} MiB -> {config.out}")
    return 0


def parse_lr(text: str | None, methods: list[str]) -> dict[str, float]:
    """``"3e-3"`` → that LR for every method; ``"full=1e-3,galore=1e-2"`` → per method."""
    if text is None:
        return {}
    try:
        if "=" not in text:
            return dict.fromkeys(methods, float(text))
        out = {}
        for item in text.split(","):
            method, _, value = item.partition("=")
            if method.strip() not in methods:
                raise UsageError(f"--lr: {method.strip()!r} is not among --methods ({', '.join(methods)})")
            out[method.strip()] = float(value)
        return out
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--lr={text!r}: give a number or METHOD=LR pairs separated by commas") from None


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods: name at least one method")
    unknown = [m for m in methods if m not in registry.REGISTRY]
    if unknown:
        raise UsageError(f"--methods: unknown method {unknown[0]!r}; use some of {', '.join(registry.METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError("--methods: a method is named twice")
    return methods


def _for_method(settings: dict[str, Any], method: str) -> dict[str, Any]:
    """Shared settings for one method; optimizer options reach only the methods that have an optimizer of ours."""
    out = dict(settings, method=method)
    if registry.get(method).kind == "adapter":
        out.pop("optimizer_options", None)
    return out


def compare_defaults() -> dict[str, Any]:
    """The demo's settings where the flags and the file say nothing."""
    return {"steps": DEMO_STEPS}


def run_compare(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    lrs = parse_lr(args.lr, methods)
    file_values = load_config_file(args.config) if args.config else {}
    for forbidden in ("method", "out"):
        if forbidden in file_values:
            raise UsageError(f"--config: {forbidden!r} is set by compare itself; remove it from {args.config}")
    settings = {**compare_defaults(), **file_values, **_given(args, {"method", "lr", "out"})}
    configs = {method: make_config(None, **_for_method(settings, method), out=os.path.join(args.out, method),
                                   lr=lrs.get(method))
               for method in methods}
    base = configs[methods[0]]
    _check_compare_out(args.out, configs)
    for config in configs.values():  # every method's model and optimizer, before the first one trains
        check_buildable(config)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(base.data, seq_len=base.seq_len, vocab_size=base.vocab_size, tokenizer=base.tokenizer,
                        val_fraction=base.val_fraction, val_tokens=base.val_tokens, cache_dir=base.cache_dir,
                        log=lambda m: print(m, file=sys.stderr))
    results, curves = [], {}
    for method in methods:
        config = configs[method]
        print(f"== {method} ==", file=sys.stderr, flush=True)
        try:
            result = train(config, data)
        except TrainingDiverged as exc:
            print(f"{method}: {exc}", file=sys.stderr)
            result = {"method": method, "val_loss": math.nan, "val_ppl": math.inf, "steps": config.steps,
                      "tokens": 0, "tokens_per_s": 0.0, "weights_bytes": 0, "optimizer_bytes": 0,
                      "lr": config.resolved_lr(), "diverged": True}
        results.append(result)
        curves[method] = read_metrics(os.path.join(config.out, "metrics.jsonl"))
    wall = time.perf_counter() - started
    write_results(args.out, results, curves, base, data.describe(), wall, sys.argv)
    print(format_table(results))
    print(f"\n{len(methods)} methods in {wall / 60:.1f} min; results in {args.out}/results.md, loss.png, memory.png")
    return 0


def _check_compare_out(out: str, configs: dict[str, Any]) -> None:
    """Refuse, before any data is read, an --out that is a file or holds runs that would be clobbered."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out={out!r} is a file, not a folder; name a folder for the comparison")
    held = [m for m, c in configs.items() if not (c.resume or c.overwrite) and RunFolder(c.out).run_files()]
    if held:
        raise UsageError(f"--out={out!r} already holds runs of {', '.join(held)}; add --resume to continue them "
                         "(finished ones are only scored again), --overwrite to start again, or choose another --out")


def format_table(results: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table, like the paper's Table 2 (perplexity, memory, rank)."""
    mib = 2 ** 20
    full = next((r for r in results if r["method"] == "full" and math.isfinite(r.get("val_ppl", math.inf))), None)
    rows = ["| method | val ppl | vs AdamW | val loss | rank | lr | weights (MiB) | optimizer state (MiB) "
            "| weights + optimizer (MiB) | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ppl = r.get("val_ppl", math.inf)
        versus = f"{100 * (ppl / full['val_ppl'] - 1):+.1f}%" if full and math.isfinite(ppl) else "–"
        rows.append(
            f"| {label(r['method'])} | {ppl:.2f} | {versus} | {r.get('val_loss', math.nan):.4f} | "
            f"{r.get('rank') or '–'} | {r.get('lr', 0):g} | {r['weights_bytes'] / mib:.2f} | "
            f"{r['optimizer_bytes'] / mib:.2f} | {(r['weights_bytes'] + r['optimizer_bytes']) / mib:.2f} | "
            f"{r.get('tokens_per_s', 0):,.0f} |")
    return "\n".join(rows)


def write_results(out: str, results: list[dict[str, Any]], curves: dict[str, list], config, data_description: str,
                  wall_s: float, argv: list[str]) -> None:
    """results.json, results.md, loss.png and memory.png in `out`."""
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    tokens = max((r.get("tokens", 0) for r in results), default=0)
    header = [
        f"# Pretraining comparison: {config.model}, {config.steps} steps, {tokens:,} tokens per method",
        "",
        f"- command: `galore-mini {' '.join(argv[1:]) if argv and argv[0].endswith('galore-mini') else 'compare'}`",
        f"- {data_description}",
        f"- batch {config.batch_size} × grad-accum {config.grad_accum} rows of {config.seq_len} tokens, seed "
        f"{config.seed}, cosine schedule with {config.resolved_warmup()} warm-up steps to "
        f"{config.min_lr_ratio}× the peak, clip {config.grad_clip}, GaLore scale {config.scale}, "
        f"T {config.update_proj_gap}",
        "- memory measured on the live model and optimizer after training (fp32)",
        f"- wall time {wall_s / 60:.1f} min",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n" + format_table(results) + "\n")
    finite = [r for r in results if r.get("weights_bytes")]
    model = os.path.basename(config.model)
    plot_losses(curves, os.path.join(out, "loss.png"), title=f"{model}: training (thin) and validation (dots) loss")
    plot_memory(finite, os.path.join(out, "memory.png"), title=f"{model}: weights + optimizer state")
