"""`galore-mini` command line: pretrain, compare, memory, finetune.

Each subcommand's module registers itself with `register(subparsers)` (``galore_mini.cli.memory``,
``galore_mini.cli.pretrain``, ``galore_mini.cli.finetune``); bad input surfaces as one
line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from galore_mini.cli import memory
from galore_mini.errors import UsageError
from galore_mini.cli import finetune as finetune_cli, pretrain as pretrain_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galore-mini",
        description="Memory-efficient LLM training with GaLore, Adam-mini and GaLore-mini.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pretrain_cli.register(sub)
    memory.register(sub)
    finetune_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as exc:
        print(f"galore-mini {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"galore-mini {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
