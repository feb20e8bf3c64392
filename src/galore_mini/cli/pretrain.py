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
import os
import sys
from typing import Any

from galore_mini.errors import UsageError
from galore_mini.methods import DEMO_METHODS
from galore_mini.train.compare import (compare, format_table, method_settings, parse_lr,  # noqa: F401  (re-exported)
                                       parse_methods, write_results)
from galore_mini.train.config import (TrainConfig, config_fields, field_help, flag, leaves, load_config_file,
                                      make_config, value_type)
from galore_mini.train.loop import leave_distributed, train

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
    configs = {method: make_config(None, **method_settings(settings, method), out=os.path.join(args.out, method),
                                   lr=lrs.get(method))
               for method in methods}
    results, wall = compare(configs, args.out, sys.argv)
    print(format_table(results))
    print(f"\n{len(methods)} methods in {wall / 60:.1f} min; results in {args.out}/results.md, loss.png, memory.png")
    if all(row.get("diverged") for row in results):  # a comparison in which nothing trained is no success
        print(f"galore-mini: error: every method diverged ({', '.join(methods)}); lower --lr", file=sys.stderr)
        return 2
    return 0


