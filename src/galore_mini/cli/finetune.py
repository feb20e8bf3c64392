"""``galore-mini finetune``: several methods fine-tune one model on one task; a table, plots, resumable.

With no ``--model`` the offline demo model is used: ``tiny`` pretrained with AdamW for
``DEMO_PRETRAIN_STEPS`` steps on the default corpus (Python's docs) into ``OUT/pretrain``
(reused when it is already there). With no ``--task`` the offline task ``debian-sections``
is used (Debian package descriptions → archive section). See docs/finetuning.md.

Examples::

    galore-mini finetune                                   # the offline demo (= make finetune-demo)
    galore-mini finetune --model runs/pretrain --task reviews.csv --methods full,lora,galore_mini
    galore-mini finetune --model roberta-base --task glue/mrpc --rank 8 --lr 2e-5 --epochs 30 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from galore_mini.errors import UsageError
from galore_mini.train.config import DEFAULT_GAP, FINETUNE_DEFAULT_METHODS, FINETUNE_METHODS, FinetuneConfig, TrainConfig
from galore_mini.train.finetune import WARMUP_RATIO, run_finetune
from galore_mini.train.loop import train
from galore_mini.train.compare import parse_lr
from galore_mini.train.tasks import load_task

DEMO_PRETRAIN_STEPS = 300
DEMO_SEEDS = (0, 1, 2)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune one model with several methods on a labelled task and tabulate them",
        description="Fine-tune one pretrained model with several methods (full, LoRA, GaLore, GaLore-mini, "
                    "Adam-mini) on one task; write results.json, results.md and plots. With no --model/--task: "
                    "the offline demo.")
    p.add_argument("--model", help="Hugging Face model folder or hub id, or a `galore-mini pretrain --out` folder "
                                   "(default: the demo's tiny model, pretrained into OUT/pretrain)")
    p.add_argument("--task", help="CSV/TSV/JSONL file (text[, text_pair], label), a folder with train.* and "
                                  "validation.*, glue/<name>, or debian-sections (the default)")
    p.add_argument("--val", metavar="FILE", help="validation file for --task FILE (default: a deterministic 10%%)")
    p.add_argument("--methods", default=",".join(FINETUNE_DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(FINETUNE_METHODS)} "
                        f"(default: {','.join(FINETUNE_DEFAULT_METHODS)})")
    p.add_argument("--layerwise", action="store_true", help="galore_mini updates each weight inside backward()")
    p.add_argument("--rank", type=int, default=8, help="GaLore's and LoRA's rank (default: 8)")
    p.add_argument("--scale", type=float, default=None,
                   help="GaLore scale α for galore and galore_mini (default: per method, 16/rank for galore "
                        "as in the paper's recipe, 4/rank for galore_mini)")
    p.add_argument("--update-proj-gap", type=int, default=DEFAULT_GAP, help=f"GaLore's T (default: {DEFAULT_GAP})")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="freeze the embeddings in lora/galore/galore_mini (default: every method trains them)")
    p.add_argument("--epochs", type=int, default=3, help="epochs (default: 3)")
    p.add_argument("--lr", metavar="LR|METHOD=LR,...", default=None,
                   help="peak LR for all methods, or per method (default: each method's, see docs/finetuning.md)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per update (default: 16)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example, longer ones truncated (default: min(128, the model's positions))")
    p.add_argument("--seed", default=None, metavar="N[,N...]",
                   help="seed(s); several give mean ± std (default: 0; the demo: 0,1,2)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (default: 1; 0: off)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", default="runs/finetune", help="results folder (default: runs/finetune)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(func=run_cli)
    p.epilog = f"Warm-up {WARMUP_RATIO:.0%} of the updates, then linear decay to 0."


def _parse_seeds(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seed={text!r}: give integers separated by commas") from None


def demo_model(out: str, log=lambda m: None, steps: int = DEMO_PRETRAIN_STEPS) -> str:
    """`tiny` pretrained with AdamW on the default corpus into ``OUT/pretrain`` (reused when finished there)."""
    folder = Path(out) / "pretrain"
    final = folder / "final.json"
    if final.is_file() and (folder / "checkpoint.pt").is_file() and "diverged" not in json.loads(final.read_text()):
        log(f"reusing the pretrained demo model in {folder}")
        return str(folder)
    log(f"pretraining the demo model (tiny, AdamW, {steps} steps on the default corpus) into {folder}")
    train(TrainConfig(model="tiny", method="full", steps=steps, out=str(folder), resume=True, device="cpu",
                      eval_every=0, save_every=100))
    return str(folder)


def run_cli(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    demo = args.model is None
    seeds = _parse_seeds(args.seed, DEMO_SEEDS if demo else (0,))
    config = FinetuneConfig(model=args.model or "", task=args.task, val=args.val, methods=methods,
                            layerwise=args.layerwise, rank=args.rank, scale=args.scale,
                            update_proj_gap=args.update_proj_gap, freeze_embeddings=args.freeze_embeddings,
                            epochs=args.epochs, lr=parse_lr(args.lr, list(methods)), batch_size=args.batch_size,
                            max_length=args.max_length, seeds=seeds, grad_clip=args.grad_clip, out=args.out,
                            device=args.device, progress=args.progress)
    if demo:
        config.validate()
        load_task(config.task, config.val)  # a bad task fails before the pretraining run, not after it
        config.model = demo_model(args.out, log)
    results = run_finetune(config, log=log)
    print((Path(args.out) / "results.md").read_text())
    return 0 if results else 1
